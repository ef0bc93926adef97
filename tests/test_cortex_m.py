"""The Cortex-M writer (mcu-int8): int8 layers' biases stored as CMSIS-NN adds them, the
memory plan and kernel calls read from a written program, the user's mistakes refused before
anything is written, and, where ExecuTorch's Cortex-M backend imports, the .pte itself:
cortex_m ops in it, its check within the int8 tolerance, its arena and weight bytes those of the
program's plan."""

import functools
import importlib

import pytest
import torch

import fxcompress
from fxcompress import FxCompressError, load_profile

pytest.importorskip("executorch.exir", reason="the Cortex-M writer needs ExecuTorch")

from fxcompress.errors import InternalError  # noqa: E402
from fxcompress.export import (  # noqa: E402
    cortex_m,
    default_check_tolerance,
    to_exported_program,
)
from fxcompress.export.pte import lower_to_pte  # noqa: E402

qd = torch.ops.quantized_decomposed


def _flow_imports() -> bool:
    try:
        importlib.import_module("executorch.backends.cortex_m.passes.cortex_m_pass_manager")
    except ImportError:
        return False
    return True


FLOW = _flow_imports()
needs_flow = pytest.mark.skipif(
    not FLOW, reason=f"ExecuTorch's Cortex-M backend does not import here ({cortex_m.INSTALL})")


def _cortex_m_profile():
    prof = load_profile("mcu-int8")
    assert (prof.export_format, prof.writer) == (".pte", "cortex-m")  # what mcu-int8 ships
    return prof


