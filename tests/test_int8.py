"""int8: per-channel weights stored as int8, in each representation the profiles ask for (Q/DQ
as XNNPACK and ONNX Runtime fuse it, _int_mm for x86, weight-only dequant), static observers,
SQNR per layer type, serialized sizes, exportability, and simulation == build."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

import fxcompress
from fxcompress.acceptance import DEFAULT_HOLDOUT, split_batches
from fxcompress.capture import capture
from fxcompress.graph import find_layers
from fxcompress.hardware_profiles import load_profile
from fxcompress.host import host_isa, int8_weight_bits
from fxcompress.passes.int8 import (
    Int8Config,
    dequantize_per_channel,
    int8_pass,
    quantize_per_channel,
    step_mode,
)
from fxcompress.passes.int8.observers import OBSERVERS, affine_qparams, fake_quant_affine, observe

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return 10 * math.log10(float(ref.pow(2).sum()) / max(float((ref - out).pow(2).sum()), 1e-30))


class Net(torch.nn.Module):
    """Embedding, linears, a conv and a depthwise conv: every layer type int8 handles."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.l1 = torch.nn.Linear(16, 32)
        self.l2 = torch.nn.Linear(32, 16)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8 * 6 * 6 + 16, 4)

    def forward(self, img, ids):
        h = self.l2(torch.relu(self.l1(self.emb(ids)))).mean(1)
        c = self.dw(torch.relu(self.conv(img))).flatten(1)
        return self.fc(torch.cat([c, h], 1))


def _inputs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 50, (n, 7), generator=g)


def _profile(rep, act):
    # int_mm runs here, eagerly (torch._int_mm on oneDNN): weights in the range this CPU's
    # int8 GEMM computes exactly (7 bits without VNNI, whose 16-bit pair sums saturate)
    bits = int8_weight_bits(host_isa()) if rep == "int_mm" else 8
    return dataclasses.replace(load_profile("mobile-arm"), int8_representation=rep,
                               int8_activations=act, int8_ops=("linear", "conv2d", "embedding"),
                               int8_weight_bits=bits, int8_required=True)


def _compile(rep, act, model=None):
    torch.manual_seed(0)
    model = (model or Net()).eval()
    x = _inputs()
    calib = [_inputs(8, s) for s in range(3)]
    out = fxcompress.compile(model, x, profile=_profile(rep, act), techniques=["int8"],
                             calibration=calib, tolerance=0.5, objective="size")
    return model, x, calib, out


def test_weight_round_trip_and_sqnr_per_layer_type():
    torch.manual_seed(0)
    for w, floor in ((torch.randn(64, 128), 38.0), (torch.randn(16, 8, 3, 3), 38.0),
                     (torch.randn(16, 1, 3, 3), 38.0), (torch.randn(100, 32), 38.0)):
        q, s = quantize_per_channel(w, 0)
        assert q.dtype == torch.int8 and int(q.abs().max()) == 127
        assert s.shape == (w.shape[0],)
        assert sqnr(w, dequantize_per_channel(q, s, 0)) > floor
        # quantizing the dequantized weight again is exact (idempotent)
        q2, _ = quantize_per_channel(dequantize_per_channel(q, s, 0), 0)
        assert torch.equal(q, q2)


def test_observers_clip_outliers_and_include_zero():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[0] = 80.0  # one outlier
    lo_mm, hi_mm = observe(x, "minmax")
    assert hi_mm == 80.0
    for method in ("percentile", "mse"):
        lo, hi = observe(x, method)
        assert hi < hi_mm and lo <= 0 <= hi
        s, z = affine_qparams(lo, hi)
        s_mm, z_mm = affine_qparams(lo_mm, hi_mm)
        # mse: no worse than min-max over all values; percentile: finer on the bulk
        v = x if method == "mse" else x[1:]
        err = float((fake_quant_affine(v, s, z) - v).pow(2).mean())
        err_mm = float((fake_quant_affine(v, s_mm, z_mm) - v).pow(2).mean())
        assert err <= err_mm
    s, z = affine_qparams(0.0, 6.0)  # post-ReLU: the whole int8 range on [0, 6]
    assert z == -128 and abs(s - 6 / 255) < 1e-9
    assert set(OBSERVERS) == {"minmax", "percentile", "mse"}


