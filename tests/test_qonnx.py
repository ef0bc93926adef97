"""fpga-binary's QONNX writer: binary and int8 layers as BipolarQuant / Quant nodes in the
domain FINN reads, run by qonnx's own executor, equal to the compiled model; float layers stay
float; nothing is written when the check fails or the graph has no QONNX form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import fxcompress
from fxcompress import FxCompressError, InternalError

qonnx = pytest.importorskip("qonnx", reason="the QONNX writer needs qonnx (fxcompress[qonnx])")
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx  # noqa: E402
from qonnx.custom_op.general.bipolar_quant import binary_quant  # noqa: E402
from qonnx.custom_op.general.intquant import int_quant  # noqa: E402

from fxcompress.export import qonnx as qw  # noqa: E402
from fxcompress.export import relative_error  # noqa: E402
from tests.test_binary import MLP  # noqa: E402

DOMAIN = "qonnx.custom_op.general"
qd = torch.ops.quantized_decomposed


def _run(path, x: torch.Tensor) -> torch.Tensor:
    """The file at `path`, loaded with qonnx's ModelWrapper and run by its executor."""
    model = ModelWrapper(str(path))
    out = execute_onnx(model, {model.graph.input[0].name: x.numpy()})
    return torch.from_numpy(out[model.graph.output[0].name])


def _quantizers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Quantizer nodes by kind: on a weight (an initializer) or on an activation."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, list] = {}
    for n in model.graph.node:
        if n.op_type in ("BipolarQuant", "Quant"):
            assert n.domain == DOMAIN
            kind = "weights" if n.input[0] in inits else "activations"
            out.setdefault(f"{n.op_type}_{kind}", []).append(n)
    return out


@pytest.fixture(scope="module")
def binary_cnn(digits, digits_cnn):
    """The digits CNN compiled for fpga-binary with binary and int8 layers both chosen."""
    batches, x_cal, _, _ = digits
    gm = fxcompress.compile(digits_cnn, (x_cal[:8],), profile="fpga-binary",
                            calibration=batches, techniques=["binary", "int8"], tolerance=1.0)
    applied = {la.name: la.applied for la in gm.meta["fxcompress_report"].layers}
    assert sum(a.startswith("binary") for a in applied.values()) >= 1
    assert sum(a.startswith("int8") for a in applied.values()) >= 1
    return gm, applied


