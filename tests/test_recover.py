"""Accuracy recovery: the student computes what the built graph computes, training lowers the
error, the stored form is unchanged, and the settings are validated."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fxcompress.hardware_profiles import load_profile
from torch import nn

import fxcompress
from fxcompress.calibration import Calibration, OverrideInterpreter
from fxcompress.capture import capture
from fxcompress.graph import find_layers
from fxcompress.planner import build, build_options, measure
from fxcompress.recover import Recover, Student, fine_tune


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(),
                      nn.Linear(96, 10))
    return m.eval()


def _data(n=256) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(1))


def _plan(techniques=("svd", "int8"), profile="nvidia-gpu"):
    """The graph, its options and a plan with every layer at its most compressed candidate."""
    x = _data()
    gm = capture(_model(), (x[:4],), None).graph_module
    layers = find_layers(gm)
    calib = Calibration(gm, [(x,)], {lay.node: lay.op for lay in layers})
    # nvidia-gpu runs int8 weight-only, whose candidates simulate through their steps: those are
    # the ones recovery trains (static Q/DQ int8 keeps a custom simulation and stays frozen)
    options = build_options(gm, layers, calib, load_profile(profile), "size", techniques, 0,
                            calibrated=True, user_techniques=True, scale_batch=1.0)
    measure(options, calib)
    choice = {}
    for o in options:
        if o.candidates:
            choice[o.layer.name] = min(o.candidates, key=lambda c: (c.stored_bytes, c.error))
    return gm, options, calib, choice, x


def test_student_computes_the_built_graph_and_write_back_is_faithful():
    gm, options, calib, choice, x = _plan()
    assert any("svd" in c.technique and "int8" in c.technique for c in choice.values())
    built = build(gm, choice).graph_module
    built.graph.lint()
    student = Student(gm, options, choice, train_unchanged=True)
    assert not student.frozen
    sim = {}
    for c in choice.values():
        sim.update(c.simulation())
    with torch.no_grad():
        ys = student(x)
        yb = built(x)
        ysim = OverrideInterpreter(gm, sim).run(x)
    # the straight-through quantizers compute exactly what the planner simulates for the
    # target (int8 weights and activations)
    assert torch.allclose(ys, ysim, rtol=1e-4, atol=1e-5)
    # untrained latents written back give the same graph again
    new_gm, trained = student.write_back()
    rebuilt = build(new_gm, {n: trained.get(n, c) for n, c in choice.items()}).graph_module
    rebuilt.graph.lint()
    assert torch.allclose(rebuilt(x), yb, rtol=1e-4, atol=1e-5)


def test_fine_tune_lowers_the_error_and_keeps_the_stored_form():
    gm, options, calib, choice, x = _plan()
    before = build(gm, choice).graph_module
    err0 = calib.error_of(before)
    student = Student(gm, options, choice, train_unchanged=True)
    steps = fine_tune(student, gm, Recover(steps=60, lr=2e-3), (x,), None, 0, None, kind="mse")
    assert steps == 60
    new_gm, trained = student.write_back()
    after = build(new_gm, {n: trained.get(n, c) for n, c in choice.items()}).graph_module
    after.graph.lint()
    err1 = calib.error_of(after)
    assert err1 < 0.8 * err0, (err0, err1)
    stored = {k: (v.dtype, tuple(v.shape)) for k, v in before.state_dict().items()}
    assert {k: (v.dtype, tuple(v.shape)) for k, v in after.state_dict().items()} == stored
    assert any(v.dtype == torch.int8 for v in after.state_dict().values())


def test_compile_with_recover_is_deterministic_exportable_and_reported():
    x = _data()
    kw = dict(profile="mobile-arm", calibration=[(x,)], tolerance=0.3, techniques=["svd"],
              objective="size", seed=0)
    plain = fxcompress.compile(_model(), (x[:4],), **kw)
    rec = Recover(steps=40, lr=2e-3, stages=0, features=True)
    a = fxcompress.compile(_model(), (x[:4],), recover=rec, **kw)
    b = fxcompress.compile(_model(), (x[:4],), recover=rec, **kw)
    a.graph.lint()
    torch.export.export(a, (x[:4].clone(),), strict=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    ra, rp = a.meta["fxcompress_report"], plain.meta["fxcompress_report"]
    assert ra.error < rp.error
    assert ra.serialized_bytes_after == pytest.approx(rp.serialized_bytes_after, rel=0.02)
    lines = [n for n in ra.notes if n.startswith("recovery stage")]
    assert len(lines) == 1 and "accepted" in lines[0]


def test_labels_mix_in_hard_targets():
    gm, options, calib, choice, x = _plan(("svd",), profile="mobile-arm")
    labels = gm(x).argmax(-1)
    student = Student(gm, options, choice, train_unchanged=False)
    fine_tune(student, gm, Recover(steps=30, lr=2e-3, labels=labels, alpha=0.7), (x,), labels,
              0, None, kind="kl")
    new_gm, trained = student.write_back()
    after = build(new_gm, {n: trained.get(n, c) for n, c in choice.items()}).graph_module
    before = build(gm, choice).graph_module
    # the model is random, its logits near uniform, so argmax agreement is noise; what mixing in
    # labels must do is lower the hard-target loss
    with torch.no_grad():
        ce = lambda g: float(torch.nn.functional.cross_entropy(g(x), labels))  # noqa: E731
        assert ce(after) < 0.95 * ce(before)


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(alpha=1.5), "alpha must be in [0, 1]"),
    (dict(stages=-1), "stages must be an integer >= 0"),
    (dict(soft_loss="l1"), "use 'kl'"),
    (dict(data=torch.zeros(3, 32)), "not a tensor"),
    (dict(labels=torch.zeros(3)), "int64 tensor"),
    (dict(time_budget=0), "seconds > 0"),
])
def test_recover_settings_are_validated(kwargs, words):
    with pytest.raises(fxcompress.FxCompressError, match=None) as e:
        Recover(**kwargs)
    assert words in str(e.value)


def test_compile_rejects_a_wrong_recover_and_mismatched_labels():
    x = _data(64)
    with pytest.raises(fxcompress.FxCompressError, match="fxcompress.Recover"):
        fxcompress.compile(_model(), (x[:4],), profile="mobile-arm", recover={"steps": 3})
    with pytest.raises(fxcompress.FxCompressError, match="one label per example"):
        fxcompress.compile(_model(), (x[:4],), profile="mobile-arm", calibration=[(x,)],
                           tolerance=0.3, techniques=["svd"], objective="size",
                           recover=Recover(steps=2, labels=torch.zeros(5, dtype=torch.int64)))


def test_an_untrainable_layer_passes_gradients_to_the_layers_before_it():
    gm, options, calib, choice, x = _plan(("svd",))
    last = options[-1]
    node = last.layer.node

    def through_int8(args, kwargs):  # a custom simulation that rounds through an integer type
        y = torch.nn.functional.linear(*args[:3])
        return (y * 64).round().to(torch.int8).float() / 64

    frozen = dataclasses.replace(last.base, technique="custom", overrides={node: through_int8})
    student = Student(gm, options, {last.layer.name: frozen}, train_unchanged=True)
    assert last.layer.name in student.frozen
    loss = student(x).square().sum()
    loss.backward()
    first = student.entries[options[0].layer.name].latents[0]
    assert first.grad is not None and float(first.grad.abs().sum()) > 0
