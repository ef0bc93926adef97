"""The planner: which rewrite each layer gets, on this target, within the tolerance.

1. **Candidates.** For every layer, each technique the profile runs (and the user allows)
   proposes rewrites; techniques that stack (int8) are also applied on top of the others'
   candidates. Each candidate is costed on the profile (roofline latency, stored bytes). A
   candidate that does not improve the objective on the target is dropped, with the reason.
2. **Sensitivity.** Each remaining candidate's error is measured alone: the original graph is
   run on the first calibration batches (at least 64 examples) with only that layer simulated
   as rewritten; one whose error on the first batches (4 examples or more) is already beyond
   4 x the tolerance is measured no further. The chosen plan is verified on all of the
   calibration data.
3. **Selection.** A greedy sequence of plans: each step upgrades the one layer whose next
   rewrite adds the most gain on the objective per unit of added squared error. The plan for a
   tolerance is the longest prefix of that sequence whose estimated error (the root of the sum
   of squared single-rewrite errors, as for independent noise) is within 0.9 x tolerance, so a
   looser tolerance only ever extends a plan.
4. **Verification and back-off.** The plan is built for real and judged by
   `fxcompress.acceptance`: its end-to-end error (or the drop of the user's `evaluate`) on
   calibration batches held out from every statistic and fit, and the upper end of its
   bootstrap interval, must be within the tolerance. If it misses, the last, least efficient
   upgrades are backed off: a binary search over shorter prefixes finds the longest that
   holds. If it holds with its measured error below the estimate (errors that partly cancel
   or are damped downstream), longer prefixes are tried with the estimate rescaled by what
   was measured. With calibration data, each plan is built with its values re-fitted to the
   whole plan first (`Technique.refine`: SVD re-fits its chosen factors in graph order from
   the inputs the rewritten model gives each layer), at unchanged ranks and costs.

Everything iterates in graph order and ties break by order, so the same inputs and seed give
the same plan.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fxcompress.acceptance import Acceptance, Verdict
from fxcompress.calibration import Calibration
from fxcompress.candidates import Candidate, Shapes, step_of_layer
from fxcompress.capture import inference_graph
from fxcompress.errors import FxCompressError, InternalError
from fxcompress.graph import Layer, get_attr
from fxcompress.hardware_profiles import Profile
from fxcompress.overrides import LayerSettings
from fxcompress.passes_infra import PassResult, run_passes
from fxcompress.technique import REGISTRY, GroupContext, ProposeContext, compatible


@dataclass
class LayerOptions:
    """A layer, its unchanged form, the candidates left after costing, and the reasons why
    techniques offered nothing or were dropped."""

    layer: Layer
    base: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (rewrite, reason)
    skip_reason: str | None = None  # why the layer is left alone before any candidate
    # the techniques the target requires of this layer (`Profile.requires` their format: an
    # int8-only target); then the layer must get a candidate of one of them
    required: tuple[str, ...] = ()
    shapes: Shapes | None = None  # input / output shapes on the example batch


@dataclass
class Plan:
    """The chosen candidate per layer (absent: left alone), and how it was verified."""

    choice: dict[str, Candidate]
    error: float  # end-to-end relative output error on the acceptance data
    score: float | None = None  # evaluate() of the built plan, when given
    graph_module: fx.GraphModule | None = None
    history: list[str] = field(default_factory=list)  # what the verification loop did
    verdict: Verdict | None = None  # the acceptance judgment of the built plan
    index: int | None = None  # the plan's position in the greedy sequence it was taken from


def gain(c: Candidate, base: Candidate, objective: str) -> float:
    """Saving of `c` over the unchanged layer on the objective (seconds or bytes)."""
    if objective == "latency":
        return base.latency - c.latency
    return float(base.stored_bytes - c.stored_bytes - c.program_bytes)


def build_options(gm: fx.GraphModule, layers: list[Layer], calib: Calibration,
                  profile: Profile, objective: str, techniques: tuple[str, ...], seed: int,
                  calibrated: bool, user_techniques: bool, scale_batch: float,
                  settings: dict[str, LayerSettings] | None = None,
                  global_settings: LayerSettings | None = None) -> list[LayerOptions]:
    """Costed candidates for every layer; `settings`: the layers' resolved
    `compile(overrides=...)` (see `fxcompress.overrides`), `global_settings`: those of its
    `"*"` key alone (for rewrites spanning several layers)."""
    options = []
    ordered_all = sorted((REGISTRY[t] for t in techniques if t in REGISTRY),
                         key=lambda t: t.order)
    settings = settings or {}
    # techniques whose format the target requires of every layer that can run it
    requiring = [t for t in ordered_all if t.fmt is not None and profile.requires(t.fmt)]
    for index, layer in enumerate(layers):
        s = settings.get(layer.name)
        ordered = [t for t in ordered_all
                   if s is None or s.techniques is None or t.name in s.techniques]
        stackers = [t for t in ordered if t.stack is not None]
        st = calib.stats[layer.node]
        weight = get_attr(gm, layer.weight_target).detach()
        bias = get_attr(gm, layer.bias_target).detach() if layer.bias_target else None
        inp = _scaled(st.shape, scale_batch)
        base = Candidate("none", layer, {}, (step_of_layer(layer, weight, bias),))
        base = base.costed(inp, profile)
        opt = LayerOptions(layer, base, shapes=Shapes(inp, _scaled(st.out_shape, scale_batch)))
        options.append(opt)
        if layer.shared_with:
            opt.skip_reason = (f"weight shared with {', '.join(layer.shared_with)}; one plan "
                               "for a shared weight is not supported yet, so it is left alone")
            continue
        if not weight.is_floating_point():
            opt.skip_reason = "weight is not floating point"
            continue
        required = tuple(t.name for t in requiring if profile.supports(layer.op, t.fmt))
        if s is not None and (s.skip or (required and not any(t.name in required
                                                              for t in ordered))):
            if required:
                raise FxCompressError(
                    f"overrides ({', '.join(s.keys)}) keep layer {layer.name!r} from "
                    f"{' / '.join(required)}, but {profile.name} runs {layer.op} layers in "
                    f"{' / '.join(required)} only; drop that override for this layer, or pick a "
                    "profile that runs float layers")
            if s.skip:
                opt.skip_reason = f"skipped by overrides ({', '.join(s.keys)})"
                continue
        ctx = ProposeContext(profile, objective, st, opt.shapes, weight, bias, seed, calibrated,
                             user_techniques, index, len(layers), calib, s)
        proposed: list[Candidate] = []
        for tech in ordered:
            cands, why = tech.propose(layer, base, ctx)
            if why:
                opt.rejected.append((tech.name, why))
            proposed.extend(cands)
        for tech in stackers:
            for c in list(proposed):
                if c.uses(tech.name):
                    continue
                stacked = tech.stack(c, ctx)
                if stacked is not None:
                    proposed.append(stacked)
        opt.required = required
        for c in proposed:
            c = c.costed(inp, profile)
            bits = c.params.get("bits")
            if s is not None and s.bits is not None and bits is not None and bits != s.bits:
                opt.rejected.append((c.describe(), f"{bits}-bit, and overrides "
                                     f"({', '.join(s.keys)}) ask for {s.bits}-bit"))
                continue
            if required and not any(c.uses(t) for t in required):
                opt.rejected.append((c.describe(), f"the target runs {' / '.join(required)} "
                                     "only"))
                continue
            ram = _layer_ram(opt.shapes, c, profile)
            if profile.activation_budget_bytes is not None and c.steps[0].scratch_bytes \
                    and ram > profile.activation_budget_bytes:
                opt.rejected.append((c.describe(), f"needs {ram:,} B of RAM while it runs (its "
                                     "activations and the weight it unpacks), over "
                                     f"{profile.name}'s activation budget of "
                                     f"{profile.activation_budget_bytes:,} B"))
                continue
            g = gain(c, base, objective)
            if g <= 0 and not required:
                what = "slower" if objective == "latency" else "larger"
                opt.rejected.append((c.describe(), f"{what} than the original on "
                                     f"{profile.name} by the cost model"))
                continue
            opt.candidates.append(c)
        if not opt.candidates and not opt.rejected:
            opt.skip_reason = "no technique applies to this layer"
    # rewrites spanning several layers (pruned dependency groups): extra entries, one per group
    gctx = GroupContext(gm, calib, list(options), profile, objective, seed, calibrated,
                        global_settings)
    for tech in ordered_all:
        if tech.propose_groups is not None:
            groups = tech.propose_groups(gctx)
            for g in groups:
                _respect_overrides(g, tech.name, settings)
            options.extend(groups)
    _check_costs(options, profile, objective)
    return options


def _respect_overrides(opt: LayerOptions, technique: str,
                       settings: dict[str, LayerSettings]) -> None:
    """Drop a multi-layer candidate (a pruned group) that would change a layer the overrides
    skip, or one whose techniques exclude `technique`, with the reason."""
    kept = []
    for c in opt.candidates:
        blocked = [n for n in sorted(c.touches) if n in settings and (
            settings[n].skip or (settings[n].techniques is not None
                                 and technique not in settings[n].techniques))]
        if blocked:
            keys = ", ".join(dict.fromkeys(k for n in blocked for k in settings[n].keys))
            opt.rejected.append((c.describe(), f"it changes {', '.join(blocked)}, which "
                                 f"overrides ({keys}) keep from {technique}"))
        else:
            kept.append(c)
    opt.candidates = kept


def _check_costs(options: list[LayerOptions], profile: Profile, objective: str) -> None:
    """Every cost is a finite number: a NaN gain never compares <= 0, so `moves` would take
    the same move forever. A validated profile has finite numbers; numbers of extreme
    magnitude can still overflow the roofline estimate."""
    for o in options:
        for c in [o.base, *o.candidates]:
            g = gain(c, o.base, objective)
            if not (math.isfinite(c.latency) and math.isfinite(g)):
                raise FxCompressError(
                    f"the cost model of profile {profile.name!r} gives layer "
                    f"{o.layer.name!r} ({c.describe()}) a latency of {c.latency} s and a "
                    f"{objective} gain of "
                    f"{g}: its numbers (throughput {profile.peak_gops} GOP/s, bandwidth "
                    f"{profile.bandwidth_gbs} GB/s, op_overhead_us {profile.op_overhead_us}) "
                    "are out of range; give finite numbers of realistic magnitude")


def _scaled(shape: tuple, factor: float) -> tuple:
    if not shape:
        return shape
    return (max(1, round(shape[0] * factor)), *shape[1:])


#: A candidate whose error, after `SETTLE_EXAMPLES` examples, is above this many times the
#: (largest) tolerance is not measured further (`Calibration.errors(settle_above=)`): it keeps
#: the error measured so far. A plan's estimate, the root of the sum of its squared errors, is
#: within 0.9 x tolerance, so such a candidate enters a plan only when `_extend` rescales the
#: estimate by less than 1/4 (a plan measuring a quarter of its estimate), and then its error
#: from fewer examples only orders it among the others; the built plan is judged as always.
SETTLE_FACTOR = 4.0


def measure(options: list[LayerOptions], calib: Calibration, progress: Callable | None = None,
            deadline: float | None = None, settle_above: float | None = None) -> int:
    """Fill in each candidate's error, measured alone (see `Calibration.errors`). Layers are
    measured in graph order; past `deadline` (a `time.perf_counter` value) the candidates of the
    remaining layers are dropped with that reason. A candidate whose error is above
    `settle_above` on the first batches keeps the error measured there. Returns how many were
    dropped."""
    order = {n.name: i for i, n in enumerate(calib.gm.graph.nodes)}
    total = sum(len(o.candidates) for o in options)
    limit = calib.sensitivity_batches()
    # each candidate starts where its earliest override is: one job list per start node
    starts: dict[str, list[tuple[Candidate, dict]]] = {}
    for opt in options:
        for c in opt.candidates:
            sim = c.simulation()
            first = min(sim, key=lambda name: order[name])
            starts.setdefault(first, []).append((c, sim))
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    stop = None if deadline is None else (lambda: time.perf_counter() > deadline)
    errs = calib.errors({k: [sim for _, sim in v] for k, v in starts.items()}, limit=limit,
                        stop=stop, progress=tick, settle_above=settle_above)
    for node, jobs in starts.items():
        for (c, _), e in zip(jobs, errs[node], strict=True):
            c.error = e
    dropped = 0
    for opt in options:
        for c in [c for c in opt.candidates if c.error is None]:
            opt.rejected.append((c.describe(), "not measured within the time budget"))
            dropped += 1
        for c in [c for c in opt.candidates if c.error is not None
                  and not math.isfinite(c.error)]:
            opt.rejected.append((c.describe(), f"its output error is {c.error} (the rewritten "
                                 "layer gives non-finite outputs on the calibration data)"))
        opt.candidates = [c for c in opt.candidates
                          if c.error is not None and math.isfinite(c.error)]
    return dropped


def moves(options: list[LayerOptions], objective: str) -> list[dict[str, Candidate]]:
    """The greedy sequence of plans: plan k+1 is plan k with the one layer upgrade of best
    marginal gain per unit of added squared error. Plan 0 holds only the rewrites the target
    requires (int8-only layers, at their least lossy). Every plan is a superset-in-gain of the
    one before it, so a looser tolerance (a later plan) never gives a bigger or slower model."""
    choice: dict[str, int] = {}
    for opt in options:
        if opt.required and opt.candidates:
            choice[opt.layer.name] = min(range(len(opt.candidates)),
                                         key=lambda i: (opt.candidates[i].error, i))
    by_name = {o.layer.name: o for o in options}

    def snapshot():
        return {n: by_name[n].candidates[i] for n, i in choice.items()}

    plans = [snapshot()]
    while True:
        best_key, best_move = None, None
        current = snapshot()
        for oi, opt in enumerate(options):
            cur = choice.get(opt.layer.name)
            cur_gain = 0.0 if cur is None else gain(opt.candidates[cur], opt.base, objective)
            cur_e2 = 0.0 if cur is None else opt.candidates[cur].error ** 2
            for ci, c in enumerate(opt.candidates):
                d_gain = gain(c, opt.base, objective) - cur_gain
                if not math.isfinite(d_gain):
                    # the loop ends only because each move raises one layer's gain by a
                    # finite amount > 0; a NaN gain (never <= 0) would be taken forever
                    raise InternalError(f"the planner got a non-finite gain ({d_gain}) for "
                                        f"{c.describe()} on {opt.layer.name}; please report "
                                        "this")
                if d_gain <= 0:
                    continue
                if any(not compatible(c, x) for n, x in current.items() if n != opt.layer.name):
                    continue
                d_e2 = max(c.error ** 2 - cur_e2, 1e-18)
                key = (d_gain / d_e2, -oi, -ci)
                if best_key is None or key > best_key:
                    best_key, best_move = key, (opt.layer.name, ci)
        if best_move is None:
            return plans
        choice[best_move[0]] = best_move[1]
        plans.append(snapshot())


def exact_allocation(options: list[LayerOptions], objective: str, error_budget: float,
                     bins: int = 4000) -> dict[str, Candidate] | None:
    """The plan of largest total gain whose estimated error (root-sum-of-squares of the
    single-rewrite errors, `estimated_error`) is within `error_budget`: a multiple-choice
    knapsack over the layers' (gain, squared error) ladders, solved by dynamic programming
    over the squared-error budget cut into `bins` steps (each candidate's share rounded up,
    so the plan never exceeds the budget). The exact counterpart of `moves`' greedy order,
    for comparing the two (`benchmarks/lowbit.py`); rewrites that change other layers'
    shapes (pruned groups) are left out, as their compatibility is pairwise. Layers the
    target requires rewritten (`LayerOptions.required`) always get one; None where they do not
    fit the budget."""
    budget2 = error_budget ** 2
    neg = float("-inf")
    best = torch.full((bins + 1,), neg, dtype=torch.float64)  # largest gain using b steps
    best[0] = 0.0
    picks: list[tuple[str, list[Candidate | None], torch.Tensor, list[int]]] = []
    for opt in options:
        ladder: list[tuple[Candidate | None, float, int]] = [] if opt.required \
            else [(None, 0.0, 0)]
        for c in opt.candidates:
            if c.touches or c.error is None or not math.isfinite(c.error):
                continue
            g = gain(c, opt.base, objective)
            steps = 0 if c.error == 0 else math.ceil(c.error ** 2 / max(budget2, 1e-30) * bins)
            # a layer the target requires rewritten takes a rewrite even at a loss
            if (g > 0 or opt.required) and steps <= bins:
                ladder.append((c, g, steps))
        if not ladder:
            if opt.required and opt.candidates:
                return None  # no required rewrite of this layer fits the budget
            continue
        rows = torch.full((len(ladder), bins + 1), neg, dtype=torch.float64)
        for i, (_, g, steps) in enumerate(ladder):
            rows[i, steps:] = best[:bins + 1 - steps] + g
        best, arg = rows.max(0)
        picks.append((opt.layer.name, [c for c, _, _ in ladder], arg,
                      [st for _, _, st in ladder]))
    if not math.isfinite(float(best.max())):
        return None  # the required rewrites alone exceed the budget
    b = int(torch.argmax(best))  # the first of equal gains: the least error
    choice: dict[str, Candidate] = {}
    for name, cands, arg, steps in reversed(picks):
        i = int(arg[b])
        if cands[i] is not None:
            choice[name] = cands[i]
        b -= steps[i]
    return choice


def plan_gain(plan: dict[str, Candidate], options: list[LayerOptions], objective: str) -> float:
    """A plan's total saving on the objective (the sum of its rewrites' `gain`)."""
    bases = {o.layer.name: o.base for o in options}
    return sum(gain(c, bases[n], objective) for n, c in plan.items())


def estimated_error(plan: dict[str, Candidate]) -> float:
    """Root of the sum of squared single-rewrite errors (independent noise)."""
    return math.sqrt(sum(c.error ** 2 for c in plan.values()))


def build_plan(gm: fx.GraphModule, choice: dict[str, Candidate],
               calib: Calibration | None = None, seed: int = 0,
               ) -> tuple[PassResult, dict[str, Candidate]]:
    """The rewritten graph for a plan, and the plan as built: a copy of `gm` with the chosen
    rewrites applied, one pass per technique, in the techniques' order. With `calib`,
    techniques that can re-fit their chosen values to the whole plan (`Technique.refine`:
    SVD's sequential re-fit) do so first; the returned plan holds those re-fitted candidates,
    so it describes the graph (`choice` itself is left as it is)."""
    # the graph copied, its tensors shared: passes add new tensors for what they rewrite and
    # never write into the base's (checked below), so a plan does not copy a block's weights
    tensors = _tensors(gm)
    versions = {id(t): _version(t) for t in tensors}
    work = copy.deepcopy(gm, memo={id(t): t for t in tensors})
    built = dict(choice)
    by_tech: dict[str, list[Candidate]] = {}
    for c in choice.values():
        for t in c.techniques:
            by_tech.setdefault(t, []).append(c)
    passes = []
    for tech in sorted((REGISTRY[t] for t in by_tech), key=lambda t: t.order):
        chosen = by_tech[tech.name]
        if calib is not None and tech.refine is not None:
            others = [c for c in built.values() if not c.uses(tech.name)]
            chosen = tech.refine(gm, chosen, others, calib.batches, seed)
            built.update((c.layer.name, c) for c in chosen)  # a plan is keyed by layer name
        passes.append((tech.name, tech.apply, tech.make_config(chosen)))
    result = run_passes(work, passes)
    inference_graph(result.graph_module)  # deepcopy drops the instance-bound eval / train
    changed = [t for t in tensors if _version(t) != versions[id(t)]]
    if changed:
        raise InternalError(f"a pass wrote into {len(changed)} of the base graph's tensors "
                            "in place (they are shared with the plans built from it); please "
                            "report this")
    return result, built


def _version(t: torch.Tensor) -> int | None:
    """`t`'s in-place write counter (None for an inference tensor, which keeps none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _tensors(gm: nn.Module) -> list[torch.Tensor]:
    """Every tensor `gm` holds: parameters, buffers and plain tensor attributes (constants)."""
    seen: dict[int, torch.Tensor] = {}
    for m in gm.modules():
        for t in (*m._parameters.values(), *m._buffers.values(),
                  *(v for v in vars(m).values() if isinstance(v, torch.Tensor))):
            if t is not None:
                seen.setdefault(id(t), t)
    return list(seen.values())


def own_tensors(result: nn.Module, base: nn.Module) -> None:
    """Give `result` copies of the tensors it shares with `base` (a plan built by
    `build_plan` shares the base's unchanged tensors): what is handed to the user is its
    own."""
    shared = {id(t) for t in _tensors(base)}
    for m in result.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is not None and id(t) in shared:
                    c = t.detach().clone()
                    store[k] = nn.Parameter(c, t.requires_grad) \
                        if isinstance(t, nn.Parameter) else c
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor) and id(v) in shared:
                setattr(m, k, v.clone())


