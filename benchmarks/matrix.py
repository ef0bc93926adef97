"""The architecture matrix: every architecture of `benchmarks.archs` compiled for every profile,
each case in a fresh process with a time limit, as a new user would try it.

For each (architecture, profile) it records the outcome (ok / `FxCompressError` with its
message / `InternalError` / another exception / timeout), the techniques applied, the relative
output error on a batch the calibration never saw, the objective's ratio (file size for size
profiles, the profile's estimated latency for latency profiles) and whether the result goes
through `torch.export`, and to the profile's own file where it has one: the `.pte` for
mobile-arm, the `.onnx` for x86-server (`fxcompress.export.export`).

Each case runs in a child forked from a parent that has imported torch, transformers and
fxcompress but run nothing (so the child starts fresh and in a second, not in ten), one
thread, `--limit` seconds. Results accumulate in `benchmarks/results/zoo.json` (a rerun of a
subset replaces those cases) and `benchmarks/results/zoo.md` is written from all of it.

    .venv/bin/python benchmarks/matrix.py [--archs bert gpt2] [--profiles mobile-arm]
                                          [--limit 300] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.* as a script

import torch  # noqa: E402

import fxcompress  # noqa: E402
from benchmarks import code_revision, conditions, publish  # noqa: E402
from benchmarks.archs import ARCHS  # noqa: E402
from fxcompress.errors import FxCompressError, InternalError  # noqa: E402
from fxcompress.export import export as export_file  # noqa: E402

PROFILES = ("x86-server", "mobile-arm", "nvidia-gpu", "apple-ane", "mcu-int8", "fpga-binary")
#: the profile whose deployable file is checked, and its suffix
FILES = {"mobile-arm": ".pte", "x86-server": ".onnx"}
#: relative output error: loose enough that int8-only targets (mcu-int8) are reachable on
#: random-weight models, so every technique's code is exercised; the default 0.01 refuses
#: most mcu-int8 cases with the documented error (the rewrites the target requires exceed it)
TOLERANCE = 0.05
CALIBRATION = 16  # batches of 2: a quarter (8 examples) held out to judge plans on
UNSEEN_SEED = 1000
OUT_JSON = ROOT / "benchmarks" / "results" / "zoo.json"
OUT_MD = ROOT / "benchmarks" / "results" / "zoo.md"


def _outcome(e: BaseException) -> tuple[str, str]:
    kind = ("FxCompressError" if isinstance(e, FxCompressError)
            else "InternalError" if isinstance(e, InternalError) else type(e).__name__)
    return kind, " ".join(str(e).split())[:400]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(arch: str, profile: str, files: bool = True) -> dict:
    """Compile `arch` for `profile` in this process and measure it (see the module doc)."""
    family, build = ARCHS[arch]
    model, x = build(seed=0)
    calib = [build(seed=i)[1] for i in range(1, CALIBRATION + 1)]
    unseen = build(seed=UNSEEN_SEED)[1]
    row: dict = {"arch": arch, "family": family, "profile": profile,
                 "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    try:
        small = fxcompress.compile(model, x, profile=profile, calibration=calib,
                                   tolerance=TOLERANCE, seed=0)
    except Exception as e:  # the outcome is what is measured
        row["outcome"], row["message"] = _outcome(e)
        row["trace"] = traceback.format_exc()[-1500:]
        row["seconds"] = time.perf_counter() - t0
        return row
    row["seconds"] = time.perf_counter() - t0
    rep = small.meta["fxcompress_report"]
    row["outcome"], row["message"] = "ok", ""
    row["techniques"] = sorted({la.applied.split("(")[0] for la in rep.layers
                                if la.applied != "none"})
    row["size_ratio"] = rep.serialized_bytes_after / rep.serialized_bytes_before
    row["latency_ratio"] = rep.latency_after_us / max(rep.latency_before_us, 1e-12)
    row["objective"] = rep.objective
    layers = [la for la in rep.layers if not la.name.startswith("prune[")]  # groups: deltas
    row["weight_ratio"] = (sum(la.bytes_after for la in layers)
                           / max(sum(la.bytes_before for la in layers), 1))
    with torch.no_grad():
        row["unseen_error"] = relative_error(small(*unseen), model(*unseen))
    try:
        torch.export.export(small, x, strict=False)
        row["export"] = "ok"
    except Exception as e:
        row["export"] = "{}: {}".format(*_outcome(e))
    suffix = FILES.get(profile)
    if files and suffix:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                export_file(small, x, Path(tmp) / f"model{suffix}",
                                         profile=profile)
                row["file"] = "ok"
            except Exception as e:
                row["file"] = "{}: {}".format(*_outcome(e))
                row["file_trace"] = traceback.format_exc()[-1500:]
                try:  # the uncompressed model, to tell the exporter's limits from ours
                    export_file(model, x, Path(tmp) / f"original{suffix}", profile=profile)
                    row["file_original"] = "ok"
                except Exception as e2:
                    row["file_original"] = "{}: {}".format(*_outcome(e2))
    return row


def _child(arch: str, profile: str, conn) -> None:
    torch.set_num_threads(1)
    try:
        conn.send(run_case(arch, profile))
    except BaseException as e:  # building the model itself failed
        kind, msg = _outcome(e)
        conn.send({"arch": arch, "profile": profile, "family": ARCHS[arch][0],
                   "outcome": kind, "message": msg, "trace": traceback.format_exc()[-1500:]})
    conn.close()


def run_isolated(arch: str, profile: str, limit: float) -> dict:
    """`run_case` in a forked child, killed after `limit` seconds."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(arch, profile, send), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    row = None
    if recv.poll(limit):
        try:
            row = recv.recv()
        except EOFError:
            row = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if row is None:
        timed_out = time.perf_counter() - t0 >= limit
        row = {"arch": arch, "profile": profile, "family": ARCHS[arch][0],
               "outcome": "timeout" if timed_out else "crashed",
               "message": f"over {limit:.0f} s" if timed_out else
               f"the process died (exit code {proc.exitcode})"}
    return row


