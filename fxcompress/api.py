"""`fxcompress.compile`: capture, plan, rewrite, verify, report."""

from __future__ import annotations

import copy
import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

import fxcompress.passes  # noqa: F401  (registers the techniques)
from fxcompress.acceptance import (
    DEFAULT_HOLDOUT,
    Acceptance,
    base_score_of,
    no_grad_eval,
    split_batches,
)
from fxcompress.built_cost import built_costs
from fxcompress.calibration import Calibration, check_calibration, patch_geometries
from fxcompress.capture import EXPORT_LOCK, capture, clones, inference_graph
from fxcompress.errors import FxCompressError, InternalError
from fxcompress.graph import find_layers
from fxcompress.hardware_profiles import Profile, known_techniques, load_profile
from fxcompress.host import calibrated, compile_threads, target_vs_host, threads
from fxcompress.overrides import check_overrides, resolve_all, resolve_global
from fxcompress.planner import (
    SETTLE_FACTOR,
    Selection,
    build_options,
    charge_program_bytes,
    enforce_budgets,
    measure,
    own_tensors,
    rounding_floor,
    verify,
)
from fxcompress.progress import Progress
from fxcompress.recover import Recover, recover_plan
from fxcompress.report import REPORT_KEY, CandidateReport, LayerReport, Report
from fxcompress.technique import REGISTRY

DEFAULT_TOLERANCE = 0.01


def serialized_size(ep: torch.export.ExportedProgram) -> int:
    """Bytes of the ``.pt2`` `fxcompress.export` writes for `ep` (`pt2.save_program`), without
    the example inputs a program may carry (the calibration batch it was exported with is not
    the model: `fxcompress.export` keeps two rows of it at most). Written to a temporary file,
    not held: a block's program is hundreds of MB."""
    from fxcompress.export.pt2 import save_program

    kept, ep.example_inputs = ep.example_inputs, None
    try:
        with tempfile.TemporaryDirectory(prefix="fxcompress-size-") as d:
            path = Path(d) / "archive.pt2"  # the archive's root folder: "archive"
            save_program(ep, path)
            return path.stat().st_size
    finally:
        ep.example_inputs = kept


def _as_written(result: fx.GraphModule, ep: torch.export.ExportedProgram, cap
                ) -> torch.export.ExportedProgram:
    """The program `fxcompress.export` writes as a ``.pt2``: `ep`, or, where codes narrower
    than a byte are packed (group-wise low-bit layers, int8 layers' 4-bit codes), the export
    of that packed form (so the report's serialized size is the file's)."""
    from fxcompress.export import nbits

    packed = nbits.packed_graph(result) if nbits.has_narrow_codes(result) else result
    if packed is result:
        return ep
    return torch.export.export(packed, clones(cap.example_inputs),
                               dynamic_shapes=cap.dynamic_shapes, strict=False)


