"""Sparsity (issue #21): masks compared, and sparse storage in the planner's plans.

Three parts, each its own section of ``benchmarks/results/sparse.md`` (``--parts`` runs some;
the others keep their saved rows in ``sparse.json``):

- ``docs_lm``: every linear of the docs language model at 50 % unstructured and at 2:4, the
  kept values at full width, by magnitude, Wanda and SparseGPT (`compile` with
  ``techniques=["sparse"]`` on apple-ane narrowed to the one pattern, the method as the
  ``sparse`` setting, a tolerance that takes every layer); perplexity on its held-out windows.
- ``docs_ane``: the docs language model on apple-ane (objective size) at tolerance 0.05, with
  and without ``sparse``: ``.pt2`` bytes over fp32's and the held-out perplexity.
- ``minilm``: the pretrained MiniLM on apple-ane (objective size) at tolerance 0.2, with and
  without ``sparse`` among its techniques, and on x86-server with objective size (a ``.pt2``
  target, where share's entropy-coded palettes are offered): ``.pt2`` bytes over fp32's and
  the cosines on the 1000 sentences no compile saw.
- ``digits``: the digits CNN on apple-ane, tolerance 1 point of evaluate() = per-image
  accuracy on a validation set (the calibration images and a quarter of the train split; the
  planner accepts a plan when the 95 % upper bound of the drop is within the point),
  post-training and with recovery (300 labelled steps on the rest of the train split), with
  and without ``sparse``: ``.pt2`` bytes over fp32's, validation and test accuracy.

    .venv/bin/python benchmarks/sparse.py [--parts docs_lm docs_ane minilm digits] [--from-json]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.* as a script

import fxcompress  # noqa: E402
from benchmarks import (  # noqa: E402
    code_revision,
    conditions,
    lowbit,  # noqa: E402
    publish,
)
from benchmarks.models import accuracy, digits_data, load_pretrained  # noqa: E402

OUT_MD = ROOT / "benchmarks" / "results" / "sparse.md"
OUT_JSON = ROOT / "benchmarks" / "results" / "sparse.json"
PARTS = ("docs_lm", "docs_ane", "minilm", "digits")
ANE = fxcompress.load_profile("apple-ane")
#: a tolerance every single-pattern plan is within: every layer the planner can rewrite is
EVERYTHING = 10.0
MINILM_TOL = 0.2
#: MiniLM's extra row: a target that loads the `.pt2` (whose archive inflates records), where
#: share's entropy-coded palettes are offered under the size objective
MINILM_EXTRA = (("x86-server, objective size (entropy-coded palettes offered)", "x86-server",
                 "size"),)
#: the docs language model's tolerance in the other benchmarks (lowbit's whole planner)
DOCS_TOL = 0.05
WITHOUT = [t for t in ANE.techniques if t != "sparse"]
#: every this-many-th train image goes to the digits validation set instead of recovery
VAL_EVERY = 4


def _sizes(gm) -> tuple[int, float]:
    """The compiled program's bytes and their ratio to the original's, as the report counts
    them: the `.pt2` program `fxcompress.export` writes, without the compile report and the
    example rows it also puts in the archive (the report grows with every candidate a
    technique proposes, and is not the model)."""
    rep = gm.meta["fxcompress_report"]
    return rep.serialized_bytes_after, rep.serialized_bytes_after / rep.serialized_bytes_before


def _kinds(gm) -> dict:
    out: dict[str, int] = {}
    for la in gm.meta["fxcompress_report"].layers:
        key = la.applied.split("(")[0] if la.applied != "none" else "fp32"
        if key == "sparse":
            key += f"/{la.params['pattern']}/{la.params['sparsity']:g}/{la.params['values']}"
        out[key] = out.get(key, 0) + 1
    return out


def docs_rows() -> list[dict]:
    """Perplexity at 50 % unstructured and 2:4 by each mask method (every linear)."""
    case = lowbit.case_of("docs_lm")
    with torch.no_grad():
        ref = case.outputs(case.model)
    rows = [{"row": "fp32", **case.metric(ref, ref)}]
    for pattern, levels in (("unstructured", (0.5,)), ("2:4", ())):
        prof = dataclasses.replace(ANE, name=f"apple-ane, {pattern} only",
                                   sparsity_patterns=(pattern,), sparsity_levels=levels,
                                   sparsity_value_bits=())
        for method in ("magnitude", "wanda", "sparsegpt"):
            t0 = time.perf_counter()
            gm = fxcompress.compile(case.model, case.example, profile=prof,
                                    calibration=case.calib, techniques=["sparse"],
                                    tolerance=EVERYTHING, objective="size", seed=0,
                                    overrides={"*": {"sparse": {"method": method}}})
            secs = time.perf_counter() - t0
            with torch.no_grad():
                out = case.outputs(gm)
            rep = gm.meta["fxcompress_report"]
            row = {"row": f"{pattern}{' 50 %' if levels else ''}, {method}",
                   **case.metric(out, ref), "error": float(rep.error), "layers": _kinds(gm),
                   "compile_s": secs}
            print(row, flush=True)
            rows.append(row)
    return rows


def planner_rows(name: str, tolerance: float, extra: tuple = ()) -> list[dict]:
    """Model `name` on apple-ane (objective size) at `tolerance`, with and without sparse,
    and the `extra` rows: (label, profile, objective)."""
    case = lowbit.case_of(name)
    with torch.no_grad():
        ref = case.outputs(case.model)
    rows = []
    for label, profile, techniques, objective in (
            ("apple-ane without sparse", "apple-ane", WITHOUT, None),
            ("apple-ane (with sparse)", "apple-ane", None, None),
            *((lab, prof, None, obj) for lab, prof, obj in extra)):
        t0 = time.perf_counter()
        gm = fxcompress.compile(case.model, case.example, profile=profile,
                                calibration=case.calib, tolerance=tolerance, seed=0,
                                techniques=techniques, objective=objective)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            out = case.outputs(gm)
        size, ratio = _sizes(gm)
        row = {"row": label, "bytes": size, "ratio": ratio, **case.metric(out, ref),
               "error": float(gm.meta["fxcompress_report"].error), "layers": _kinds(gm),
               "compile_s": secs}
        print(row, flush=True)
        rows.append(row)
    return rows


def _correct(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """100 x correct per image: evaluate()'s per-example form, which the planner judges by
    the upper end of a bootstrap interval of the drop rather than as measured."""
    with torch.no_grad():
        return 100.0 * (model(x).argmax(-1) == y).float()


def digits_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits splits as a user with a validation set has them: calibration (128), a
    validation set (calibration plus every fourth train image, 433) that evaluate() scores,
    the other train images (914) that recovery trains on, and the test split (450), which
    nothing fits, trains on or selects with."""
    xc, yc = digits_data("calib")
    xtr, ytr = digits_data("train")
    val = torch.arange(len(ytr)) % VAL_EVERY == 0
    return {"calib": (xc, yc), "val": (torch.cat([xc, xtr[val]]), torch.cat([yc, ytr[val]])),
            "train": (xtr[~val], ytr[~val]), "test": digits_data("test")}


