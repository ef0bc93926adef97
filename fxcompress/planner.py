"""The planner: which rewrite each layer gets, on this target, within the tolerance (DESIGN §6).

1. **Candidates.** For every layer, each technique the profile runs (and the user allows)
   proposes rewrites; techniques that stack (int8) are also applied on top of the others'
   candidates. Each candidate is costed on the profile (roofline latency, stored bytes). A
   candidate that does not improve the objective on the target is dropped, with the reason.
2. **Sensitivity.** Each remaining candidate's error is measured alone: the original graph is
   run on the calibration data with only that layer simulated as rewritten.
3. **Selection.** Greedy by marginal gain per unit of squared error: starting from nothing,
   repeatedly take the layer upgrade with the best ratio whose estimated total error
   (the root of the sum of squared errors, as for independent noise) stays within the budget.
4. **Verification.** The chosen plan is built for real and its end-to-end error measured. If it
   exceeds the tolerance the budget is tightened in proportion and the plan redone; if that does
   not converge, the most harmful choices are backed off one at a time until it holds.

Everything iterates in graph order and ties break by order, so the same inputs and seed give
the same plan.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from fxcompress.calibration import Calibration
from fxcompress.candidates import Candidate, Shapes, step_of_layer
from fxcompress.errors import FxCompressError
from fxcompress.graph import Layer, get_attr
from fxcompress.hardware_profiles import Profile
from fxcompress.passes_infra import PassResult, run_passes
from fxcompress.technique import REGISTRY, ProposeContext


@dataclass
class LayerOptions:
    """A layer, its unchanged form, the candidates left after costing, and the reasons why
    techniques offered nothing or were dropped."""

    layer: Layer
    base: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (rewrite, reason)
    skip_reason: str | None = None  # why the layer is left alone before any candidate
    mandatory: bool = False  # the target cannot run this layer unless it is rewritten (int8)


@dataclass
class Plan:
    """The chosen candidate per layer (absent: left alone), and how it was verified."""

    choice: dict[str, Candidate]
    error: float  # measured end-to-end relative output error
    score: float | None = None  # evaluate() of the built plan, when given
    graph_module: fx.GraphModule | None = None
    history: list[str] = field(default_factory=list)  # what the verification loop did


def gain(c: Candidate, base: Candidate, objective: str) -> float:
    """Saving of `c` over the unchanged layer on the objective (seconds or bytes)."""
    if objective == "latency":
        return base.latency - c.latency
    return float(base.stored_bytes - c.stored_bytes)


def build_options(gm: fx.GraphModule, layers: list[Layer], calib: Calibration,
                  profile: Profile, objective: str, techniques: tuple[str, ...], seed: int,
                  calibrated: bool, user_techniques: bool, scale_batch: float,
                  ) -> list[LayerOptions]:
    """Costed candidates for every layer."""
    options = []
    ordered = sorted((REGISTRY[t] for t in techniques if t in REGISTRY), key=lambda t: t.order)
    stackers = [t for t in ordered if t.stack is not None]
    for index, layer in enumerate(layers):
        st = calib.stats[layer.node]
        weight = get_attr(gm, layer.weight_target).detach()
        bias = get_attr(gm, layer.bias_target).detach() if layer.bias_target else None
        inp = _scaled(st.shape, scale_batch)
        base = Candidate("none", layer, {}, (step_of_layer(layer, weight, bias),))
        base = base.costed(inp, profile)
        opt = LayerOptions(layer, base)
        options.append(opt)
        if layer.shared_with:
            opt.skip_reason = (f"weight shared with {', '.join(layer.shared_with)}; one plan "
                               "for a shared weight is not supported yet, so it is left alone")
            continue
        if not weight.is_floating_point():
            opt.skip_reason = "weight is not floating point"
            continue
        ctx = ProposeContext(profile, objective, st, Shapes(inp, _scaled(st.out_shape,
                                                                         scale_batch)),
                             weight, bias, seed, calibrated, user_techniques, index,
                             len(layers))
        proposed: list[Candidate] = []
        for tech in ordered:
            cands, why = tech.propose(layer, base, ctx)
            if why:
                opt.rejected.append((tech.name, why))
            proposed.extend(cands)
        for tech in stackers:
            for c in list(proposed):
                if tech.name in c.technique.split("+"):
                    continue
                stacked = tech.stack(c, ctx)
                if stacked is not None:
                    proposed.append(stacked)
        opt.mandatory = profile.int8_required and profile.supports(layer.op, "int8") \
            and "int8" in techniques
        for c in proposed:
            c = c.costed(inp, profile)
            if opt.mandatory and not c.payload.get("int8"):
                opt.rejected.append((c.describe(), "the target runs int8 only"))
                continue
            g = gain(c, base, objective)
            if g <= 0 and not opt.mandatory:
                what = "slower" if objective == "latency" else "larger"
                opt.rejected.append((c.describe(), f"{what} than the original on "
                                     f"{profile.name} by the cost model"))
                continue
            opt.candidates.append(c)
        if not opt.candidates and not opt.rejected:
            opt.skip_reason = "no technique applies to this layer"
    return options


def _scaled(shape: tuple, factor: float) -> tuple:
    if not shape:
        return shape
    return (max(1, round(shape[0] * factor)), *shape[1:])


def measure(options: list[LayerOptions], calib: Calibration, progress: Callable | None = None,
            ) -> None:
    """Fill in each candidate's error, measured alone."""
    total = sum(len(o.candidates) for o in options)
    done = 0
    for opt in options:
        for c in opt.candidates:
            c.error = calib.error(c.simulation())
            done += 1
            if progress:
                progress(done, total)