def _real(value) -> bool:
    """A real number (int, float, NumPy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_tolerance(tolerance, evaluate) -> float:
    if not _real(tolerance):
        raise FxCompressError(f"tolerance must be a number, not {type(tolerance).__name__} "
                              f"({tolerance!r}); e.g. tolerance=0.01 (1% relative output "
                              "error), or tolerance=0 for lossless rewrites only")
    t = float(tolerance)
    if t >= 0 and math.isfinite(t):
        return t
    if evaluate is None:
        raise FxCompressError(
            f"tolerance {t:g} is out of range: without evaluate= it is the largest relative "
            "output error allowed, a finite number >= 0 (0: lossless rewrites only; 1 or "
            "more is allowed), e.g. 0.01")
    raise FxCompressError(f"tolerance {t:g} is out of range: with evaluate= it is the largest "
                          "allowed drop of evaluate()'s score, a finite number >= 0 (e.g. 1.0 "
                          "for one point of accuracy in percent)")


#: `torch.manual_seed` takes any 64-bit integer; a seed is one that is also non-negative.
SEED_LIMIT = 2 ** 63


def _check_seed(seed) -> int:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise FxCompressError(f"seed must be an integer, not {type(seed).__name__} ({seed!r}); "
                              "e.g. seed=0")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise FxCompressError(f"seed {int(seed)} is out of range; give an integer from 0 to "
                              "2**63 - 1, e.g. seed=0")
    return int(seed)


def _check_time_budget(time_budget) -> float | None:
    """Seconds, or None for no limit; math.inf is no limit too, 0 measures no candidate."""
    if time_budget is None:
        return None
    if not _real(time_budget):
        raise FxCompressError(f"time_budget must be a number of seconds, not "
                              f"{type(time_budget).__name__} ({time_budget!r}); e.g. "
                              "time_budget=60, or None for no limit")
    t = float(time_budget)
    if math.isnan(t) or t < 0:
        raise FxCompressError(f"time_budget {t:g} is out of range; give a number of seconds "
                              ">= 0 (e.g. time_budget=60), or None for no limit")
    return None if math.isinf(t) else t


def _check_holdout(holdout) -> float:
    if not _real(holdout) or not 0 <= float(holdout) < 1:
        raise FxCompressError(f"holdout must be a share of the calibration batches from 0 to "
                              f"below 1, not {holdout!r}; e.g. holdout=0.25 (the default), or "
                              "0 to judge plans on the data they were fitted to")
    return float(holdout)


def _check_callable(name: str, value, example: str) -> None:
    if value is not None and not callable(value):
        raise FxCompressError(f"{name} must be a callable or None, not "
                              f"{type(value).__name__} ({str(value)[:60]!r}); e.g. {example}")


def _check_objective(objective) -> str | None:
    if objective is None or (isinstance(objective, str) and objective in ("latency", "size")):
        return objective
    raise FxCompressError(f"objective {objective!r} is unknown; use 'latency' or 'size', or "
                          "None for the profile's default")


def _technique_names(techniques) -> tuple[str, ...] | None:
    """`techniques` as a tuple of known names (None stays None); checked before any work."""
    if techniques is None:
        return None
    TECHNIQUES = known_techniques()  # noqa: N806
    if isinstance(techniques, str):
        techniques = [techniques]
    try:
        names = tuple(techniques)
    except TypeError:
        raise FxCompressError(f"techniques must be a list of technique names, not "
                              f"{type(techniques).__name__} ({techniques!r}); e.g. "
                              f"techniques=['prune', 'int8'] from {', '.join(TECHNIQUES)}"
                              ) from None
    for t in names:
        if not isinstance(t, str):
            raise FxCompressError(f"techniques holds {t!r} ({type(t).__name__}); give names "
                                  f"of techniques as strings, from {', '.join(TECHNIQUES)}")
        if t not in TECHNIQUES:
            raise FxCompressError(f"unknown technique {t!r}; use a subset of "
                                  f"{', '.join(TECHNIQUES)}")
    return names


def _check_techniques(techniques, profile: Profile) -> tuple[tuple[str, ...], bool]:
    names = _technique_names(techniques)
    if names is None:
        return tuple(t for t in profile.techniques if t in REGISTRY), False
    for t in names:
        if not profile.allows(t):
            raise FxCompressError(
                f"technique {t!r} cannot run on {profile.name} (it runs "
                f"{', '.join(profile.techniques)}); drop it from techniques, or pick a profile "
                "whose target runs it")
        if t not in REGISTRY:
            raise FxCompressError(f"technique {t!r} is not available in this version of "
                                  f"fxcompress; available: {', '.join(sorted(REGISTRY))}")
    order = known_techniques()
    return tuple(sorted(set(names), key=order.index)), True


def compile(model, example_inputs=None, *, profile="mobile-arm", calibration: Iterable | None
            = None, tolerance: float = DEFAULT_TOLERANCE, evaluate: Callable | None = None,
            techniques: Iterable[str] | None = None, objective: str | None = None,
            dynamic_shapes=None, recover=None, seed: int = 0,
            progress: Callable[[str], None] | None = None,
            time_budget: float | None = None, holdout: float = DEFAULT_HOLDOUT,
            overrides: Mapping[str, Mapping] | None = None) -> fx.GraphModule:
    """Compress `model` for the target `profile` within `tolerance`.

    Returns an ATen-level `torch.fx.GraphModule` that runs in eager mode, accepts any batch
    size where the model allows it, and that `torch.export.export(result, example_inputs)`
    accepts. `result.meta["fxcompress_report"]` is the `Report`. The input model is never
    modified. The arguments are those of README.md's "Use" section:

    - `tolerance`: without `evaluate`, the largest relative output error ‖y′−y‖/‖y‖ over the
      calibration data, any finite number >= 0; 1 or more is allowed (binary layers can
      exceed 1). `tolerance=0` is lossless only: just the exact rewrites, those whose
      measured error is exactly 0 on the calibration data (e.g. removing dead, all-zero
      channels); the built model then equals the original up to float rounding (a narrower
      matmul adds the same terms in another order), and if no rewrite is exact the model
      comes back unchanged, the report saying why. With `evaluate`, the largest allowed drop
      of its score (0: no drop).
      The tolerance is judged on calibration batches held out from every fit (`holdout`),
      by the upper end of a 95% bootstrap interval, so that it holds on data the planner did
      not choose with (see `fxcompress.acceptance`).
    - `evaluate(model)`: higher is better; it returns the score, a finite number (a
      one-element tensor is read as its value), or one number per example (a 1-D tensor,
      array or list, e.g. `100 * (pred == y).float()`), whose mean is the score: then a plan
      holds when the 95% upper bound of a paired bootstrap of the per-example drop is within
      the tolerance. A compressed model whose score is NaN or infinite fails the tolerance.
    - `holdout`: the share of the calibration batches held out to judge plans on, from 0 to
      below 1 (default 0.25; at least one batch is held out when there are two or more).
      0 judges on the data the rewrites were fitted to, as measured, without an interval: the
      tolerance then holds on the calibration data only.
    - `overrides`: per-layer settings, `{pattern: {"skip": True, "techniques": [...],
      "rank": r, "bits": b}}`, where a pattern is `"*"`, `"op:<type>"` or a layer-name
      pattern; global < op type < name pattern (see `fxcompress.overrides`). A key that
      selects no layer is an error.
    - `seed`: an integer from 0 to 2**63 - 1; fixes every random choice.
    - `progress`: a callable that receives one line per planner step (a bar is drawn on a
      terminal regardless). It is the caller's code: what it raises propagates.
    - `time_budget`: seconds >= 0 that bound the measurement of candidates: those not
      measured in time are dropped, each with that reason in the report (0 measures none);
      None or `math.inf`: no limit. NaN and negative numbers are errors.

    Every argument is checked before any work; a wrong one raises `FxCompressError` naming it
    and the fix. The compile uses `torch.get_num_threads()` threads (or
    `FXCOMPRESS_THREADS`), fewer while other processes keep the cores busy (see
    `fxcompress.host.compile_threads`)."""
    n_threads = compile_threads()
    with EXPORT_LOCK, threads(n_threads):  # torch.export's state is process-wide
        result = _compile(model, example_inputs, profile, calibration, [tolerance], evaluate,
                          techniques, objective, dynamic_shapes, recover, seed, progress,
                          time_budget, holdout, overrides)[0]
    _thread_note(result.meta[REPORT_KEY], n_threads)
    return result


def sweep(model, example_inputs=None, *, tolerances: Iterable[float], profile="mobile-arm",
          calibration: Iterable | None = None, evaluate: Callable | None = None,
          techniques: Iterable[str] | None = None, objective: str | None = None,
          dynamic_shapes=None, recover=None, seed: int = 0,
          progress: Callable[[str], None] | None = None, time_budget: float | None = None,
          holdout: float = DEFAULT_HOLDOUT, overrides: Mapping[str, Mapping] | None = None
          ) -> list[fx.GraphModule]:
    """`compile` at each of `tolerances` (in the order given), for the price of little more
    than one: the capture, calibration, candidates and their measurement are done once, the
    greedy plan sequence does not depend on the tolerance, and each plan of it is built and
    measured once and judged for every tolerance. Returns one compiled model per tolerance,
    each as `compile` would return it (its own report; the same plan as `compile` gives at
    that tolerance). The other arguments are `compile`'s."""
    try:
        tols = list(tolerances)
    except TypeError:
        raise FxCompressError(f"tolerances must be a list of numbers, not "
                              f"{type(tolerances).__name__}; e.g. tolerances=[0.005, 0.01, "
                              "0.02]") from None
    if not tols:
        raise FxCompressError("tolerances is empty; give e.g. tolerances=[0.005, 0.01, 0.02]")
    n_threads = compile_threads()
    with EXPORT_LOCK, threads(n_threads):
        results = _compile(model, example_inputs, profile, calibration, tols, evaluate,
                           techniques, objective, dynamic_shapes, recover, seed, progress,
                           time_budget, holdout, overrides)
    for r in results:
        _thread_note(r.meta[REPORT_KEY], n_threads)
    return results


