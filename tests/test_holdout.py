"""The tolerance holds on data the planner never saw (fxcompress.acceptance): calibration batches
held out from every fit, a bootstrap bound, per-example evaluate() scores, regularised fits and
static int8 ranges with headroom. Accuracy claims on the trained models' test splits."""

import math

import pytest
import torch
from torch import nn

import fxcompress
from benchmarks.models import accuracy, digits_data, load_pretrained
from fxcompress import FxCompressError
from fxcompress.acceptance import (
    DEFAULT_HOLDOUT,
    Score,
    mean_bound,
    ratio_bound,
    score_of,
    split_batches,
)
from fxcompress.passes.int8 import range_headroom
from fxcompress.passes.svd import decompose, shrinkage, shrunk


# --- the split -------------------------------------------------------------------------------
@pytest.mark.parametrize("n, held", [(1, []), (2, [1]), (3, [1]), (4, [2]), (7, [1, 5]),
                                     (8, [2, 6]), (12, [2, 6, 10])])
def test_split_holds_out_a_quarter_spread_over_the_list(n, held):
    batches = list(range(n))
    fit, out = split_batches(batches, DEFAULT_HOLDOUT)
    assert out == held
    assert sorted(fit + out) == batches and not set(fit) & set(out)


def test_holdout_zero_keeps_every_batch_for_the_fits():
    assert split_batches([1, 2, 3], 0.0) == ([1, 2, 3], [])
    assert split_batches([1, 2], 0.9) == ([1], [2])  # never all


@pytest.mark.parametrize("bad", [1, 1.5, -0.1, math.nan, "0.25", True])
def test_holdout_out_of_range_is_a_user_error(bad):
    with pytest.raises(FxCompressError, match="holdout must be a share"):
        fxcompress.compile(nn.Linear(4, 4).eval(), (torch.randn(2, 4),), holdout=bad)


# --- the bound -------------------------------------------------------------------------------
def test_ratio_bound_is_the_relative_error_with_a_seeded_interval():
    g = torch.Generator().manual_seed(0)
    num, den = torch.rand(200, generator=g) * 1e-4, torch.rand(200, generator=g) + 1
    e = ratio_bound(num, den, seed=3)
    assert e.value == pytest.approx(math.sqrt(float(num.sum() / den.sum())))
    assert e.low < e.value < e.high and e.units == 200
    assert ratio_bound(num, den, seed=3) == e  # same seed, same interval
    wide = ratio_bound(num[:20], den[:20], seed=3)
    assert wide.high - wide.low > e.high - e.low  # fewer examples, wider interval
    assert ratio_bound(num, den, seed=3, resample=False).units == 0


def test_mean_bound_of_a_paired_drop():
    drops = torch.tensor([0.0] * 95 + [100.0] * 5)  # 5 of 100 examples lost
    e = mean_bound(drops, seed=0)
    assert e.value == pytest.approx(5.0)
    assert e.high > 5.0 > e.low >= 0.0
    assert mean_bound(torch.zeros(50), seed=0).high == 0.0  # no flips: exactly no drop


def test_score_of_reads_one_number_or_one_per_example():
    assert score_of(3.5, "f") == Score(3.5)
    assert score_of(torch.tensor([2.0]), "f") == Score(2.0)
    s = score_of(torch.tensor([1, 0, 1, 1]), "f")
    assert s.value == 0.75 and s.per_example.dtype == torch.float64
    assert score_of([100.0, 0.0], "f").value == 50.0


# --- evaluate() per example ------------------------------------------------------------------
def _digits_mlp_case():
    model = load_pretrained("digits_mlp")
    x_cal, y_cal = digits_data("calib")
    return model, x_cal, y_cal, [(x_cal[i:i + 32],) for i in range(0, len(x_cal), 32)]


def test_per_example_evaluate_accepts_on_the_paired_bound():
    model, x, y, cal = _digits_mlp_case()
    small = fxcompress.compile(model, (x[:8],), calibration=cal, tolerance=0.5,
                               evaluate=lambda m: 100.0 * (m(x).argmax(1) == y).float())
    rep = small.meta["fxcompress_report"]
    assert rep.drop is not None and rep.drop_interval is not None
    assert rep.drop_interval[1] <= 0.5  # the upper bound is what held
    assert rep.drop == pytest.approx(rep.score_before - rep.score_after)
    assert "paired bootstrap" in rep.accepted_on and "judged on" in str(rep)


def test_per_example_scores_must_keep_their_length():
    model, x, y, cal = _digits_mlp_case()
    calls = []

    def evaluate(m):
        calls.append(1)
        n = len(x) if len(calls) == 1 else len(x) - 1  # drops an example after the first call
        return (m(x[:n]).argmax(1) == y[:n]).float()

    with pytest.raises(FxCompressError, match="the same examples, in the same order"):
        fxcompress.compile(model, (x[:8],), calibration=cal, tolerance=1.0, evaluate=evaluate)


def test_a_scalar_evaluate_is_judged_as_measured_and_the_report_says_so():
    model, x, y, cal = _digits_mlp_case()
    small = fxcompress.compile(model, (x[:8],), calibration=cal, tolerance=0.5,
                               evaluate=lambda m: accuracy(m, x, y))
    rep = small.meta["fxcompress_report"]
    assert rep.drop_interval is None and "return one score per example" in rep.accepted_on


