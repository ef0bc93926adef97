"""fxcompress.export: .pt2 / .pte / .onnx files, each run in its own runtime and compared with
the compiled model; int8 Q/DQ graphs lowered to int8 kernels; atomic writes; safe loading."""

import copy
import dataclasses
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)
from torch import nn
from torch.export import Dim

import fxcompress
from fxcompress import FxCompressError, InternalError
from fxcompress.report import Report

ex = sys.modules["fxcompress.export"]  # the module; `fxcompress.export` is the function
qd = torch.ops.quantized_decomposed
X = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
CAL = [(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(3)]


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def _fp32_pt2_bytes(model, x) -> int:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(model, (x.clone(),), strict=False), buf)
    return buf.getbuffer().nbytes


@pytest.fixture(scope="module")
def compiled():
    model = _cnn()
    small = fxcompress.compile(model, (X,), profile="mobile-arm", calibration=CAL, tolerance=0.05,
                               techniques=["int8"])
    assert any(lay.applied != "none" for lay in small.meta["fxcompress_report"].layers)
    return model, small


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_pt2_keeps_report_and_dynamic_batch(compiled, tmp_path):
    model, small = compiled
    out = fxcompress.export(small, (X,), tmp_path / "m.pt2")
    assert out.path.is_file() and out.size_bytes == out.path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]  # no staging left
    loaded = ex.load_program(out.path)
    loaded.module().graph.lint()
    x3 = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x3), small(x3))  # any batch, same numbers
    data = ex.read_report(out.path)
    assert data == small.meta["fxcompress_report"].to_dict()
    assert Report.from_dict(data).profile == "mobile-arm"
    # int8 weights are stored as int8: the file is smaller than the fp32 program
    assert out.size_bytes < 0.5 * _fp32_pt2_bytes(model, X)


def test_pt2_records_deflate_by_the_cheaper_strategy():
    import zlib

    from fxcompress.export import pt2

    g = torch.Generator().manual_seed(0)
    codes = (torch.randn(200_000, generator=g) * 3 + 128).round().clamp(0, 255).to(torch.uint8)
    data = codes.numpy().tobytes()
    p = torch.bincount(codes.long(), minlength=256).double() / codes.numel()
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum()) * codes.numel() / 8
    got = pt2.record_bytes(data)
    # unordered byte codes: Huffman codes alone reach their entropy, string matching does not
    assert got < 1.02 * entropy < len(zlib.compress(data, 9))
    text = json.dumps([{"op": "aten.linear", "args": [i, i + 1]} for i in range(3000)])
    assert pt2.record_bytes(text.encode()) == len(zlib.compress(text.encode(), 9)) - 6
    noise = torch.randint(0, 256, (100_000,), generator=g, dtype=torch.uint8)
    assert pt2.record_bytes(noise.numpy().tobytes()) == 100_000  # stored as it is


def test_pt2_is_compact_host_free_and_reproducible(compiled, tmp_path):
    model, small = compiled
    (tmp_path / "a").mkdir()
    a = fxcompress.export(small, (X,), tmp_path / "a" / "m.pt2").path
    b_dir = tmp_path / "elsewhere" / "deeper"
    b_dir.mkdir(parents=True)
    b = fxcompress.export(small, (X,), b_dir / "m.pt2").path
    assert a.read_bytes() == b.read_bytes()  # same program, same bytes, wherever written
    with zipfile.ZipFile(a) as z:
        infos = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
        program = z.read(infos["models/model.json"].filename)
        # the JSON records are deflated (a tenth of their bytes or less) ...
        for name in ("models/model.json", "data/weights/model_weights_config.json"):
            assert infos[name].compress_type == zipfile.ZIP_DEFLATED
            assert infos[name].compress_size < infos[name].file_size / 5
        # ... int8 codes are stored as they are, at 64-byte offsets as torch places them
        stored = [i for n, i in infos.items() if n.startswith("data/weights/weight_")
                  and i.compress_type == zipfile.ZIP_STORED]
        assert stored
        with open(a, "rb") as f:
            for i in stored:
                f.seek(i.header_offset + 26)
                n, m = (int.from_bytes(f.read(2), "little") for _ in range(2))
                assert (i.header_offset + 30 + n + m) % 64 == 0
    # no source lines naming this host's paths (torch's, the tests', the checkout's)
    for where in (torch.__file__, __file__, fxcompress.__file__):
        assert str(Path(where).parent).encode() not in program
    assert b'"stack_trace"' not in program
    raw = io.BytesIO()
    torch.export.save(torch.export.export(small, (X,), strict=False), raw)
    assert a.stat().st_size < raw.getbuffer().nbytes
    loaded = torch.export.load(a).module()  # torch's own reader, deflated records and all
    assert torch.allclose(loaded(X), small(X), atol=1e-5)


