"""Benchmark of weight sharing (`share`): file sizes, errors, accuracy, clustering time.

1. The trained text transformer with every layer (embeddings included) shared at n bits by the
   pass directly (importance-weighted from calibration activations): `torch.export.save` bytes
   before / after, relative output error of the logits on the test split, test accuracy.
2. The same model through `fxcompress.compile` on `apple-ane`, share only, tolerance 0.05.
3. The trained digits CNN: 4-bit sharing alone, and the planner on `apple-ane` with share
   alone and stacked (with int8, and on SVD factors or pruned weights where those techniques
   are registered), tolerance 0.05 relative output error; test accuracy drop reported.
4. Clustering time of every weight of a BERT-base-sized model (transformers `BertConfig()`,
   random weights) at 4 bits, one lookup table per tensor and one per 16 output channels.

Writes `benchmarks/results/share.md`.

    .venv/bin/python benchmarks/share.py
"""

from __future__ import annotations

import copy
import io
import statistics
import time
from pathlib import Path

import torch
from fxcompress.passes import share

import fxcompress
from fxcompress.calibration import Calibration
from fxcompress.capture import capture
from fxcompress.graph import find_layers
from fxcompress.models import digits_data, load_pretrained, text_data
from fxcompress.passes_infra import run_passes
from fxcompress.technique import REGISTRY

OUT = Path(__file__).parent / "results" / "share.md"


def file_bytes(m, x: tuple) -> int:
    """Bytes of `torch.export.save` of `m` exported on (cloned) `x`."""
    buf = io.BytesIO()
    ep = torch.export.export(m, tuple(t.clone() for t in x), strict=False)
    torch.export.save(ep, buf)
    return buf.getbuffer().nbytes