def select(options: list[LayerOptions], budget: float, objective: str,
           exclude: dict[str, set[int]] | None = None) -> dict[str, Candidate]:
    """Greedy selection within an error budget (see module docstring)."""
    exclude = exclude or {}
    choice: dict[str, int] = {}
    err2 = 0.0
    for opt in options:
        if opt.mandatory and opt.candidates:
            allowed = [i for i in range(len(opt.candidates))
                       if i not in exclude.get(opt.layer.name, set())] or [0]
            best = min(allowed, key=lambda i: (opt.candidates[i].error, i))
            choice[opt.layer.name] = best
            err2 += opt.candidates[best].error ** 2
    while True:
        best_key, best_move = None, None
        for oi, opt in enumerate(options):
            cur = choice.get(opt.layer.name)
            cur_gain = 0.0 if cur is None else gain(opt.candidates[cur], opt.base, objective)
            cur_e2 = 0.0 if cur is None else opt.candidates[cur].error ** 2
            for ci, c in enumerate(opt.candidates):
                if ci in exclude.get(opt.layer.name, set()):
                    continue
                d_gain = gain(c, opt.base, objective) - cur_gain
                if d_gain <= 0:
                    continue
                d_e2 = c.error ** 2 - cur_e2
                if err2 + d_e2 > budget ** 2 + 1e-30:
                    continue
                ratio = d_gain / max(d_e2, 1e-18)
                key = (ratio, -oi, -ci)
                if best_key is None or key > best_key:
                    best_key, best_move = key, (opt.layer.name, ci, d_e2)
        if best_move is None:
            break
        name, ci, d_e2 = best_move
        choice[name] = ci
        err2 += d_e2
    by_name = {o.layer.name: o for o in options}
    return {name: by_name[name].candidates[ci] for name, ci in choice.items()}


def build(gm: fx.GraphModule, choice: dict[str, Candidate]) -> PassResult:
    """The rewritten graph for a plan: a copy of `gm` with the chosen rewrites applied, one
    pass per technique, in the techniques' order."""
    work = copy.deepcopy(gm)
    by_tech: dict[str, list[Candidate]] = {}
    for c in choice.values():
        for t in c.technique.split("+"):
            by_tech.setdefault(t, []).append(c)
    passes = []
    for tech in sorted((REGISTRY[t] for t in by_tech), key=lambda t: t.order):
        passes.append((tech.name, tech.apply, tech.make_config(by_tech[tech.name])))
    return run_passes(work, passes)