def _thread_note(report: Report, n_threads: int) -> None:
    if "FXCOMPRESS_THREADS" in os.environ:
        report.notes.append(f"compiled with {n_threads} threads (FXCOMPRESS_THREADS)")
    elif n_threads < torch.get_num_threads():
        report.notes.append(f"compiled with {n_threads} of {torch.get_num_threads()} threads: "
                            "other processes kept the other cores busy (FXCOMPRESS_THREADS "
                            "pins the number, for results that repeat exactly)")
    else:
        report.notes.append(f"compiled with {n_threads} threads")


@dataclass
class Prepared:
    """What a compile computes before it depends on the tolerance: the capture, the
    calibration (fit batches, held-out batches), the per-layer settings, every layer's costed
    and measured candidates, and the `planner.Selection` (the greedy sequence and the plans
    built from it). `compile` and `sweep` run on one; `prepare` returns it, the one internal
    seam for tools and tests that inspect or drive the planner."""

    captured: Any  # capture.Captured
    graph_module: fx.GraphModule  # the captured graph (ATen), layers tagged
    layers: list  # graph.Layer, in graph order
    calib: Calibration
    options: list  # planner.LayerOptions per layer (and per multi-layer rewrite)
    profile: Profile
    objective: str
    seed: int
    overrides: dict  # the checked overrides
    settings: dict  # layer name -> overrides.LayerSettings
    selection: Selection
    base_score: Any = None  # acceptance.Score of the original, with evaluate=
    phases: dict = field(default_factory=dict)  # seconds per step (Report.phase_seconds)