def test_torch_quantizers_match_qonnx_reference():
    """The torch ops the exported program computes are QONNX's arithmetic (qonnx's numpy
    reference), ties to even included."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, generator=g) * 3, torch.arange(-40, 41) / 4])  # ties
    scale = torch.tensor(0.25)
    for bits, signed, narrow in ((8, True, True), (8, True, False), (4, False, False)):
        got = qw.quant(x, scale, torch.tensor(0.0), torch.tensor(float(bits)), signed, narrow)
        ref = int_quant(x.numpy(), scale.numpy(), np.float32(0), np.float32(bits), signed, narrow,
                        "ROUND")
        assert torch.equal(got, torch.from_numpy(ref.astype(np.float32)))
        lo, hi = qw.int_range(bits, signed, narrow)
        assert set((got / scale).unique().tolist()) <= set(range(lo, hi + 1))
    alpha = torch.rand(200, generator=g) + 0.1
    ref = binary_quant(x[:200].numpy(), alpha.numpy())
    assert torch.equal(qw.bipolar_quant(x[:200], alpha), torch.from_numpy(ref))
    assert qw.signed_form(-128, 127) == (8, False, 0)
    assert qw.signed_form(0, 255) == (8, False, 128)  # uint8 levels: the same, moved
    assert qw.signed_form(-127, 127) == (8, True, 0)
    assert qw.signed_form(-63, 63) == (7, True, 0)
    assert qw.signed_form(0, 9) is None


def test_digits_cnn_binary_and_int8_as_qonnx(binary_cnn, digits, digits_cnn, tmp_path):
    gm, applied = binary_cnn
    _, x_cal, x_test, _ = digits
    code = gm.code
    path = tmp_path / "digits.onnx"
    res = fxcompress.export(gm, (x_cal[:8],), path)  # the report names fpga-binary
    assert gm.code == code  # the compiled model is left as it is
    assert res.writer == "qonnx" and res.runtime == "qonnx.core.onnx_exec"
    assert res.check_error <= 1e-6  # the same arithmetic, not merely close
    assert not res.dynamic_batch and res.details["batch"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.onnx"]

    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[DOMAIN] == 1
    q = _quantizers(model)
    binary = [n for n, a in applied.items() if a.startswith("binary")]
    int8 = [n for n, a in applied.items() if a.startswith("int8")]
    # one weight quantizer a layer; binary activations where the profile runs them; each of
    # the graph's int8 activation q/dq pairs a Quant
    pairs = sum(n.target == qd.dequantize_per_tensor.default for n in gm.graph.nodes)
    assert pairs >= len(int8)
    assert len(q["BipolarQuant_weights"]) == len(binary)
    assert len(q["BipolarQuant_activations"]) == len(binary)
    assert len(q["Quant_weights"]) == len(int8)
    assert len(q["Quant_activations"]) == pairs
    assert res.details["BipolarQuant"] == 2 * len(binary)
    assert res.details["Quant"] == len(int8) + pairs
    assert res.details["float_layers"] == []

    mw = ModelWrapper(str(path))
    for n in q["BipolarQuant_weights"]:  # ±1 latent weights, α per output channel
        w, a = mw.get_initializer(n.input[0]), mw.get_initializer(n.input[1])
        assert set(np.unique(w).tolist()) <= {-1.0, 1.0}
        assert a.size in (w.shape[0], w.shape[-1]) and (a > 0).all()
        consumer = mw.find_consumer(n.output[0])
        assert consumer.op_type in ("Conv", "MatMul")  # where FINN folds the scale
    for n in q["Quant_weights"] + q["Quant_activations"]:
        assert mw.get_initializer(n.input[2]) == 0  # FINN takes zero point 0 only
        assert mw.get_initializer(n.input[3]) == 8
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["signed"] == 1 and attrs["rounding_mode"] == b"ROUND"
        assert attrs["narrow"] == (1 if n in q["Quant_weights"] else 0)
    for n in q["BipolarQuant_activations"]:
        assert mw.get_initializer(n.input[1]) == 1.0  # FINN's only bipolar activation scale

    # qonnx's datatype inference (what FINN's front end starts from) sees integer activations
    from qonnx.transformation.infer_datatypes import InferDataTypes

    typed = mw.transform(InferDataTypes())
    assert {typed.get_tensor_datatype(n.output[0]).name
            for n in q["Quant_activations"]} == {"INT8"}
    assert {typed.get_tensor_datatype(n.output[0]).name
            for n in q["BipolarQuant_activations"]} == {"BIPOLAR"}

    # the file round-trips through ModelWrapper and computes the compiled model on other data
    with torch.no_grad():
        assert relative_error(_run(path, x_test[:8]), gm(x_test[:8])) <= 1e-6

    # QONNX stores float weights: the file is about the fp32 .onnx; the packed widths are
    # what the quantizers declare
    fp32 = fxcompress.export(digits_cnn, (x_cal[:8],), tmp_path / "fp32.onnx",
                             profile="fpga-binary")
    assert fp32.details["BipolarQuant"] == fp32.details["Quant"] == 0
    assert 0.95 < res.size_bytes / fp32.size_bytes < 1.1
    declared = res.details["weights_by_declared_bits"]
    assert res.details["quantized_weight_bytes_packed"] == declared["1"] // 8 + declared["8"]
    assert res.details["quantized_weight_bytes_stored"] == 4 * (declared["1"] + declared["8"])


def test_mlp_keeps_first_and_last_layers_float(tmp_path):
    torch.manual_seed(0)
    model, x = MLP((64, 128, 128, 10)).eval(), torch.randn(32, 64)
    gm = fxcompress.compile(model, (x,), profile="fpga-binary", techniques=["binary"],
                            tolerance=0.9)
    rep = gm.meta["fxcompress_report"]
    binary = [la.name for la in rep.layers if la.applied.startswith("binary")]
    assert binary == ["layers.1"]
    res = fxcompress.export(gm, (x,), tmp_path / "mlp.onnx")
    assert res.check_error <= 1e-6
    assert res.details["float_layers"] == ["layers.0", "layers.2"]
    assert res.details["quantizers"] == {"BipolarQuant_activations": 1,
                                         "BipolarQuant_weights": 1}
    assert res.details["weights_by_declared_bits"] == {"1": 128 * 128}
    assert res.details["float_weights"] == 64 * 128 + 128 * 10
    with torch.no_grad():
        x2 = torch.randn(32, 64)
        assert relative_error(_run(tmp_path / "mlp.onnx", x2), gm(x2)) <= 1e-6


def test_nothing_written_when_the_check_fails(binary_cnn, digits, tmp_path):
    gm, _ = binary_cnn
    x = digits[1][:8]
    with torch.no_grad():
        wrong = gm(x) + 1.0  # not what the file computes
    path = tmp_path / "d.onnx"
    with pytest.raises(InternalError, match="disagrees"):
        qw.write_qonnx(gm, (x,), path, gm.meta["fxcompress_report"], wrong, 1e-3)
    assert list(tmp_path.iterdir()) == []


def test_dynamic_activations_have_no_qonnx_form(tmp_path):
    from fxcompress.capture import capture
    from fxcompress.graph import find_layers
    from fxcompress.passes.int8 import Int8Config, int8_pass

    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 64)
    gm = capture(model, (x,)).graph_module
    names = frozenset(la.name for la in find_layers(gm))
    gm = int8_pass(gm, Int8Config(names, "qdq", "dynamic", {})).graph_module
    gm.recompile()
    assert any(n.target == qd.choose_qparams.tensor for n in gm.graph.nodes)
    with pytest.raises(FxCompressError, match="dynamic"):
        fxcompress.export(gm, (x,), tmp_path / "m.onnx", profile="fpga-binary")
    assert list(tmp_path.iterdir()) == []