def digits_rows() -> list[dict]:
    """The digits CNN on apple-ane within 1 point of validation accuracy, with and without
    sparse, with and without recovery."""
    m = load_pretrained("digits_cnn").eval()
    sp = digits_splits()
    xc, _ = sp["calib"]
    xv, yv = sp["val"]
    xtr, ytr = sp["train"]
    xt, yt = sp["test"]
    buf = io.BytesIO()  # the fp32 program as torch.export.save writes it, for comparison
    ep = torch.export.export(m, (xc[:8],))
    ep.example_inputs = None  # as the report counts the program: without example rows
    torch.export.save(ep, buf)
    plain = buf.getbuffer().nbytes
    fp32_acc = accuracy(m, xt, yt)
    rows = [{"row": "fp32", "test_acc": fp32_acc},
            {"row": "fp32, torch.export.save's own file", "bytes": plain, "test_acc": fp32_acc}]
    for label, techniques in (("without sparse", WITHOUT), ("with sparse", None)):
        for rec in (None, fxcompress.Recover(steps=300, lr=1e-3, data=[(xtr,)], labels=ytr,
                                             stages=3, train_others=True, others_lr=1e-4)):
            t0 = time.perf_counter()
            gm = fxcompress.compile(m, (xc[:8],), profile="apple-ane", calibration=[(xc,)],
                                    evaluate=lambda g: _correct(g, xv, yv), tolerance=1.0,
                                    techniques=techniques, recover=rec, seed=0)
            secs = time.perf_counter() - t0
            size, ratio = _sizes(gm)
            rows[0].setdefault("bytes", gm.meta["fxcompress_report"].serialized_bytes_before)
            rows[0]["ratio"] = 1.0
            rows[1]["ratio"] = plain / rows[0]["bytes"]
            row = {"row": f"{label}, {'with recovery' if rec else 'post-training'}",
                   "bytes": size, "ratio": ratio, "plain_ratio": size / plain,
                   "val_acc": float(_correct(gm, xv, yv).mean()),
                   "test_acc": accuracy(gm, xt, yt),
                   "layers": _kinds(gm), "compile_s": secs}
            print(row, flush=True)
            rows.append(row)
    rows[0]["val_acc"] = rows[1]["val_acc"] = float(_correct(m, xv, yv).mean())
    return rows


def _layers(d: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((d or {}).items()))


def _cell(r: dict, key: str, fmt: str) -> str:
    return format(r[key], fmt) if key in r else ""