def verify(gm: fx.GraphModule, options: list[LayerOptions], calib: Calibration,
           tolerance: float, objective: str, evaluate: Callable | None,
           base_score: float | None, log: Callable[[str], None]) -> Plan:
    """Choose and verify a plan whose measured error (or evaluate() drop) is within the
    tolerance, backing off when the estimate was optimistic."""

    def check(choice):
        result = build(gm, choice)
        out = result.graph_module
        err = calib.error_of(out)
        score = None
        if evaluate is not None:
            score = float(evaluate(out))
            ok = base_score - score <= tolerance + 1e-12
        else:
            ok = err <= tolerance
        return Plan(choice, err, score, out), ok

    if evaluate is None:
        budget = tolerance * 0.9
        for attempt in range(5):
            choice = select(options, budget, objective)
            plan, ok = check(choice)
            plan.history.append(f"plan {attempt}: budget {budget:.4g}, {len(choice)} rewrites, "
                                f"error {plan.error:.4g}")
            log(plan.history[-1])
            if ok:
                return plan
            budget *= 0.9 * tolerance / max(plan.error, 1e-12)
        return _back_off(plan, check, log, options)
    # With evaluate(), the relation between output error and the user's metric is unknown:
    # search the largest output-error budget whose plan keeps the metric drop in tolerance.
    best = None
    lo, hi = 0.0, None
    budget = 0.05
    for attempt in range(7):
        choice = select(options, budget, objective)
        plan, ok = check(choice)
        log(f"plan {attempt}: error budget {budget:.4g}, {len(choice)} rewrites, "
            f"error {plan.error:.4g}, score {plan.score:.4f}, {'ok' if ok else 'too lossy'}")
        if ok:
            best = plan if best is None or len(choice) >= len(best.choice) or \
                _total_gain(choice, options, objective) >= _total_gain(best.choice, options,
                                                                       objective) else best
            lo = budget
            budget = budget * 2 if hi is None else (budget + hi) / 2
        else:
            hi = budget
            budget = (lo + budget) / 2 if lo > 0 else budget / 4
    if best is None:
        plan, _ = check({})
        plan.history.append("no rewrite keeps evaluate() within the tolerance")
        return plan
    return best


def _total_gain(choice, options, objective) -> float:
    bases = {o.layer.name: o.base for o in options}
    return sum(gain(c, bases[n], objective) for n, c in choice.items())


def _back_off(plan: Plan, check, log, options: list[LayerOptions]) -> Plan:
    """Drop the most harmful choice, one at a time, until the plan is within tolerance. A
    layer the target can only run rewritten (int8-only targets) is never dropped."""
    mandatory = {o.layer.name for o in options if o.mandatory}
    choice = dict(plan.choice)
    while True:
        optional = [n for n in choice if n not in mandatory]
        if not optional:
            break
        worst = max(optional, key=lambda n: (choice[n].error, n))
        del choice[worst]
        plan, ok = check(choice)
        plan.history.append(f"backed off {worst}: error {plan.error:.4g}")
        log(plan.history[-1])
        if ok:
            return plan
    if mandatory & set(choice):
        raise FxCompressError(
            f"even with every optional rewrite backed off the error is {plan.error:.4g}, and "
            "this target runs int8 only; loosen the tolerance, or pass calibration data closer "
            "to real inputs")
    return plan


def enforce_budgets(profile: Profile, weight_bytes: int) -> None:
    """The user error when the planned weights do not fit the target's weight memory."""
    budget = profile.weight_budget_bytes
    if budget is not None and weight_bytes > budget:
        raise FxCompressError(
            f"the compressed weights need {weight_bytes} bytes, {weight_bytes - budget} more "
            f"than {profile.name}'s weight budget of {budget} bytes; loosen the tolerance, "
            "allow more techniques, or use a profile with more memory")


def total_error_estimate(choice: dict[str, Candidate]) -> float:
    """Root of the sum of squared single-rewrite errors."""
    return math.sqrt(sum(c.error ** 2 for c in choice.values()))


def no_grad_eval(fn: Callable) -> Callable:
    """Wrap a user's evaluate() so it runs without autograd."""
    def wrapped(model):
        with torch.no_grad():
            return fn(model)
    return wrapped
