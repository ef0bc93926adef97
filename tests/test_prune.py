"""prune: dependency groups, exact removal of dead channels on every zoo model, importance,
least-squares compensation, and the planner / int8 integration."""

import copy

import pytest
import torch
from torch import nn

import fxcompress
from benchmarks.zoo import ZOO, calibration
from fxcompress.calibration import Calibration
from fxcompress.capture import capture
from fxcompress.graph import find_layers, get_attr
from fxcompress.passes.int8 import Int8Config, int8_pass
from fxcompress.passes.prune import (
    PruneConfig,
    consumer_grams,
    prune_pass,
    uniform_config,
    unit_importance,
)
from fxcompress.passes.prune.depgraph import analyze


def _captured(model, inputs):
    cap = capture(model, inputs)
    layers = find_layers(cap.graph_module)
    return cap, layers


def _rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _kill(gm, dg, group, idx) -> None:
    """Make units `idx` of `group` dead: zero every parameter slice that carries them."""
    dead = torch.tensor([group.units[i] for i in idx])
    for t in group.params:
        p = get_attr(gm, t)
        for axis, labels in dg.param_labels[t].items():
            mask = torch.isin(dg.find[labels.clamp_min(0)], dead) & (labels >= 0)
            with torch.no_grad():
                p.index_fill_(axis, mask.nonzero().flatten(), 0.0)


