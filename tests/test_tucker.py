"""Tucker-2 pass: exactness, error against rank, conv geometry, export, grouped convs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.graph import LAYER_META, find_layers, op_type
from fxcompress.passes.tucker import TuckerConfig, rank_pairs, tucker2, tucker_pass


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _low_multilinear_rank(t, s, k, r_out, r_in, seed=0):
    """A conv weight whose output / input channel modes have exactly ranks r_out / r_in."""
    g = _gen(seed)
    core = torch.randn(r_out, r_in, k, k, generator=g)
    a = torch.randn(t, r_out, generator=g)
    b = torch.randn(s, r_in, generator=g)
    return torch.einsum("ta,abhw,sb->tshw", a, core, b)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_exact_at_the_weights_multilinear_rank():
    w = _low_multilinear_rank(24, 16, 3, 6, 4)
    f = tucker2(w, 6, 4)
    assert f.first.shape == (4, 16, 1, 1) and f.core.shape == (6, 4, 3, 3)
    assert f.last.shape == (24, 6, 1, 1)
    assert _rel(f.weight(), w) < 1e-5
    # full rank on both modes leaves the conv whole (no useless rotations)
    full = tucker2(w, 24, 16)
    assert full.first is None and full.last is None and _rel(full.weight(), w) < 1e-6


def test_error_falls_as_rank_grows():
    w = torch.randn(32, 24, 3, 3, generator=_gen(1))
    errs = [_rel(tucker2(w, r, r * 3 // 4).weight(), w) for r in (4, 8, 16, 24, 32)]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[0] > 0.5 and errs[-1] < 1e-5


def test_rank_pairs_are_aligned_and_smaller_than_the_conv():
    w = _low_multilinear_rank(64, 32, 3, 10, 6, seed=2) + 1e-3 * torch.randn(
        64, 32, 3, 3, generator=_gen(3))
    pairs = rank_pairs(w, lambda r: -(-r // 8) * 8)
    assert pairs and all(ro % 8 == 0 and ri % 8 == 0 for ro, ri in pairs)
    assert (16, 8) in pairs  # the true ranks (10, 6) rounded up
    for ro, ri in pairs:
        assert 32 * ri + ro * ri * 9 + 64 * ro < 64 * 32 * 9


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(16, 24, 3, padding=2, dilation=2)
        self.same = nn.Conv2d(24, 16, 5, padding="same", bias=False)
        self.rect = nn.Conv2d(16, 12, (3, 1), stride=(1, 2), padding=(1, 0))

    def forward(self, x):
        return self.rect(self.same(torch.relu(self.dilated(torch.relu(self.strided(x))))))


@pytest.mark.parametrize("name", ["strided", "dilated", "same", "rect"])
def test_pass_keeps_stride_padding_dilation_and_exports(name):
    torch.manual_seed(0)
    m = _Convs().eval()
    conv = getattr(m, name)
    t, s = conv.weight.shape[:2]
    with torch.no_grad():  # give the layer a low multilinear rank so the chain is exact
        conv.weight.copy_(_low_multilinear_rank(t, s, 1, 4, 4, seed=4).repeat(
            1, 1, *conv.weight.shape[2:]) / 3)
    x = torch.randn(2, 8, 12, 12, generator=_gen(5))
    gm = capture(m, (x,)).graph_module
    assert name in {lay.name for lay in find_layers(gm)}
    f = tucker2(conv.weight.detach(), 4, 4)
    res = tucker_pass(gm, TuckerConfig({name: f}))
    assert res.modified
    out = res.graph_module
    out.graph.lint()
    out.recompile()
    chain = [n for n in out.graph.nodes if n.meta.get(LAYER_META) == name and op_type(n)]
    assert len(chain) == 3
    core = chain[1]
    assert "val" in core.meta and tuple(core.meta["val"].shape[1:2]) == (4,)
    with torch.no_grad():
        ref, got = m(x), out(x)
    assert _rel(got, ref) < 1e-5
    ep = torch.export.export(out, (x,), dynamic_shapes=({0: torch.export.Dim("b")},),
                             strict=False)
    y = torch.randn(5, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(y), m(y), rtol=1e-4, atol=1e-4)


def test_chain_computes_its_own_decompressed_weight():
    # lossy ranks: the chain must equal a single conv with the reconstructed weight
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1, dilation=1).eval()
    x = torch.randn(2, 16, 9, 9, generator=_gen(6))
    gm = capture(nn.Sequential(conv), (x,)).graph_module
    assert [lay.name for lay in find_layers(gm)] == ["0"]
    f = tucker2(conv.weight.detach(), 8, 8)
    res = tucker_pass(gm, TuckerConfig({"0": f}))
    assert res.modified
    out = res.graph_module
    out.graph.lint()
    out.recompile()
    with torch.no_grad():
        want = F.conv2d(x, f.weight(), conv.bias, 2, 1)
        got = out(x)
        dense = conv(x)
    assert _rel(got, want) < 1e-5
    assert _rel(got, dense) > 1e-3  # and it is lossy


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(3, 64, 3, padding=1)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.dense2 = nn.Conv2d(64, 64, 3, padding=1)

    def forward(self, x):
        return self.dense2(torch.relu(self.depthwise(torch.relu(self.grouped(
            torch.relu(self.dense(x)))))))


def test_compile_refuses_grouped_and_depthwise_with_a_reason():
    torch.manual_seed(0)
    m = _Grouped().eval()
    with torch.no_grad():  # a dense2 that Tucker can shrink within the tolerance
        m.dense2.weight.copy_(_low_multilinear_rank(64, 64, 3, 8, 8, seed=7) / 40)
    cal = [(torch.randn(8, 3, 8, 8, generator=_gen(i)),) for i in range(2)]
    small = fxcompress.compile(m, (cal[0][0],), profile="mobile-arm", calibration=cal,
                               tolerance=0.05, techniques=["tucker"], objective="size")
    small.graph.lint()
    report = {lay.name: lay for lay in small.meta["fxcompress_report"].layers}
    assert report["grouped"].applied == "none"
    assert "grouped conv (groups=4)" in report["grouped"].reason
    assert report["depthwise"].applied == "none"
    assert "depthwise conv (groups=64)" in report["depthwise"].reason
    assert report["dense2"].applied.startswith("tucker")
    assert small.meta["fxcompress_report"].error <= 0.05
    torch.export.export(small, (cal[0][0],), strict=False)