def _cell(row: dict) -> str:
    if row["outcome"] != "ok":
        return f"**{row['outcome']}**"
    techs = "+".join(row["techniques"]) or "none"
    ratio = row["size_ratio"] if row["objective"] == "size" else row["latency_ratio"]
    flags = []
    if row.get("export") != "ok":
        flags.append("export ✗")
    if row.get("file", "ok") != "ok":
        flags.append("file ✗")
    return f"{techs} · {ratio:.2f}× · {row['unseen_error']:.3f}" + (
        " · " + ", ".join(flags) if flags else "")


def provenance(rows: list[dict]) -> str:
    """Which commit each column's cases ran at (rows recorded before commits were: "earlier")."""
    by: dict[str, dict[str, int]] = {}
    for r in rows:
        cols = by.setdefault(r.get("rev", "earlier"), {})
        cols[r["profile"]] = cols.get(r["profile"], 0) + 1
    parts = []
    for rev, cols in sorted(by.items(), key=lambda kv: kv[0] == "earlier"):
        what = ", ".join(f"{p} ({n})" for p, n in cols.items())
        parts.append(f"at commit {rev}: {what}" if rev != "earlier"
                     else f"in earlier runs, before each case recorded its commit: {what}")
    return "cases run " + "; ".join(parts)