def build(gm: fx.GraphModule, choice: dict[str, Candidate], calib: Calibration | None = None,
          seed: int = 0) -> PassResult:
    """The rewritten graph of `build_plan`."""
    return build_plan(gm, choice, calib, seed)[0]


class Selection:
    """Selection's tolerance-independent state, computed once and shared by every tolerance
    of a sweep and by recovery: the greedy plan sequence (`moves`; the exact-only one for
    tolerance 0), and each plan of it built once — re-fitted where `refit`, the plan as built
    kept with its graph — and measured once by an `Acceptance`, whose `judged` then decides
    each tolerance. `fits(gm)` is the target's weight budget (`Profile.weight_budget_bytes`);
    `enforce_budgets` reports the final plan against it."""

    def __init__(self, gm: fx.GraphModule, options: list[LayerOptions], calib: Calibration,
                 objective: str, profile: Profile | None = None, refit: bool = False,
                 seed: int = 0, file_bytes: Callable[[fx.GraphModule], int] | None = None):
        self.gm, self.options, self.calib = gm, options, calib
        self.objective, self.refit, self.seed = objective, refit, seed
        self.budget = None if profile is None else profile.weight_budget_bytes
        self._file_bytes = file_bytes
        self._files: dict[int, tuple[fx.GraphModule, int]] = {}
        self._sequences: dict[bool, tuple[list[dict[str, Candidate]], str | None]] = {}
        self._built: dict[tuple, tuple[fx.GraphModule, dict, Verdict]] = {}

    def file_bytes(self, gm: fx.GraphModule) -> int | None:
        """Bytes of `gm`'s serialized program (`.pt2`), measured once per graph; None when the
        selection was given no way to measure it."""
        if self._file_bytes is None:
            return None
        hit = self._files.get(id(gm))
        if hit is None or hit[0] is not gm:
            hit = self._files[id(gm)] = (gm, self._file_bytes(gm))
        return hit[1]

    def fits(self, built: fx.GraphModule) -> bool:
        """Whether a built graph's weights fit the target's weight budget."""
        return self.budget is None or weight_bytes(built) <= self.budget

    def sequence(self, exact: bool) -> tuple[list[dict[str, Candidate]], str | None]:
        """The greedy sequence (of exact rewrites only, with `exact`), and the note saying how
        many rewrites are exact."""
        if exact not in self._sequences:
            note = None
            options = self.options
            if exact:
                kept = [o if o.required else dataclasses.replace(
                    o, candidates=[c for c in o.candidates if c.error == 0.0]) for o in options]
                n_all = sum(len(o.candidates) for o in options if not o.required)
                n_exact = sum(len(o.candidates) for o in kept if not o.required)
                note = (f"tolerance 0 keeps only exact rewrites (error exactly 0 on the "
                        f"calibration data): {n_exact} of {n_all} candidates are exact"
                        + ("" if n_exact else ", so no layer is rewritten; give a tolerance > "
                           "0 (e.g. 0.01) to allow lossy rewrites"))
                options = kept
            self._sequences[exact] = (moves(options, self.objective), note)
        return self._sequences[exact]

    def built(self, exact: bool, k: int, accept: Acceptance,
              ) -> tuple[fx.GraphModule, dict[str, Candidate], Verdict]:
        """Plan `k` of the sequence built (once) and judged for `accept`'s tolerance: (its
        graph, the plan as built, the verdict). The same graph object for every tolerance:
        copy it before handing out two results."""
        key = (exact, k)
        if key in self._built:
            out, choice, v = self._built[key]
            return out, choice, accept.judged(v)
        choice = self.sequence(exact)[0][k]
        result, built = build_plan(self.gm, choice, self.calib if self.refit else None,
                                   self.seed)
        v = accept(result.graph_module)
        self._built[key] = (result.graph_module, built, v)
        return result.graph_module, built, v


    def built_choice(self, choice: dict[str, Candidate], accept: Acceptance,
                     ) -> tuple[fx.GraphModule, dict[str, Candidate], Verdict]:
        """`built` for a plan that is not a prefix of the sequence (`_fill`'s), cached by
        the candidates it holds."""
        key = ("choice", tuple(sorted((n, id(c)) for n, c in choice.items())))
        if key not in self._built:
            result, built = build_plan(self.gm, choice, self.calib if self.refit else None,
                                       self.seed)
            self._built[key] = (result.graph_module, built, accept(result.graph_module))
        out, built, v = self._built[key]
        return out, built, accept.judged(v)


