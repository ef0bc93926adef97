"""int8 layers with 4-bit codes (`[int8] packed_bits`, mcu-int8): the codes and how they are
chosen, the files that store them two per byte, the RAM their unpacking costs (planned and
measured), and recovery keeping their form."""

import dataclasses
import tempfile
import tomllib
from pathlib import Path

import pytest
import torch

import fxcompress
import fxcompress.hardware_profiles as hp
from fxcompress import FxCompressError, Recover, load_profile
from fxcompress.export import nbits

qd = torch.ops.quantized_decomposed
BITS4 = {"*": {"bits": 4, "techniques": ["int8"]}}


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(),
                               torch.nn.Linear(96, 10)).eval()


def _batches(n: int = 16) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 64, generator=g),) for _ in range(n)]


def _compile(model, overrides=BITS4, **kw):
    kw = {"profile": "mcu-int8", "calibration": _batches(), "tolerance": 0.5, "holdout": 0,
          **kw}
    return fxcompress.compile(model, (torch.randn(1, 64),), overrides=overrides, **kw)


def _weight_dq(gm) -> list:
    return [n for n in gm.graph.nodes if n.target == qd.dequantize_per_channel.default]


def _buffer(gm, node):
    return gm.get_buffer(node.target)


def test_profile_reads_packed_bits_and_refuses_what_it_cannot_pack():
    assert load_profile("mcu-int8").int8_packed_bits == (4,)
    assert load_profile("mobile-arm").int8_packed_bits == ()
    data = load_profile("mcu-int8").to_dict()
    assert data["int8_packed_bits"] == [4]
    raw = tomllib.loads((Path(hp.__file__).parent / "mcu-int8.toml").read_text())
    raw["int8"]["packed_bits"] = [3]
    with pytest.raises(FxCompressError, match=r"int8\.packed_bits.*contains 3.*4"):
        fxcompress.Profile.from_dict(raw, "test")
    raw["int8"]["packed_bits"] = [4]
    raw["int8"]["representation"] = "dequant"
    with pytest.raises(FxCompressError, match=r"int8\.packed_bits.*qdq"):
        fxcompress.Profile.from_dict(raw, "test")


def test_pack_codes_round_trips_even_and_odd_counts():
    g = torch.Generator().manual_seed(0)
    for shape in [(6, 4), (3, 5, 3, 3), (7,)]:
        q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
        packed = nbits.pack_codes(q)
        assert packed.dtype == torch.uint8 and packed.numel() == (q.numel() + 1) // 2
        assert torch.equal(nbits.unpack_reference(packed, shape), q)
    with pytest.raises(ValueError):
        nbits.pack_codes(torch.zeros(4, dtype=torch.int8), bits=2)


def test_four_bit_layers_hold_per_channel_codes_and_files_pack_them():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = _compile(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    rep = gm.meta["fxcompress_report"]
    applied = [lay for lay in rep.layers if lay.applied != "none"]
    assert [lay.params["bits"] for lay in applied] == [4, 4]
    # 512 calibration rows for 64 input columns: error-compensated; 96 columns: also
    assert applied[0].params["rounding"] == "gptq"
    dqs = _weight_dq(gm)
    assert len(dqs) == 2
    codes = 0
    for dq in dqs:
        assert tuple(dq.args[4:6]) == (-8, 7)  # its range says 4 bits
        q = _buffer(gm, dq.args[0])
        assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
        codes += q.numel()
        # per channel: some channel reaches the top or bottom level (scales fit the rows)
        assert int(q.abs().amax(1).max()) >= 7
    from fxcompress.planner import weight_bytes

    held = sum(t.numel() * t.element_size() for t in [*gm.parameters(), *gm.buffers()])
    assert weight_bytes(gm) == held - codes // 2  # the budget counts them packed
    # the .pt2 stores them two per byte and unpacks them in the program: same outputs
    x = torch.randn(5, 64)
    packed = nbits.packed_graph(gm)
    assert packed is not gm and not _weight_dq(packed)[0].args[0].op == "get_attr"
    assert torch.equal(packed(x)[0] if isinstance(packed(x), tuple) else packed(x),
                       gm(x)[0] if isinstance(gm(x), tuple) else gm(x))
    stored = {n: b for n, b in packed.named_buffers() if b.dtype == torch.uint8}
    assert sum(b.numel() for b in stored.values()) == (96 * 64 + 1) // 2 + (10 * 96 + 1) // 2


def test_gptq_codes_beat_round_to_nearest_through_the_layers_hessian():
    from fxcompress.calibration import LayerStats
    from fxcompress.candidates import Step
    from fxcompress.passes.int8 import packed_codes
    from fxcompress.passes.intx.quant import hessian_error

    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 48, generator=g)
    mix = torch.randn(48, 48, generator=g)
    st = LayerStats()
    for _ in range(8):
        st.add(torch.randn(64, 48, generator=g) @ mix, "linear", 0)  # correlated inputs
    st.finish()
    step = Step("linear", w)
    gptq = packed_codes(step, 4, st, calibrated=True)
    rtn = packed_codes(step, 4, st, calibrated=False)
    assert (gptq.rounding, rtn.rounding) == ("gptq", "rtn")
    h = st.covariance
    assert hessian_error(w, gptq(), h) < 0.8 * hessian_error(w, rtn(), h)


