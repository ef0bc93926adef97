"""Benchmark of weight sharing (`share`): file sizes, errors, accuracy, clustering time.

1. The trained text transformer with every layer (embeddings included) shared at n bits by the
   pass directly: `torch.export.save` bytes before / after, relative output error of the
   logits on the test split, test accuracy; nearest-entry indices against error-compensating
   ones (GPTQ-style, through each linear's input second moment and each embedding's output
   Hessian), and which layer kinds the compensation helps.
2. The same model through `fxcompress.compile` on `apple-ane`, tolerance 0.05: share alone,
   and prune + share + int8 (pruned groups with their layers shared on top).
3. The trained digits CNN: 4-bit sharing alone, and the planner on `apple-ane` with share
   alone and stacked (int8; prune -> share -> int8; with SVD too), tolerance 0.05 relative
   output error; test accuracy drop reported.
4. Clustering time of every weight of a BERT-base-sized model (transformers `BertConfig()`,
   random weights) at 4 bits, one lookup table per tensor and one per 16 output channels, on
   1 and 2 threads, interleaved.

Writes `benchmarks/results/share.md`.

    .venv/bin/python benchmarks/share.py
"""

from __future__ import annotations

import copy
import io
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* as a script

import fxcompress  # noqa: E402
from benchmarks import conditions  # noqa: E402
from benchmarks.models import digits_data, load_pretrained, text_data  # noqa: E402
from fxcompress.calibration import Calibration  # noqa: E402
from fxcompress.capture import capture  # noqa: E402
from fxcompress.graph import find_layers  # noqa: E402
from fxcompress.passes import share  # noqa: E402
from fxcompress.passes_infra import run_passes  # noqa: E402

OUT = Path(__file__).parent / "results" / "share.md"


def file_bytes(m, x: tuple) -> int:
    """Bytes of `torch.export.save` of `m` exported on (cloned) `x`."""
    buf = io.BytesIO()
    ep = torch.export.export(m, tuple(t.clone() for t in x), strict=False)
    torch.export.save(ep, buf)
    return buf.getbuffer().nbytes