def verify(selection: Selection, accept: Acceptance, log: Callable[[str], None]) -> Plan:
    """The longest prefix of the greedy sequence whose *built* graph `accept` holds (see
    `fxcompress.acceptance`: on held-out calibration data, by a bootstrap bound). With the
    selection's `refit`, each plan is built with its techniques' values re-fitted on the
    calibration data (see `build_plan`), and that graph, with the re-fitted plan, is judged
    and returned.

    Without evaluate(), the first try is the longest prefix whose estimated error is within
    0.9 x tolerance; with it, the longest prefix of all. If the built plan misses the
    tolerance, a binary search over shorter prefixes finds the longest that holds; if it
    holds below its estimate, longer prefixes are tried (`_extend`). If the
    plan misses the target's weight budget, the first longer prefix that fits and holds is
    taken (`Selection.fits`).

    Tolerance 0 without evaluate() is lossless only (`accept.exact_limit` set): the sequence is
    made of the exact rewrites alone (measured error exactly 0.0 on the calibration data), and
    the built plan holds when its error is within float rounding (`rounding_floor`: removing a
    dead channel reorders a sum). A NaN or infinite error or score never holds."""
    tolerance = accept.tolerance
    exact = accept.exact_limit is not None
    sequence, note = selection.sequence(exact)
    if note is not None:
        log(note)
    cache: dict[int, tuple[Plan, bool]] = {}

    def check(k: int) -> tuple[Plan, bool]:
        if k not in cache:
            out, choice, v = selection.built(exact, k, accept)
            plan = Plan(choice, v.error.value, v.score, out, verdict=v, index=k)
            limit = (f"float rounding ({accept.exact_limit:.2g}) of tolerance 0" if exact
                     else "tolerance")
            plan.history.append(f"plan {k}/{len(sequence) - 1}: {len(choice)} rewrites, "
                                f"{v.describe()}: {'within' if v.ok else 'over'} {limit}")
            log(plan.history[-1])
            cache[k] = (plan, v.ok)
        return cache[k]

    def noted(plan: Plan) -> Plan:
        if note is not None:
            plan.history.insert(0, note)
        return plan

    if accept.evaluate is None:
        top = max((k for k, p in enumerate(sequence) if estimated_error(p) <= 0.9 * tolerance),
                  default=0)
    else:
        top = len(sequence) - 1
    plan, ok = check(top)
    if ok and accept.evaluate is None and not exact:
        top, hi = _extend(sequence, top, plan, check, tolerance)
        plan = cache[top][0]
        if hi is not None:  # a longer prefix failed: the longest holding one lies between
            top = _bisect(top, hi, check)
            plan = cache[top][0]
    if ok:
        plan = _no_larger(_fit(plan, sequence, top, check, selection.fits), check, selection)
        plan = _fill(selection, sequence, plan, cache, accept, log)
        return noted(_exact(selection, sequence, plan, accept, log))
    lo, hi = 0, top  # invariant: hi fails; lo is the best known to hold (0 is checked below)
    plan0, ok0 = check(0)
    if not ok0:
        if sequence[0]:
            v0 = plan0.verdict
            judged = v0.describe() if v0 is not None else f"error {plan0.error:.4g}"
            raise FxCompressError(
                f"the rewrites this target requires already give {judged}, which does not "
                f"hold the tolerance {tolerance:g} (judged by the upper end of the interval "
                "where there is one); loosen the tolerance, pass more calibration batches (a "
                "narrower interval), or pass calibration data closer to real inputs")
        return noted(plan0)
    lo = _bisect(lo, hi, check)
    plan = _no_larger(_fit(cache[lo][0], sequence, lo, check, selection.fits), check, selection)
    plan = _fill(selection, sequence, plan, cache, accept, log)
    return noted(_exact(selection, sequence, plan, accept, log))