def test_representation_per_op():
    assert step_mode("linear", 1, "qdq", "static") == "qdq_static"
    assert step_mode("conv2d", 8, "qdq", "static") == "qdq_static"
    assert step_mode("conv2d", 8, "qdq", "dynamic") == "weight_only"  # no dynamic depthwise
    assert step_mode("linear", 1, "int_mm", "dynamic") == "int_mm_dynamic"
    assert step_mode("conv2d", 1, "int_mm", "dynamic") == "weight_only"
    assert step_mode("embedding", 1, "qdq", "static") == "embedding"
    assert step_mode("linear", 1, "dequant", "static") == "weight_only"


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("rep,act", [("qdq", "static"), ("qdq", "dynamic"),
                                     ("int_mm", "dynamic"), ("int_mm", "static"),
                                     ("dequant", "none")])
def test_representations_build_what_the_planner_simulated(rep, act):
    model, x, calib, out = _compile(rep, act)
    out.graph.lint()
    rep_ = out.meta["fxcompress_report"]
    assert all(lay.applied.startswith("int8") for lay in rep_.layers)
    # every layer's weight is stored as int8, nothing as an fp32 weight any more
    int8_bufs = [b for n, b in out.named_buffers() if n.endswith("int8_weight")]
    assert len(int8_bufs) == 6 and all(b.dtype == torch.int8 for b in int8_bufs)
    assert not any(p.dim() > 1 and p.is_floating_point() and "scale" not in n
                   for n, p in list(out.named_parameters()) + list(out.named_buffers()))
    targets = _targets(out)
    if rep == "qdq" and act == "static":
        assert targets.count(qd.dequantize_per_channel.default) == 5
        # input and output pairs on each of the 5 linear / conv ops
        assert targets.count(qd.quantize_per_tensor.default) == 10
        for n in out.graph.nodes:
            if n.target in (aten.linear.default, aten.conv2d.default):
                assert n.args[0].target == qd.dequantize_per_tensor.default
                assert n.args[1].target == qd.dequantize_per_channel.default
                (user,) = n.users
                assert user.target == qd.quantize_per_tensor.default
    elif rep == "qdq":
        # the depthwise conv stays weight-only: XNNPACK has no dynamic depthwise conv
        assert targets.count(qd.choose_qparams.tensor) == 4
        assert targets.count(qd.quantize_per_tensor.tensor) == 4
    elif rep == "int_mm":
        assert targets.count(aten._int_mm.default) == 3
        assert aten.linear.default not in targets
    else:
        assert not any("quantized_decomposed" in str(t) or t == aten._int_mm.default
                       for t in targets)
    # the planner's simulation is the built graph's arithmetic (the reported error is the
    # held-out calibration batch's)
    err = out.meta["fxcompress_report"].error
    num = den = 0.0
    with torch.no_grad():
        for b in split_batches(calib, DEFAULT_HOLDOUT)[1]:
            y0, y = model(*b), out(*b)
            num += float((y - y0).pow(2).sum())
            den += float(y0.pow(2).sum())
    assert abs(math.sqrt(num / den) - err) < 1e-4
    assert err < 0.05
    # and it exports, with the batch dynamic
    torch.export.export(out, tuple(t.clone() for t in _inputs(3, 9)), strict=False)


class Encoder(torch.nn.Module):
    """A small transformer-like stack: embeddings and linears dominate the bytes."""

    def __init__(self, vocab=8000, d=128):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(32, d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.o = torch.nn.Linear(d, d)
        self.f1 = torch.nn.Linear(d, 4 * d)
        self.f2 = torch.nn.Linear(4 * d, d)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        q, k, v = self.qkv(h).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(1, 2) / 11.3, -1) @ v
        h = self.norm(h + self.o(a))
        return h + self.f2(torch.relu(self.f1(h)))