def _params(gm) -> int:
    return sum(p.numel() for p in gm.parameters()) + sum(b.numel() for b in gm.buffers()
                                                         if b.is_floating_point())


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_prune_fixed_ratio_and_exact_dead_channels(name):
    model, x = ZOO[name]()
    cap, layers = _captured(model, x)
    gm = cap.graph_module
    ref = gm(*x)

    # fixed ratio: half of every prunable group goes, shapes out stay, export still works
    half = copy.deepcopy(gm)
    cfg = uniform_config(half, 0.5, "l2")
    assert cfg.remove, f"{name}: nothing prunable"
    assert prune_pass(half, cfg).modified
    half.graph.lint()
    assert half(*x).shape == ref.shape
    assert _params(half) < _params(gm)
    torch.export.export(half, x, dynamic_shapes=cap.dynamic_shapes, strict=False)

    # exactness: kill a quarter of each group's prunable units; activation importance finds
    # them (they score 0), the pass removes them all and the output does not move
    dg = analyze(gm)
    gen = torch.Generator().manual_seed(0)
    remove = {}
    for g in dg.groups:
        pr = g.prunable
        if len(pr) < 2:
            continue
        pick = sorted(torch.randperm(len(pr), generator=gen)[: max(1, len(pr) // 4)].tolist())
        remove[g.name] = tuple(pr[i] for i in pick)
        _kill(gm, dg, g, remove[g.name])
    ref = gm(*x)
    calib = Calibration(gm, [x], {lay.node: lay.op for lay in layers})
    for g in dg.groups:
        if g.name in remove and g.consumers:
            imp = unit_importance(gm, dg, g, "activation", calib.stats)
            assert all(float(imp[i]) == 0.0 for i in remove[g.name]), g.name
    pruned = copy.deepcopy(gm)
    prune_pass(pruned, PruneConfig(remove, consumer_grams(dg, calib.stats)))
    pruned.graph.lint()
    n_removed = sum(sum(g.unit_channels[i] for i in remove[g.name]) for g in dg.groups
                    if g.name in remove)
    assert n_removed > 0
    out = pruned(*x)
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-5
    # every remaining unit of each group is still there: exactly the dead ones went
    after = analyze(pruned)
    for g in dg.groups:
        if g.name in remove:
            assert len(after.group(g.name).units) == len(g.units) - len(remove[g.name])
    torch.export.export(pruned, x, dynamic_shapes=cap.dynamic_shapes, strict=False)


def test_groups_of_bert_heads_ffn_and_blocked_residual():
    model, x = ZOO["bert"]()
    cap, _ = _captured(model, x)
    dg = analyze(cap.graph_module)
    heads = dg.group("model.bert.encoder.layer.0.attention.self.query")
    assert len(heads.units) == 4 and set(heads.unit_channels) == {8}
    assert {p.layer.rsplit(".", 1)[-1] for p in heads.producers} == {"query", "key", "value"}
    assert [c.layer.rsplit(".", 1)[-1] for c in heads.consumers] == ["dense"]
    ffn = dg.group("model.bert.encoder.layer.0.intermediate.dense")
    assert len(ffn.prunable) == 64
    residual = dg.group("model.bert.encoder.layer.0.attention.output.dense")
    assert not residual.prunable
    assert any("layer_norm" in r for r in residual.reasons())
    # the logits keep their shape
    assert any("model output" in r for r in dg.group("model.classifier").reasons())


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.cumsum(self.a(x), dim=1)  # mixes channels: not element-wise
        y = self.b(torch.relu(y))
        return self.head(y.mean((2, 3)))


def test_unknown_op_blocks_its_group_with_the_reason():
    torch.manual_seed(0)
    cap, _ = _captured(_Unknown().eval(), (torch.randn(2, 3, 8, 8),))
    dg = analyze(cap.graph_module)
    a = dg.group("a")
    assert not a.prunable
    assert any("cumsum" in r and "not understood" in r for r in a.reasons())
    assert len(dg.group("b").prunable) == 8  # the rest of the graph is unaffected
    cfg = uniform_config(cap.graph_module, 0.5)
    assert "a" not in cfg.remove and "b" in cfg.remove
    with pytest.raises(ValueError, match="blocked"):
        prune_pass(copy.deepcopy(cap.graph_module), PruneConfig({"a": (0,)}))


def test_importance_bn_scale_and_magnitude_find_zeroed_units():
    model, x = ZOO["residual_cnn"]()
    cap, _ = _captured(model, x)
    gm = cap.graph_module
    dg = analyze(gm)
    g = dg.group("b1.0")
    bn = [t for t in g.params if t in dg.norm_scales][0]
    with torch.no_grad():
        get_attr(gm, bn)[[3, 7]] = 0.0
    imp = unit_importance(gm, dg, g, "bn_scale")
    assert sorted(imp.argsort()[:2].tolist()) == [3, 7]
    _kill(gm, dg, g, (5,))
    with torch.no_grad():
        for c in g.consumers:
            get_attr(gm, c.weight)[:, 5] = 0.0
    for kind in ("l1", "l2"):
        assert int(unit_importance(gm, dg, g, kind).argmin()) == 5


def test_least_squares_refit_beats_plain_removal():
    model, x = ZOO["residual_cnn"]()
    cap, layers = _captured(model, x)
    gm = cap.graph_module
    cal = calibration("residual_cnn", 6)
    calib = Calibration(gm, cal, {lay.node: lay.op for lay in layers})
    plain = uniform_config(gm, 0.5, "activation", calib.stats, refit=False)
    refit = uniform_config(gm, 0.5, "activation", calib.stats, refit=True)
    assert refit.grams and plain.remove == refit.remove
    errs = []
    for cfg in (plain, refit):
        g2 = prune_pass(copy.deepcopy(gm), cfg).graph_module
        errs.append(calib.error_of(g2))
    assert errs[1] < errs[0]


def test_prune_then_int8_reads_pruned_shapes():
    model, x = ZOO["depthwise_cnn"]()
    cap, layers = _captured(model, x)
    gm = cap.graph_module
    ref = gm(*x)
    pruned = prune_pass(copy.deepcopy(gm), uniform_config(gm, 0.25)).graph_module
    q = int8_pass(pruned, Int8Config(frozenset(lay.name for lay in layers))).graph_module
    q.graph.lint()
    q.recompile()
    assert any(b.dtype == torch.int8 for b in q.buffers())
    out = q(*x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    torch.export.export(q, x, dynamic_shapes=cap.dynamic_shapes, strict=False)


def test_compile_plans_prune_groups_with_int8():
    model, x = ZOO["residual_cnn"]()
    cal = calibration("residual_cnn", 4)
    small = fxcompress.compile(model, x, profile="mobile-arm", calibration=cal, tolerance=0.05,
                               techniques=["prune", "int8"])
    small.graph.lint()
    report = small.meta["fxcompress_report"]
    applied = {lay.name: lay.applied for lay in report.layers}
    assert any(k.startswith("prune[") and v.startswith("prune(") for k, v in applied.items())
    assert report.error <= 0.05
    assert report.macs_after < report.macs_before
    blocked = next(lay for lay in report.layers if lay.name == "prune[head]")
    assert "model output" in blocked.reason
    with torch.no_grad():
        assert small(*x).shape == model(*x).shape
    torch.export.export(small, x, strict=False)
