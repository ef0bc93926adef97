"""Every profile in its target's own format: the trained digits CNN and text transformer,
compiled for each of the six target profiles and written by `fxcompress.export` in the
profile's `export_format` with its writer (`[backend] writer`: Core ML package, QONNX, TensorRT
ONNX, Cortex-M `.pte`, XNNPACK `.pte`, ONNX Runtime `.onnx`).

For each (model, profile): the file written, its bytes beside the same writer's file of the fp32
model (size / fp32), the check `export` ran before moving the file into place (its relative
output error against the compiled model, and what ran it), the compiled model's test accuracy
(eager PyTorch) and what each writer measured in its file (`ExportResult.details`). No timings:
the figures do not depend on the load. Writes `benchmarks/results/formats.md` and `.json`.

    .venv/bin/python benchmarks/formats.py [--models digits_cnn] [--profiles apple-ane]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.* as a script

import fxcompress  # noqa: E402
from benchmarks import code_revision, publish  # noqa: E402
from benchmarks.models import accuracy, correct, digits_data, load_pretrained, text_data  # noqa: E402
from fxcompress.errors import FxCompressError  # noqa: E402
from fxcompress.export import writer_for  # noqa: E402
from fxcompress.hardware_profiles import load_profile  # noqa: E402

OUT_MD = ROOT / "benchmarks" / "results" / "formats.md"
OUT_JSON = ROOT / "benchmarks" / "results" / "formats.json"
PROFILES = ("mobile-arm", "x86-server", "nvidia-gpu", "apple-ane", "mcu-int8", "fpga-binary")
#: x86-server's runtime is Inductor (`.pt2`); its ONNX Runtime file is the deployable one
FORMAT = {"x86-server": ".onnx"}
MODELS = {"digits_cnn": digits_data, "text_transformer": text_data}
#: accuracy budget in points of calibration-split accuracy, as in BENCHMARKS.md (compare.py)
ACC_BUDGET = 0.0
#: extra cases where the target's own technique needs a looser tolerance: binary layers cost the
#: digits CNN more than 10 points of accuracy, and without them a QONNX file has no BipolarQuant
#: to show; here binary and int8 alone (pruning would take the whole budget) at a relative
#: output error of 1.0 (no `evaluate`)
EXTRA = {"fpga-binary": 1.0}
EXTRA_TECHNIQUES = ["binary", "int8"]
BATCH = 32
#: a microcontroller runs one input at a time: its program (and the arena it plans) is batch 1
BATCH_OF = {"mcu-int8": 1}


def _details(details: dict) -> str:
    """The writer's own measurements, flattened to one cell."""
    parts = []
    for k, v in sorted(details.items()):
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in sorted(v.items()))
            parts.append(f"{k}: {{{v}}}")
        elif isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        else:
            parts.append(f"{k}={v}")
    return "; ".join(parts)


def _census(res) -> dict:
    """A `.pte`'s delegation census: operators the delegate took / left to portable kernels."""
    if not (res.delegated_ops or res.undelegated_ops):
        return {}
    return {"delegated_ops": sum(res.delegated_ops.values()),
            "portable_ops": sum(res.undelegated_ops.values())}


def run_case(name: str, profile: str, budget: float = ACC_BUDGET,
             relative: float | None = None) -> dict:
    """Compile model `name` for `profile`, write both files, return the row."""
    data = MODELS[name]
    model = load_pretrained(name).eval()
    x_cal, y_cal = data("calib")
    x_test, y_test = data("test")
    example = (x_cal[:BATCH_OF.get(profile, BATCH)].contiguous(),)
    calib = [(x_cal[i:i + 64],) for i in range(0, len(x_cal), 64)]
    prof = load_profile(profile)
    fmt = FORMAT.get(profile, prof.export_format)
    t0 = time.perf_counter()
    note = ""
    judge = (dict(evaluate=lambda m: correct(m, x_cal, y_cal), tolerance=budget)
             if relative is None else dict(tolerance=relative, techniques=EXTRA_TECHNIQUES))
    try:
        g = fxcompress.compile(model, example, profile=prof, calibration=calib, seed=0,
                               **judge)
    except FxCompressError as e:
        if "budget" not in str(e):
            raise
        # the model does not fit the target: the file is still written (the writer's figures
        # for this architecture), from a compile without the target's memory budgets
        note = "over the target's memory budget: " + str(e).split(";")[0][:200]
        prof = dataclasses.replace(prof, weight_budget_bytes=None,
                                   activation_budget_bytes=None)
        g = fxcompress.compile(model, example, profile=prof, calibration=calib, seed=0,
                               **judge)
    compile_s = time.perf_counter() - t0
    rep = g.meta["fxcompress_report"]
    applied = sorted({la.applied.split("(")[0] for la in rep.layers if la.applied != "none"})
    row = {"model": name, "profile": profile, "format": fmt,
           "writer": writer_for(fmt, prof if fmt == prof.export_format else None),
           "accuracy": accuracy(g, x_test, y_test), "applied": applied,
           "compile_s": compile_s, "note": note}
    with tempfile.TemporaryDirectory() as d:
        # the target's own profile: its writer, and its budgets in what the writer measures
        base = fxcompress.export(model, example, Path(d, "fp32" + fmt), profile=profile)
        t0 = time.perf_counter()
        res = fxcompress.export(g, example, Path(d, "compiled" + fmt), profile=profile)
        row.update(export_s=time.perf_counter() - t0, size=res.size_bytes,
                   fp32_size=base.size_bytes, check_error=res.check_error,
                   runtime=res.runtime, fp32_runtime=base.runtime,
                   details=dict(res.details, **_census(res)),
                   fp32_writer=base.writer)
    row["ratio"] = row["size"] / row["fp32_size"]
    return row


