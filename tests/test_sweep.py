"""fxcompress.sweep: every tolerance at once, each the model compile would give, for little more
than one compile's work."""

import pytest
import torch

import fxcompress
import fxcompress.planner as planner
from benchmarks.models import digits_data, load_pretrained
from fxcompress import FxCompressError

X, _ = digits_data("calib")
CAL = [(X[i:i + 32],) for i in range(0, len(X), 32)]
TOLS = [0.005, 0.01, 0.02, 0.05, 0.1]


def _applied(gm):
    rep = gm.meta["fxcompress_report"]
    return [lay.applied for lay in rep.layers], rep.serialized_bytes_after, rep.error


def _counting_builds(monkeypatch) -> list:
    calls = []
    real = planner.build_plan

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(planner, "build_plan", counted)
    return calls


def test_sweep_gives_what_compile_gives_at_each_tolerance_building_each_plan_once(monkeypatch):
    model = load_pretrained("digits_mlp")
    calls = _counting_builds(monkeypatch)
    swept = fxcompress.sweep(model, (X[:8],), tolerances=TOLS, calibration=CAL)
    sweep_builds = len(calls)
    calls.clear()
    single = [fxcompress.compile(model, (X[:8],), calibration=CAL, tolerance=t) for t in TOLS]
    assert [_applied(g) for g in swept] == [_applied(g) for g in single]
    assert [g.meta["fxcompress_report"].tolerance for g in swept] == TOLS
    # the same plan at two tolerances is two models, each with its own report
    assert len({id(g) for g in swept}) == len(TOLS)
    assert len({id(g.meta["fxcompress_report"]) for g in swept}) == len(TOLS)
    assert sweep_builds < len(calls)  # each prefix of the sequence is built once
    with torch.no_grad():
        for g, s in zip(swept, single, strict=True):
            torch.testing.assert_close(g(X[:16]), s(X[:16]))


@pytest.mark.parametrize("tolerances, message", [
    ([], "tolerances is empty"),
    (0.01, "tolerances must be a list of numbers"),
    ([0.01, -1], "out of range"),
])
def test_bad_tolerances_are_user_errors(tolerances, message):
    with pytest.raises(FxCompressError, match=message):
        fxcompress.sweep(load_pretrained("digits_mlp"), (X[:8],), tolerances=tolerances)
