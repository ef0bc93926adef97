"""intx: group-wise low-bit weights with dynamic per-token int8 activations — the rounding
(GPTQ beats round-to-nearest on the layer's own inputs), the stored levels and scales, the
profile's `[intx]` section, simulation == build, and the .pte XNNPACK runs whole and the
.onnx's MatMulNBits with the weights packed two per byte."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress.errors import FxCompressError
from fxcompress.hardware_profiles import Profile, load_profile
from fxcompress.passes.intx import IntxPart, _write
from fxcompress.passes.intx.quant import (
    CLIP_RATIOS,
    PerTokenInt8,
    dequantize,
    gptq,
    hessian_error,
    qrange,
    rtn,
)

qd = torch.ops.quantized_decomposed


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a few directions carry most of the signal, as a network's activations do (what GPTQ
    # exploits: an error in one input column can be cancelled by the columns it moves with)
    mix = torch.randn(d // 8, d, generator=g)
    return torch.randn(n, d // 8, generator=g) @ mix + 0.1 * torch.randn(n, d, generator=g)


def test_gptq_lowers_the_output_error_of_round_to_nearest():
    x = _correlated_inputs(2048, 128)
    h = (x.T.double() @ x.double()) / len(x)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) / 11
    for bits in (3, 4):
        e_rtn = hessian_error(w, dequantize(*rtn(w, bits, 32), 32), h)
        e_gptq = hessian_error(w, dequantize(*gptq(w, h, bits, 32), 32), h)
        # measured on the actual outputs too: the proxy is the relative output error
        out = x @ w.T
        gq = dequantize(*gptq(w, h, bits, 32), 32)
        direct = float((x @ gq.T - out).square().sum() / out.square().sum())
        assert direct == pytest.approx(e_gptq, rel=1e-3)
        assert e_gptq < 0.3 * e_rtn, (bits, e_gptq, e_rtn)


def test_levels_stay_in_range_and_scales_are_what_the_target_keeps():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    h = torch.eye(64, dtype=torch.float64)
    for bits in (2, 4, 7):
        lo, hi = qrange(bits)
        for q, s in (rtn(w, bits, 16, "bf16"), gptq(w, h, bits, 16, "bf16")):
            assert q.dtype == torch.int8 and q.shape == w.shape
            assert int(q.min()) >= lo and int(q.max()) <= hi
            assert s.shape == (16, 4)
            assert torch.equal(s, s.to(torch.bfloat16).float())  # exact in bfloat16
    # each group's scale is the one of its range's shares (CLIP_RATIOS) with the least error:
    # never more error than the full range's, less where clipping the extremes pays
    q, s = rtn(w, 4, 16)
    g = w.reshape(16, 4, 16)
    full = torch.maximum(g.amax(-1) / 7, g.amin(-1) / -8)
    err_full = (g - torch.round(g / full[..., None]).clamp(-8, 7) * full[..., None]) \
        .square().sum(-1)
    err = (g - dequantize(q, s, 16).reshape(16, 4, 16)).square().sum(-1)
    assert bool((err <= err_full + 1e-6).all()) and float(err.sum()) < float(err_full.sum())
    assert bool((s <= full + 1e-7).all()) and bool((s >= full * min(CLIP_RATIOS) - 1e-7).all())


class MLP(torch.nn.Module):
    """Three linears wide enough that 4-bit weights dominate the file."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(256, 512)
        self.fc2 = torch.nn.Linear(512, 256)
        self.fc3 = torch.nn.Linear(256, 10)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _calib(n=10, seed=0, rows=160):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 256, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def compiled():
    model = MLP().eval()
    gm = fxcompress.compile(model, _calib()[0], profile="mobile-arm", techniques=["intx"],
                            calibration=_calib(), tolerance=0.5)
    return model, gm