def _saved_size(gm, args):
    buf = io.BytesIO()
    torch.export.save(torch.export.export(gm, tuple(a.clone() for a in args), strict=False), buf)
    return buf.getbuffer().nbytes


def test_int8_transformer_with_embeddings_is_under_0_3x_serialized():
    torch.manual_seed(0)
    model = Encoder().eval()
    ids = torch.randint(0, 8000, (2, 16))
    gm = capture(model, (ids,)).graph_module
    before = _saved_size(gm, (ids,))
    names = frozenset(lay.name for lay in find_layers(gm))
    # int_mm runs eagerly here: the weight range this CPU's int8 GEMM computes exactly
    wqmax = (1 << (int8_weight_bits(host_isa()) - 1)) - 1
    res = int8_pass(gm, Int8Config(names, "int_mm", "dynamic", weight_qmax=wqmax))
    assert res.modified
    res.graph_module.graph.lint()
    res.graph_module.recompile()
    after = _saved_size(res.graph_module, (ids,))
    assert after < 0.3 * before
    with torch.no_grad():
        assert sqnr(model(ids), res.graph_module(ids)) > 30


def test_static_config_without_qparams_is_our_error_not_silent():
    torch.manual_seed(0)
    model, x = Net().eval(), _inputs()
    gm = capture(model, x).graph_module
    names = frozenset(lay.name for lay in find_layers(gm))
    with pytest.raises(ValueError, match="act_params"):
        int8_pass(gm, Int8Config(names, "qdq", "static"))


def test_int8_stacks_on_svd_factors():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 16)).eval()
    with torch.no_grad():  # a rank-8 weight: its SVD factors are exact, then int8 on both
        model[0].weight.copy_(torch.randn(128, 8) @ torch.randn(8, 128) / 30)
    x = torch.randn(64, 128)
    out = fxcompress.compile(model, (x,), profile=_profile("qdq", "static"),
                             techniques=["svd", "int8"], tolerance=0.2, objective="size")
    applied = [lay.applied for lay in out.meta["fxcompress_report"].layers]
    assert any(a.startswith("svd+int8") for a in applied), applied
    out.graph.lint()
    with torch.no_grad():
        y0, y = model(x), out(x)
    err = float((y - y0).norm() / y0.norm())
    assert abs(err - out.meta["fxcompress_report"].error) < 1e-4
    torch.export.export(out, (x,), strict=False)


@pytest.mark.parametrize("act", ["static", "dynamic"])
def test_uint8_activations_are_the_int8_levels_shifted(act):
    """x86's form stores activations as uint8 with the zero point moved by 128: the same 256
    levels, so the built graph computes exactly what the int8 form computes, and still exports."""
    torch.manual_seed(0)
    model = Net().eval()
    x = _inputs()
    calib = [_inputs(8, s) for s in range(3)]
    outs = {}
    for dtype in ("int8", "uint8"):
        prof = dataclasses.replace(_profile("qdq", act), int8_activation_dtype=dtype)
        gm = fxcompress.compile(model, x, profile=prof, techniques=["int8"], calibration=calib,
                                tolerance=0.5, objective="size")
        quant = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
            qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor)]
        assert quant and {n.args[5] for n in quant} == {getattr(torch, dtype)}
        assert {(n.args[3], n.args[4]) for n in quant} == \
            ({(0, 255)} if dtype == "uint8" else {(-128, 127)})
        with torch.no_grad():
            outs[dtype] = gm(*x)
        torch.export.export(gm, x, strict=False)
    assert torch.equal(outs["int8"], outs["uint8"])
    assert load_profile("x86-server").int8_activation_dtype == "uint8"
    assert load_profile("mobile-arm").int8_activation_dtype == "int8"