def prepare(model, example_inputs=None, *, profile="mobile-arm", calibration: Iterable | None
            = None, techniques: Iterable[str] | None = None, objective: str | None = None,
            dynamic_shapes=None, seed: int = 0, holdout: float = DEFAULT_HOLDOUT,
            overrides: Mapping[str, Mapping] | None = None, time_budget: float | None = None,
            progress: Callable[[str], None] | None = None) -> Prepared:
    """The tolerance-independent front half of `compile` (its arguments, checked as it checks
    them): capture, calibrate, propose, cost and measure every candidate, and set up the
    selection. `planner.verify(prepared.selection, acceptance, log)` then selects a plan for a
    tolerance. For tools and tests that inspect the candidates or drive selection."""
    start = time.perf_counter()
    _check_callable("progress", progress, "progress=print")
    objective = _check_objective(objective)
    seed = _check_seed(seed)
    time_budget = _check_time_budget(time_budget)
    holdout = _check_holdout(holdout)
    techniques = _technique_names(techniques)
    with EXPORT_LOCK:
        return _prepare(model, example_inputs, profile, calibration, techniques, objective,
                        dynamic_shapes, seed, holdout, overrides, time_budget,
                        progress or (lambda s: None), start)


def _prepare(model, example_inputs, profile, calibration, techniques, objective,
             dynamic_shapes, seed, holdout, overrides, time_budget, log, start,
             evaluate=None, settle_above: float | None = None) -> Prepared:
    prof = load_profile(profile)
    techs, user_techs = _check_techniques(techniques, prof)
    overrides = check_overrides(overrides, techs)
    prof = calibrated(prof)
    obj = prof.objective if objective is None else objective
    torch.manual_seed(seed)
    phases: dict[str, float] = {}
    lap = _Lap(phases)

    cap = capture(model, example_inputs, dynamic_shapes)
    gm = cap.graph_module
    lap("capture")
    # the original's score first: a score that is not a finite number fails before the work
    base_score = base_score_of(evaluate, gm) if evaluate is not None else None
    batches = check_calibration(calibration, cap.example_inputs)
    layers = find_layers(gm)
    settings = resolve_all(overrides, layers)
    fit_batches, held = split_batches(batches, holdout)
    log(f"captured {len(layers)} layers; calibrating on {len(fit_batches)} batches, "
        f"{len(held)} held out to judge plans on")
    # unfolded patches of k x k convolutions where a technique compensates their rounding
    # through them (int8's 4-bit codes)
    patches = patch_geometries(layers) if prof.int8_packed_bits and "int8" in techs else None
    calib = Calibration(gm, fit_batches, {lay.node: lay.op for lay in layers}, holdout=held,
                        patches=patches)
    lap("calibration")
    example_batch = _batch_of(cap.example_inputs)
    calib_batch = _batch_of(batches[0])
    scale = example_batch / calib_batch if example_batch and calib_batch else 1.0
    options = build_options(gm, layers, calib, prof, obj, techs, seed,
                            calibrated=calibration is not None, user_techniques=user_techs,
                            scale_batch=scale, settings=settings,
                            global_settings=resolve_global(overrides))
    lap("propose")
    log(f"measuring {sum(len(o.candidates) for o in options)} candidates")
    deadline = None if time_budget is None else start + float(time_budget)
    measure(options, calib, Progress("measuring candidates").update, deadline, settle_above)
    lap("measure")
    # values re-fitted to the whole plan (SVD's sequential re-fit) only on real calibration
    # data: re-fitting on the example inputs alone would fit them

    def file_bytes(g: fx.GraphModule) -> int:
        return serialized_size(torch.export.export(g, clones(cap.example_inputs),
                                                   dynamic_shapes=cap.dynamic_shapes,
                                                   strict=False))

    selection = Selection(gm, options, calib, obj, prof, refit=calibration is not None,
                          seed=seed, file_bytes=file_bytes)
    charge_program_bytes(selection, log)
    lap("propose")
    return Prepared(cap, gm, layers, calib, options, prof, obj, seed, overrides, settings,
                    selection, base_score, phases)