def test_every_linear_gets_4bit_groups_and_the_build_computes_what_was_simulated(compiled):
    model, gm = compiled
    rep = gm.meta["fxcompress_report"]
    applied = {la.name: la for la in rep.layers}
    assert all(la.applied.startswith("intx") for la in applied.values())
    assert all(la.params["bits"] == 4 and la.params["rounding"] == "gptq"
               for la in applied.values())
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(qd.dequantize_per_channel_group.default) == 3
    assert ops.count(qd.quantize_per_token.default) == 3
    # the built graph == the planner's simulation: per-token int8 input, dequantized weight
    x = _calib(1, seed=5, rows=16)[0][0]
    h = x
    for i, name in enumerate(("fc1", "fc2", "fc3")):
        q = getattr(gm, f"{name}_intx_weight")
        s = getattr(gm, f"{name}_intx_scale")
        assert int(q.abs().max()) <= 8
        h = torch.nn.functional.linear(PerTokenInt8()(h), dequantize(q, s, 32),
                                       getattr(model, name).bias)
        h = torch.relu(h) if i < 2 else h
    assert torch.allclose(gm(x), h, atol=1e-5, rtol=1e-5)
    # bytes: 4 bits per weight plus a bf16 scale per 32
    fc1 = applied["fc1"]
    assert fc1.bytes_after == 512 * 256 // 2 + 512 * 8 * 2 + 512 * 4
    assert any("error-compensated rounding" in n for n in rep.notes)


def test_the_input_model_is_unchanged_and_rtn_is_a_setting(compiled):
    model, _ = compiled
    fresh = MLP().eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                fresh.state_dict().values(), strict=True))
    gm = fxcompress.compile(fresh, _calib()[0], profile="mobile-arm", techniques=["intx"],
                            calibration=_calib(), tolerance=0.5,
                            overrides={"fc2": {"intx": {"rounding": "rtn"}}})
    by = {la.name: la.params.get("rounding") for la in gm.meta["fxcompress_report"].layers}
    assert by == {"fc1": "gptq", "fc2": "rtn", "fc3": "gptq"}
    with pytest.raises(FxCompressError, match="rounding must be one of gptq, rtn"):
        fxcompress.compile(fresh, _calib()[0], profile="mobile-arm", techniques=["intx"],
                           calibration=_calib(), overrides={"*": {"intx": {"rounding": "x"}}})


def test_pte_runs_the_int4_linears_in_xnnpack_packed_two_per_byte(compiled, tmp_path):
    pytest.importorskip("executorch.runtime")
    model, gm = compiled
    x = _calib(1, rows=16)[0]
    res = fxcompress.export(gm, x, tmp_path / "m.pte")
    assert res.delegated_ops.get("quantized_decomposed.dequantize_per_channel_group.default") \
        == 3
    assert res.delegated_ops.get("aten.linear.default") == 3
    assert not any("linear" in k or "per_token" in k for k in res.undelegated_ops)
    base = fxcompress.export(fxcompress.compile(model, x, profile="mobile-arm",
                                                techniques=["int8"], calibration=_calib(),
                                                tolerance=0.0), x, tmp_path / "f.pte")
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    # 4 bits + bf16 scales per 32 is 0.1406 of fp32; fp32 biases and the program add a little
    assert res.size_bytes < weights * 4 * 0.17
    assert res.size_bytes < base.size_bytes
    assert res.check_error < 0.05


def test_onnx_holds_int4_layers_as_matmulnbits_packed_two_per_byte(compiled, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    model, gm = compiled
    x = _calib(1, rows=16)[0]
    res = fxcompress.export(gm, x, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    nodes = [(n.domain, n.op_type) for n in m.graph.node]
    assert nodes.count(("com.microsoft", "MatMulNBits")) == 3
    assert not any(t in ("MatMul", "Gemm", "DequantizeLinear") for _, t in nodes)
    packed = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert sorted(tuple(t.dims) for t in packed) == [(10, 8, 16), (256, 16, 16), (512, 8, 16)]
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    # 4 bits + an fp32 scale per 32 is 0.156 of fp32; biases and the graph add a little
    assert res.size_bytes < weights * 4 * 0.18
    assert res.check_error < 0.05
    # another batch size, on inputs the export never saw: ONNX Runtime's int8 x int4 kernels
    # compute what the compiled model computes, up to their finer input quantization
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    xs = torch.randn(7, 256, generator=torch.Generator().manual_seed(9))
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0])
    with torch.no_grad():
        want = gm(xs)
    assert float((got - want).norm() / want.norm()) < 0.05
    # the codes in the file are the compiled model's
    from fxcompress.export.nbits import unpack

    w = onnx.numpy_helper.to_array(next(t for t in packed if tuple(t.dims) == (512, 8, 16)))
    assert torch.equal(unpack(torch.from_numpy(w.copy()), 4, 32), gm.fc1_intx_weight)


