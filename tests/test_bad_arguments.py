"""Every bad input gets the documented error (issue 17): a wrong argument to `compile`, a
profile number that is not finite or out of range, an evaluate() that does not return a finite
number. Each is an `FxCompressError` whose message names the argument or field and the fix,
raised before any work where the input can be judged up front. Also: tolerance 0 is lossless
only, and tolerances of 1 or more are valid."""

from __future__ import annotations

import dataclasses
import math
import re
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
import fxcompress.api as api
import fxcompress.planner as planner
from fxcompress import FxCompressError, InternalError, Recover, load_profile

X = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
CAL = [(torch.randn(64, 16, generator=torch.Generator().manual_seed(i)),) for i in (1, 2)]
DEAD = torch.arange(0, 32, 4)  # 8 of 32 hidden channels: 25%, a multiple of mobile-arm's 8
NAN, INF = float("nan"), float("inf")


def _mlp(dead: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    if dead:
        with torch.no_grad():
            m[0].weight[DEAD] = 0
            m[0].bias[DEAD] = 0
    return m


def _rewrites(gm) -> list[str]:
    return [lay.applied for lay in gm.meta["fxcompress_report"].layers if lay.applied != "none"]


def _n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


@contextmanager
def _deadline(seconds: int):
    """Fail (not hang) when the body runs longer than `seconds`."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the planner hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- 1. compile's arguments: checked before any work --------------------------------------------
@pytest.mark.parametrize("kwargs, says", [
    (dict(techniques=5), ["techniques must be a list", "techniques=['prune', 'int8']"]),
    (dict(techniques=[5]), ["techniques holds 5", "as strings"]),
    (dict(techniques=["magic"]), ["unknown technique 'magic'", "use a subset of"]),
    (dict(seed="abc"), ["seed must be an integer", "seed=0"]),
    (dict(seed=1.5), ["seed must be an integer", "seed=0"]),
    (dict(seed=True), ["seed must be an integer", "seed=0"]),
    (dict(seed=2 ** 70), ["seed 1180591620717411303424 is out of range", "0 to 2**63 - 1"]),
    (dict(seed=-1), ["seed -1 is out of range", "0 to 2**63 - 1"]),
    (dict(time_budget="10s"), ["time_budget must be a number of seconds", "None for no limit"]),
    (dict(time_budget=NAN), ["time_budget nan is out of range", "seconds >= 0"]),
    (dict(time_budget=-1), ["time_budget -1 is out of range", "seconds >= 0"]),
    (dict(time_budget=-INF), ["time_budget -inf is out of range", "seconds >= 0"]),
    (dict(evaluate=5), ["evaluate must be a callable", "evaluate=lambda m:"]),
    (dict(progress="yes"), ["progress must be a callable", "progress=print"]),
    (dict(objective=5), ["objective 5 is unknown", "'latency' or 'size'"]),
    (dict(objective="speed"), ["objective 'speed' is unknown", "'latency' or 'size'"]),
    (dict(recover="yes"), ["recover must be None or fxcompress.Recover", "Recover(steps="]),
    (dict(tolerance=-0.1), ["tolerance -0.1 is out of range", "finite number >= 0"]),
    (dict(tolerance=NAN), ["tolerance nan is out of range", "finite number >= 0"]),
    (dict(tolerance=INF), ["tolerance inf is out of range", "finite number >= 0"]),
    (dict(tolerance="0.01"), ["tolerance must be a number", "tolerance=0.01"]),
    (dict(tolerance=True), ["tolerance must be a number", "tolerance=0.01"]),
    (dict(tolerance=-1, evaluate=lambda m: 1.0), ["tolerance -1 is out of range",
                                                  "drop of evaluate()'s score"]),
    (dict(tolerance=0, recover=Recover(steps=1)), ["recover= fine-tunes", "drop recover="]),
])
def test_bad_argument_names_itself_and_the_fix_before_any_work(monkeypatch, kwargs, says):
    def no_work(*a, **k):
        pytest.fail("compile did work before checking its arguments")

    monkeypatch.setattr(api, "capture", no_work)
    monkeypatch.setattr(api, "calibrated", no_work)
    with pytest.raises(FxCompressError) as e:
        fxcompress.compile(_mlp(), (X,), profile="mobile-arm", **kwargs)
    for s in says:
        assert s in str(e.value)


@pytest.mark.parametrize("seed", [2 ** 63 - 1, np.int64(7)])
def test_edge_values_that_are_valid(seed):
    # time_budget inf: no limit; the largest seed, a NumPy integer; techniques as a generator
    gm = fxcompress.compile(_mlp(), (X,), profile="mobile-arm",
                            techniques=(t for t in ["prune"]), time_budget=math.inf, seed=seed)
    rep = gm.meta["fxcompress_report"]
    rewrites = [c.rewrite for lay in rep.layers for c in lay.candidates]
    assert any(r.startswith("prune(") for r in rewrites)  # the generator was read once
    assert all(c.verdict != "not measured within the time budget"
               for lay in rep.layers for c in lay.candidates)
    assert rep.seed == int(seed)


# --- 1b. what evaluate() returns ----------------------------------------------------------------
@pytest.mark.parametrize("value, shown", [
    ("abc", "'abc' (str)"), (None, "None (NoneType)"), (torch.ones(3, 2), "shape (3, 2)"),
    ([1.0, "x"], "[1.0, 'x']"),
    (NAN, "returned nan"), (INF, "returned inf"), (-INF, "returned -inf"),
    (torch.tensor(NAN), "returned nan"),
])
def test_evaluate_must_return_a_finite_number(value, shown):
    with pytest.raises(FxCompressError) as e:
        fxcompress.compile(_mlp(), (X,), profile="mobile-arm", evaluate=lambda m: value,
                           techniques=["prune"], tolerance=1.0)
    msg = str(e.value)
    assert "evaluate(model) returned" in msg and shown in msg
    assert "it must return a finite number, higher is better (e.g. accuracy in percent)" in msg


@pytest.mark.parametrize("compressed_score, rewritten", [(NAN, False), (INF, False),
                                                         (90.0, True)])
def test_a_non_finite_score_of_a_compressed_model_fails_the_tolerance(compressed_score,
                                                                      rewritten):
    m = _mlp()
    full = _n_params(m)

    def evaluate(model):  # the original scores 90; a smaller (compressed) model scores as given
        return torch.tensor(90.0) if _n_params(model) >= full else compressed_score

    gm = fxcompress.compile(m, (X,), profile="mobile-arm", calibration=CAL, evaluate=evaluate,
                            techniques=["prune"], tolerance=100.0)
    assert bool(_rewrites(gm)) is rewritten  # 90.0: the control, where prune is accepted
    assert gm.meta["fxcompress_report"].score_before == 90.0


# --- 2. profiles: every number finite and in range ----------------------------------------------
_TOML = (Path(fxcompress.hardware_profiles.__file__).parent / "mobile-arm.toml").read_text()


def _profile_file(tmp_path, field: str, value: str) -> Path:
    section, key = field.split(".")
    text = _TOML
    if section == "memory":
        text += f"\n[memory]\n{key} = {value}\n"
    else:  # the first `key = ...` line is the field's (the [sources] table comes last)
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        assert n == 1
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("field", ["throughput.op_overhead_us", "throughput.fp32",
                                   "throughput.bandwidth_gbs"])
@pytest.mark.parametrize("spelled, shown", [("nan", "nan"), ("inf", "inf"), ("+inf", "inf"),
                                            ("-inf", "-inf")])
def test_profile_file_with_a_non_finite_number(tmp_path, field, spelled, shown):
    with pytest.raises(FxCompressError) as e:
        load_profile(_profile_file(tmp_path, field, spelled))
    msg = str(e.value)
    assert f"field '{field}' is {shown};" in msg and "a finite number" in msg


@pytest.mark.parametrize("field, value, fix", [
    ("throughput.fp32", "0", "a finite number > 0"),
    ("throughput.bandwidth_gbs", "-1.0", "a finite number > 0"),
    ("throughput.op_overhead_us", "-1", "a finite number >= 0"),
    ("planner.alignment", "0", "a whole number, 1 or more"),
    ("memory.weight_budget_bytes", "0", "a whole number of bytes > 0"),
    ("memory.activation_budget_bytes", "-5", "a whole number of bytes > 0"),
])
def test_profile_file_with_a_number_out_of_range(tmp_path, field, value, fix):
    with pytest.raises(FxCompressError) as e:
        load_profile(_profile_file(tmp_path, field, value))
    assert f"field '{field}' is {value};" in str(e.value) and fix in str(e.value)


@pytest.mark.parametrize("change, field", [
    (dict(op_overhead_us=NAN), "'throughput.op_overhead_us' (Profile.op_overhead_us) is nan"),
    (dict(op_overhead_us=INF), "'throughput.op_overhead_us' (Profile.op_overhead_us) is inf"),
    (dict(bandwidth_gbs=-INF), "'throughput.bandwidth_gbs' (Profile.bandwidth_gbs) is -inf"),
    (dict(peak_gops={"fp32": INF}), "'throughput.fp32' (Profile.peak_gops['fp32']) is inf"),
    (dict(alignment=0), "'planner.alignment' (Profile.alignment) is 0"),
])
def test_profile_built_in_code_is_checked_too(change, field):
    with pytest.raises(FxCompressError, match="give") as e:
        dataclasses.replace(load_profile("mobile-arm"), **change)
    assert field in str(e.value)


def test_a_nan_cost_errors_within_seconds_instead_of_hanging(monkeypatch):
    # a Profile whose check was bypassed: the planner refuses its non-finite costs
    prof = load_profile("mobile-arm")
    object.__setattr__(prof, "op_overhead_us", NAN)
    with _deadline(60), pytest.raises(FxCompressError, match="op_overhead_us nan.*finite"):
        fxcompress.compile(_mlp(), (X,), profile=prof, techniques=["prune"])
    # and the greedy loop itself ends on a NaN gain, with our error, not forever
    monkeypatch.setattr(planner, "_check_costs", lambda *a: None)
    with _deadline(60), pytest.raises(InternalError, match="non-finite gain"):
        fxcompress.compile(_mlp(), (X,), profile=prof, techniques=["prune"])


# --- 3. tolerance: 0 is lossless only, 1 or more is valid ---------------------------------------
def test_tolerance_zero_removes_exactly_the_dead_channels():
    m = _mlp(dead=True)
    gm = fxcompress.compile(m, (X,), profile="mobile-arm", calibration=CAL, tolerance=0,
                            techniques=["prune"])
    live = torch.ones(32, dtype=torch.bool)
    live[DEAD] = False
    weights = {tuple(p.shape): p for p in gm.parameters()}
    assert set(weights) == {(24, 16), (24,), (4, 24), (4,)}
    assert torch.equal(weights[(24, 16)], m[0].weight[live])
    assert torch.equal(weights[(4, 24)], m[2].weight[:, live])
    with torch.no_grad():
        for (x,) in [(X,), *CAL]:
            torch.testing.assert_close(gm(x), m(x), rtol=1e-6, atol=1e-6)
    rep = gm.meta["fxcompress_report"]
    assert rep.tolerance == 0 and rep.error < 1e-6
    assert any("tolerance 0 keeps only exact rewrites" in n for n in rep.notes)


def test_tolerance_zero_without_an_exact_rewrite_leaves_the_model_and_says_why():
    m = _mlp()
    gm = fxcompress.compile(m, (X,), profile="mobile-arm", calibration=CAL, tolerance=0,
                            techniques=["prune"])
    assert _rewrites(gm) == []
    assert _n_params(gm) == _n_params(m)
    with torch.no_grad():
        assert torch.equal(gm(X), m(X))
    notes = " ".join(gm.meta["fxcompress_report"].notes)
    assert "tolerance 0 keeps only exact rewrites" in notes
    assert "0 of 3 candidates are exact, so no layer is rewritten" in notes
    assert "give a tolerance > 0" in notes


def test_tolerance_above_one_compiles():
    gm = fxcompress.compile(_mlp(), (X,), profile="mobile-arm", calibration=CAL, tolerance=1.5,
                            techniques=["prune"])
    rep = gm.meta["fxcompress_report"]
    assert rep.tolerance == 1.5 and rep.error <= 1.5
    assert _rewrites(gm)  # a loose tolerance prunes