def accuracy(m, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy in percent; unlike `fxcompress.accuracy` it never calls `.eval()`, which an
    exported program's module refuses (every model here is captured in eval mode)."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((m(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y)


def rel_error(a, b, x: torch.Tensor, batch: int = 256) -> float:
    """||b(x) - a(x)|| / ||a(x)|| over `x`."""
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            ya, yb = a(x[i:i + batch]).double(), b(x[i:i + batch]).double()
            num += float(((yb - ya) ** 2).sum())
            den += float((ya ** 2).sum())
    return (num / den) ** 0.5


def shared_at(gm, bits: int, grouped: bool, lut_int8: bool, calib,
              compensate: tuple[str, ...] = ("linear", "embedding")):
    """`gm` with every layer shared at `bits`, through the pass manager."""
    cfg = share.uniform_config(gm, bits, grouped, lut_int8, calib=calib, compensate=compensate)
    return run_passes(copy.deepcopy(gm), [("share", share.share_pass, cfg)]).graph_module


def planner_row(model, gm, x, techs, calibration, xt, yt, acc0) -> tuple[str, str]:
    """A table row for `compile(profile="apple-ane", techniques=techs, tolerance=0.05)`, and
    the layers' choices."""
    t0 = time.perf_counter()
    comp = fxcompress.compile(model, x, profile="apple-ane", techniques=techs,
                              calibration=calibration, tolerance=0.05)
    secs = time.perf_counter() - t0
    rep = comp.meta["fxcompress_report"]
    acc = accuracy(comp, xt, yt)
    row = (f"| planner, apple-ane, {'+'.join(techs)}, tolerance 0.05 | "
           f"{rep.serialized_bytes_after} | "
           f"{rep.serialized_bytes_after / rep.serialized_bytes_before:.3f}x | "
           f"{rep.error:.4f} | {rel_error(gm, comp, xt):.4f} | {acc:.2f} % | "
           f"{acc0 - acc:.2f} | {secs:.0f} |")
    print(row, flush=True)
    return row, f"- {'+'.join(techs)}: " + "; ".join(
        f"{lay.name}: {lay.applied}" for lay in rep.layers if lay.applied != "none")


PLANNER_HEAD = ["| rewrite | file bytes | size ratio | calib. error | test rel. error | "
                "test accuracy | drop (points) | compile s |", "|---|---|---|---|---|---|---|---|"]


def _setup(name: str, data, calib_rows: int | None):
    """The trained model, its calib / test data, its captured graph and layers, calibration
    statistics from the first `calib_rows` calib examples (all: None), the graph's file bytes
    and the model's test accuracy."""
    model = load_pretrained(name)
    xc, _ = data("calib")
    xt, yt = data("test")
    x = (xc[:8].clone(),)
    gm = capture(model, x).graph_module
    layers = find_layers(gm)
    calib = Calibration(gm, [(xc[:calib_rows],)], {lay.node: lay.op for lay in layers})
    return model, xc, xt, yt, x, gm, layers, calib, file_bytes(gm, x), accuracy(model, xt, yt)


def text_rows() -> list[str]:
    """Sections 1 and 2."""
    model, xc, xt, yt, x, gm, layers, calib, before, acc0 = _setup("text_transformer",
                                                                   text_data, 256)
    rows = ["## Text transformer (trained on Python documentation), every layer shared", "",
            f"{sum(p.numel() for p in model.parameters())} parameters, {len(layers)} layers "
            f"(embeddings included); `torch.export.save` {before} bytes; test accuracy "
            f"{acc0:.2f} %. Statistics (importance, Hessians) from the first 256 windows of "
            f"the calibration split. Error: relative output error of the logits, "
            f"sqrt(sum (y' - y)^2 / sum y^2) over all {len(xt)} windows x 11 logits of the test "
            "split (no window of it is in the calibration split).", "",
            "Assignment: *nearest* = each weight to its nearest palette entry (importance-"
            "weighted k-means); *compensated* = indices chosen column by column with each "
            "column's rounding error pushed onto the later columns through the Cholesky "
            "factor of H^-1 (GPTQ), H = the linear's input second moment, or for embeddings "
            "the output Hessian E[J^T J] of the logits w.r.t. the embedding's output "
            "(autograd, one backward per logit).", "",
            "| bits | lookup tables | assignment | file bytes | size ratio | rel. output error | "
            "test accuracy |", "|---|---|---|---|---|---|---|"]
    both, none = ("linear", "embedding"), ()
    for bits, grouped, l8, comp in [(2, False, False, both), (3, False, False, none),
                                    (3, False, False, both), (4, False, False, none),
                                    (4, False, False, ("linear",)),
                                    (4, False, False, ("embedding",)),
                                    (4, False, False, both), (4, True, True, both),
                                    (6, False, False, both)]:
        out = shared_at(gm, bits, grouped, l8, calib, comp)
        size = file_bytes(out, x)
        kind = ("per 16 channels" if grouped else "per tensor") + (", int8" if l8 else "")
        how = "compensated (" + ", ".join(comp) + ")" if comp else "nearest"
        if comp == both:
            how = "compensated"
        rows.append(f"| {bits} | {kind} | {how} | {size} | {size / before:.3f}x | "
                    f"{rel_error(gm, out, xt):.4f} | {accuracy(out, xt, yt):.2f} % |")
        print(rows[-1], flush=True)
    calibration = [(xc[i:i + 64],) for i in range(0, 128, 64)]
    rows += ["", "### Through the planner (`compile`, profile apple-ane, tolerance 0.05 on the "
             "relative output error over 128 calibration windows)", "", *PLANNER_HEAD]
    notes = []
    for techs in (["share"], ["prune", "share", "int8"]):
        row, note = planner_row(model, gm, x, techs, calibration, xt, yt, acc0)
        rows.append(row)
        notes.append(note)
    return rows + ["", "The planner's choices (layers left alone omitted):", "", *notes, ""]


def digits_rows() -> list[str]:
    """Section 3."""
    model, xc, xt, yt, x, gm, layers, calib, before, acc0 = _setup("digits_cnn", digits_data,
                                                                   None)
    rows = ["## Digits CNN (trained on scikit-learn digits)", "",
            f"{sum(p.numel() for p in model.parameters())} parameters; `torch.export.save` "
            f"{before} bytes; test accuracy {acc0:.2f} %.", "",
            "| rewrite | file bytes | size ratio | test accuracy | drop (points) | rel. error |",
            "|---|---|---|---|---|---|"]
    for bits, grouped in ((4, False), (4, True), (3, True)):
        out = shared_at(gm, bits, grouped, False, calib)
        size, acc = file_bytes(out, x), accuracy(out, xt, yt)
        kind = "per 16 channels" if grouped else "per tensor"
        rows.append(f"| share {bits}-bit every layer, one table {kind} | {size} | "
                    f"{size / before:.3f}x | {acc:.2f} % | {acc0 - acc:.2f} | "
                    f"{rel_error(gm, out, xt):.4f} |")
        print(rows[-1], flush=True)
    rows += ["", "### Through the planner", "", *PLANNER_HEAD]
    notes = []
    for techs in (["share"], ["share", "int8"], ["svd", "share", "int8"],
                  ["prune", "share", "int8"], ["prune", "svd", "share", "int8"]):
        row, note = planner_row(model, gm, x, techs, [(xc,)], xt, yt, acc0)
        rows.append(row)
        notes.append(note)
    rows += ["", "Tolerance: relative output error on the calibration split "
             f"({len(xc)} images); accuracy on the test split ({len(xt)} images). "
             "The planner's choices (layers left alone omitted):", "", *notes, ""]
    return rows


def bert_rows(repeats: int = 3) -> list[str]:
    """Section 4: medians of `repeats` runs, thread counts and granularities interleaved."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    weights = [p.detach() for p in model.parameters() if p.dim() == 2]
    numel = sum(w.numel() for w in weights)
    configs = [(threads, grouped) for threads in (1, 2) for grouped in (False, True)]
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    saved = torch.get_num_threads()
    try:
        for _ in range(repeats):
            for threads, grouped in configs:
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                for w in weights:
                    share.cluster(w, 4, share.group_count(w.shape[0], grouped))
                times[(threads, grouped)].append(time.perf_counter() - t0)
                print("bert", threads, grouped, times[(threads, grouped)][-1], flush=True)
    finally:
        torch.set_num_threads(saved)
    rows = ["## Clustering time, BERT-base-sized (transformers `BertConfig()`, random weights)",
            "", f"{len(weights)} weight matrices (embeddings included), {numel / 1e6:.1f} M "
            f"weights, 4 bits, importance-uniform, nearest-entry assignment (the error-"
            f"compensating assignment needs calibration statistics); a 2-core host shared with "
            f"other work, so the runs are interleaved and the median of {repeats} reported.", "",
            "| threads | lookup tables | seconds (median) | runs |", "|---|---|---|---|"]
    for threads, grouped in configs:
        t = times[(threads, grouped)]
        rows.append(f"| {threads} | {'per 16 output channels' if grouped else 'per tensor'} | "
                    f"{statistics.median(t):.1f} | {', '.join(f'{v:.1f}' for v in t)} |")
    return rows + [""]


def main() -> None:
    """Run every section and write the table."""
    torch.set_num_threads(1)  # a shared host; section 4 sets its own thread counts
    rows = ["# Weight sharing (`share`)", "",
            "Generated by `benchmarks/share.py`; sizes are `torch.export.save` bytes; "
            f"{conditions()}.", ""]
    rows += text_rows()
    rows += digits_rows()
    rows += bert_rows()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    tmp.replace(OUT)
    print(OUT.read_text())


if __name__ == "__main__":
    main()