def write_markdown(rows: list[dict], seconds: float, taken: str) -> None:
    """benchmarks/results/zoo.md from every recorded case; `taken`: how the runs were timed."""
    by = {(r["arch"], r["profile"]): r for r in rows}
    archs = [a for a in ARCHS if any((a, p) in by for p in PROFILES)]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    n = len(rows)
    ok = counts.get("ok", 0)
    files = [r for r in rows if "file" in r]
    grew = [r for r in rows if r["outcome"] == "ok"
            and (r["size_ratio"] if r["objective"] == "size" else r["latency_ratio"]) > 1.0]
    over = [r for r in rows if r["outcome"] == "ok" and r["unseen_error"] > TOLERANCE]
    lines = [
        "# The architecture matrix",
        "",
        f"Generated by `benchmarks/matrix.py`; do not edit by hand. {len(archs)} `transformers` "
        f"architectures (`benchmarks/archs.py`: tiny configs, seeded random weights) × "
        f"{len(PROFILES)} profiles, each case `fxcompress.compile(model, x, profile=p, "
        f"calibration=<{CALIBRATION} batches of 2>, tolerance={TOLERANCE})` in a fresh forked "
        f"process, one thread, with a time limit; {taken}; the runs behind this table "
        f"took {seconds / 60:.1f} min; {provenance(rows)}.",
        "",
        "Cell: techniques applied · the objective after / before (size profiles: bytes of the "
        "`.pt2`; latency profiles: the profile's estimated latency) · relative output error on "
        "a batch the calibration never saw. ✗ marks a result `torch.export` or the profile's "
        "file (`.pte` for mobile-arm, `.onnx` for x86-server) refused; details below.",
        "",
        f"**{ok} of {n} cases ok ({100 * ok / max(n, 1):.0f} %)**; by outcome: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; files written: "
        f"{sum(r['file'] == 'ok' for r in files)} of {len(files)}; objective larger than the "
        f"original's: {len(grew)}"
        + ("" if not grew else " (" + ", ".join(
            f"{r['arch']} × {r['profile']}: file {r['size_ratio']:.2f}×, weights "
            f"{r.get('weight_ratio', 1):.2f}×" for r in grew) + ")")
        + f"; error on the unseen batch above the tolerance: {len(over)}"
        + ("" if not over else " (" + ", ".join(
            f"{r['arch']} × {r['profile']} {r['unseen_error']:.3f}" for r in over) + ")")
        + ".",
        "",
        "A larger objective than the original's can only come from rewrites the target "
        "requires: where a rewrite is optional the planner counts the bytes its ops add to a "
        "small model's program and never returns a larger file than a shorter plan would "
        "give. On mcu-int8 every layer that can run int8 must (the target has no float "
        "kernels), and on these 10–120 k-parameter models the `.pt2` records of the quantize / "
        "dequantize ops outweigh the weight bytes saved (the weights ratio above). The unseen "
        "batch is 2 examples; the tolerance is judged on the 8 held-out calibration examples "
        "by a bootstrap bound, which random-weight models with widely spread per-example "
        "errors make loose (`holdout.md` measures the promise on trained models).",
        "",
        "| architecture | family | params | " + " | ".join(PROFILES) + " |",
        "|---|---|---|" + "---|" * len(PROFILES),
    ]
    for a in archs:
        params = next((by[a, p].get("params") for p in PROFILES if (a, p) in by), None)
        cells = [_cell(by[a, p]) if (a, p) in by else "" for p in PROFILES]
        lines.append(f"| {a} | {ARCHS[a][0]} | {params or 0:,} | " + " | ".join(cells) + " |")
    notes = [r for r in rows if r["outcome"] != "ok" or r.get("export", "ok") != "ok"
             or r.get("file", "ok") != "ok"]
    if notes:
        lines += ["", "## Cases that did not go through, and why", ""]
        for r in notes:
            what = (r["message"] if r["outcome"] != "ok"
                    else r.get("file") if r.get("file", "ok") != "ok" else r.get("export"))
            if "file_original" in r:
                what += (" — the uncompressed model's file: " + (
                    "written" if r["file_original"] == "ok" else "fails too"))
            lines.append(f"- **{r['arch']} × {r['profile']}** ({r['outcome']}): {what}")
    publish(OUT_MD, lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cases, merge them into zoo.json, rewrite zoo.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="*", default=list(ARCHS))
    ap.add_argument("--profiles", nargs="*", default=list(PROFILES))
    ap.add_argument("--limit", type=float, default=300.0, help="seconds per case")
    ap.add_argument("--jobs", type=int, default=1, help="cases run at once")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.archs) - set(ARCHS)) + sorted(set(args.profiles) - set(PROFILES))
    if unknown:
        ap.error(f"unknown: {unknown}")
    old = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {"rows": [],
                                                                         "seconds": 0.0}
    taken = old.get("conditions", "")
    keep = {(r["arch"], r["profile"]): r for r in old["rows"]}
    cases = [(a, p) for a in args.archs for p in args.profiles]
    start = time.perf_counter()
    rev = code_revision()
    if cases:
        taken = conditions()
    torch.set_num_threads(1)
    for a in args.archs:  # imports each architecture's modules here, once, before the forks
        ARCHS[a][1]()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda c: run_isolated(*c, args.limit), cases):
            row["rev"] = rev
            keep[row["arch"], row["profile"]] = row
            what = _cell(row) if row["outcome"] == "ok" else row["message"][:150]
            print(f"{row['arch']:>16} × {row['profile']:<11} {row['outcome']:<15} "
                  f"{row.get('seconds', 0):6.1f} s  {what}", flush=True)
            OUT_JSON.write_text(json.dumps({"rows": list(keep.values()),
                                            "seconds": old["seconds"],
                                            "conditions": taken}, indent=1))
    seconds = time.perf_counter() - start
    full = len(cases) == len(ARCHS) * len(PROFILES)
    total = seconds if full else old["seconds"] + seconds
    rows = [keep[a, p] for a in ARCHS for p in PROFILES if (a, p) in keep]
    OUT_JSON.write_text(json.dumps({"rows": rows, "seconds": total, "conditions": taken},
                                   indent=1))
    write_markdown(rows, total, taken)
    bad = [r for r in rows if r["outcome"] not in ("ok", "FxCompressError")]
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