def test_pt2_stores_the_4bit_codes_two_per_byte_and_the_report_counts_that_file(compiled,
                                                                                tmp_path):
    import io

    from torch.export import load

    model, gm = compiled
    x = _calib(1, rows=16)[0]
    res = fxcompress.export(gm, x, tmp_path / "m.pt2")
    loaded = load(tmp_path / "m.pt2")
    # the codes are in the file as uint8, two a byte; the int8-held ones are not
    state = {k: v for k, v in loaded.state_dict.items()} | dict(loaded.constants)
    packed = sorted(tuple(v.shape) for v in state.values() if v.dtype == torch.uint8)
    assert packed == [(10, 128), (256, 256), (512, 128)]
    assert not any(v.dtype == torch.int8 and v.dim() == 2 for v in state.values())
    # the scales as the target keeps them (bfloat16), one per 32 codes
    assert sorted(v.numel() for v in state.values() if v.dtype == torch.bfloat16) == \
        [10 * 8, 256 * 16, 512 * 8]
    xs = torch.randn(5, 256, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(loaded.module()(xs), gm(xs))
    # torch.export.save of the compiled model itself keeps a byte a code (the form the
    # XNNPACK partitioner takes): the packed file saves the other half of each byte
    buf = io.BytesIO()
    torch.export.save(torch.export.export(gm, x), buf)
    codes = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert buf.getbuffer().nbytes - res.size_bytes > 0.45 * codes
    rep = gm.meta["fxcompress_report"]
    # the report's size is this file's, less the two example rows and the report it carries
    assert 0 < res.size_bytes - rep.serialized_bytes_after < 16_000


def _outlier_calib(n=10, seed=0, rows=160):
    """Inputs whose columns differ in scale by up to 30x (activation outliers, as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    col = torch.logspace(0, 1.5, 256)[torch.randperm(256, generator=torch.Generator()
                                                      .manual_seed(1))]
    return [(torch.randn(rows, 256, generator=g) * col,) for _ in range(n)]


def test_awq_scaling_where_it_lowers_the_error_and_every_format_runs_it(tmp_path):
    pytest.importorskip("executorch.runtime")
    pytest.importorskip("onnxruntime")
    model = MLP().eval()
    cal = _outlier_calib()
    kw = dict(profile="mobile-arm", techniques=["intx"], calibration=cal, tolerance=10.0)
    gm = fxcompress.compile(model, cal[0], **kw)
    plain = fxcompress.compile(model, cal[0], overrides={"*": {"intx": {"scaling": "none"}}},
                               **kw)
    rep, rep0 = gm.meta["fxcompress_report"], plain.meta["fxcompress_report"]
    # fc1 sees the outlier columns: AWQ scales it; the layers after see relu outputs
    fc1 = next(la for la in rep.layers if la.name == "fc1")
    assert fc1.params.get("scaling") == "awq"
    assert not any(la.params.get("scaling") for la in rep0.layers)
    fc1_0 = next(la for la in rep0.layers if la.name == "fc1")
    assert fc1.error < fc1_0.error and rep.error < rep0.error  # measured, not just estimated
    assert any("AWQ's input scaling on" in n for n in rep.notes)
    # the built graph divides the input by s, then quantizes per token, against the scaled
    # weight: what was simulated
    x = _outlier_calib(1, seed=5, rows=16)[0][0]
    h = x
    for i, name in enumerate(("fc1", "fc2", "fc3")):
        inv = getattr(gm, f"{name}_intx_input_scale", None)
        hin = h if inv is None else h * inv
        h = torch.nn.functional.linear(PerTokenInt8()(hin),
                                       dequantize(getattr(gm, f"{name}_intx_weight"),
                                                  getattr(gm, f"{name}_intx_scale"), 32),
                                       getattr(model, name).bias)
        h = torch.relu(h) if i < 2 else h
    with torch.no_grad():
        assert torch.allclose(gm(x), h, atol=1e-5, rtol=1e-5)
    # its bytes: 4-bit codes, a bf16 scale per 32, the fp32 input scale, the bias
    assert fc1.bytes_after == 512 * 256 // 2 + 512 * 8 * 2 + 256 * 4 + 512 * 4
    # recovery trains the scaled weight and keeps the scaling
    rec = fxcompress.compile(model, cal[0], recover=fxcompress.Recover(steps=100, lr=3e-4,
                                                                       stages=0), **kw)
    assert torch.equal(rec.fc1_intx_input_scale, gm.fc1_intx_input_scale)
    assert int(rec.fc1_intx_weight.abs().max()) <= 8
    assert rec.meta["fxcompress_report"].error < rep.error
    for fmt in ("pte", "onnx", "pt2"):
        res = fxcompress.export(gm, cal[0], tmp_path / f"m.{fmt}")
        assert res.check_error < 0.05, fmt
        if fmt == "pte":
            assert res.delegated_ops.get("aten.linear.default") == 3
            assert not any("linear" in k for k in res.undelegated_ops)


class Lookup(torch.nn.Module):
    """An embedding table alone (its output is its rows)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 128)
        self.emb.weight.data = torch.randn(1000, 128, generator=torch.Generator().manual_seed(4))

    def forward(self, ids):
        return self.emb(ids)