def accuracy(m, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy in percent; unlike `models.accuracy` it never calls `.eval()`, which an
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


def shared_at(gm, bits: int, grouped: bool, lut_int8: bool, stats):
    """`gm` with every layer shared at `bits`, through the pass manager."""
    cfg = share.uniform_config(gm, bits, grouped, lut_int8, stats)
    return run_passes(copy.deepcopy(gm), [("share", share.share_pass, cfg)]).graph_module


def text_rows() -> list[str]:
    """Sections 1 and 2."""
    model = load_pretrained("text_transformer")
    xc, _ = text_data("calib")
    xt, yt = text_data("test")
    x = (xc[:8],)
    gm = capture(model, x).graph_module
    layers = find_layers(gm)
    calib = Calibration(gm, [(xc[:256],)], {lay.node: lay.op for lay in layers})
    before = file_bytes(gm, x)
    acc0 = accuracy(model, xt, yt)
    rows = ["## Text transformer (trained on Python documentation), every layer shared", "",
            f"{sum(p.numel() for p in model.parameters())} parameters, {len(layers)} layers "
            f"(embeddings included); `torch.export.save` {before} bytes; test accuracy "
            f"{acc0:.2f} %. Error: relative output error of the logits on the test split "
            f"({len(xt)} windows).", "",
            "| bits | lookup tables | file bytes | size ratio | rel. output error | "
            "test accuracy |", "|---|---|---|---|---|---|"]
    for bits, grouped, l8 in [(2, False, False), (3, False, False), (4, False, False),
                              (4, True, True), (6, False, False)]:
        out = shared_at(gm, bits, grouped, l8, calib.stats)
        size = file_bytes(out, x)
        kind = ("per 16 channels" if grouped else "per tensor") + (", int8" if l8 else "")
        rows.append(f"| {bits} | {kind} | {size} | {size / before:.3f}x | "
                    f"{rel_error(gm, out, xt):.4f} | {accuracy(out, xt, yt):.2f} % |")
        print(rows[-1], flush=True)
    t0 = time.perf_counter()
    comp = fxcompress.compile(model, x, profile="apple-ane", techniques=["share"],
                              calibration=[(xc[i:i + 64],) for i in range(0, 128, 64)],
                              tolerance=0.05)
    secs = time.perf_counter() - t0
    rep = comp.meta["fxcompress_report"]
    bits = sorted(f"{lay.name}:{lay.params.get('bits')}" for lay in rep.layers
                  if lay.applied != "none")
    rows += ["", "### Through the planner: `compile(profile=\"apple-ane\", "
             "techniques=[\"share\"], tolerance=0.05)`", "",
             "| file bytes before | after | ratio | calib. error | test rel. error | "
             "test accuracy | compile s |", "|---|---|---|---|---|---|---|",
             f"| {rep.serialized_bytes_before} | {rep.serialized_bytes_after} | "
             f"{rep.serialized_bytes_after / rep.serialized_bytes_before:.3f}x | "
             f"{rep.error:.4f} | {rel_error(gm, comp, xt):.4f} | "
             f"{accuracy(comp, xt, yt):.2f} % | {secs:.1f} |", "",
             "Bits chosen per layer: " + ", ".join(bits), ""]
    print("\n".join(rows[-6:]), flush=True)
    return rows


def digits_rows() -> list[str]:
    """Section 3."""
    model = load_pretrained("digits_cnn")
    xc, yc = digits_data("calib")
    xt, yt = digits_data("test")
    x = (xc[:8],)
    gm = capture(model, x).graph_module
    layers = find_layers(gm)
    calib = Calibration(gm, [(xc,)], {lay.node: lay.op for lay in layers})
    before = file_bytes(gm, x)
    acc0 = accuracy(model, xt, yt)
    rows = ["## Digits CNN (trained on scikit-learn digits)", "",
            f"{sum(p.numel() for p in model.parameters())} parameters; `torch.export.save` "
            f"{before} bytes; test accuracy {acc0:.2f} %.", "",
            "| rewrite | file bytes | size ratio | test accuracy | drop (points) | rel. error |",
            "|---|---|---|---|---|---|"]
    for bits, grouped in ((4, False), (4, True), (3, True)):
        out = shared_at(gm, bits, grouped, False, calib.stats)
        size, acc = file_bytes(out, x), accuracy(out, xt, yt)
        kind = "per 16 channels" if grouped else "per tensor"
        rows.append(f"| share {bits}-bit every layer, one table {kind} | {size} | "
                    f"{size / before:.3f}x | {acc:.2f} % | {acc0 - acc:.2f} | "
                    f"{rel_error(gm, out, xt):.4f} |")
        print(rows[-1], flush=True)
    notes = []
    for techs in (["share"], ["share", "int8"],
                  [t for t in ("prune", "svd", "share", "int8") if t in REGISTRY]):
        comp = fxcompress.compile(model, x, profile="apple-ane", techniques=techs,
                                  calibration=[(xc,)], tolerance=0.05)
        rep = comp.meta["fxcompress_report"]
        acc = accuracy(comp, xt, yt)
        rows.append(f"| planner, apple-ane, {'+'.join(techs)}, tolerance 0.05 | "
                    f"{rep.serialized_bytes_after} | "
                    f"{rep.serialized_bytes_after / rep.serialized_bytes_before:.3f}x | "
                    f"{acc:.2f} % | {acc0 - acc:.2f} | {rel_error(gm, comp, xt):.4f} |")
        print(rows[-1], flush=True)
        notes.append(f"- {'+'.join(techs)}: " + "; ".join(
            f"{lay.name}: {lay.applied}" for lay in rep.layers))
    rows += ["", "Tolerance: relative output error on the calibration split "
             f"({len(xc)} images); accuracy on the test split ({len(xt)} images). "
             "The planner's choices:", "", *notes, ""]
    return rows


def bert_rows(repeats: int = 1) -> list[str]:
    """Section 4: medians of `repeats` runs, the two granularities interleaved."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    weights = [p.detach() for p in model.parameters() if p.dim() == 2]
    numel = sum(w.numel() for w in weights)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for grouped in (False, True):
            t0 = time.perf_counter()
            for w in weights:
                share.cluster(w, 4, share.group_count(w.shape[0], grouped))
            times[grouped].append(time.perf_counter() - t0)
            print("bert", grouped, times[grouped][-1], flush=True)
    rows = ["## Clustering time, BERT-base-sized (transformers `BertConfig()`, random weights)",
            "", f"{len(weights)} weight matrices (embeddings included), {numel / 1e6:.1f} M "
            f"weights, 4 bits, importance-uniform; {torch.get_num_threads()} threads on a "
            f"shared 2-core host (heavily loaded while measured); median of {repeats}.", "",
            "| lookup tables | seconds (median) | runs |", "|---|---|---|"]
    for grouped in (False, True):
        rows.append(f"| {'per 16 output channels' if grouped else 'per tensor'} | "
                    f"{statistics.median(times[grouped]):.1f} | "
                    f"{', '.join(f'{t:.1f}' for t in times[grouped])} |")
    return rows + [""]


def main() -> None:
    """Run every section and write the table."""
    rows = ["# Weight sharing (`share`)", "",
            "Generated by `benchmarks/share.py`; sizes are `torch.export.save` bytes.", ""]
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
