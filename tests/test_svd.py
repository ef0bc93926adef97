"""SVD pass: plain and activation-aware factors, the rank ladder, the graph rewrite."""

import pytest
import torch
from fxcompress.passes.svd import (
    SVDConfig,
    decompose,
    max_useful_rank,
    svd_pass,
    whitening,
)
from torch import nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.graph import LAYER_META, find_layers, op_type


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(n_rows, dim, seed=0):
    """Anisotropic inputs: a few directions carry most of the energy, like real activations."""
    g = _gen(seed)
    scales = torch.logspace(1, -2, dim)
    return torch.randn(n_rows, dim, generator=g) * scales @ torch.linalg.qr(
        torch.randn(dim, dim, generator=g)).Q


def _cov(x):
    x = x.double()
    return x.T @ x / x.shape[0]


def _out_err(w, wr, x):
    return float((x @ (w - wr).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("aware", [False, True])
def test_full_rank_reconstructs_exactly(shape, aware):
    w = torch.randn(*shape, generator=_gen(1))
    x = _inputs(500, shape[1])
    dec = decompose(w, _cov(x), aware=aware)
    v, u = dec.factors(min(shape))
    assert float((u @ v - w).norm() / w.norm()) < 1e-5
    assert dec.error_at(min(shape)) < 1e-6


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_error_falls_with_rank_and_matches_the_prediction(shape):
    w = torch.randn(*shape, generator=_gen(2))
    x = _inputs(500, shape[1], seed=3)
    for aware in (False, True):
        dec = decompose(w, _cov(x), aware=aware)
        errs = []
        for r in range(1, min(shape) + 1):
            v, u = dec.factors(r)
            errs.append(_out_err(w, u @ v, x))
            # the rank ladder is chosen on this prediction: it is the measured output error
            assert abs(errs[-1] - dec.error_at(r)) < 1e-4
        assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:], strict=False))
        assert errs[0] > 0.05 and errs[-1] < 1e-5


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_activation_aware_beats_plain_on_output_error(shape):
    w = torch.randn(*shape, generator=_gen(4))
    x = _inputs(800, shape[1], seed=5)
    r = min(shape) // 4
    plain = decompose(w, None).factors(r)
    aware = decompose(w, _cov(x), aware=True).factors(r)
    e_plain = _out_err(w, plain[1] @ plain[0], x)
    e_aware = _out_err(w, aware[1] @ aware[0], x)
    assert e_aware < 0.5 * e_plain


def test_whitening_falls_back_when_covariance_is_not_positive_definite():
    # an indefinite "covariance" (as float round-off can make a rank-deficient one): Cholesky
    # fails on it even damped, the eigen route must not
    q = torch.linalg.qr(torch.randn(6, 6, generator=_gen(6), dtype=torch.float64)).Q
    cov = q @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, -1e-3], dtype=torch.float64)) @ q.T
    assert torch.linalg.cholesky_ex(cov + 1e-6 * torch.eye(6, dtype=torch.float64)).info > 0
    s, s_inv = whitening(cov)
    assert torch.isfinite(s).all() and torch.isfinite(s_inv).all()
    torch.testing.assert_close(s @ s_inv, torch.eye(6, dtype=torch.float64))
    # tall weight (m > n) takes the whitening route; full rank is still exact
    w = torch.randn(10, 6, generator=_gen(7))
    dec = decompose(w, cov, aware=True)
    v, u = dec.factors(6)
    assert float((u @ v - w).norm() / w.norm()) < 1e-5