def test_embedding_rows_in_4bit_groups_decode_exactly_in_every_format(tmp_path):
    pytest.importorskip("executorch.runtime")
    pytest.importorskip("onnxruntime")
    model = Lookup().eval()
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randint(0, 1000, (8, 16), generator=g),) for _ in range(6)]
    gm = fxcompress.compile(model, cal[0], profile="mobile-arm", techniques=["intx"],
                            calibration=cal, tolerance=0.5, objective="size")
    (la,) = gm.meta["fxcompress_report"].layers
    assert la.applied.startswith("intx(bits=4") and la.params["rounding"] == "rtn"
    assert la.bytes_after == 1000 * 128 // 2 + 1000 * 4 * 2  # two codes a byte, bf16 scales
    q, s = rtn(model.emb.weight, 4, 32, "bf16")
    ids = torch.randint(0, 1000, (3, 16), generator=g)  # another batch than calibration's
    assert torch.allclose(gm(ids), dequantize(q, s, 32)[ids], atol=1e-6, rtol=0)
    fp32 = fxcompress.export(model, cal[0], tmp_path / "f.pte", profile="mobile-arm")
    for fmt in ("pte", "onnx", "pt2"):
        res = fxcompress.export(gm, cal[0], tmp_path / f"m.{fmt}")
        assert res.check_error < 1e-4, fmt
    pte = fxcompress.export(gm, cal[0], tmp_path / "m.pte")
    assert pte.size_bytes < 0.2 * fp32.size_bytes


