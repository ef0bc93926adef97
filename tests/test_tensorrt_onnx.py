"""The TensorRT ``.onnx`` writer (nvidia-gpu): fp16 weights and compute, int8 weight-only
DequantizeLinear, decodes folded into plain initializers, 2:4 weights listed in the metadata;
run in ONNX Runtime on CPU (TensorRT itself does not run here) and checked structurally."""

from __future__ import annotations

import json

import pytest
import torch

import fxcompress
from fxcompress import FxCompressError
from fxcompress.errors import InternalError
from fxcompress.export import relative_error

onnx = pytest.importorskip("onnx", reason="the TensorRT writer writes ONNX")
ort = pytest.importorskip("onnxruntime", reason="the TensorRT file is checked in ONNX Runtime")
pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript")

from fxcompress.export import tensorrt  # noqa: E402

FP16 = onnx.TensorProto.FLOAT16
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


class TinyMLP(torch.nn.Module):
    """Three linears, inputs divisible by 4 (2:4 needs runs of four)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)
        self.fc3 = torch.nn.Linear(64, 10)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _calib(n=6, rows=128):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 64, generator=g),) for _ in range(n)]


def _run(path, *inputs):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    return s.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})


def _by_type(model, op):
    return [n for n in model.graph.node if n.op_type == op]


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    """The tiny MLP with fc1 stored 2:4 and fc2 int8 (forced), written for nvidia-gpu."""
    model = TinyMLP().eval()
    cal = _calib()
    gm = fxcompress.compile(model, cal[0], profile="nvidia-gpu", calibration=cal,
                            objective="size", tolerance=0.5, seed=0,
                            overrides={"fc1": {"techniques": ["sparse"]},
                                       "fc2": {"techniques": ["int8"]},
                                       "fc3": {"skip": True}})
    code = gm.code
    path = tmp_path_factory.mktemp("trt") / "mlp.onnx"
    result = fxcompress.export(gm, cal[0], path)
    assert gm.code == code  # the compiled model is left as it was (its decodes still there)
    return gm, cal, path, result


def test_the_mlp_is_fp16_with_int8_dequantize_and_its_2_4_weight_listed(mlp_file):
    gm, cal, path, r = mlp_file
    applied = {la.name: la.applied for la in gm.meta["fxcompress_report"].layers}
    assert applied["fc1"].startswith("sparse(pattern=2:4") and applied["fc2"].startswith("int8")
    assert (r.writer, r.format, r.runtime, r.dynamic_batch) == ("tensorrt", ".onnx",
                                                                "onnxruntime", True)
    m = onnx.load(str(path))
    opset = {o.domain: o.version for o in m.opset_import}[""]
    assert opset <= tensorrt.TENSORRT_MAX_OPSET and m.ir_version <= tensorrt.TENSORRT_MAX_IR_VERSION
    inits = {t.name: t for t in m.graph.initializer}
    # every float weight fp16; the model's fp32 interface kept with casts at the boundary
    assert not [t.name for t in inits.values() if t.data_type in FLOATS]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len(_by_type(m, "Cast")) == 2
    # no decode left (the sparse pass's unpack / cumsum / gather ran once, at export)
    ops = {n.op_type for n in m.graph.node}
    assert ops <= {"Cast", "Gemm", "Relu", "DequantizeLinear"}, ops
    # fc2: int8 weight-only, one DequantizeLinear on the int8 initializer, fp16 scale, zero 0
    (dq,) = _by_type(m, "DequantizeLinear")
    q, s, z = (onnx.numpy_helper.to_array(inits[n]) for n in dq.input)
    assert q.dtype.name == "int8" and q.shape == (64, 128) and s.dtype.name == "float16"
    assert s.shape == (64,) and not z.any()
    assert torch.equal(torch.tensor(q), gm.fc2_int8_weight)
    # the dequantized output feeds the Gemm directly: no cast of the weight to run apart
    assert any(dq.output[0] in n.input for n in _by_type(m, "Gemm"))
    # fc1: 2:4 listed, along the Gemm's reduction axis, and holds it
    meta = {p.key: p.value for p in m.metadata_props}
    sparse = json.loads(meta[tensorrt.META_SPARSE])
    assert [(k, v["layer"]) for k, v in sparse.items()] == [("fc1.weight", "fc1")]
    (name, info), = sparse.items()
    w = onnx.numpy_helper.to_array(inits[name])
    assert w.dtype.name == "float16" and info["op"] == "Gemm"
    runs = torch.tensor(w).moveaxis(info["axis"], -1).reshape(-1, 4)
    assert w.shape[info["axis"]] == 64 and ((runs != 0).sum(1) <= 2).all()
    assert float((runs == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert meta[tensorrt.META_BUILDER_FLAGS] == "FP16,SPARSE_WEIGHTS"
    assert meta[tensorrt.META_PRECISION] == "fp16" and "fxcompress_report.json" in meta
    # what the writer counted is what the file holds: fp16 bytes of fc1, fc3 and the biases and
    # scale; int8 elements of fc2
    fp16_params = 128 * 64 + 128 + 64 + 10 * 64 + 10 + 64
    assert r.details["fp16_initializer_bytes"] == 2 * fp16_params
    assert r.details["int8_weights"] == 64 * 128
    assert (r.details["sparse_2_4_weights"], r.details["sparse_2_4_params"]) == (1, 128 * 64)
    assert r.details["fp32_tensors"] == 0 and r.details["sparse_2_4_not_trt_layout"] == 0


def test_the_mlp_agrees_within_the_fp16_bound_at_any_batch(mlp_file):
    gm, cal, path, r = mlp_file
    d = r.details
    # the bound: 4x what rounding every tensor to fp16 costs this model, or the check tolerance;
    # rounding to fp16 costs a few units of its roundoff (2^-11), not more
    assert tensorrt.FP16_UNIT_ROUNDOFF / 8 < d["fp16_rounding_error"] \
        < 4 * tensorrt.FP16_UNIT_ROUNDOFF
    assert d["check_bound"] == max(1e-3, tensorrt.FP16_NOISE_FACTOR * d["fp16_rounding_error"])
    assert 0 < r.check_error <= d["check_bound"] < 1e-2
    for x in (cal[1][0][:3], cal[2][0]):  # other rows, other batch sizes: the batch is dynamic
        with torch.no_grad():
            want = gm(x)
        err = relative_error(_run(path, x), want)
        assert 1e-5 < err <= d["check_bound"], err  # fp16: not bit-equal, but close


def test_the_digits_cnn_lists_only_weights_tensorrt_reads_as_2_4(digits_cnn, digits, tmp_path):
    batches, x_cal, _, _ = digits
    example = (x_cal[:32].contiguous(),)
    gm = fxcompress.compile(digits_cnn, example, profile="nvidia-gpu", calibration=batches,
                            objective="size", tolerance=0.5, seed=0,
                            overrides={"fc1": {"techniques": ["sparse"]},
                                       "conv2": {"techniques": ["sparse"]},
                                       "conv3": {"techniques": ["int8"]}})
    applied = {la.name: la.applied for la in gm.meta["fxcompress_report"].layers}
    assert applied["fc1"].startswith("sparse(pattern=2:4")
    assert applied["conv2"].startswith("sparse(pattern=2:4")
    assert applied["conv3"].startswith("int8")
    r = fxcompress.export(gm, example, tmp_path / "cnn.onnx")
    assert r.writer == "tensorrt" and r.check_error <= r.details["check_bound"] < 1e-2
    m = onnx.load(str(tmp_path / "cnn.onnx"))
    assert not [t.name for t in m.graph.initializer if t.data_type in FLOATS]
    sparse = json.loads({p.key: p.value for p in m.metadata_props}[tensorrt.META_SPARSE])
    # fc1's mask runs along its input features, TensorRT's K; conv2's 3x3 mask runs along
    # its flattened (in, kh, kw) columns, not along input channels as TensorRT's 2:4 does
    assert [(v["layer"], v["op"], v["axis"]) for v in sparse.values()] == [("fc1", "Gemm", 1)]
    assert r.details["sparse_2_4_not_trt_layout"] == 1
    dq = _by_type(m, "DequantizeLinear")
    assert len(dq) >= 1 and r.details["int8_weights"] >= 128 * 64 * 9
    assert any(dq[i].output[0] in n.input for i in range(len(dq)) for n in _by_type(m, "Conv"))
    with torch.no_grad():
        want = gm(x_cal[32:40])
    assert relative_error(_run(tmp_path / "cnn.onnx", x_cal[32:40]), want) \
        <= r.details["check_bound"]


def test_the_structural_check_refuses_a_wrong_file(mlp_file):
    _, _, path, _ = mlp_file
    m = onnx.load(str(path))
    assert tensorrt.check_structure(m, torch.float16)["sparse_2_4_weights"] == 1
    # a dense weight listed as 2:4
    dense = next(t.name for t in m.graph.initializer if list(t.dims) == [10, 64])
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    meta = next(p for p in bad.metadata_props if p.key == tensorrt.META_SPARSE)
    meta.value = json.dumps({dense: {"layer": "fc3", "op": "Gemm", "axis": 1}})
    with pytest.raises(InternalError, match="does not hold the pattern"):
        tensorrt.check_structure(bad, torch.float16)
    # an fp32 weight
    bad.CopyFrom(m)
    t = next(t for t in bad.graph.initializer if t.data_type == FP16)
    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype("float32"),
                                            t.name))
    with pytest.raises(InternalError, match="float constants not in"):
        tensorrt.check_structure(bad, torch.float16)
    # an opset TensorRT 10 does not parse
    bad.CopyFrom(m)
    next(o for o in bad.opset_import if o.domain == "").version = 23
    with pytest.raises(InternalError, match="opset 23"):
        tensorrt.check_structure(bad, torch.float16)


def test_a_model_that_overflows_fp16_is_refused_and_nothing_written(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    torch.nn.init.constant_(model[0].weight, 300.0)
    x = torch.full((2, 4), 300.0)  # outputs 360000 > 65504, fp16's largest
    path = tmp_path / "big.onnx"
    with pytest.raises(FxCompressError, match="overflows fp16"):
        fxcompress.export(model, (x,), path, profile="nvidia-gpu")
    assert list(tmp_path.iterdir()) == []
    # the same model at a tenth of the scale is written, and its own ATen graph exported
    torch.nn.init.constant_(model[0].weight, 30.0)
    r = fxcompress.export(model, (x / 10,), path, profile="nvidia-gpu")
    assert r.writer == "tensorrt" and r.check_error <= r.details["check_bound"]


def test_a_profile_computing_in_fp32_gets_fp32_weights_and_the_fp32_check(mlp_file, tmp_path):
    import dataclasses

    gm, cal, _, _ = mlp_file
    prof = dataclasses.replace(fxcompress.load_profile("nvidia-gpu"), compute_dtype="fp32")
    r = fxcompress.export(gm, cal[0], tmp_path / "fp32.onnx", profile=prof)
    assert r.writer == "tensorrt" and r.details["check_bound"] == 1e-3
    assert r.check_error < 1e-5  # the same arithmetic as the compiled model, in fp32
    m = onnx.load(str(tmp_path / "fp32.onnx"))
    kinds = {t.data_type for t in m.graph.initializer} - {onnx.TensorProto.INT8,
                                                          onnx.TensorProto.INT64}
    assert kinds == {onnx.TensorProto.FLOAT}
    assert not _by_type(m, "Cast") and len(_by_type(m, "DequantizeLinear")) == 1
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta[tensorrt.META_BUILDER_FLAGS] == "SPARSE_WEIGHTS"  # fp32: TensorRT's default
    assert r.details["fp32_initializer_bytes"] == 4 * (128 * 64 + 128 + 64 + 10 * 64 + 10 + 64)


class WideMLP(torch.nn.Module):
    """Linears with 256 inputs (two of nvidia-gpu's 128-column INT4 blocks a row) and 128
    (one block a row, which the exporter writes without the reshapes around it)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(256, 128)
        self.fc2 = torch.nn.Linear(128, 16)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_int4_weights_are_tensorrt_blocked_dequantize_of_int4_initializers(tmp_path):
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(64, 256, generator=g),) for _ in range(16)]
    x = torch.randn(4, 256, generator=g)
    kw = dict(profile="nvidia-gpu", calibration=calib, tolerance=0.3, holdout=0)
    # latency, nvidia-gpu's objective: weight-only int4 gains no speed there, so none is made
    fast = fxcompress.compile(WideMLP(), (x,), **kw)
    layers = fast.meta["fxcompress_report"].layers
    assert all(lay.applied.split("(")[0] != "intx" for lay in layers)
    assert any("weight-only" in c.verdict for lay in layers for c in lay.candidates
               if c.rewrite == "intx")
    # size: int4 weight-only where it holds the tolerance, against int8 weight-only
    files = {}
    for tech in ("intx", "int8"):
        gm = fxcompress.compile(WideMLP(), (x,), objective="size", techniques=[tech],
                                overrides={"*": {"techniques": [tech]}}, **kw)
        files[tech] = (gm, fxcompress.export(gm, (x,), tmp_path / f"{tech}.onnx"))
    gm, res = files["intx"]
    applied = [lay.params for lay in gm.meta["fxcompress_report"].layers
               if lay.applied.startswith("intx")]
    assert applied and all(p["bits"] == 4 and p["group"] == 128 for p in applied)
    assert res.details["int4_blocks"] == len(applied) and res.details["opset"] == 21
    model = onnx.load(str(res.path))
    onnx.checker.check_model(model, full_check=True)
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == len(applied)
    for dq in _by_type(model, "DequantizeLinear"):
        attrs = {a.name: a.i for a in dq.attribute}
        if dq.input[0] in {t.name for t in int4}:
            assert attrs == {"axis": 1, "block_size": 128}
            scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
            assert scale.data_type == FP16 and list(scale.dims)[1] * 128 in (256, 128)
    # the file agrees with the compiled model within the fp16 bound, in ONNX Runtime
    got = torch.from_numpy(_run(res.path, x)[0]).float()
    assert relative_error(gm(x), got) <= res.details["check_bound"]
    # two codes a byte: the int4 file is smaller than the int8 one by about half a byte a code
    assert files["int8"][1].size_bytes - res.size_bytes > (256 * 128 + 128 * 16) * 0.4
    # the .pt2 stores the weight-only codes two a byte too, with the same outputs
    from fxcompress.export import nbits

    packed = nbits.packed_graph(gm)
    assert packed is not gm and torch.equal(packed(x), gm(x))
    assert any(b.dtype == torch.uint8 and b.numel() == 256 * 128 // 2
               for b in packed.buffers())