def _bisect(lo: int, hi: int, check) -> int:
    """The longest prefix between `lo` (holds) and `hi` (fails) that holds, by binary search
    (each probe built and judged once: `check` caches)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if check(mid)[1]:
            lo = mid
        else:
            hi = mid
    return lo


#: At most this many longer prefixes are tried when the built plan's error is below its
#: estimate (`_extend`).
EXTEND_TRIES = 3


def _extend(sequence: list[dict[str, Candidate]], k: int, plan: Plan, check,
            tolerance: float) -> tuple[int, int | None]:
    """Longer prefixes than `k` (which holds), when its built error is below its estimate: the
    root-sum-of-squares estimate treats the single-rewrite errors as independent, and they
    often partly cancel or are damped by the layers after them, so the measured error can be
    a fraction of the estimate. The estimate is rescaled by that measured fraction (of the
    upper end of the interval, which is what is judged) and the longest prefix whose
    rescaled estimate is within 0.9 x tolerance is built and judged; repeated while it holds,
    at most `EXTEND_TRIES` times. Returns (the longest prefix known to hold, the shortest
    longer one known to fail or None)."""
    last = len(sequence) - 1
    for _ in range(EXTEND_TRIES):
        est = estimated_error(sequence[k])
        high = plan.verdict.error.high if plan.verdict is not None else plan.error
        if k >= last or est <= 0 or not math.isfinite(high) or high <= 0:
            return k, None
        factor = min(1.0, high / est)
        nxt = max((j for j in range(k + 1, last + 1)
                   if estimated_error(sequence[j]) * factor <= 0.9 * tolerance), default=k)
        if nxt == k:
            return k, None
        longer, ok = check(nxt)
        if not ok:
            return k, nxt
        k, plan = nxt, longer
    return k, None


def _fill(selection: Selection, sequence: list[dict[str, Candidate]], plan: Plan,
          cache: dict[int, tuple[Plan, bool]], accept: Acceptance,
          log: Callable[[str], None]) -> Plan:
    """`plan` (a prefix of the sequence that holds) with later moves of the sequence added
    where they fit the remaining error budget, skipping those that do not. A prefix ends at
    the first move that would overrun the budget — often one large, lossy rewrite (a 4-bit
    palette of the biggest matrix) — while many smaller moves after it would still fit. The
    budget is 0.9 x tolerance on the estimate rescaled by the plan's measured error (its
    upper bound) over its estimate, as in `_extend` (here also when the plan measures above its
    estimate, which shrinks the budget); moves whose prefix was built and failed
    right after one that held are not retried. The filled plan is built and judged like any
    other and taken only if it holds, fits and (size objective) has a smaller file; else,
    once, a fill to half the extra budget is tried. Without evaluate() only (with it, the
    estimate is not in the units that are judged), and not for tolerance 0."""
    if accept.evaluate is not None or accept.exact_limit is not None or plan.index is None \
            or plan.verdict is None:
        return plan
    k, tolerance = plan.index, accept.tolerance
    est, high = estimated_error(plan.choice), plan.verdict.error.high
    if not math.isfinite(high):
        return plan
    factor = 1.0 if est <= 0 or high <= 0 else high / est
    failed = {j for j in cache if j > 0 and not cache[j][1] and cache.get(j - 1, (None, False))[1]}
    # each move of the sequence: (the layer it changes, its new candidate)
    steps = []
    for j in range(k + 1, len(sequence)):
        if j in failed:
            continue
        changed = [n for n, c in sequence[j].items() if sequence[j - 1].get(n) is not c]
        steps.extend((n, sequence[j][n]) for n in changed)
    base_e2, budget_e2 = est ** 2, (0.9 * tolerance / factor) ** 2
    if not steps or budget_e2 <= base_e2:
        return plan
    before = selection.file_bytes(plan.graph_module) if selection.objective == "size" else None
    bases = {o.layer.name: o.base for o in selection.options}
    for share in (1.0, 0.5):
        limit = base_e2 + share * (budget_e2 - base_e2)
        choice = dict(plan.choice)
        for name, c in steps:
            cur = choice.get(name)
            if cur is not None and gain(c, bases[name], selection.objective) \
                    <= gain(cur, bases[name], selection.objective):
                continue
            if any(not compatible(c, x) for n, x in choice.items() if n != name):
                continue
            trial = {**choice, name: c}
            if estimated_error(trial) ** 2 <= limit:
                choice = trial
        if len(choice) == len(plan.choice) and all(plan.choice.get(n) is c
                                                    for n, c in choice.items()):
            return plan
        out, built, v = selection.built_choice(choice, accept)
        added = sum(1 for n, c in choice.items() if plan.choice.get(n) is not c)
        line = (f"plan {k} filled with {added} later moves that fit the remaining budget: "
                f"{len(built)} rewrites, {v.describe()}: {'within' if v.ok else 'over'} "
                "tolerance")
        log(line)
        plan.history.append(line)
        if not v.ok or not selection.fits(out):
            continue
        if before is not None:
            after = selection.file_bytes(out)
            if after is not None and after >= before:
                continue
        return Plan(built, v.error.value, v.score, out, history=plan.history, verdict=v,
                    index=k)
    return plan


#: Error budgets of the exact allocation tried after the greedy's plan (each plan that gains
#: more is built and judged). Eight bisect the estimate's range to 1/128: with six, MiniLM on
#: x86-server (size, tolerance 0.2) stopped at a plan whose bound was 0.181, the next probe
#: between it and the failing one never tried.
EXACT_PROBES = 8


def _exact(selection: Selection, sequence: list[dict[str, Candidate]], plan: Plan,
           accept: Acceptance, log: Callable[[str], None]) -> Plan:
    """The greedy's `plan`, or the exact allocation's (`exact_allocation`) where one gains
    more and holds: its error budget is tried at the greedy plan's estimate (where it gains
    at least as much, by the estimate), then bisected between 0 and the whole sequence's,
    each probe built and judged; the largest gain that holds (and fits the weight budget,
    and under the size objective does not grow the file) wins. The greedy order (gain per
    error², one layer at a time) goes astray where a mild rewrite of every layer uses the
    budget that a stronger rewrite of most of them would have used better: on MiniLM for
    mobile-arm at tolerance 0.14 (size), 8-bit palettes everywhere, 0.235 of the weights at
    error 0.123, where the exact allocation holds at 0.150 (int4 on 21 linears, palettes
    on the rest)."""
    if accept.exact_limit is not None or plan.graph_module is None:
        return plan
    options, objective = selection.options, selection.objective
    best, best_gain = plan, plan_gain(plan.choice, options, objective)
    before = selection.file_bytes(plan.graph_module) if objective == "size" else None
    lo, hi = 0.0, estimated_error(sequence[-1])
    for i in range(EXACT_PROBES):
        # first at the greedy plan's own estimate, then bisecting: a budget whose plan gains
        # no more than the best so far, or holds, moves the search up; one that fails, down
        budget = estimated_error(plan.choice) if i == 0 else (lo + hi) / 2
        choice = exact_allocation(options, objective, budget)
        g = plan_gain(choice, options, objective) if choice is not None else -math.inf
        if g <= best_gain:
            lo = budget
            continue
        out, built, v = selection.built_choice(choice, accept)
        ok = v.ok and selection.fits(out)
        if ok and before is not None:
            after = selection.file_bytes(out)
            ok = after is None or after < before
        verdict = "taken" if ok else "over tolerance" if not v.ok else "not taken"
        line = (f"exact allocation at estimated error {budget:.4g}: {len(built)} rewrites, "
                f"{v.describe()}: {verdict}")
        log(line)
        plan.history.append(line)
        if ok:
            best, best_gain = Plan(built, v.error.value, v.score, out, history=plan.history,
                                   verdict=v, index=plan.index), g
            lo = budget
        else:
            hi = budget
    return best


def _no_larger(plan: Plan, check, selection: Selection) -> Plan:
    """Under the size objective, a plan whose file is larger than the original's (the ops a
    rewrite adds can outweigh the bytes it saves on a small layer) gives way to the shorter
    prefix with the smallest file among those that hold the tolerance and fit (probed at
    3/4, 1/2, 1/4, ... of its length, and plan 0); `plan` itself when none is smaller."""
    if selection.objective != "size" or plan.index is None:
        return plan
    before = selection.file_bytes(selection.gm)
    after = selection.file_bytes(plan.graph_module)
    if before is None or after is None or after <= before:
        return plan
    required, ok = check(0)
    if not ok or selection.file_bytes(required.graph_module) >= after:
        return plan  # the rewrites the target requires are what grows it
    best, best_bytes = plan, after
    probes = sorted({plan.index * 3 // 4, *(plan.index >> s for s in range(1, 64)), 0},
                    reverse=True)
    for j in probes:
        if j >= plan.index:
            continue
        cand, ok = check(j)
        if not ok or not selection.fits(cand.graph_module):
            continue
        n = selection.file_bytes(cand.graph_module)
        if n < best_bytes:
            best, best_bytes = cand, n
        if j == 0:
            break
    if best is not plan:
        best.history = [*plan.history, *best.history,
                        f"plan {plan.index}'s file ({after:,} B) is larger than the "
                        f"original's ({before:,} B): plan {best.index} ({best_bytes:,} B) "
                        "taken instead"]
    return best


#: Below this share of the original's file taken by its graph (not its weights), the ops a
#: rewrite adds are not worth measuring: they cannot outweigh what a rewrite saves.
PROGRAM_SHARE = 0.02


def charge_program_bytes(selection: Selection, log: Callable[[str], None]) -> None:
    """Estimate what each kind of rewrite adds to the serialized program besides its weights
    (the records of the ops and tensors it adds) and charge it to every candidate of that
    kind (`Candidate.program_bytes`, counted by the size objective's gain). Only under the
    size objective, and only where the graph is a sizeable part of the original's file
    (`PROGRAM_SHARE`: small models). One plan per kind (the technique stack and its formats),
    on the kind's largest layer, is built and its added records counted; the kind adding the
    most is also exported, which gives the bytes per record (its file's growth beyond its
    weights', over the records it added). Techniques that count these bytes themselves
    (`Technique.counts_program_bytes`) are left as they are."""
    if selection.objective != "size" or selection.file_bytes(selection.gm) is None:
        return
    gm = selection.gm
    before = selection.file_bytes(gm)
    if before - weight_bytes(gm) < PROGRAM_SHARE * before:
        return

    def records(g: fx.GraphModule) -> int:
        from fxcompress.export import nbits

        g = nbits.packed_graph(g) if nbits.has_narrow_codes(g) else g  # as the file holds it
        return (sum(n.op == "call_function" for n in g.graph.nodes)
                + len(list(g.parameters())) + len(list(g.buffers())))

    kinds: dict[tuple, list[tuple[LayerOptions, Candidate]]] = {}
    for o in selection.options:
        for c in o.candidates:
            if any(REGISTRY[t].counts_program_bytes for t in c.techniques if t in REGISTRY):
                continue
            key = (c.technique, tuple(s.fmt for s in c.steps), len(c.steps),
                   tuple(s.input_quant is not None for s in c.steps),
                   tuple(s.extra_ops for s in c.steps))  # e.g. int8 codes unpacked or not
            kinds.setdefault(key, []).append((o, c))
    base = build(gm, {}, None, selection.seed).graph_module  # as building leaves the graph
    n0 = records(base)
    added: dict[tuple, tuple[int, fx.GraphModule]] = {}
    for key, members in kinds.items():
        o, c = max(members, key=lambda oc: oc[0].base.stored_bytes)
        try:
            built = build(gm, {o.layer.name: c}, None, selection.seed).graph_module
        except Exception as e:  # a kind that does not build alone is judged with its plan
            log(f"program bytes of {key[0]} not estimated ({type(e).__name__}: {e})")
            continue
        added[key] = (records(built) - n0, built)
    if not added:
        return
    most, built = max(added.values(), key=lambda ab: ab[0])
    if most <= 0:
        return
    grown = selection.file_bytes(built) - selection.file_bytes(base)
    per_record = max(0.0, (grown - (weight_bytes(built) - weight_bytes(base))) / most)
    for key, (n, _) in added.items():
        for _, m in kinds[key]:
            m.program_bytes = int(max(0, n) * per_record)




#: How far, in units of the output dtype's machine epsilon, a plan of exact rewrites may be
#: from the original at tolerance 0: a narrower matmul adds the same terms in another order.
ROUNDING_ULPS = 64


def rounding_floor(calib: Calibration) -> float:
    """The relative output error float rounding alone can give: `ROUNDING_ULPS` epsilons of
    the widest-epsilon floating-point output."""
    eps = [torch.finfo(r.dtype).eps for ref in calib.reference[:1] for r in ref
           if isinstance(r, torch.Tensor) and r.is_floating_point()]
    return ROUNDING_ULPS * max(eps, default=torch.finfo(torch.float32).eps)


def _fit(plan: Plan, sequence, k: int, check, fits) -> Plan:
    """`plan` if its built graph fits the target's memory, else the first longer prefix that
    fits and holds the tolerance (more compression) — or `plan` unchanged, for
    `enforce_budgets` to report by how much it misses."""
    if fits(plan.graph_module):
        return plan
    for j in range(k + 1, len(sequence)):
        cand, ok = check(j)
        if ok and fits(cand.graph_module):
            return cand
    return plan


def weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of every parameter and buffer the built graph holds (what the target stores):
    codes narrower than a byte at their packed width (`nbits.code_widths`)."""
    from fxcompress.export.nbits import code_widths

    widths = code_widths(gm)
    total = 0
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        bits = widths.get(name)
        total += t.numel() * t.element_size() if bits is None else (t.numel() * bits + 7) // 8
    return total


def peak_activation_bytes(options: list[LayerOptions], choice: dict[str, Candidate],
                          profile: Profile) -> int:
    """Largest input + output of one layer, for one example, in the format it runs in, with
    the working memory its steps need beside them (`Step.scratch_bytes`: an unpacked weight)."""
    return max((_layer_ram(o.shapes, choice.get(o.layer.name) or o.base, profile)
                for o in options), default=0)


def _layer_ram(shapes: Shapes | None, c: Candidate, profile: Profile) -> int:
    """RAM one example needs while `c` runs: its input and output in the format it runs in,
    and the working memory of its steps (`Step.scratch_bytes`); 0 where the shapes are
    unknown."""
    if shapes is None or not shapes.inp or not shapes.out:
        return 0
    act = profile.activation_bytes(c.steps[0].fmt)
    return (math.prod(shapes.inp[1:]) + math.prod(shapes.out[1:])) * act \
        + max(s.scratch_bytes for s in c.steps)


def enforce_budgets(profile: Profile, options: list[LayerOptions],
                    choice: dict[str, Candidate], gm: fx.GraphModule) -> list[str]:
    """The user error when the plan does not fit the target's memory; otherwise lines for
    the report saying how it fits."""
    notes = []
    w = weight_bytes(gm)
    budget = profile.weight_budget_bytes
    if budget is not None:
        if w > budget:
            raise FxCompressError(
                f"the compressed weights need {w:,} bytes, {w - budget:,} more than "
                f"{profile.name}'s weight budget of {budget:,} bytes; loosen the tolerance, "
                "allow more techniques, or use a profile with more memory")
        notes.append(f"weights {w:,} B fit the {budget:,} B weight budget")
    act_budget = profile.activation_budget_bytes
    if act_budget is not None:
        a = peak_activation_bytes(options, choice, profile)
        if a > act_budget:
            raise FxCompressError(
                f"the largest layer needs {a:,} bytes of activations per example, "
                f"{a - act_budget:,} more than {profile.name}'s activation budget of "
                f"{act_budget:,} bytes; prune channels, reduce the input size, or use a "
                "profile with more memory")
        notes.append(f"peak activations {a:,} B fit the {act_budget:,} B activation budget")
    return notes