@pytest.fixture(scope="module")
def mlp():
    """A tiny MLP compiled for mcu-int8 (static int8 on both linears), and its inputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10)).eval()
    batches = [(torch.randn(16, 32),) for _ in range(8)]
    x = torch.randn(1, 32)
    gm = fxcompress.compile(model, (x,), profile="mcu-int8", calibration=batches,
                            tolerance=0.2, holdout=0, overrides={"*": {"bits": 8}})
    return gm, x


@pytest.fixture(scope="module")
def digits_mcu(digits_cnn, digits):
    batches, x_cal, _, _ = digits
    gm = fxcompress.compile(digits_cnn, (x_cal[:1],), profile="mcu-int8", calibration=batches,
                            tolerance=0.05)
    return gm, x_cal[:1]


def _tensor(gm, target: str) -> torch.Tensor:
    return functools.reduce(getattr, target.split("."), gm)


def _int8_layers(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
            and getattr(n.args[1], "target", None) == qd.dequantize_per_channel.default]


def _convs(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target == torch.ops.aten.conv2d.default]


def test_cmsis_form_stores_int32_biases_and_runs_linears_as_1x1_convolutions(mlp):
    gm, x = mlp
    before = gm.code
    g2, changes = cortex_m.cmsis_form(gm, (x,))
    assert gm.code == before  # the compiled model is left as it is
    assert changes == {"int32_biases": 2, "linears_as_1x1_conv": 2}
    # no linear left: each is a 1x1 convolution
    assert not any(n.target == torch.ops.aten.linear.default for n in g2.graph.nodes)
    convs = _convs(g2)
    assert len(convs) == 2
    for conv, lin in zip(convs, _int8_layers(gm), strict=True):
        # the same int8 weights and per-channel scales, as [out, in, 1, 1]
        w_dq, w_dq0 = conv.args[1], lin.args[1]
        w, w0 = _tensor(g2, w_dq.args[0].target), _tensor(gm, w_dq0.args[0].target)
        assert w.dtype == torch.int8 and w.shape == (*w0.shape, 1, 1)
        assert torch.equal(w.flatten(1), w0)
        assert torch.equal(_tensor(g2, w_dq.args[1].target), _tensor(gm, w_dq0.args[1].target))
        # the bias as int32 at s_in x s_w[c], within half a step of the float bias
        bias_dq = conv.args[2]
        assert bias_dq.target == qd.dequantize_per_channel.default
        q, scale = (_tensor(g2, a.target) for a in bias_dq.args[:2])
        assert q.dtype == torch.int32 and bias_dq.args[6] == torch.int32
        s_in = float(lin.args[0].args[1])
        torch.testing.assert_close(scale, (s_in * _tensor(gm, w_dq0.args[1].target).double())
                                   .float())
        float_bias = _tensor(gm, lin.args[2].target)
        assert float((q.double() * scale.double() - float_bias.double()).abs().max()) \
            <= float(scale.max()) / 2 + 1e-12
    # the float biases and 2-D weights are gone from the module: not exported twice
    names = {n for n, _ in g2.named_buffers()}
    assert not any(n.endswith("bias") or n.endswith("int8_weight") for n in names)
    with torch.no_grad():
        xs = torch.randn(64, 32)
        g3, _ = cortex_m.cmsis_form(gm, (xs,))
        y, y3 = gm(xs), g3(xs)
    assert float((y3 - y).norm() / y.norm()) < 0.01


def test_read_plan_gives_the_programs_arena_constants_and_kernels(mlp):
    gm, x = mlp
    ep, _ = to_exported_program(gm, (x,), dynamic_batch=False)
    data = lower_to_pte(ep, None)
    plan = cortex_m.read_plan(data)
    exir = importlib.import_module("executorch.exir")
    manager = exir.to_edge_transform_and_lower(ep).to_executorch()
    sizes = manager.executorch_program.execution_plan[0].non_const_buffer_sizes
    assert plan.activation_bytes == sum(sizes) > 0
    # every tensor the graph reads is a constant of the program: int8 weights, fp32 scales,
    # int64 zero points, fp32 biases
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    expected = sum(_tensor(gm, t).numel() * _tensor(gm, t).element_size() for t in read)
    assert plan.weight_bytes == expected
    assert expected < 0.3 * (32 * 64 + 64 * 10) * 4  # int8 weights: about a quarter of fp32
    assert plan.constant_data_bytes >= plan.weight_bytes
    assert plan.ops["quantized_decomposed::quantize_per_tensor.out"] == 4
    assert plan.count("cortex_m") == {}
    assert sum(plan.others("cortex_m").values()) == sum(plan.ops.values())


@pytest.mark.skipif(FLOW, reason="the Cortex-M backend imports here")
def test_without_the_cortex_m_backend_nothing_is_written_and_the_fix_is_named(mlp, tmp_path):
    gm, x = mlp
    out = tmp_path / "m.pte"
    with pytest.raises(FxCompressError, match="tosa-tools==2026.5.0"):
        fxcompress.export(gm, (x,), out, profile=_cortex_m_profile())
    with pytest.raises(FxCompressError, match="Cortex-M backend"):
        cortex_m.preflight()
    assert cortex_m.INSTALL in cortex_m.runtime_note()
    with pytest.raises(FxCompressError, match="tosa-tools"):  # the original model alike
        fxcompress.export(torch.nn.Linear(8, 4).eval(), (torch.randn(1, 8),), out,
                          profile=_cortex_m_profile())
    assert list(tmp_path.iterdir()) == []


def _check_written(result, gm):
    assert result.writer == "cortex-m" and result.format == ".pte"
    assert result.path.stat().st_size == result.size_bytes
    plan = cortex_m.read_plan(result.path.read_bytes())
    d = result.details
    assert d["cortex_m_ops"] == plan.count("cortex_m")
    assert d["portable_ops"] == plan.others("cortex_m")
    # every int8 layer of the compiled model is a CMSIS-NN kernel call in the file
    layers = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
        and getattr(n.args[1], "target", None) == qd.dequantize_per_channel.default)
    kernels = sum(n for op, n in d["cortex_m_ops"].items()
                  if "quantized_linear" in op or "conv2d" in op)
    assert kernels == layers == d["int8_layers"] > 0
    assert not any("linear" in op or "addmm" in op or "convolution" in op
                   for op in d["portable_ops"])
    assert plan.layout_errors == []  # NHWC where the kernels read and write
    assert d["activation_bytes"] == plan.activation_bytes > 0
    assert d["weight_bytes"] == plan.weight_bytes > 0
    assert d["activation_budget_bytes"] == 262144 and d["weight_budget_bytes"] == 524288
    assert d["fits"] == (d["activation_fits"] and d["weight_fits"])
    assert result.runtime in ("executorch", cortex_m.REFERENCE_RUNTIME)
    assert result.check_error <= default_check_tolerance(gm)
    return plan


@needs_flow
def test_tiny_mlp_becomes_cmsis_nn_kernels_with_the_relu_fused(mlp, tmp_path):
    gm, x = mlp
    result = fxcompress.export(gm, (x,), tmp_path / "mlp.pte", profile=_cortex_m_profile())
    plan = _check_written(result, gm)
    d = result.details
    assert d["cortex_m_ops"]["cortex_m::quantized_conv2d.out"] == 2
    # the ReLU is the first layer's output clamp, the int8 values never leave int8
    assert not any("relu" in op for op in plan.ops)
    assert plan.ops["cortex_m::quantize_per_tensor.out"] == 1
    assert plan.ops["cortex_m::dequantize_per_tensor.out"] == 1
    assert set(d["portable_ops"]) == {"dim_order_ops::_clone_dim_order.out"}
    # the constants are the int8 weights once (the 2-D originals, float biases and scales
    # gone), an int32 bias, requantization multiplier and shift per output channel
    weights = [_tensor(gm, n.args[1].args[0].target) for n in _int8_layers(gm)]
    assert all(w.dtype == torch.int8 for w in weights)
    assert plan.weight_bytes == sum(w.numel() + 3 * 4 * w.shape[0] for w in weights)
    assert d["fits"] is True


@needs_flow
def test_a_convolution_cmsis_nn_would_refuse_is_not_written(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxcompress.compile(model, (x,), profile="mcu-int8", tolerance=0.2, holdout=0,
                            calibration=[(torch.randn(8, 3, 8, 8),) for _ in range(4)])
    result = fxcompress.export(gm, (x,), tmp_path / "ok.pte", profile=_cortex_m_profile())
    assert result.details["cortex_m_ops"]["cortex_m::quantized_conv2d.out"] == 2
    assert cortex_m.read_plan(result.path.read_bytes()).layout_errors == []
    # NCHW inputs, as a program exported without ExecuTorch's channels_last step: the
    # kernels read the tensors as NHWC, so the file is refused before it is written
    monkeypatch.setattr(cortex_m, "channels_last", lambda inputs: inputs)
    with pytest.raises(InternalError, match="NHWC"):
        fxcompress.export(gm, (x,), tmp_path / "nchw.pte", profile=_cortex_m_profile())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pte"]


@needs_flow
def test_digits_cnn_becomes_cmsis_nn_convolutions_in_a_small_arena(digits_mcu, tmp_path):
    gm, x = digits_mcu
    result = fxcompress.export(gm, (x,), tmp_path / "digits.pte", profile=_cortex_m_profile())
    plan = _check_written(result, gm)
    d = result.details
    assert d["linears_as_1x1_conv"] == 2 and d["int32_biases"] == 5
    # the float batch norms stay float, on portable kernels
    assert plan.ops["aten::_native_batch_norm_legit_no_training.out"] == 3
    # int8 activations in the arena: the portable int8 program dequantizes every weight into
    # it (megabytes); this one holds the activations and CMSIS-NN's scratch
    ep, _ = to_exported_program(gm, (x,), dynamic_batch=False)
    portable = cortex_m.read_plan(lower_to_pte(ep, None))
    assert d["activation_bytes"] * 20 < portable.activation_bytes
    assert d["weight_bytes"] < portable.weight_bytes
    assert d["fits"] is True


@needs_flow
def test_the_original_float_model_is_written_on_portable_kernels(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10)).eval()
    result = fxcompress.export(model, (torch.randn(1, 32),), tmp_path / "fp32.pte",
                               profile=_cortex_m_profile())
    assert result.details["cortex_m_ops"] == {} and result.details["int8_activations"] is False
    assert result.check_error <= 1e-3
    assert result.details["weight_bytes"] == (32 * 64 + 64 + 64 * 10 + 10) * 4


@needs_flow
def test_a_failed_check_writes_nothing(mlp, tmp_path, monkeypatch):
    gm, x = mlp
    out = tmp_path / "mlp.pte"
    real = cortex_m._compare
    # a file whose outputs are off by one everywhere, as a lost scale would make them
    monkeypatch.setattr(cortex_m, "_compare",
                        lambda got, expected, *a: real(got, expected + 1.0, *a))
    with pytest.raises(InternalError, match="disagrees"):
        fxcompress.export(gm, (x,), out, profile=_cortex_m_profile())
    assert list(tmp_path.iterdir()) == []


@needs_flow
def test_four_bit_codes_are_packed_in_flash_and_unpacked_into_the_arena(tmp_path):
    """mcu-int8's `[int8] packed_bits`: the same layers at 8 and at 4 bits. At 4 bits the file
    holds the codes two per byte and the program unpacks them on portable kernels before the
    CMSIS-NN layer: the constants shrink by half the codes, the arena grows by the unpacking."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(),
                                torch.nn.Linear(96, 10)).eval()
    batches = [(torch.randn(32, 64),) for _ in range(16)]
    x = torch.randn(1, 64)
    results = {}
    for bits in (8, 4):
        gm = fxcompress.compile(model, (x,), profile="mcu-int8", calibration=batches,
                                tolerance=0.5, holdout=0,
                                overrides={"*": {"bits": bits, "techniques": ["int8"]}})
        result = fxcompress.export(gm, (x,), tmp_path / f"w{bits}.pte",
                                   profile=_cortex_m_profile())
        results[bits] = (_check_written(result, gm), result.details)
    (p8, d8), (p4, d4) = results[8], results[4]
    codes = 64 * 96 + 96 * 10
    assert (d8["int4_packed_layers"], d4["int4_packed_layers"]) == (0, 2)
    assert d4["int4_codes"] == codes
    assert d8["weight_bytes"] - d4["weight_bytes"] == codes // 2
    # the unpacking: a mask, a floor division, a concatenation, a convert and an offset per
    # layer, on portable kernels
    for op in ("aten::bitwise_and.Scalar_out", "aten::div.Scalar_mode_out", "aten::cat.out",
               "dim_order_ops::_to_dim_order_copy.out", "aten::sub.Scalar_out"):
        assert p4.ops[op] == 2 and p8.ops[op] == 0
    assert p4.count("cortex_m") == p8.count("cortex_m")
    # in RAM: at least the largest unpacked weight (one byte a code) beyond the 8-bit arena,
    # and no more than the planner charged for it (`UNPACK_SCRATCH` bytes a code)
    from fxcompress.export.nbits import UNPACK_SCRATCH

    grown = d4["activation_bytes"] - d8["activation_bytes"]
    assert 64 * 96 <= grown <= UNPACK_SCRATCH * 64 * 96
    # a RAM budget the first layer's unpacking exceeds: it is built in slices of output
    # channels, each packed and unpacked on its own, and the arena holds one slice at a time
    import dataclasses

    tight = dataclasses.replace(_cortex_m_profile(), activation_budget_bytes=8_000)
    gm = fxcompress.compile(model, (x,), profile=tight, calibration=batches, tolerance=0.5,
                            holdout=0, overrides={"*": {"bits": 4, "techniques": ["int8"]}})
    k = next(lay.params["slices"] for lay in gm.meta["fxcompress_report"].layers
             if lay.name == "0")
    result = fxcompress.export(gm, (x,), tmp_path / "sliced.pte", profile=tight)
    ps, ds = cortex_m.read_plan(result.path.read_bytes()), result.details
    assert ps.layout_errors == [] and result.check_error <= default_check_tolerance(gm)
    assert ds["cortex_m_ops"]["cortex_m::quantized_conv2d.out"] == k + 1
    assert k > 1 and ds["int4_packed_layers"] == k + 1 and ds["int4_codes"] == codes
    assert ds["weight_bytes"] <= d4["weight_bytes"] + 12 * 4 * k  # the same codes, more scales
    assert ds["activation_bytes"] <= 8_000 < d4["activation_bytes"]
    assert ds["activation_fits"] is True