class _Lap:
    """Adds the seconds since the last call to `phases[name]`."""

    def __init__(self, phases: dict[str, float], start: float | None = None):
        self.phases = phases
        self.last = time.perf_counter() if start is None else start

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now


def _compile(model, example_inputs, profile, calibration, tolerances, evaluate, techniques,
             objective, dynamic_shapes, recover, seed, progress, time_budget, holdout,
             overrides) -> list[fx.GraphModule]:
    """One compiled model per tolerance (see `sweep`): what does not depend on the tolerance
    is done once."""
    start = time.perf_counter()
    # every argument is checked before any work (the host benchmark of a measured profile,
    # the capture): a mistake costs nothing
    tols = [_check_tolerance(t, evaluate) for t in tolerances]
    _check_callable("evaluate", evaluate, "evaluate=lambda m: accuracy(m, x_val, y_val)")
    _check_callable("progress", progress, "progress=print")
    objective = _check_objective(objective)
    seed = _check_seed(seed)
    time_budget = _check_time_budget(time_budget)
    holdout = _check_holdout(holdout)
    techniques = _technique_names(techniques)  # a tuple: a generator is read once
    if recover is not None and not isinstance(recover, Recover):
        raise FxCompressError(f"recover must be None or fxcompress.Recover(...), not "
                              f"{type(recover).__name__}; e.g. recover=fxcompress.Recover("
                              "steps=200)")
    if recover is not None and 0 in tols and evaluate is None:
        raise FxCompressError("recover= fine-tunes the weights, which is never lossless, and "
                              "tolerance=0 keeps only exact rewrites; drop recover=, or give a "
                              "tolerance > 0 (e.g. 0.01)")
    log = progress or (lambda s: None)
    # rewrites far beyond the largest tolerance are measured on the first batches only (the
    # tolerance bounds relative error only without evaluate=)
    settle = SETTLE_FACTOR * max(tols) if evaluate is None and max(tols) > 0 else None
    prep = _prepare(model, example_inputs, profile, calibration, techniques, objective,
                    dynamic_shapes, seed, holdout, overrides, time_budget, log, start,
                    evaluate=evaluate, settle_above=settle)
    cap, gm, calib, options, prof, obj = (prep.captured, prep.graph_module, prep.calib,
                                          prep.options, prep.profile, prep.objective)
    overrides, settings, base_score = prep.overrides, prep.settings, prep.base_score
    example_batch = _batch_of(cap.example_inputs)
    score_fn = no_grad_eval(evaluate) if evaluate is not None else None
    # the original's file size, for every report: exported once
    t_export = time.perf_counter()
    bytes_before = prep.selection.file_bytes(gm)
    shared = time.perf_counter() - start
    prep.phases["export"] = time.perf_counter() - t_export
    handed_out: set[int] = set()
    results = []
    for tol in tols:
        t0 = time.perf_counter()
        accept = Acceptance(calib, tol, score_fn, base_score, seed,
                            exact_limit=rounding_floor(calib) if tol == 0 and evaluate is None
                            else None, in_sample=holdout == 0)
        phases = dict(prep.phases)
        lap = _Lap(phases, t0)
        plan = verify(prep.selection, accept, log)
        lap("select")
        if recover is not None:
            plan, _ = recover_plan(prep.selection, plan, accept, recover, log)
            lap("recover")
        result = plan.graph_module
        own_tensors(result, gm)  # plans share the captured graph's tensors until handed out
        if id(result) in handed_out:  # the same plan at two tolerances: two models
            result = copy.deepcopy(result)
            inference_graph(result)
        handed_out.add(id(result))
        report = _finish(result, plan, options, calib, accept, prof, obj, tol, seed, evaluate,
                         base_score, example_batch, cap, overrides, settings)
        lap("export")
        report.phase_seconds = {k: round(v, 3) for k, v in phases.items()}
        report.serialized_bytes_before = bytes_before
        if report.serialized_bytes_after > report.serialized_bytes_before:
            report.notes.append(
                f"the compiled program's file ({report.serialized_bytes_after:,} B) is larger "
                f"than the original's ({report.serialized_bytes_before:,} B): on layers this "
                "small the added ops (quantize / dequantize, their scales and zero points) "
                "cost more bytes than the rewrites save, which only the size objective "
                "weighs; if the file size matters, compile with objective='size', or keep "
                "int8 off those layers (overrides={'<layer>': {'skip': True}} or "
                "techniques=)")
        report.compile_seconds = shared + time.perf_counter() - t0
        result.meta[REPORT_KEY] = report
        results.append(result)
    return results