def test_code_packing_round_trips_every_width():
    from fxcompress.export.nbits import container_bits, pack, unpack

    g = torch.Generator().manual_seed(3)
    for bits in range(2, 9):
        lo, hi = qrange(bits)
        q = torch.randint(lo, hi + 1, (5, 64), generator=g, dtype=torch.int8)
        p = pack(q, bits, 32)
        cb = container_bits(bits)
        assert p.dtype == torch.uint8 and p.shape == (5, 2, 32 * cb // 8)
        assert torch.equal(unpack(p, bits, 32), q)
    # low bits first: codes 1 and 2 (stored as 9 and 10) share the byte 0xA9
    assert int(pack(torch.tensor([[1, 2] * 16], dtype=torch.int8), 4, 32)[0, 0, 0]) == 0xA9


def test_profile_intx_section_is_checked():
    data = load_profile("mobile-arm").to_dict()
    assert data["intx_bits"] == [4] and data["intx_group_size"] == 32
    import tomllib
    from pathlib import Path

    import hardware_profiles

    raw = tomllib.loads((Path(hardware_profiles.__file__).parent / "mobile-arm.toml")
                        .read_text())
    for field, value, match in (("bits", [8], "widths from 2 to 7"),
                                ("activations", "static", "intx.activations"),
                                ("ops", ["linear", "conv2d"], "intx.ops"),
                                ("scale_dtype", "fp8", "intx.scale_dtype"),
                                ("symmetric", False, "intx.symmetric")):
        bad = {**raw, "intx": {**raw["intx"], field: value}}
        with pytest.raises(FxCompressError, match=match):
            Profile.from_dict(bad, "test")


def test_recovery_writes_the_trained_weight_back_as_the_same_groups():
    w = torch.randn(32, 64)
    q, s = rtn(w, 4, 32)
    from fxcompress.candidates import Candidate, Step
    from fxcompress.graph import Layer

    layer = Layer("l", "l", "linear", "l.weight", None, (32, 64))
    part = IntxPart(4, 32, q, s)  # rounding: gptq
    c = Candidate("intx", layer, {"bits": 4}, (Step("linear", dequantize(q, s, 32),
                                                    fmt="intx"),), parts={"intx": part})
    trained = w * 0.9
    out = _write(c, [trained], None)
    q2 = torch.round(trained.reshape(32, 2, 32) / s.unsqueeze(-1)).clamp(-8, 7)
    assert torch.equal(out.part("intx").q, q2.reshape(32, 64).to(torch.int8))
    assert torch.equal(out.part("intx").scale, s)  # the same groups and scales, new values
    assert torch.equal(out.steps[0].dense(), dequantize(out.part("intx").q, s, 32))
    assert out.params["rounding"] == "gptq, trained"
    # the straight-through form starts where the stored weight is, and passes gradients
    lat = dequantize(q, s, 32).requires_grad_()
    fq = fxcompress.technique.REGISTRY["intx"].formats["intx"](c)(lat)
    assert torch.equal(fq.detach(), dequantize(q, s, 32))
    fq.sum().backward()
    assert torch.equal(lat.grad, torch.ones_like(lat))


def test_recovery_trains_the_4bit_plan_and_stores_the_same_form(compiled):
    model, gm = compiled
    rec = fxcompress.compile(model, _calib()[0], profile="mobile-arm", techniques=["intx"],
                             calibration=_calib(), tolerance=0.5,
                             recover=fxcompress.Recover(steps=100, lr=3e-4, stages=0))
    ops = [n.target for n in rec.graph.nodes if n.op == "call_function"]
    assert ops.count(qd.dequantize_per_channel_group.default) == 3
    changed = 0
    for name in ("fc1", "fc2", "fc3"):
        q = getattr(rec, f"{name}_intx_weight")
        assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
        changed += int((q != getattr(gm, f"{name}_intx_weight")).sum())
    assert changed > 0  # trained weights, re-rounded into the same groups
    before = gm.meta["fxcompress_report"].error
    assert rec.meta["fxcompress_report"].error < before


def test_too_few_calibration_rows_per_input_column_round_to_nearest():
    """GPTQ fitted to a second moment from fewer rows than the layer has inputs moves error
    into directions those rows never took: such layers round to nearest (and say so)."""
    model = MLP().eval()
    few = _calib(6, rows=16)  # ~64 fit rows: fewer than 2 per input column of any layer
    gm = fxcompress.compile(model, few[0], profile="mobile-arm", techniques=["intx"],
                            calibration=few, tolerance=0.5)
    layers = gm.meta["fxcompress_report"].layers
    assert layers and all(la.params["rounding"] == "rtn" for la in layers)


def test_a_size_plan_decoded_at_every_call_says_so_and_what_to_drop():
    model = MLP().eval()
    slow = fxcompress.compile(model, _calib()[0], profile="mobile-arm", techniques=["share"],
                              calibration=_calib(), tolerance=0.5, objective="size")
    rep = slow.meta["fxcompress_report"]
    assert rep.latency_after_us > rep.latency_before_us
    (note,) = [n for n in rep.notes if n.startswith("objective size: the plan is estimated")]
    assert "share layers" in note and "'intx'" in note and "'share'" not in note
    fast = fxcompress.compile(model, _calib()[0], profile="mobile-arm", techniques=["intx"],
                              calibration=_calib(), tolerance=0.5, objective="size")
    assert not any(n.startswith("objective size:") for n in fast.meta["fxcompress_report"].notes)


def test_onnx_refuses_groups_matmulnbits_cannot_read_and_writes_nothing(tmp_path):
    pytest.importorskip("onnxscript")
    import tomllib
    from pathlib import Path

    import hardware_profiles

    raw = tomllib.loads((Path(hardware_profiles.__file__).parent / "mobile-arm.toml")
                        .read_text())
    prof = Profile.from_dict({**raw, "intx": {**raw["intx"], "group_size": 8}}, "groups of 8")
    gm = fxcompress.compile(MLP().eval(), _calib()[0], profile=prof, techniques=["intx"],
                            calibration=_calib(), tolerance=0.5)
    with pytest.raises(FxCompressError, match="fc1 holds groups of 8.*group_size of 16"):
        fxcompress.export(gm, _calib(1, rows=16)[0], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