def test_the_int8_check_tolerance_grows_with_the_quantization_noise(compiled):
    """A file of a graph with int8 activations may differ from the compiled model by rounding
    in every requantization, noise of the size of the plan's own: the default check allows
    1.5x the error the report measured, and never less than 5e-2; float graphs keep 1e-3."""
    import copy
    import dataclasses

    model, small = compiled
    assert ex.has_quantized_activations(small)
    rep = small.meta["fxcompress_report"]
    assert ex.default_check_tolerance(small) == max(ex.INT8_CHECK_TOLERANCE,
                                                    ex.INT8_NOISE_FACTOR * rep.error)
    noisy = copy.copy(small)
    noisy.meta = {**small.meta, "fxcompress_report": dataclasses.replace(rep, error=0.08)}
    assert ex.default_check_tolerance(noisy) == pytest.approx(0.12)
    noisy.meta = {}
    assert ex.default_check_tolerance(noisy) == ex.INT8_CHECK_TOLERANCE  # no report
    assert ex.default_check_tolerance(model) == ex.FLOAT_CHECK_TOLERANCE


def test_pte_runs_in_executorch_with_xnnpack(compiled, tmp_path):
    _, small = compiled
    out = fxcompress.export(small, (X,), tmp_path / "m.pte")  # profile from the report
    assert out.delegate == "xnnpack" and out.runtime == "executorch"
    assert sum(out.delegated_ops.values()) > 0
    got = ex.PteProgram(out.path)(X)[0]
    # the fixture quantizes activations (static Q/DQ): XNNPACK's int8 kernels round differently
    # from torch's reference Q/DQ, so agreement is within the int8 check tolerance
    with torch.no_grad():
        assert _rel(got, small(X)) < ex.INT8_CHECK_TOLERANCE
    assert out.check_error < ex.INT8_CHECK_TOLERANCE
    # same class wherever the top-2 margin exceeds twice the difference (no flip is possible
    # there; the random model's near-ties may flip either way)
    with torch.no_grad():
        y = small(X)
    top2 = y.topk(2, 1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (got - y).norm(dim=1)
    assert int(clear.sum()) >= 4 and bool((got.argmax(1) == y.argmax(1))[clear].all())


def test_onnx_runs_in_onnxruntime_with_any_batch(compiled, tmp_path):
    _, small = compiled
    out = fxcompress.export(small, (X,), tmp_path / "m.onnx")
    assert out.size_bytes == ex.file_size(out.path) >= out.path.stat().st_size
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 1, 8, 8)
    got = session.run(None, {session.get_inputs()[0].name: x5.numpy()})[0]
    with torch.no_grad():  # ONNX Runtime's int8 kernels: within the int8 check tolerance
        assert _rel(torch.from_numpy(got), small(x5)) < ex.INT8_CHECK_TOLERANCE
    assert ex.read_report(out.path)["profile"] == "mobile-arm"


class _QDQLinear(nn.Module):
    """int8 linear in the quantized_decomposed Q/DQ form XNNPACK and ONNX Runtime fuse: static
    per-tensor activations, per-channel symmetric weights, quantized output."""

    def __init__(self, lin: nn.Linear, in_scale: float, out_scale: float):
        super().__init__()
        w = lin.weight.detach()
        scale = w.abs().amax(1) / 127
        self.register_buffer("wq", torch.round(w / scale[:, None]).clamp(-127, 127)
                             .to(torch.int8))
        self.register_buffer("ws", scale)
        self.register_buffer("wz", torch.zeros(w.shape[0], dtype=torch.int64))
        self.bias = nn.Parameter(lin.bias.detach().clone())
        self.in_scale, self.out_scale = in_scale, out_scale

    def _qdq(self, x, s):
        q = qd.quantize_per_tensor.default(x, s, 0, -128, 127, torch.int8)
        return qd.dequantize_per_tensor.default(q, s, 0, -128, 127, torch.int8)

    def forward(self, x):
        w = qd.dequantize_per_channel.default(self.wq, self.ws, self.wz, 0, -127, 127,
                                              torch.int8)
        return self._qdq(nn.functional.linear(self._qdq(x, self.in_scale), w, self.bias),
                         self.out_scale)