def test_thin_data_gets_notes_that_say_how_much_more_to_pass():
    model, x, _, cal = _digits_mlp_case()
    one = fxcompress.compile(model, (x[:8],), calibration=[(x,)], tolerance=0.02)
    assert any("none could be held out" in n for n in one.meta["fxcompress_report"].notes)
    # 2 held-out examples: too few, and the note says how many to pass
    tiny = [(x[i:i + 2],) for i in range(0, 8, 2)]
    rep = fxcompress.compile(model, (x[:8],), calibration=tiny,
                             tolerance=0.02).meta["fxcompress_report"]
    note = next(n for n in rep.notes if "rests on only 2 held-out calibration examples" in n)
    assert "pass at least 32 (about 16x as many)" in note


# --- out of sample, on the trained models ------------------------------------------------------
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_the_tolerance_holds_on_the_test_split(name):
    """The digits models at tolerance 0.01: before held-out acceptance and range headroom, both
    met it on calibration and missed it on the test split (0.0112 and 0.0136)."""
    model = load_pretrained(name)
    x_cal, _ = digits_data("calib")
    x_test, _ = digits_data("test")
    cal = [(x_cal[i:i + 64],) for i in range(0, len(x_cal), 64)]
    small = fxcompress.compile(model, (x_cal[:32],), calibration=cal, tolerance=0.01)
    rep = small.meta["fxcompress_report"]
    assert rep.serialized_bytes_after < 0.3 * rep.serialized_bytes_before  # still compressed
    with torch.no_grad():
        ref = model(x_test)
        err = float((small(x_test) - ref).norm() / ref.norm())
    assert err <= 0.01
    assert rep.error_interval[1] <= 0.01


def test_holdout_zero_is_the_in_sample_judgment():
    model, x, _, cal = _digits_mlp_case()
    small = fxcompress.compile(model, (x[:8],), calibration=cal, tolerance=0.02, holdout=0)
    rep = small.meta["fxcompress_report"]
    assert rep.error_interval is None and "holdout=0" in rep.accepted_on
    with torch.no_grad():  # judged on all calibration data
        num = sum(float(((small(b) - model(b)) ** 2).sum()) for (b,) in cal)
        den = sum(float((model(b) ** 2).sum()) for (b,) in cal)
    assert rep.error == pytest.approx(math.sqrt(num / den), rel=1e-4)


# --- fits the data cannot support --------------------------------------------------------------
def test_ledoit_wolf_shrinkage_follows_the_rows_per_feature():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g, dtype=torch.float64) + 3 * torch.eye(64,
                                                                               dtype=torch.float64)

    def rho(rows):
        x = torch.randn(rows, 64, generator=g, dtype=torch.float64) @ mix
        cov = x.T @ x / rows
        return shrinkage(cov, rows, float((x * x).sum(1).square().sum()))

    few, some, many = rho(8), rho(256), rho(65536)
    assert few > 0.5 and few > some > many and many < 0.01
    cov = torch.diag(torch.tensor([4.0, 0.0], dtype=torch.float64))
    s = shrunk(cov, 0.5)  # half-way to the mean eigenvalue (2) times the identity
    assert torch.allclose(s, torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)))


def test_activation_aware_svd_from_few_rows_generalises_when_shrunk():
    """8 calibration rows of a 128-feature layer: the raw covariance has rank 8, so rank 8
    reproduces those rows exactly and fails on new ones; the shrunk one does better on them."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(128, 128, generator=g, dtype=torch.float64) / 128 ** 0.5
    mix = mix + torch.eye(128, dtype=torch.float64)
    draw = lambda n: torch.randn(n, 128, generator=g, dtype=torch.float64) @ mix  # noqa: E731
    w = torch.randn(64, 128, generator=g, dtype=torch.float64)
    seen, fresh = draw(8), draw(2000)
    cov = seen.T @ seen / 8
    rho = shrinkage(cov, 8, float((seen * seen).sum(1).square().sum()))

    def err(c, x):
        v, u = decompose(w.float(), c, aware=True, max_rank=8).factors(8)
        d = x @ (w - u.double() @ v.double()).T
        return float(d.norm() / (x @ w.T).norm())

    assert err(cov, seen) < 1e-3  # the raw fit matches the rows it saw
    assert err(shrunk(cov, rho), fresh) < 0.97 * err(cov, fresh)


def test_range_headroom_shrinks_with_the_calibration_size():
    assert range_headroom(64) == pytest.approx(1.25)
    assert range_headroom(10_000) == pytest.approx(1.02)
    assert range_headroom(None) == 1.0


def test_a_file_larger_than_the_original_is_said_in_the_report():
    """On an MLP of 8-wide linears, int8's added Q/DQ ops and their scales outweigh the bytes
    they save, which the latency objective does not weigh: the report says the file grew and
    what to do, and the size objective, which counts those bytes, does not grow it."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(8, 8), nn.ReLU())]).eval()
    cal = [(torch.randn(16, 8),) for _ in range(8)]
    rep = fxcompress.compile(model, (cal[0][0],), profile="mobile-arm", calibration=cal,
                             tolerance=0.05).meta["fxcompress_report"]
    assert any(la.applied.startswith("int8") for la in rep.layers)
    assert rep.serialized_bytes_after > rep.serialized_bytes_before
    note = next(n for n in rep.notes if "is larger than the original's" in n)
    assert "objective='size'" in note and "keep int8 off those layers" in note
    rep = fxcompress.compile(model, (cal[0][0],), profile="mobile-arm", calibration=cal,
                             tolerance=0.05, objective="size").meta["fxcompress_report"]
    assert rep.serialized_bytes_after <= rep.serialized_bytes_before
    assert not any("keep int8 off" in n for n in rep.notes)

