"""SVD pass: plain and activation-aware factors, the rank ladder, the graph rewrite."""

import copy

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.graph import LAYER_META, find_layers, op_type
from fxcompress.passes.svd import (
    SVDConfig,
    decompose,
    max_useful_rank,
    refit_config,
    refit_factors,
    svd_pass,
    whitening,
)


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


def _digits_mlp():
    """The trained digits MLP (64-512-256-10, ReLU): real activations, where the error a
    truncated layer leaves after a ReLU is partly predictable by the next layer."""
    from benchmarks.models import digits_data, load_pretrained

    m = load_pretrained("digits_mlp")
    xc, _ = digits_data("calib")
    xt, _ = digits_data("test")
    cal = [(xc[i:i + 64],) for i in range(0, len(xc), 64)]
    gm = capture(m, (xc[:8],)).graph_module
    return m, gm, cal, xt


def _aware_factors(gm, cal, ranks):
    from fxcompress.calibration import Calibration
    from fxcompress.graph import get_attr

    layers = [lay for lay in find_layers(gm) if lay.op == "linear"]
    calib = Calibration(gm, cal, {lay.node: lay.op for lay in layers})
    return {lay.name: decompose(get_attr(gm, lay.weight_target), calib.stats[lay.node]
                                .covariance).factors(ranks[lay.name]) for lay in layers}


def _e2e(m, gm, config, x):
    out = svd_pass(copy.deepcopy(gm), config).graph_module
    out.graph.lint()
    out.recompile()
    with torch.no_grad():
        ref = m(x)
        return float((out(x) - ref).norm() / ref.norm()), out


def test_sequential_refit_lowers_end_to_end_error_and_is_deterministic():
    m, gm, cal, test_x = _digits_mlp()
    aware = _aware_factors(gm, cal, {"fc1": 8, "fc2": 8, "fc3": 8})
    refit = refit_factors(gm, cal, aware)
    # same ranks: the graph the planner costed keeps its shape
    for name, (v, u, bias) in refit.items():
        assert v.shape == aware[name][0].shape and u.shape == aware[name][1].shape
        assert bias is not None  # every digits linear has one, re-fitted with the factors
    e_aware, _ = _e2e(m, gm, SVDConfig(aware), test_x)
    e_refit, out = _e2e(m, gm, refit_config(refit), test_x)
    # on the test split, which the re-fit never saw
    assert e_refit < 0.9 * e_aware, (e_refit, e_aware)
    assert sum(n.op == "get_attr" and "svd_bias" in n.target for n in out.graph.nodes) == 3
    torch.export.export(out, (test_x[:4],), strict=False)
    again = refit_factors(gm, cal, aware)
    for name in refit:
        for a, b in zip(refit[name], again[name], strict=True):
            assert torch.equal(a, b)


def test_sequential_refit_at_full_rank_reconstructs():
    m, gm, cal, test_x = _digits_mlp()
    refit = refit_factors(gm, cal, _aware_factors(gm, cal, {"fc1": 64, "fc2": 256, "fc3": 10}))
    for name in ("fc1", "fc2", "fc3"):
        lin = getattr(m, name)
        w, b0 = lin.weight.detach(), lin.bias.detach()
        v, u, bias = refit[name]
        assert float((u @ v - w).norm() / w.norm()) < 1e-4
        assert float((bias - b0).norm() / b0.norm()) < 1e-4
    assert _e2e(m, gm, refit_config(refit), test_x)[0] < 1e-4


def test_compile_builds_the_refitted_factors():
    m, _, cal, test_x = _digits_mlp()

    def run(overrides=None):
        small = fxcompress.compile(m, (cal[0][0][:16],), profile="mobile-arm",
                                   calibration=cal, tolerance=0.1, techniques=["svd"],
                                   objective="size", overrides=overrides)
        small.graph.lint()
        with torch.no_grad():
            ref = m(test_x)
            err = float((small(test_x) - ref).norm() / ref.norm())
        return small, small.meta["fxcompress_report"], err

    small, rep, err = run()
    one_shot, rep0, err0 = run({"*": {"svd": {"sequential_refit": False}}})
    assert sum(lay.applied.startswith("svd") for lay in rep.layers) >= 2
    # verification measured the built graph, and that graph holds the re-fitted values
    assert rep.error <= 0.1
    assert any("svd_bias" in k for k, _ in small.named_buffers())
    assert not any("svd_bias" in k for k, _ in one_shot.named_buffers())
    # the re-fit's smaller error lets a more compressed plan hold on the held-out batches,
    # and it holds on the test split too
    ranks = lambda r: sum(lay.params.get("rank", 0) for lay in r.layers)  # noqa: E731
    assert ranks(rep) < ranks(rep0)
    assert rep.serialized_bytes_after < rep0.serialized_bytes_after
    assert err <= 0.1 and err0 <= 0.1