def write_markdown(rows: list[dict], started: str) -> None:
    """`formats.md` from the rows."""
    lines = [
        "# Every profile in its target's own format",
        "",
        "Generated by `benchmarks/formats.py`; do not edit by hand. "
        f"Last run {started}; each row's code in its commit column. Each model compiled for each "
        "profile with `fxcompress.compile(model, (x,), profile=..., calibration=<calibration "
        f"split>, evaluate=<calibration-split accuracy>, tolerance={ACC_BUDGET:g}, seed=0)` "
        "(the rows named with a relative error: `tolerance=` that, no `evaluate`, only the "
        "techniques named) and "
        "written with `fxcompress.export(result, (x,), path, profile=...)` in the profile's "
        "`export_format` by its writer (x86-server: its `.onnx`, for ONNX Runtime). fp32: the "
        "original model written by the same writer. Check: the relative output error of the "
        "file, run in what the check column names, against the compiled model in PyTorch, on "
        f"a batch of {BATCH} calibration examples (mcu-int8: 1, the batch its program is "
        "planned for); `export` refuses to write a file above its "
        "check tolerance. Accuracy: the compiled model's test-split accuracy (eager).",
        "",
        "| model | profile | file | writer | bytes | fp32 bytes | size / fp32 | check error | "
        "check ran in | test acc. | applied | measured in the file | notes | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['profile']} | — | — | — | — | — | — | — | — | "
                         f"— | — | failed: {r['error']} | {r.get('commit', '')} |")
            continue
        lines.append(
            f"| {r['model']} | {r['profile']} | {r['format']} | {r['writer']} | "
            f"{r['size']:,} | {r['fp32_size']:,} | {r['ratio']:.3f} | {r['check_error']:.2e} "
            f"| {r['runtime']} | {r['accuracy']:.2f} | {', '.join(r['applied']) or 'none'} | "
            f"{_details(r['details'])} | {r.get('note', '')} | {r.get('commit', '')} |")
    publish(OUT_MD, lines)


def main(argv: list[str] | None = None) -> int:
    """Run the cases asked for (all by default), merge them into the results, write them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--profiles", nargs="*", default=list(PROFILES))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    old = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else []
    done = {}
    for r in old:
        done[(r["model"], r["profile"])] = r
    cases = [(p, None, p) for p in args.profiles]
    cases += [(p, EXTRA[p], f"{p} (binary + int8, relative error {EXTRA[p]:g})")
              for p in args.profiles if p in EXTRA]
    for name in args.models:
        for profile, relative, label in cases:
            t0 = time.perf_counter()
            try:
                row = run_case(name, profile, relative=relative)
            except Exception as e:  # noqa: BLE001 - a failed case is reported, the run goes on
                traceback.print_exc()
                row = {"model": name, "profile": profile,
                       "error": f"{type(e).__name__}: {str(e)[:160]}"}
            row["commit"], row["profile"] = code_revision(), label
            print(f"{name} {label}: {time.perf_counter() - t0:.0f} s", flush=True)
            done[(name, label)] = row
    labels = [*PROFILES, *(f"{p} (binary + int8, relative error {b:g})" for p, b in EXTRA.items())]
    keys = sorted((k for k in done if k[1] in labels),
                  key=lambda k: (list(MODELS).index(k[0]), labels.index(k[1])))
    rows = [done[k] for k in keys]
    OUT_JSON.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    write_markdown(rows, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