@pytest.fixture(scope="module")
def qdq_graph():
    torch.manual_seed(0)
    model = nn.Sequential(_QDQLinear(nn.Linear(64, 32), 4 / 127, 6 / 127), nn.ReLU(),
                          _QDQLinear(nn.Linear(32, 10), 6 / 127, 4 / 127)).eval()
    x = torch.randn(4, 64)
    gm = torch.export.export(model, (x,), strict=False).module()
    return gm, x


def test_qdq_graph_is_delegated_whole_to_xnnpack(qdq_graph, tmp_path):
    gm, x = qdq_graph
    ep = torch.export.export(gm, (x,), strict=False)
    census = ex.count_delegated(ep, "xnnpack")
    assert census.count("quantized_decomposed", delegated=False) == 0
    assert census.count("quantized_decomposed.dequantize_per_channel") == 2
    assert census.count("quantized_decomposed.quantize_per_tensor") == 4
    assert census.count("aten.linear") == 2 and census.partitions == 1
    assert sum(census.undelegated.values()) == 0
    path = tmp_path / "q.pte"
    path.write_bytes(ex.lower_to_pte(ep, "xnnpack"))
    got = ex.PteProgram(path)(x)[0]
    with torch.no_grad():
        assert _rel(got, gm(x)) < ex.INT8_CHECK_TOLERANCE


