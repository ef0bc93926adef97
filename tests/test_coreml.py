"""Core ML packages (`.mlpackage`, apple-ane): palettes stored as Core ML lookup tables, int8 as
its blockwise-scaled weights, sparse weights as its bit mask + values; weights read back equal
the compiled model's, bytes match fxcompress's accounting, outputs agree."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("coremltools", reason="writing .mlpackage files needs coremltools")

import fxcompress  # noqa: E402
from fxcompress.capture import capture  # noqa: E402
from fxcompress.errors import InternalError  # noqa: E402
from fxcompress.export import coreml, default_check_tolerance, file_size  # noqa: E402
from fxcompress.graph import find_layers, get_attr  # noqa: E402
from fxcompress.passes import share  # noqa: E402


def _constexpr(prog) -> dict[str, list]:
    """The package's outermost constexpr ops (those a compute op reads), by op type."""
    out: dict[str, list] = {}
    for op in prog.functions["main"].operations:
        if op.op_type.startswith("constexpr_") and not any(
                c.op_type.startswith("constexpr_") for v in op.outputs for c in v.child_ops):
            out.setdefault(op.op_type, []).append(op)
    return out


def _decoded(op) -> np.ndarray:
    got = coreml.decompress(op)
    return (got[-1] if isinstance(got, tuple) else got).astype(np.float32)