def test_randomized_route_is_seeded_and_close_to_exact():
    g = _gen(8)
    # a decaying spectrum, as trained weights have
    u0 = torch.linalg.qr(torch.randn(300, 300, generator=g)).Q
    v0 = torch.linalg.qr(torch.randn(260, 260, generator=g)).Q
    s0 = torch.exp(-torch.arange(260.0) / 15)
    w = (u0[:, :260] * s0) @ v0.T
    x = _inputs(1000, 260, seed=9)
    exact = decompose(w, _cov(x), aware=True, randomized=False)
    fast = decompose(w, _cov(x), aware=True, max_rank=40, randomized=True, seed=3)
    again = decompose(w, _cov(x), aware=True, max_rank=40, randomized=True, seed=3)
    assert fast.randomized and fast.max_rank == 40
    assert torch.equal(fast.first, again.first)
    for r in (10, 20, 40):
        v, u = fast.factors(r)
        measured = _out_err(w, u @ v, x)
        assert abs(measured - fast.error_at(r)) < 1e-4
        assert measured <= exact.error_at(r) * 1.05 + 1e-6


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(16, 32, 1, stride=2, padding=1)
        self.fc = nn.Linear(32 * 5 * 5, 48)

    def forward(self, x):
        return self.fc(torch.relu(self.pw(x)).flatten(1))


def _captured():
    torch.manual_seed(0)
    m = _TwoLayer().eval()
    x = torch.randn(4, 16, 8, 8, generator=_gen(10))
    gm = capture(m, (x,)).graph_module
    return m, x, gm, {lay.name: lay for lay in find_layers(gm)}


def test_pass_rewrites_linear_and_strided_padded_1x1_conv_exactly_at_full_rank():
    m, x, gm, layers = _captured()
    w_fc = m.fc.weight.detach()
    w_pw = m.pw.weight.detach()[:, :, 0, 0]
    cfg = SVDConfig({"fc": decompose(w_fc).factors(min(w_fc.shape)),
                     "pw": decompose(w_pw).factors(min(w_pw.shape))})
    res = svd_pass(gm, cfg)
    assert res.modified
    out = res.graph_module
    out.graph.lint()
    out.recompile()
    for name, op in (("fc", "linear"), ("pw", "conv2d")):
        nodes = [n for n in out.graph.nodes if n.meta.get(LAYER_META) == name and op_type(n)]
        assert [op_type(n) for n in nodes] == [op, op]
        assert all("val" in n.meta for n in nodes)
    with torch.no_grad():
        ref = m(x)
        got = out(x)
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    ep = torch.export.export(out, (x,), strict=False)
    torch.testing.assert_close(ep.module()(x), got)
    # nothing configured: nothing modified
    assert not svd_pass(capture(m, (x,)).graph_module, SVDConfig()).modified


def test_compile_factors_within_tolerance_and_never_where_it_does_not_shrink():
    torch.manual_seed(0)
    # a low-rank-ish MLP so factoring pays off within a 2 % output error
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                      nn.Linear(256, 4)).eval()
    with torch.no_grad():
        for lin in (m[0], m[2]):
            u, s, vh = torch.linalg.svd(lin.weight, full_matrices=False)
            lin.weight.copy_((u * (s * torch.exp(-torch.arange(len(s)) / 8.0))) @ vh)
    cal = [(torch.randn(128, 64, generator=_gen(i)),) for i in range(2)]
    small = fxcompress.compile(m, (cal[0][0][:16],), profile="mobile-arm", calibration=cal,
                               tolerance=0.02, techniques=["svd"], objective="size")
    small.graph.lint()
    report = small.meta["fxcompress_report"]
    assert report.error <= 0.02
    applied = {lay.name: lay for lay in report.layers}
    assert applied["2"].applied.startswith("svd")
    for lay in report.layers:
        if lay.applied.startswith("svd"):
            r = lay.params["rank"]
            mm, nn_ = lay.weight_shape
            assert r < max_useful_rank(mm, nn_) + 1 and r % 8 == 0  # mobile-arm aligns to 8
            assert lay.params_after < lay.params_before
    # the 4-output head can never be factored smaller
    assert applied["4"].applied == "none"
    torch.export.export(small, (cal[0][0][:3],), strict=False)
