"""Structured pruning: exactness on the model zoo, the digits CNN and the text transformer.

Writes benchmarks/results/prune.md. Run: .venv/bin/python benchmarks/prune.py [--quick]

1. Zoo exactness: a quarter of every prunable dependency group's units is made dead (every
   parameter slice carrying them zeroed); pruning removes exactly those units, and the output
   moves by less than 1e-5 (relative). Parameter counts before / after.
2. Digits CNN (trained on scikit-learn digits): `fxcompress.compile(techniques=["prune"])`
   with `evaluate=` accuracy on the calibration split and a 2-point tolerance, plus fixed
   ratios with and without least-squares compensation. MACs counted on the graph; test
   accuracy; eager latency of original vs pruned graph, interleaved medians.
3. Text transformer (trained on Python's documentation): heads and FFN neurons pruned, same
   measurements.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch import fx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxcompress  # noqa: E402
from benchmarks import conditions  # noqa: E402
from fxcompress.calibration import Calibration  # noqa: E402
from fxcompress.capture import capture  # noqa: E402
from fxcompress.graph import find_layers, get_attr, op_type  # noqa: E402
from fxcompress.host import interleaved  # noqa: E402
from fxcompress.passes.prune import PruneConfig, prune_pass, uniform_config  # noqa: E402
from fxcompress.passes.prune.depgraph import analyze  # noqa: E402

aten = torch.ops.aten
QUICK = "--quick" in sys.argv


class _Macs(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.macs = 0

    def run_node(self, n):
        out = super().run_node(n)
        kind = op_type(n)
        if kind in ("linear", "conv2d") or n.target in (aten.matmul.default, aten.bmm.default):
            args, _ = self.fetch_args_kwargs_from_env(n)
            w = args[1]
            inner = w.shape[-2] if n.target in (aten.matmul.default, aten.bmm.default) \
                else w[0].numel()
            self.macs += out.numel() * inner
        return out


def macs(gm: fx.GraphModule, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward on `x` (linear, conv, matmul)."""
    m = _Macs(gm)
    with torch.no_grad():
        m.run(x)
    return m.macs


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy in percent. (`fxcompress.accuracy` calls `.eval()`, which an
    exported program's module refuses; these graphs are inference graphs already.)"""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y)


def params(gm) -> int:
    """Parameter count (floating-point parameters and buffers)."""
    return sum(p.numel() for p in gm.parameters()) + sum(
        b.numel() for b in gm.buffers() if b.is_floating_point())


def zoo_exactness() -> list[str]:
    """Rows of the zoo table."""
    from benchmarks.zoo import ZOO

    rows = []
    for name, build in ZOO.items():
        model, x = build()
        cap = capture(model, x)
        gm = cap.graph_module
        layers = find_layers(gm)
        dg = analyze(gm)
        gen = torch.Generator().manual_seed(0)
        remove = {}
        for g in dg.groups:
            pr = g.prunable
            if len(pr) < 2:
                continue
            pick = torch.randperm(len(pr), generator=gen)[: max(1, len(pr) // 4)].tolist()
            remove[g.name] = tuple(sorted(pr[i] for i in pick))
            dead = torch.tensor([g.units[i] for i in remove[g.name]])
            for t in g.params:
                p = get_attr(gm, t)
                for axis, labels in dg.param_labels[t].items():
                    mask = torch.isin(dg.find[labels.clamp_min(0)], dead) & (labels >= 0)
                    with torch.no_grad():
                        p.index_fill_(axis, mask.nonzero().flatten(), 0.0)
        with torch.no_grad():
            ref = gm(*x)
        calib = Calibration(gm, [x], {lay.node: lay.op for lay in layers})
        pruned = prune_pass(copy.deepcopy(gm), PruneConfig(remove)).graph_module
        with torch.no_grad():
            out = pruned(*x)
        err = float((out - ref).norm() / ref.norm())
        torch.export.export(pruned, x, dynamic_shapes=cap.dynamic_shapes, strict=False)
        blocked = sum(1 for g in dg.groups if not g.prunable)
        units = sum(len(v) for v in remove.values())
        del calib
        rows.append(f"| {name} | {params(gm):,} | {params(pruned):,} | {len(dg.groups)} "
                    f"({blocked} blocked) | {units} | {err:.1e} | yes |")
        print(rows[-1], flush=True)
    return rows


def digits() -> list[str]:
    """Rows of the digits CNN section."""
    from benchmarks.models import digits_data, load_pretrained

    model = load_pretrained("digits_cnn")
    xc, yc = digits_data("calib")
    xt, yt = digits_data("test")
    cal = [(xc[i:i + 128],) for i in range(0, len(xc), 128)]
    cap = capture(model, (xc[:8],))
    gm = cap.graph_module
    layers = find_layers(gm)
    calib = Calibration(gm, cal, {lay.node: lay.op for lay in layers})
    one = xt[:1]
    base_macs, base_acc = macs(gm, one), accuracy(gm, xt, yt)
    xb = xt[:256]
    out = [f"Original: test accuracy {base_acc:.2f} %, {base_macs:,} MACs / image, "
           f"{params(gm):,} parameters.", "",
           "| variant | MACs / image | MACs saved | params | test acc. | drop (points) | "
           "eager speed-up (batch 256) |", "|---|---|---|---|---|---|---|"]

    def row(label, pruned):
        m = macs(pruned, one)
        acc = accuracy(pruned, xt, yt)
        t = interleaved(lambda: gm(xb), lambda: pruned(xb), runs=20 if QUICK else 60)
        out.append(f"| {label} | {m:,} | {100 * (1 - m / base_macs):.1f} % | "
                   f"{params(pruned):,} | {acc:.2f} % | {base_acc - acc:.2f} | "
                   f"{t.speedup:.2f}x |")
        print(out[-1], flush=True)

    t0 = time.perf_counter()
    small = fxcompress.compile(model, (xc[:8],), profile="mobile-arm", calibration=cal,
                               evaluate=lambda m: accuracy(m, xc, yc), tolerance=2.0,
                               techniques=["prune"])
    secs = time.perf_counter() - t0
    rep = small.meta["fxcompress_report"]
    chosen = [f"{lay.name[6:-1]}: {lay.params.get('removed')}" for lay in rep.layers
              if lay.applied.startswith("prune(")]
    row(f"compile(prune, evaluate, tol 2 pts) [{', '.join(chosen)}]", small)
    for ratio in ((0.5,) if QUICK else (0.375, 0.5, 0.625)):
        for refit in (False, True):
            cfg = uniform_config(gm, ratio, "activation", calib.stats, align=8, refit=refit)
            pruned = prune_pass(copy.deepcopy(gm), cfg).graph_module
            row(f"uniform {ratio:.3g} of every group, activation importance, "
                f"{'LS refit' if refit else 'no refit'}", pruned)
    out += ["", f"compile() took {secs:.1f} s."]
    return out


def text() -> list[str]:
    """Rows of the text transformer section."""
    from benchmarks.models import load_pretrained, text_data

    model = load_pretrained("text_transformer")
    xc, yc = text_data("calib")
    xt, yt = text_data("test")
    cal = [(xc[i:i + 64],) for i in range(0, min(len(xc), 512), 64)]
    cap = capture(model, (xc[:8],))
    gm = cap.graph_module
    layers = find_layers(gm)
    calib = Calibration(gm, cal, {lay.node: lay.op for lay in layers})
    one = xt[:1]
    base_macs, base_acc = macs(gm, one), accuracy(gm, xt, yt)
    xb = xt[:64]
    dg = analyze(gm)
    groups = [g for g in dg.groups if g.prunable]
    out = [f"Original: test accuracy {base_acc:.2f} %, {base_macs:,} MACs / sequence, "
           f"{params(gm):,} parameters. Prunable groups: "
           + ", ".join(f"{g.name} ({len(g.units)} units of {g.unit_channels[0]})"
                       for g in groups) + ".", "",
           "| variant | what went | MACs / seq. | params | test acc. | drop (points) | "
           "eager speed-up (batch 64) |", "|---|---|---|---|---|---|---|"]

    def row(label, what, pruned):
        m = macs(pruned, one)
        acc = accuracy(pruned, xt, yt)
        t = interleaved(lambda: gm(xb), lambda: pruned(xb), runs=15 if QUICK else 40)
        out.append(f"| {label} | {what} | {m:,} | {params(pruned):,} | {acc:.2f} % | "
                   f"{base_acc - acc:.2f} | {t.speedup:.2f}x |")
        print(out[-1], flush=True)

    def what(cfg: PruneConfig) -> str:
        parts = []
        for name, idx in cfg.remove.items():
            g = dg.group(name)
            kind = "heads" if g.unit_channels[0] > 1 else "neurons"
            parts.append(f"{name.split('blocks.')[-1]} -{len(idx)}/"
                         f"{len(g.units)} {kind}")
        return "; ".join(parts)

    small = fxcompress.compile(model, (xc[:8],), profile="mobile-arm", calibration=cal,
                               evaluate=lambda m: accuracy(m, xc, yc), tolerance=1.0,
                               techniques=["prune"])
    rep = small.meta["fxcompress_report"]
    chosen = "; ".join(f"{lay.name[6:-1].split('blocks.')[-1]} -{lay.params.get('removed')}"
                       for lay in rep.layers if lay.applied.startswith("prune("))
    row("compile(prune, evaluate, tol 1 pt)", chosen or "nothing", small)
    for ratio in (0.25, 0.5):
        cfg = uniform_config(gm, ratio, "activation", calib.stats, align=8, refit=True,
                             groups=[g.name for g in groups])
        row(f"uniform {ratio:g}, activation importance, LS refit", what(cfg),
            prune_pass(copy.deepcopy(gm), cfg).graph_module)
    return out


def main() -> None:
    """Run every section and write the markdown table."""
    torch.manual_seed(0)
    sections = ["# Structured pruning (`prune`)", "",
                f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                f"{conditions()}. Generated by `benchmarks/prune.py`"
                f"{' --quick' if QUICK else ''}; do not edit.", ""]
    sections += ["## Zoo: dead channels removed exactly", "",
                 "| model | params before | params after | groups | dead units removed | "
                 "rel. output error | torch.export |", "|---|---|---|---|---|---|---|"]
    sections += zoo_exactness()
    sections += ["", "## Digits CNN (scikit-learn digits)", ""] + digits()
    sections += ["", "## Text transformer (Python documentation topics)", ""] + text()
    path = ROOT / "benchmarks" / "results" / "prune.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(sections) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