def test_a_layer_unpacks_in_slices_that_fit_the_ram_budget_or_is_rejected():
    lifted = dataclasses.replace(load_profile("mcu-int8"), activation_budget_bytes=None)
    whole = _compile(_mlp(), profile=lifted)
    tight = dataclasses.replace(lifted, activation_budget_bytes=12_000)
    sliced = _compile(_mlp(), profile=tight)
    params = {lay.name: lay.params for lay in sliced.meta["fxcompress_report"].layers}
    # layer 0: 96 x 64 codes, 2 bytes each while unpacked, beside 160 B of activations: two
    # slices of 48 channels fit 12,000 B, the whole layer does not; layer 2 (960 codes) does
    assert params["0"]["slices"] == 2 and "slices" not in params["2"]
    linears = [n for n in sliced.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert [tuple(_buffer(sliced, n.args[1].args[0]).shape) for n in linears] \
        == [(48, 64), (48, 64), (10, 96)]
    assert any(n.target == torch.ops.aten.cat.default for n in sliced.graph.nodes)
    # per-element quantization: the slices compute the unsliced layer's numbers
    x = torch.randn(16, 64)
    a, b = whole(x), sliced(x)
    assert (a - b).abs().max() <= 1e-6 * a.abs().max() + 1e-6
    assert "peak activations" in " ".join(sliced.meta["fxcompress_report"].notes)
    # a budget no single channel's unpacking fits: the 4-bit candidate is rejected, saying why
    tiny = dataclasses.replace(lifted, activation_budget_bytes=200)
    gm = _compile(_mlp(), overrides={"*": {"techniques": ["int8"]}}, profile=tiny)
    layers = {lay.name: lay for lay in gm.meta["fxcompress_report"].layers}
    why = [c.verdict for c in layers["0"].candidates if "bits=4" in c.rewrite]
    assert why and "RAM" in why[0] and "200 B" in why[0]
    assert layers["0"].params["bits"] == 8


def test_recovery_trains_four_bit_codes_on_their_scales():
    plain = _compile(_mlp(), tolerance=0.5)
    rec = _compile(_mlp(), tolerance=0.5, recover=Recover(steps=40, lr=2e-3, stages=0))
    for a, b in zip(_weight_dq(plain), _weight_dq(rec), strict=True):
        assert tuple(b.args[4:6]) == (-8, 7)
        qb = _buffer(rec, b.args[0])
        assert torch.equal(_buffer(plain, a.args[1]), _buffer(rec, b.args[1]))  # same scales
        assert int(qb.min()) >= -8 and int(qb.max()) <= 7
    assert rec.meta["fxcompress_report"].error < plain.meta["fxcompress_report"].error
    assert any(not torch.equal(_buffer(plain, a.args[0]), _buffer(rec, b.args[0]))
               for a, b in zip(_weight_dq(plain), _weight_dq(rec), strict=True))


def test_the_unpacking_runs_on_executorchs_portable_kernels():
    """The ops that unpack codes in a Cortex-M program, run by the ExecuTorch runtime here
    (its portable kernels, the ones the device links for them)."""
    pytest.importorskip("executorch.runtime")
    from fxcompress.export.pte import PteProgram, lower_to_pte

    q = torch.randint(-8, 8, (5, 3, 3, 3), generator=torch.Generator().manual_seed(0),
                      dtype=torch.int8)

    class Unpack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", nbits.pack_codes(q))

        def forward(self, x):
            w = nbits.unpack_reference(self.packed, tuple(q.shape))
            return x + w.to(torch.float32)

    x = torch.zeros(q.shape)
    ep = torch.export.export(Unpack(), (x,), strict=False)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "unpack.pte"
        path.write_bytes(lower_to_pte(ep, None))
        got = PteProgram(path)(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert torch.equal(got, q.float())


def test_kxk_convolutions_are_compensated_through_their_unfolded_patches():
    from fxcompress.calibration import LayerStats, PatchGeometry
    from fxcompress.candidates import Step
    from fxcompress.passes.int8 import packed_codes
    from fxcompress.passes.intx.quant import hessian_error

    g = torch.Generator().manual_seed(4)
    # smooth inputs (neighbouring pixels alike), the correlation GPTQ uses across positions
    xs = [torch.nn.functional.avg_pool2d(torch.randn(16, 4, 10, 10, generator=g), 3, 1)
          for _ in range(4)]
    geo = PatchGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    st = LayerStats()
    for x in xs:
        st.add(x, "conv2d", 0)
        st.add_patches(x, geo)
    st.finish()
    cols = torch.cat([torch.nn.functional.unfold(x.double(), 3, 1, 1, 1).transpose(1, 2)
                      .reshape(-1, 36) for x in xs])
    assert st.patch_rows == cols.shape[0] == 4 * 16 * 64
    assert torch.allclose(st.patch_moment.double(), cols.T @ cols / cols.shape[0], rtol=1e-5)
    w = torch.randn(8, 4, 3, 3, generator=g)
    step = Step("conv2d", w, padding=(1, 1))
    gptq, rtn = packed_codes(step, 4, st, True), packed_codes(step, 4, st, False)
    assert (gptq.rounding, rtn.rounding) == ("gptq", "rtn")
    h = st.patch_moment.double()
    w2 = w.reshape(8, -1)
    assert hessian_error(w2, gptq().reshape(8, -1), h) \
        < 0.8 * hessian_error(w2, rtn().reshape(8, -1), h)