def _finish(result, plan, options, calib, accept, prof, obj, tol, seed, evaluate, base_score,
            example_batch, cap, overrides, settings) -> Report:
    """Budgets, the export check and the report of one selected plan."""
    budget_notes = enforce_budgets(prof, options, plan.choice, result)
    try:
        ep_after = torch.export.export(result, clones(cap.example_inputs),
                                       dynamic_shapes=cap.dynamic_shapes, strict=False)
    except Exception as e:
        raise InternalError(f"the compressed graph no longer exports ({type(e).__name__}: "
                            f"{str(e)[:300]}); please report this") from e
    from fxcompress.export import keep_program

    # fxcompress.export lowers from this program rather than exporting the result again
    keep_program(result, ep_after, example_inputs=cap.example_inputs,
                 dynamic_shapes=cap.dynamic_shapes)
    report = _report(options, plan, prof, obj, tol, seed, evaluate is not None,
                     None if base_score is None else base_score.value, example_batch or 1)
    report.accepted_on = accept.basis()
    if plan.verdict is not None:
        v = plan.verdict
        report.error_interval = [v.error.low, v.error.high] if v.error.units else None
        if v.drop is not None:
            report.drop = v.drop.value
            report.drop_interval = [v.drop.low, v.drop.high] if v.drop.units else None
    report.serialized_bytes_after = serialized_size(_as_written(result, ep_after, cap))
    report.dynamic_batch = cap.dynamic_batch
    if cap.note:
        report.notes.append(cap.note)
    report.notes.extend(override_notes(overrides, settings))
    report.notes.extend(budget_notes)
    absent = sorted(set(REGISTRY) - set(prof.techniques))
    if absent:  # why a technique never appears in this report
        report.notes.append(f"not run on {prof.name}: {', '.join(absent)} (not in its "
                            "profile's [planner] techniques)")
    report.notes.extend(plan.history)
    if prof.measure:
        report.notes.append(f"profile {prof.name} describes this host: "
                            f"{prof.sources.get('measured', '')}; {prof.sources.get('isa', '')}"
                            f"; int8 weights {prof.int8_weight_bits}-bit. The plan depends on "
                            "the host")
    for tech in REGISTRY.values():  # what each technique has to say about its rewrites
        if tech.notes is not None:
            report.notes.extend(tech.notes(plan.choice, calib))
    report.notes.extend(accept.notes(plan.verdict))
    report.notes.extend(slower_size_plan(report, prof))
    if any(s.fmt == "int8" for c in plan.choice.values() for s in c.steps):
        mismatch = target_vs_host(prof)
        if mismatch:
            report.notes.append(mismatch)
    return report