def test_qdq_graph_becomes_onnx_quantize_dequantize_linear(qdq_graph, tmp_path):
    gm, x = qdq_graph
    out = fxcompress.export(gm, (x,), tmp_path / "q.onnx")
    model = onnx.load(str(out.path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 6
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # standard ops only
    # full-range int8 weights are stored as uint8 with zero point 128 (the same values), which
    # ONNX Runtime computes exactly on any x86 CPU (u8 x s8 saturates without VNNI)
    weights = [i for i in model.graph.initializer
               if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 2]
    assert sorted(tuple(i.dims) for i in weights) == [(10, 32), (32, 64)]  # stored in a byte
    assert not any(i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer)
    w = onnx.numpy_helper.to_array(next(i for i in weights if tuple(i.dims) == (32, 64)))
    assert (w.astype(int) - 128 == gm.get_buffer("0.wq").numpy()).all()
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert _rel(torch.from_numpy(got), gm(x)) < ex.INT8_CHECK_TOLERANCE


def test_onnxruntime_runs_a_qdq_linear_as_an_int8_kernel(tmp_path):
    torch.manual_seed(0)
    layer = _QDQLinear(nn.Linear(64, 32), 4 / 127, 6 / 127).eval()
    x = torch.randn(4, 64)
    gm = torch.export.export(layer, (x,), strict=False).module()
    out = fxcompress.export(gm, (x,), tmp_path / "one.onnx")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(out.path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert "QGemm" in ops and "Gemm" not in ops  # DQ -> Gemm -> Q fused into int8 QGemm


class _DynamicQDQLinear(_QDQLinear):
    """int8 linear with dynamic per-tensor activations: scale and zero point chosen from each
    input at run time (``choose_qparams.tensor``), as mobile-arm's dynamic int8 writes it."""

    def forward(self, x):
        s, z = qd.choose_qparams.tensor(x, -128, 127, torch.finfo(torch.float32).eps,
                                        torch.int8)
        xq = qd.quantize_per_tensor.tensor(x, s, z, -128, 127, torch.int8)
        xd = qd.dequantize_per_tensor.tensor(xq, s, z, -128, 127, torch.int8)
        w = qd.dequantize_per_channel.default(self.wq, self.ws, self.wz, 0, -127, 127,
                                              torch.int8)
        return nn.functional.linear(xd, w, self.bias)


def test_dynamic_qdq_graph_lowers_and_exports(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(_DynamicQDQLinear(nn.Linear(64, 32), 0, 0), nn.ReLU(),
                          _DynamicQDQLinear(nn.Linear(32, 10), 0, 0)).eval()
    x = torch.randn(4, 64)
    gm = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},),
                             strict=False).module()
    census = ex.count_delegated(torch.export.export(gm, (x,), strict=False), "xnnpack")
    assert census.count("quantized_decomposed.choose_qparams") == 2
    assert sum(census.undelegated.values()) == 0
    # ONNX: the dynamic parameters are computed in the graph, exactly as torch computes them
    out = fxcompress.export(gm, (x,), tmp_path / "d.onnx")
    assert out.dynamic_batch
    onnx_model = onnx.load(str(out.path))
    ops = [n.op_type for n in onnx_model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4
    assert all(n.domain in ("", "ai.onnx") for n in onnx_model.graph.node)
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    x7 = torch.randn(7, 64) * 3
    got = session.run(None, {session.get_inputs()[0].name: x7.numpy()})[0]
    with torch.no_grad():
        assert _rel(torch.from_numpy(got), gm(x7)) < 1e-5


def test_failed_check_writes_nothing_and_keeps_the_old_file(compiled, tmp_path, monkeypatch):
    _, small = compiled
    target = tmp_path / "m.pt2"
    target.write_bytes(b"old")
    monkeypatch.setattr(ex, "relative_error", lambda got, expected: 1.0)  # a file that disagrees
    with pytest.raises(InternalError, match="disagrees"):
        fxcompress.export(small, (X,), target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


def test_an_exporter_that_refuses_the_program_is_an_export_error(compiled, tmp_path,
                                                                  monkeypatch):
    """torch.onnx / ExecuTorch refusing a program (Swin's and T5's .onnx, GPT-2's .pte in the
    architecture matrix, the uncompressed models too) is their limit, not our bug: an
    ExportError naming the tool, the one-line check on the original model, and what to ship
    instead; nothing is written."""
    _, small = compiled

    def refuse(*args, **kwargs):
        raise RuntimeError("Failed to decompose the FX graph")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(fxcompress.ExportError) as err:
        fxcompress.export(small, (X,), tmp_path / "m.onnx")
    msg = str(err.value)
    assert isinstance(err.value, FxCompressError)
    assert "torch.onnx" in msg and "decompose" in msg and "original model" in msg
    assert "model.pt2" in msg  # what to do meanwhile
    exir = pytest.importorskip("executorch.exir")
    monkeypatch.setattr(exir, "to_edge_transform_and_lower", refuse)
    with pytest.raises(fxcompress.ExportError, match="ExecuTorch's lowering"):
        fxcompress.export(small, (X,), tmp_path / "m.pte")
    assert list(tmp_path.iterdir()) == []


def test_user_mistakes_are_fxcompress_errors(compiled, tmp_path):
    model, small = compiled
    with pytest.raises(FxCompressError, match="suffix"):
        fxcompress.export(small, (X,), tmp_path / "m.tflite")
    with pytest.raises(FxCompressError, match="does not exist"):
        fxcompress.export(small, (X,), tmp_path / "no" / "m.pt2")
    with pytest.raises(FxCompressError, match="profile="):
        fxcompress.export(model, (X,), tmp_path / "m.pte")  # no report, no profile
    unknown = dataclasses.replace(fxcompress.load_profile("mobile-arm"), delegate="tpu9000")
    with pytest.raises(FxCompressError, match="known delegates"):
        fxcompress.export(small, (X,), tmp_path / "m.pte", profile=unknown)
    # Core ML lowers here but its runtime exists only on Apple systems: name what to install
    coreml = dataclasses.replace(unknown, delegate="coreml")
    with pytest.raises(FxCompressError, match="macOS"):
        fxcompress.export(small, (X,), tmp_path / "m.pte", profile=coreml)
    assert list(tmp_path.iterdir()) == []


def test_load_program_refuses_pickles_and_strangers(tmp_path):
    torch.save(_cnn(), tmp_path / "pickled.pt2")
    with pytest.raises(FxCompressError, match="pickle"):
        ex.load_program(tmp_path / "pickled.pt2")
    (tmp_path / "text.pt2").write_text("hello")
    with pytest.raises(FxCompressError, match="not a saved program"):
        ex.load_program(tmp_path / "text.pt2")
    with pytest.raises(FxCompressError, match="does not exist"):
        ex.load_program(tmp_path / "missing.pt2")
    # a real archive whose weight entry claims to be pickled is refused before loading
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(_cnn(), (X,)), good)
    ex.load_program(good)
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                next(iter(cfg["config"].values()))["use_pickle"] = True
                data = json.dumps(cfg).encode()
            zout.writestr(item, data)
    with pytest.raises(FxCompressError, match="pickled"):
        ex.load_program(bad)


# --- export once: the programs compile exported are reused ----------------------------------
def _count_exports(monkeypatch) -> list:
    """Count `torch.export.export` calls (looked up as `torch.export.export` by
    `fxcompress.export.to_exported_program` and by compile)."""
    calls = []
    real = torch.export.export

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def test_pt2_reuses_the_program_compile_exported(compiled, tmp_path, monkeypatch):
    _, small = compiled
    assert isinstance(small.meta[ex.PROGRAM_KEY], ex.StoredProgram)
    assert ex.stored_program(small) is small.meta[ex.PROGRAM_KEY].program
    calls = _count_exports(monkeypatch)
    out = fxcompress.export(small, (X,), tmp_path / "m.pt2")
    assert calls == []  # lowered from the stored program: no second export
    assert out.dynamic_batch and out.check_error <= ex.FLOAT_CHECK_TOLERANCE
    loaded = ex.load_program(out.path)
    with torch.no_grad():
        for batch in (2, 5, 8):
            torch.testing.assert_close(loaded.module()(X[:batch]), small(X[:batch]))
    # the archive stores two rows of the caller's inputs, as a fresh export would
    assert [tuple(x.shape) for x in loaded.example_inputs[0]] == [(2, 1, 8, 8)]
    assert torch.equal(loaded.example_inputs[0][0], X[:2])
    stored = small.meta[ex.PROGRAM_KEY].program  # left as compile stored it
    assert ex.stored_program(small) is stored and stored.example_inputs[0][0].shape[0] == 8
    assert ex.read_report(out.path) == small.meta["fxcompress_report"].to_dict()


def test_a_model_changed_in_place_is_exported_afresh(tmp_path, monkeypatch):
    small = fxcompress.compile(_cnn(), (X,), profile="mobile-arm", calibration=CAL,
                               tolerance=0.05, techniques=["int8"])
    bias = next(p for name, p in small.named_parameters() if name.endswith("bias"))
    calls = _count_exports(monkeypatch)
    with torch.no_grad():
        before = small(X)
        bias.add_(1.0)  # a weight of the compiled model, changed in place
        after = small(X)
    assert not torch.allclose(before, after)
    assert ex.stored_program(small) is None  # the fingerprint no longer matches
    out = fxcompress.export(small, (X,), tmp_path / "changed.pt2")
    assert calls  # exported afresh
    with torch.no_grad():
        got = ex.load_program(out.path).module()(X)
    torch.testing.assert_close(got, after)  # the file holds the changed weight
    # a change through .data escapes the version counter: the stored program is still taken,
    # its file disagrees with the model, and the model is exported afresh
    small.meta[ex.PROGRAM_KEY] = ex.StoredProgram(ex.load_program(out.path), small, True)
    assert ex.stored_program(small) is not None
    bias.data.add_(1.0)
    with torch.no_grad():
        after = small(X)
    assert ex._reusable_program(small, (X,), dynamic_batch=True) is not None
    calls.clear()
    out = fxcompress.export(small, (X,), tmp_path / "data.pt2")
    assert calls
    with torch.no_grad():
        torch.testing.assert_close(ex.load_program(out.path).module()(X), after)
    # a weight replaced by another tensor is noticed too
    replacement = tmp_path / "replaced.pt2"
    name = next(n for n, _ in small.named_parameters() if n.endswith("bias"))
    owner = small.get_submodule(name.rpartition(".")[0]) if "." in name else small
    setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(bias.detach() * 0))
    assert ex.stored_program(small) is None
    calls.clear()
    fxcompress.export(small, (X,), replacement)
    assert calls


def test_other_example_shapes_reuse_or_export_as_before(compiled, tmp_path, monkeypatch):
    _, small = compiled
    calls = _count_exports(monkeypatch)
    # another batch within the program's dynamic batch: reused
    out = fxcompress.export(small, (X[:3],), tmp_path / "b3.pt2")
    assert calls == [] and out.dynamic_batch
    # a batch of 1 is outside the stored program's range: exported afresh, as before
    out = fxcompress.export(small, (X[:1],), tmp_path / "b1.pt2")
    assert calls and out.dynamic_batch
    with torch.no_grad():
        torch.testing.assert_close(ex.load_program(out.path).module()(X[:4]), small(X[:4]))
    # a .pte is a program for fixed shapes: the stored, dynamic one is not lowered
    assert ex._reusable_program(small, (X,), dynamic_batch=False) is None
    # inputs that do not fit the model: the same error as without a stored program
    with pytest.raises(FxCompressError, match="do not fit"):
        fxcompress.export(small, (torch.randn(3, 1, 7, 7),), tmp_path / "bad.pt2")
    with pytest.raises(FxCompressError, match="do not fit"):
        fxcompress.export(small, (X.double(),), tmp_path / "bad.pt2")
    assert not (tmp_path / "bad.pt2").exists()


def test_copies_and_reexports_of_a_compiled_model_carry_no_stale_program(compiled):
    _, small = compiled
    copied = copy.deepcopy(small)  # the programs are dropped on copy, not deep-copied
    assert repr(copied.meta[ex.PROGRAM_KEY]) == "StoredProgram(empty)"
    assert ex.stored_program(copied) is None
    with torch.no_grad():
        torch.testing.assert_close(copied(X), small(X))
    ep = torch.export.export(small, (X,), strict=False)  # still chains with torch.export
    assert ex.stored_program(ep.module()) is None  # not the module the program describes
    assert pickle.loads(pickle.dumps(small.meta[ex.PROGRAM_KEY])).program is None


def test_pte_lowers_a_stored_static_program(tmp_path, monkeypatch):
    """A program captured with a fixed batch is stored static: a .pte of the same shapes is
    lowered from it, without exporting the model again."""
    ep = torch.export.export(_cnn(), (X,), strict=False)  # static batch
    small = fxcompress.compile(ep, (X,), profile="mobile-arm", calibration=[(X,)],
                               tolerance=0.05, techniques=["int8"])
    program = ex.stored_program(small)
    assert program is not None and not program.range_constraints
    assert ex._reusable_program(small, (X,), dynamic_batch=False) is program
    assert ex._reusable_program(small, (X[:4],), dynamic_batch=False) is None  # other shape
    pytest.importorskip("executorch.runtime")
    exported = []
    real = ex.pte.to_exported_program
    monkeypatch.setattr(ex.pte, "to_exported_program",
                        lambda *a, **k: exported.append(1) or real(*a, **k))
    out = fxcompress.export(small, (X,), tmp_path / "m.pte")
    assert exported == [] and out.delegate == "xnnpack"
    with torch.no_grad():
        assert _rel(ex.PteProgram(out.path)(X)[0], small(X)) < ex.INT8_CHECK_TOLERANCE


def test_a_program_with_a_dynamic_batch_compiles_to_a_reusable_program(tmp_path, monkeypatch):
    """What the CLI compiles (a saved ExportedProgram with a dynamic batch) keeps its dynamic
    batch in the program compile exports, so writing it as .pt2 or .onnx exports nothing
    again, at any batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(8, 16)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO},), strict=False)
    small = fxcompress.compile(ep, (x,), profile="mobile-arm", tolerance=0.05,
                               # not intx: its layers become MatMulNBits calls for .onnx,
                               # a fresh export by design
                               techniques=["svd", "int8"],
                               calibration=[(torch.randn(64, 16),)] * 4)
    assert small.meta["fxcompress_report"].dynamic_batch
    calls = _count_exports(monkeypatch)
    for name, batch in (("m.pt2", x), ("m.onnx", torch.randn(3, 16))):
        written = fxcompress.export(small, (batch,), tmp_path / name)
        assert written.path.exists()
    assert calls == []
