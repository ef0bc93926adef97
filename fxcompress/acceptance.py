"""Acceptance: whether a built plan holds the tolerance on data its fits never saw.

The promise of `tolerance` is about the user's data, not about the calibration batches the
planner chose with. Two things make a plan's error on the calibration data an optimistic
estimate of its error elsewhere: the rewrites are *fitted* to that data (activation-aware SVD
to its covariance, the sequential re-fit and pruning's least-squares to its rows, int8 ranges
to its extremes), and the longest prefix that passes is *selected* on it. So:

1. **Split.** `split_batches` holds out a share of the calibration batches (`holdout`, 0.25 by
   default, spread evenly over the list so a sorted data set still gives both parts every
   kind of input). Statistics, candidate errors and every fit use the other batches only.
2. **Bound.** A built plan is judged on the held-out batches, and holds when the upper end of
   a one-sided `CONFIDENCE` bootstrap interval is within the tolerance: the relative output
   error is resampled over examples (`ratio_bound`); with an `evaluate` that returns one score
   per example, the drop is a paired bootstrap of per-example differences (`mean_bound`). An
   `evaluate` that returns one number gives no interval: its drop is judged as measured, and
   the report says so.

`holdout=0` is the in-sample acceptance: fits and judgment on all calibration batches, on the
point estimate, so the tolerance is met on the calibration data only. Resampling is seeded by
the compile's seed, so a plan and its interval repeat exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fxcompress.errors import FxCompressError

#: Share of the calibration batches held out for acceptance by default.
DEFAULT_HOLDOUT = 0.25
#: One-sided confidence of the bound a plan must keep within the tolerance.
CONFIDENCE = 0.95
#: Bootstrap resamples per judgment.
RESAMPLES = 1000
#: Below this many examples the report says a bootstrap interval means little.
MIN_EXAMPLES = 32


def split_batches(batches: list, share: float) -> tuple[list, list]:
    """(fit, held-out): `round(len * share)` batches held out (at least one when `share` > 0
    and there are two or more batches, never all), spread evenly over the list."""
    n = len(batches)
    if share <= 0 or n < 2:
        return list(batches), []
    h = min(n - 1, max(1, round(n * share)))
    held = {min(n - 1, int((j + 0.5) * n / h)) for j in range(h)}
    return ([b for i, b in enumerate(batches) if i not in held],
            [b for i, b in enumerate(batches) if i in held])


@dataclass(frozen=True)
class Estimate:
    """A figure measured on the acceptance data, and its bootstrap interval: `high` is the
    one-sided `CONFIDENCE` upper bound, `low` the matching lower one (together a two-sided
    interval of 2 x CONFIDENCE - 1). `units` is how many examples (or batches) were
    resampled; 0 means no interval (`low` = `high` = `value`)."""

    value: float
    low: float
    high: float
    units: int

    def describe(self, digits: int = 4) -> str:
        """`value` and, when resampled, the interval."""
        if not self.units:
            return f"{self.value:.{digits}g}"
        pct = round(100 * (2 * CONFIDENCE - 1))
        return (f"{self.value:.{digits}g} ({pct}% interval {self.low:.{digits}g} to "
                f"{self.high:.{digits}g} over {self.units} examples)")


def _batches(n: int) -> str:
    return f"{n} batch" + ("" if n == 1 else "es")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _resampled(stat: Callable[[torch.Tensor], torch.Tensor], n: int, seed: int,
               chunk: int = 100) -> torch.Tensor:
    """`stat(idx)` for RESAMPLES index draws `idx` (chunk x n) with replacement."""
    gen = _generator(seed)
    out = []
    for start in range(0, RESAMPLES, chunk):
        k = min(chunk, RESAMPLES - start)
        out.append(stat(torch.randint(n, (k, n), generator=gen)))
    return torch.cat(out)


def _quantiles(values: torch.Tensor) -> tuple[float, float]:
    q = torch.quantile(values, torch.tensor([1 - CONFIDENCE, CONFIDENCE], dtype=values.dtype))
    return float(q[0]), float(q[1])


def ratio_bound(num: torch.Tensor, den: torch.Tensor, seed: int, resample: bool = True
                ) -> Estimate:
    """sqrt(sum num / sum den) (the relative output error from per-example squared error and
    squared reference) and its bootstrap interval over the examples."""
    num, den = num.double(), den.double()
    total = float(den.sum())
    value = math.sqrt(float(num.sum()) / total) if total > 0 else 0.0
    n = num.numel()
    if not resample or n < 2 or not math.isfinite(value):
        return Estimate(value, value, value, 0)

    def stat(idx):
        d = den[idx].sum(1)
        return (num[idx].sum(1) / d.clamp_min(1e-300)).sqrt()

    low, high = _quantiles(_resampled(stat, n, seed))
    return Estimate(value, low, max(high, value), n)


def mean_bound(x: torch.Tensor, seed: int, resample: bool = True) -> Estimate:
    """The mean of per-example values (a paired difference) and its bootstrap interval."""
    x = x.double().reshape(-1)
    value = float(x.mean())
    n = x.numel()
    if not resample or n < 2 or not math.isfinite(value):
        return Estimate(value, value, value, 0)
    low, high = _quantiles(_resampled(lambda idx: x[idx].mean(1), n, seed))
    return Estimate(value, low, max(high, value), n)


# --------------------------------------------------------------------------------------------
# evaluate(): one number, or one number per example
# --------------------------------------------------------------------------------------------

SCORE_FIX = ("it must return a finite number, higher is better (e.g. accuracy in percent), "
             "or one such number per example (e.g. a tensor of 100 x correct), whose mean is "
             "the score")


@dataclass(frozen=True)
class Score:
    """An evaluate() result: the score, and the per-example values it is the mean of (None
    when evaluate() returned one number)."""

    value: float
    per_example: torch.Tensor | None = None


def score_of(value, what: str) -> Score:
    """The user's evaluate() result as a `Score`: a real number, a one-element tensor / array,
    or a 1-D tensor / array / list of real numbers (one per example, two or more), whose mean
    is the score. NaN and infinity pass through; anything else is the user error."""
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                for v in value):
            raise FxCompressError(f"{what} returned {shown}; {SCORE_FIX}")
        value = torch.tensor([float(v) for v in value], dtype=torch.float64)
    if isinstance(value, torch.Tensor) or (hasattr(value, "shape") and hasattr(value, "size")
                                           and not isinstance(value, numbers.Number)):
        t = value if isinstance(value, torch.Tensor) else _as_tensor(value, what, shown)
        if t.numel() == 1:
            return Score(float(t.reshape(()).item()))
        if t.dim() != 1 or t.numel() == 0 or not (t.is_floating_point() or t.dtype in (
                torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)):
            raise FxCompressError(f"{what} returned a {type(value).__name__} of shape "
                                  f"{tuple(t.shape)} and dtype {t.dtype}; {SCORE_FIX}: give "
                                  "one dimension, one value per example")
        per = t.detach().double()
        return Score(float(per.mean()), per)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FxCompressError(f"{what} returned {shown} ({type(value).__name__}); "
                              f"{SCORE_FIX}")
    return Score(float(value))


def _as_tensor(value, what: str, shown: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except Exception:
        raise FxCompressError(f"{what} returned {shown} ({type(value).__name__}); "
                              f"{SCORE_FIX}") from None


def base_score_of(fn: Callable, model) -> Score:
    """evaluate() of the original model, without autograd: finite, else the user error (a NaN
    base score would make every plan fail, and the model come back unchanged)."""
    with torch.no_grad():
        score = score_of(fn(model), "evaluate(model)")
    finite = math.isfinite(score.value) and (score.per_example is None
                                             or bool(torch.isfinite(score.per_example).all()))
    if not finite:
        raise FxCompressError(f"evaluate(model) returned {score.value} for the original model "
                              f"(or a non-finite per-example value); {SCORE_FIX}")
    return score


def no_grad_eval(fn: Callable) -> Callable[[object], Score]:
    """Wrap a user's evaluate() so it runs without autograd and returns a `Score`. A
    compressed model's non-finite score comes back as NaN, which fails every tolerance."""
    def wrapped(model) -> Score:
        with torch.no_grad():
            score = score_of(fn(model), "evaluate(compressed model)")
        if not math.isfinite(score.value):
            return Score(math.nan)
        return score
    return wrapped