def slower_size_plan(report: Report, prof) -> list[str]:
    """Under the size objective, the report line saying that the plan is estimated slower than
    the original on the target (rewrites that save bytes but are decoded in the graph at every
    call: palettes in ExecuTorch's portable kernels ran a MiniLM 120x slower than fp32), and
    which techniques to drop for a small plan that is not slower; none when it is not."""
    if report.objective != "size" or report.latency_after_us <= report.latency_before_us:
        return []
    added: dict[str, float] = {}  # technique -> latency its layers add (or save)
    count: dict[str, int] = {}
    for la in report.layers:
        if la.applied == "none":
            continue
        kind = la.applied.split("(")[0].split("+")[0]
        added[kind] = added.get(kind, 0.0) + la.latency_after_us - la.latency_before_us
        count[kind] = count.get(kind, 0) + 1
    # structural rewrites (svd, tucker, prune) can cost time too, but decode nothing
    kinds = sorted(k for k, v in added.items() if v > 0 and k in ("share", "int8", "intx",
                                                                   "binary"))
    if not kinds:
        return []
    keep = [t for t in prof.techniques if t not in kinds]
    ratio = report.latency_after_us / max(report.latency_before_us, 1e-9)
    return [f"objective size: the plan is estimated {ratio:.2f}x the original's latency on "
            f"{prof.name}: its {', '.join(f'{k} layers ({count[k]})' for k in kinds)} save "
            "bytes but are decoded in the graph at every call (the estimate is a floor: a "
            "runtime's portable decode kernels can be far slower); for a small plan that is "
            f"not slower, compile with techniques={keep!r}"]