def test_sequential_refit_of_a_strided_padded_1x1_conv_and_a_linear():
    m, x, gm, _ = _captured()
    cal = [(torch.randn(8, 16, 8, 8, generator=_gen(40 + i)),) for i in range(2)]
    w_fc = m.fc.weight.detach()
    w_pw = m.pw.weight.detach()[:, :, 0, 0]
    full = {"fc": decompose(w_fc).factors(min(w_fc.shape)),
            "pw": decompose(w_pw).factors(min(w_pw.shape))}
    refit = refit_factors(gm, cal, full)
    out = svd_pass(capture(m, (x,)).graph_module, refit_config(refit)).graph_module
    out.graph.lint()
    out.recompile()
    with torch.no_grad():
        ref = m(x)
        assert float((out(x) - ref).norm() / ref.norm()) < 1e-4
    # at a low rank: same ranks back, a graph that exports
    low = {"fc": decompose(w_fc).factors(4), "pw": decompose(w_pw).factors(4)}
    refit = refit_factors(gm, cal, low)
    assert {k: v.shape[0] for k, (v, _, _) in refit.items()} == {"fc": 4, "pw": 4}
    out = svd_pass(capture(m, (x,)).graph_module, refit_config(refit)).graph_module
    out.graph.lint()
    torch.export.export(out, (x,), strict=False)


def test_a_fit_to_fewer_rows_than_features_is_shrunk_and_reported():
    """Activation-aware SVD fitted to 8 rows of a 256-feature input could match those rows
    exactly (rank 8 from 8 rows: error 0 there, large elsewhere). The covariance is shrunk
    towards the identity, so what is chosen holds on new inputs too; the report says the fit
    was thin and how many rows to pass, and says nothing with enough."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    with torch.no_grad():  # a first layer of rank 32 plus noise: factoring it is worthwhile
        low = torch.randn(256, 32, generator=gen) @ torch.randn(32, 256, generator=gen) / 16
        model[0].weight.copy_(low + 0.002 * torch.randn(256, 256, generator=gen))
    few = [(torch.randn(8, 256, generator=gen),)]
    small = fxcompress.compile(model, few[0], profile="mobile-arm", calibration=few,
                               tolerance=0.05, techniques=["svd"])
    rep = small.meta["fxcompress_report"]
    svd_layers = [lay for lay in rep.layers if lay.applied.startswith("svd")]
    assert svd_layers and svd_layers[0].params["rank"] >= 32  # not rank 8 from 8 rows
    note = next(n for n in rep.notes if "fewer than its 256 input features" in n)
    assert "8 calibration rows" in note and "at least 256 rows (32x" in note
    assert "shrunk" in note
    x_new = torch.randn(256, 256, generator=gen)
    with torch.no_grad():  # and it holds out of sample
        err_new = float((small(x_new) - model(x_new)).norm() / model(x_new).norm())
    assert err_new <= 0.05
    many = [(torch.randn(128, 256, generator=gen),) for _ in range(4)]
    big = fxcompress.compile(model, many[0], profile="mobile-arm", calibration=many,
                             tolerance=0.05, techniques=["svd"])
    assert not any("input features" in n for n in big.meta["fxcompress_report"].notes)


def test_the_selected_plan_holds_the_refitted_candidates_its_graph_was_built_from():
    """Selection re-fits, and the plan it returns describes the graph: rebuilding the plan's
    candidates without any re-fit gives the same graph outputs."""
    from fxcompress.acceptance import Acceptance
    from fxcompress.api import prepare
    from fxcompress.planner import build, verify

    m, _, cal, test_x = _digits_mlp()
    prep = prepare(m, (cal[0][0][:16],), profile="mobile-arm", calibration=cal,
                   techniques=["svd"], objective="size")
    plan = verify(prep.selection, Acceptance(prep.calib, 0.1, None, None, 0), lambda s: None)
    svd = [c for c in plan.choice.values() if c.uses("svd")]
    assert svd and all(c.part("svd").refit for c in svd)
    assert plan.index is not None and plan.choice.keys() == \
        prep.selection.sequence(False)[0][plan.index].keys()
    again = build(prep.graph_module, plan.choice).graph_module  # no calibration: no re-fit
    with torch.no_grad():
        torch.testing.assert_close(again(test_x), plan.graph_module(test_x))
    # the sequence's own candidates are one-shot: the re-fit is what the plan holds
    one_shot = build(prep.graph_module, prep.selection.sequence(False)[0][plan.index])
    with torch.no_grad():
        assert not torch.allclose(one_shot.graph_module(test_x), plan.graph_module(test_x))