# --------------------------------------------------------------------------------------------
# The judgment of one built plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """How a built plan fared: its relative output error on the acceptance data, its
    evaluate() score and drop (with evaluate), and whether it holds the tolerance."""

    error: Estimate
    score: float | None
    drop: Estimate | None
    ok: bool

    def describe(self) -> str:
        """One line for the plan's history."""
        if self.drop is not None:
            return (f"error {self.error.value:.4g}, score {self.score:.4f}, drop "
                    f"{self.drop.describe()}")
        return f"error {self.error.describe()}"


class Acceptance:
    """Judges built plans against the tolerance (see the module docstring). `exact_limit`: a
    tolerance-0 judgment, which compares the error's point estimate with that float-rounding
    floor instead."""

    def __init__(self, calib, tolerance: float, evaluate: Callable[[object], Score] | None,
                 base: Score | None, seed: int, exact_limit: float | None = None,
                 in_sample: bool = False):
        self.calib = calib
        self.tolerance = tolerance
        self.evaluate = evaluate
        self.base = base
        self.seed = seed
        self.exact_limit = exact_limit
        self.resample = not in_sample  # holdout=0: judged as measured, no interval

    def __call__(self, model) -> Verdict:
        """The `Verdict` for a built model."""
        num, den = self.calib.example_errors(model)
        error = ratio_bound(num, den, self.seed, self.resample)
        if self.evaluate is None:
            return self.judged(Verdict(error, None, None, False))
        score = self.evaluate(model)
        return self.judged(Verdict(error, score.value, self.drop(score), False))

    def judged(self, v: Verdict) -> Verdict:
        """`v` with `ok` decided for this tolerance (the figures do not depend on it, so a
        sweep measures each built plan once and judges it for every tolerance)."""
        if v.drop is not None:
            ok = math.isfinite(v.drop.high) and v.drop.high <= self.tolerance + 1e-12
        elif self.exact_limit is not None:
            ok = math.isfinite(v.error.value) and v.error.value <= self.exact_limit
        else:
            ok = math.isfinite(v.error.high) and v.error.high <= self.tolerance
        return replace(v, ok=ok)

    def drop(self, score: Score) -> Estimate:
        """The drop of `score` from the original's: a paired bootstrap over examples when both
        are per example, else the difference as measured."""
        base = self.base
        if base.per_example is not None and score.per_example is not None:
            if base.per_example.shape != score.per_example.shape:
                raise FxCompressError(
                    f"evaluate() returned {base.per_example.numel()} per-example scores for "
                    f"the original model and {score.per_example.numel()} for a compressed one; "
                    "it must score the same examples, in the same order, every time")
            diff = base.per_example - score.per_example
            if not bool(torch.isfinite(diff).all()):
                return Estimate(math.nan, math.nan, math.nan, 0)
            return mean_bound(diff, self.seed, self.resample)
        d = base.value - score.value
        return Estimate(d, d, d, 0)

    def basis(self) -> str:
        """What a plan is judged on, for the report."""
        c = self.calib
        n_held, n_fit = c.example_count(c.holdout), c.example_count(c.batches)
        pct = round(100 * CONFIDENCE)
        if self.evaluate is not None:
            if self.base.per_example is not None and self.resample:
                return (f"evaluate()'s drop, per example: accepted when the {pct}% upper bound "
                        f"of a paired bootstrap over its {self.base.per_example.numel()} "
                        "examples is within the tolerance")
            return ("evaluate()'s drop as measured: it returned one number, so the drop has no "
                    "interval and holds on evaluate()'s own data only; return one score per "
                    "example (e.g. 100 * (pred == y).float()) to have it bounded")
        if self.exact_limit is not None:
            return "error on the calibration data, within float rounding (tolerance 0)"
        if not self.resample:
            return ("error on the calibration data the rewrites were fitted to, as measured "
                    "(holdout=0: the tolerance holds on the calibration data only)")
        if c.holdout:
            return (f"error on {_batches(len(c.holdout))} of calibration held out ({n_held} "
                    f"examples), which no fit used, accepted when its {pct}% bootstrap upper "
                    f"bound is within the tolerance; fitted on the other {_batches(len(c.batches))}"
                    f" ({n_fit} examples)")
        return (f"error on the calibration data the rewrites were fitted to ({n_fit} examples), "
                f"accepted when its {pct}% bootstrap upper bound is within the tolerance; no "
                "batch could be held out: pass two or more calibration batches for a judgment "
                "on data no fit used")

    def notes(self, verdict: Verdict | None) -> list[str]:
        """Report notes on calibration data too small for the judgment: nothing held out, or
        an interval so wide that the bound, not the error, decides — with how much more data
        to pass."""
        c = self.calib
        out = []
        if self.resample and not c.holdout and self.exact_limit is None:
            out.append("one calibration batch (or only the example inputs): none could be held "
                       "out, so the tolerance is "
                       "judged on the data the rewrites were fitted to; pass two or more batches "
                       "(e.g. split this one into 4) for a judgment on data no fit used")
        if verdict is None or self.exact_limit is not None:
            return out
        est = verdict.drop if verdict.drop is not None else verdict.error
        margin = est.high - est.value
        target = 0.25 * self.tolerance
        what = "examples evaluate() scored" if verdict.drop is not None else \
            "held-out calibration examples"
        if 0 < est.units < MIN_EXAMPLES:
            out.append(f"the judgment rests on only {est.units} {what}, too few for a bootstrap "
                       f"interval to mean much: pass at least {MIN_EXAMPLES} (about "
                       f"{math.ceil(MIN_EXAMPLES / est.units)}x as many)")
        elif est.units and target > 0 and margin > target:
            more = math.ceil((margin / target) ** 2)
            out.append(f"the judgment rests on {est.units} {what}: the 95% bound is "
                       f"{margin:.3g} above the estimate, more than a quarter of the tolerance, "
                       f"so the bound rather than the error limited the plan; about {more}x as "
                       "many examples would narrow it to that and let more compression through")
        return out