def override_notes(overrides: Mapping[str, dict], settings: Mapping) -> list[str]:
    """One report line per `overrides` key: the layers it selected and what it set."""
    notes = []
    for key, given in overrides.items():
        names = [n for n, s in settings.items() if key in s.keys]
        what = "; ".join(f"{k} {v if not isinstance(v, tuple) else ', '.join(v)}"
                         for k, v in given.items())
        notes.append(f"overrides[{key!r}] ({what}) applied to {', '.join(names)}")
    return notes


def _batch_of(inputs: tuple) -> int | None:
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return None


def _report(options, plan, prof, obj, tol, seed, with_eval, base_score, batch) -> Report:
    from fxcompress.planner import gain

    # "after" figures come from the graph that was built (see fxcompress.built_cost); a row
    # for a multi-layer rewrite (a pruned group) shows the decision, and its effect shows in
    # the rows of the layers it shrank
    built = built_costs(plan.graph_module, plan.choice, prof, batch)

    layers = []
    for o in options:
        chosen = plan.choice.get(o.layer.name)
        cands = []
        for c in o.candidates:
            if chosen is not None and chosen.same_rewrite(c):  # chosen may be re-fitted
                verdict = "chosen"
            elif chosen is not None and gain(c, o.base, obj) <= gain(chosen, o.base, obj):
                verdict = "smaller gain than the chosen rewrite"
            else:
                verdict = "too much error for the tolerance with the other choices"
            cands.append(CandidateReport(c.describe(), gain(c, o.base, obj), c.error, verdict))
        cands += [CandidateReport(r, 0.0, None, why) for r, why in o.rejected]
        if chosen is not None:
            unit = "µs" if obj == "latency" else "B"
            g = gain(chosen, o.base, obj) * (1e6 if obj == "latency" else 1)
            reason = f"best {obj} gain per error within tolerance (saves {g:.1f} {unit})"
        elif o.skip_reason:
            reason = o.skip_reason
        elif o.candidates:
            reason = "every candidate would exceed the tolerance together with the others"
        elif o.rejected:
            reason = "; ".join(why for _, why in o.rejected[:3])
        else:
            reason = "no technique applies"
        st_shape = list(o.base.steps[0].weight.shape)
        b = built.get(o.layer.name)
        if b is not None:
            after = (b.params, b.stored_bytes, b.macs, b.latency)
        else:
            after = (o.base.param_count, o.base.stored_bytes, o.base.macs, o.base.latency)
        layers.append(LayerReport(
            name=o.layer.name, op=o.layer.op, weight_shape=st_shape,
            input_shape=[], output_shape=[],
            applied=chosen.describe() if chosen else "none",
            params=dict(chosen.params) if chosen else {},
            params_before=o.base.param_count, params_after=after[0],
            # bytes: the candidates' accounting, which includes the serialized description of
            # decode ops (share measures it against the file); MACs and latency: as built
            bytes_before=o.base.stored_bytes,
            bytes_after=(chosen or o.base).stored_bytes,
            macs_before=o.base.macs, macs_after=after[2],
            latency_before_us=o.base.latency * 1e6, latency_after_us=after[3] * 1e6,
            error=chosen.error if chosen else None, reason=reason, candidates=cands))
    return Report(
        profile=prof.name, objective=obj, tolerance=tol,
        metric="evaluate() drop" if with_eval else "relative output error", seed=seed,
        layers=layers, serialized_bytes_before=0, serialized_bytes_after=0,
        macs_before=sum(lay.macs_before for lay in layers),
        macs_after=sum(lay.macs_after for lay in layers),
        latency_before_us=sum(lay.latency_before_us for lay in layers),
        latency_after_us=sum(lay.latency_after_us for lay in layers),
        error=plan.error, score_before=base_score, score_after=plan.score)