@pytest.fixture(scope="module")
def digits_package(digits_cnn, digits, tmp_path_factory):
    batches, x_cal, _, _ = digits
    model = copy.deepcopy(digits_cnn)
    before = copy.deepcopy(model.state_dict())
    small = fxcompress.compile(model, (x_cal[:8],), profile="apple-ane", objective="size",
                               calibration=batches, tolerance=0.02, techniques=["share"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    path = tmp_path_factory.mktemp("coreml") / "digits.mlpackage"
    res = fxcompress.export(small, (x_cal[:8],), path, profile="apple-ane")
    return small, res, model


def test_digits_cnn_palettes_are_core_ml_luts_of_fxcompress_bytes(digits_package):
    small, res, model = digits_package
    rep = small.meta["fxcompress_report"]
    shared = [lay for lay in rep.layers if lay.applied.startswith("share(")]
    assert len(shared) >= 3
    assert res.format == ".mlpackage" and res.path.is_dir() and res.writer == "coreml"
    assert res.size_bytes == file_size(res.path)
    prog, spec = coreml.load_package(res.path)
    luts = _constexpr(prog).get("constexpr_lut_to_dense", [])
    assert len(luts) == len(shared)
    # each palette is stored with the index width fxcompress chose
    widths = sorted(op.indices.dtype.get_bitwidth() for op in luts)
    assert widths == sorted(lay.params["bits"] for lay in shared)
    d = res.details
    assert d["compressed_weights"] == {"lut": len(shared)}
    assert 0.9 <= d["ratio"]["lut"] <= 1.1  # the palettes' bytes are fxcompress's
    assert d["weight_readback_max_diff"] == 0.0
    # the package is small: below 0.3 x the original model's weights in fp16 (measured 0.24)
    fp16_bytes = sum(p.numel() * 2 for p in model.parameters())
    assert res.size_bytes < 0.3 * fp16_bytes
    assert d["weight_bin_bytes"] < 1.1 * (d["package_bytes"]["lut"] + d["package_bytes"]["fp16"])
    assert res.check_error < coreml.FP16_CHECK_TOLERANCE


def test_digits_cnn_weights_read_back_equal_the_compiled_models(digits_package):
    small, res, _ = digits_package
    prog, _ = coreml.load_package(res.path)
    _, weights = coreml._fold_weights(small)
    decoded = {w.name: w.dense for w in weights if w.kind == "lut"}
    got = [_decoded(op) for op in _constexpr(prog)["constexpr_lut_to_dense"]]
    for name, w in decoded.items():
        ref = w.numpy().astype(np.float16).astype(np.float32)
        assert sum(g.shape == ref.shape and np.array_equal(g, ref) for g in got) == 1, name


class Mlp(nn.Module):
    def __init__(self, width: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, 96 if width == 128 else width)
        self.fc3 = nn.Linear(self.fc2.out_features, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _forced_palettes():
    """A tiny MLP whose layers are palettized as fxcompress stores them: fc1 4-bit grouped
    (one table per 16 output channels), fc2 2-bit with int8 table entries, fc3 left fp16."""
    torch.manual_seed(0)
    model = Mlp().eval()
    x = (torch.randn(4, 64),)
    gm = capture(model, x).graph_module
    layers = {lay.name: lay for lay in find_layers(gm)}
    books, specs = {}, {}
    for name, bits, grouped, lut_int8 in (("fc1", 4, True, False), ("fc2", 2, False, True)):
        w = get_attr(gm, layers[name].weight_target).detach()
        cb = share.cluster(w, bits, share.group_count(w.shape[0], grouped), lut_int8=lut_int8,
                           seed=0)
        books[name] = cb
        specs[name] = share.ShareSpec(bits, grouped, lut_int8, 0, ((w, cb),))
    out = share.share_pass(copy.deepcopy(gm), share.ShareConfig(specs)).graph_module
    out.recompile()
    return model, out, x, books


def test_forced_palettes_are_stored_with_fxcompress_indices_and_tables(tmp_path):
    model, gm, x, books = _forced_palettes()
    res = fxcompress.export(gm, x, tmp_path / "mlp.mlpackage", profile="apple-ane")
    prog, _ = coreml.load_package(res.path)
    luts = _constexpr(prog)["constexpr_lut_to_dense"]
    assert len(luts) == 2
    by_shape = {tuple(op.outputs[0].shape): op for op in luts}
    for cb in books.values():
        op = by_shape[cb.shape]
        # the indices are fxcompress's, the tables its own, entry for entry
        assert np.array_equal(op.indices.val.reshape(cb.groups, -1).astype(np.int64),
                              cb.indices.long().numpy())
        assert np.array_equal(_decoded(op), cb.decode().numpy().astype(np.float16)
                              .astype(np.float32))
    # fc2's int8 table entries are kept int8, scaled in fp16
    fc2 = by_shape[books["fc2"].shape]
    assert fc2.lut.op.op_type == "constexpr_blockwise_shift_scale"
    assert fc2.lut.op.data.val.dtype == np.int8
    d = res.details
    stored = sum(cb.stored_bytes for cb in books.values())
    assert d["fxcompress_bytes"]["lut"] == stored
    assert 0.9 * stored <= d["package_bytes"]["lut"] <= 1.1 * stored
    # fc3 and the biases in fp16: half of fxcompress's fp32
    assert d["package_bytes"]["fp16"] == d["fxcompress_bytes"]["fp16"] // 2
    assert res.check_error < coreml.FP16_CHECK_TOLERANCE


def test_the_program_runs_as_the_model_computes(tmp_path):
    # run_program, the check's interpreter, against the compiled model: a wrong op (a
    # dropped bias, a transposed table) would be off by the size of the output
    _, gm, x, _ = _forced_palettes()
    res = fxcompress.export(gm, x, tmp_path / "mlp.mlpackage", profile="apple-ane")
    prog, spec = coreml.load_package(res.path)
    x2 = torch.randn(4, 64)
    got = coreml.run_program(prog, {spec.description.input[0].name: x2.numpy()})[0]
    ref = gm(x2).detach().numpy()
    assert np.linalg.norm(got.astype(np.float32) - ref) < 5e-3 * np.linalg.norm(ref)


@pytest.mark.parametrize("technique", ["int8", "sparse"])
def test_int8_and_sparse_weights_take_core_ml_forms(technique, tmp_path):
    torch.manual_seed(0)
    model = Mlp(256).eval()  # layers large enough to repay a sparse decode
    calib = [(torch.randn(32, 64),) for _ in range(4)]
    small = fxcompress.compile(model, calib[0], profile="apple-ane", calibration=calib,
                               techniques=[technique], tolerance=0.5, holdout=0)
    applied = [lay for lay in small.meta["fxcompress_report"].layers
               if lay.applied.startswith(technique)]
    assert applied
    res = fxcompress.export(small, calib[0], tmp_path / "m.mlpackage")
    prog, _ = coreml.load_package(res.path)
    ops = _constexpr(prog)
    kind = {"int8": "constexpr_blockwise_shift_scale", "sparse": "constexpr_sparse_to_dense"}
    assert len(ops.get(kind[technique], [])) == len(applied)
    storage = res.details["package_bytes"][technique]
    dense = sum(lay.params_after * 2 for lay in applied)  # as fp16 they would take this
    assert storage < 0.75 * dense
    assert res.details["compressed_weights"]
    assert res.check_error < max(coreml.FP16_CHECK_TOLERANCE,
                                 default_check_tolerance(small))


def test_a_failed_check_writes_nothing_and_keeps_the_old_package(tmp_path):
    _, gm, x, _ = _forced_palettes()
    path = tmp_path / "mlp.mlpackage"
    fxcompress.export(gm, x, path, profile="apple-ane")
    before = sorted((p.relative_to(path), p.stat().st_size) for p in path.rglob("*"))
    with torch.no_grad():
        wrong = gm(*x) * 1.5  # outputs the package cannot match
    with pytest.raises(InternalError, match="disagrees"):
        coreml.write_mlpackage(gm, x, path, None, wrong, 1e-3, None)
    assert sorted((p.relative_to(path), p.stat().st_size) for p in path.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mlp.mlpackage"]  # no staging left
    fresh = tmp_path / "fresh.mlpackage"
    with pytest.raises(InternalError):
        coreml.write_mlpackage(gm, x, fresh, None, wrong, 1e-3, None)
    assert not fresh.exists()