#: part -> (title, what its figures are, column headers, the cells of a row)
SECTIONS = {
    "docs_lm": ("docs_lm: every linear sparse, by mask method",
                "Perplexity on the held-out windows; kept values at full width.",
                ["row", "perplexity", "increase %", "error", "layers", "compile s"],
                lambda r: [r["row"], f"{r['ppl']:.2f}", f"{r['ppl_increase']:+.2f}",
                           _cell(r, "error", ".4f"), _layers(r.get("layers")),
                           _cell(r, "compile_s", ".1f")]),
    "docs_ane": (f"docs_lm on apple-ane (objective size), tolerance {DOCS_TOL:g}",
                 "Perplexity on the held-out windows.",
                 ["row", ".pt2 bytes", "× fp32", "perplexity", "increase %", "error", "layers",
                  "compile s"],
                 lambda r: [r["row"], f"{r['bytes']:,}", f"{r['ratio']:.3f}", f"{r['ppl']:.2f}",
                            f"{r['ppl_increase']:+.2f}", f"{r['error']:.4f}",
                            _layers(r["layers"]), f"{r['compile_s']:.1f}"]),
    "minilm": (f"MiniLM on apple-ane (objective size) and x86-server (objective size), "
               f"tolerance {MINILM_TOL:g}",
               "Cosines and top-5 on 1000 sentences no compile saw.",
               ["row", ".pt2 bytes", "× fp32", "mean cos", "worst cos", "top-5", "error",
                "layers", "compile s"],
               lambda r: [r["row"], f"{r['bytes']:,}", f"{r['ratio']:.3f}",
                          f"{r['cos_mean']:.4f}", f"{r['cos_worst']:.4f}", f"{r['top5']:.3f}",
                          f"{r['error']:.4f}", _layers(r["layers"]), f"{r['compile_s']:.1f}"]),
    "digits": ("digits CNN on apple-ane, within 1 point of validation accuracy",
               "evaluate() scores each of the 433 validation images (the 128 calibration "
               "images and every fourth train image; recovery trains on the other 914) and the "
               "planner accepts a plan when the 95 % upper bound of the paired bootstrap "
               "interval of the accuracy drop is within 1 point. Test accuracy on the test "
               "split (450), which nothing fits, trains on or selects with.",
               ["row", ".pt2 bytes", "× fp32", "1 / ratio", "1 / ratio to torch's fp32 file",
                "val acc %", "test acc %", "layers", "compile s"],
               lambda r: [r["row"], f"{r['bytes']:,}", f"{r['ratio']:.4f}",
                          f"{1 / r['ratio']:.1f}",
                          f"{1 / r['plain_ratio']:.1f}" if "plain_ratio" in r else "",
                          _cell(r, "val_acc", ".2f"), f"{r['test_acc']:.2f}",
                          _layers(r.get("layers")), _cell(r, "compile_s", ".1f")]),
}


def render(saved: dict) -> list[str]:
    """The results file."""
    lines = ["# Sparsity: masks compared, sparse storage in plans", "",
             "Generated by `benchmarks/sparse.py`; do not edit by hand. Each part says the "
             "commit and conditions it ran at. Sizes: bytes of the `.pt2` program "
             "`fxcompress.export` writes (the report's serialized size: without the compile "
             "report and example rows the archive also carries), over the fp32 model's "
             "written the same way. From 387079a on, that file is torch's archive "
             "recompressed (records that deflate to 0.9 of their bytes or less stored "
             "deflated: the program's JSON, some codes) and without source lines; parts "
             "measured before it count torch's archive as written. Parts measured with "
             "share's entropy-coded palettes also deflate each record with Huffman codes "
             "alone where that is smaller (unordered byte codes). "
             "\"error\": the compile's measured relative output error on its held-out "
             "calibration batches. \"layers\": rewrites per kind "
             "(sparse/pattern/fraction zeroed/kept values).", ""]
    for part, (title, what, headers, cells) in SECTIONS.items():
        p = saved.get("parts", {}).get(part)
        if p is None:
            continue
        lines += [f"## {title}", "", f"At {p['rev']}; {p['cond']}. {what}", "",
                  "| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
        lines += ["| " + " | ".join(cells(r)) + " |" for r in p["rows"]]
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts and write ``benchmarks/results/sparse.md``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--from-json", action="store_true", help="render the saved rows again")
    args = ap.parse_args(argv)
    saved = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {"parts": {}}
    if not args.from_json:
        warnings.filterwarnings("ignore")
        torch.set_num_threads(2)
        torch.manual_seed(0)
        run = {"docs_lm": docs_rows, "docs_ane": lambda: planner_rows("docs_lm", DOCS_TOL),
               "minilm": lambda: planner_rows("minilm", MINILM_TOL, MINILM_EXTRA),
               "digits": digits_rows}
        for part in args.parts:
            cond, rev = conditions(), code_revision()
            saved["parts"][part] = {"rows": run[part](), "cond": cond, "rev": rev}
            OUT_JSON.write_text(json.dumps(saved, indent=1))
    publish(OUT_MD, render(saved))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
