"""The technique interface: how a rewrite in `passes/<technique>/` plugs into the compiler.

A technique is one folder of `passes/` that registers one `Technique` at import. The core
(planner, recovery, report) never names a technique: it asks the registered object.

What a technique provides:

- ``propose(layer, base, ctx) -> (candidates, reason)``: the rewrites of one layer it offers on
  the target, or why it offers none;
- ``stack(candidate, ctx) -> candidate | None`` (optional): itself applied on top of another
  technique's chain (int8 on the factors of an SVD);
- ``make_config(chosen) -> config`` and ``apply(gm, config) -> PassResult``: the pass, a pure
  function of the graph and a frozen config;
- ``propose_groups`` (optional): planner entries spanning several layers (pruned groups);
- ``refine`` (optional): the chosen values re-fitted to the whole plan (SVD's sequential
  re-fit), same structure and costs;
- ``trainable`` (optional, `Trainable`): how its candidates train in recovery;
- ``regroup`` (optional, `Regroup`): for a technique that changes other layers' shapes
  (pruning), how recovery lays out and writes back the layers it touches;
- ``notes`` (optional): report lines about the chosen candidates (fits on thin data);
- ``settings``: its frozen, validated settings (defaults), which `compile(overrides=...)` can
  change per layer (`{"*": {"svd": {"sequential_refit": False}}}`).

Capability flags the core asks instead of checking names:

- ``formats``: the stored formats it introduces (`Step.fmt`), each with a differentiable
  fake-quantizer (straight-through) of a candidate's weight, shared by simulation and recovery;
- ``final``: it fixes how a weight is stored, so nothing stacks on top of it (int8, binary);
- ``rereads_weight``: its pass reads the layer's weight from the graph when it applies, so it
  stacks on a layer another rewrite reshaped (int8, share);
- ``fmt``: the format a profile can *require* of a layer (`Profile.requires`): on such a
  target every layer that can run it must get a candidate of this technique.

The order is the order the passes run in: pruning first, because it changes the shapes every
later rewrite sees; factorization next, so that quantization and sharing act on the factors;
weight sharing and quantization last, because they fix how the final weights are stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxcompress.calibration import LayerStats
from fxcompress.candidates import Candidate, Shapes
from fxcompress.errors import FxCompressError
from fxcompress.graph import LAYER_META, Layer, get_attr, op_type
from fxcompress.hardware_profiles import Profile


@dataclass
class ProposeContext:
    """What a technique may consult when it proposes rewrites for one layer."""

    profile: Profile
    objective: str  # "latency" | "size"
    stats: LayerStats  # the layer's calibration input statistics
    shapes: Shapes  # the layer's input / output shapes for latency estimates
    weight: torch.Tensor
    bias: torch.Tensor | None
    seed: int
    calibrated: bool  # whether the user passed calibration data (activation-aware methods)
    user_techniques: bool  # the user named the techniques (do not skip for cost reasons)
    layer_index: int = 0  # position of the layer among the graph's layers (first = 0)
    layer_count: int = 1  # how many layers the graph has (binary keeps first and last wider)
    # the Calibration (graph, batches, reference outputs), for techniques that measure how a
    # layer's output error reaches the model's outputs (share: an embedding's output Hessian)
    calib: Any = None
    # the layer's resolved `compile(overrides=...)` settings (fxcompress.overrides.LayerSettings)
    settings: Any = None

    def knobs(self, technique: str) -> Any:
        """The settings of `technique` for this layer: its defaults, changed by the layer's
        overrides."""
        return settings_of(technique, self.settings)


@dataclass(frozen=True)
class Trainable:
    """How a technique's candidates train in recovery (`fxcompress.recover`).

    `init(candidate, base_weight)` gives the latent tensor of every step, or None to defer to
    the technique below it in a stack; `write(candidate, latents, graph)` returns the candidate
    rebuilt from the trained latents, writing into the student's copy of the base graph where
    the pass reads its weight from there; `weight(candidate, step, latent)`, where given, is
    the step's effective weight from a latent of another shape (a palette), else the step
    format's fake-quantizer applies.

    Optional: `input_levels(c)`, `learned_levels(mu, beta)` and `with_input_levels(c, mu,
    beta)`: a two-level input quantizer of the first step whose levels train (binary
    activations): their initial values, the differentiable quantizer, and the candidate with
    the trained levels; `output_quant(c)`: per step, a fixed output fake-quantizer or None
    (static int8 activations), or None for a candidate without any;
    `on_kept(c, kept, full)` / `off_kept(c, kept, graph)`: the candidate on a layer another
    rewrite slices to the entries `kept`, widened to the full weight for training and back."""

    init: Callable[[Candidate, torch.Tensor], list[torch.Tensor] | None]
    write: Callable[[Candidate, list[torch.Tensor], fx.GraphModule], Candidate]
    weight: Callable[[Candidate, int, torch.Tensor], torch.Tensor] | None = None
    input_levels: Callable[[Candidate], tuple[float, float] | None] | None = None
    learned_levels: Callable[[torch.Tensor, torch.Tensor], Callable] | None = None
    with_input_levels: Callable[[Candidate, float, float], Candidate] | None = None
    output_quant: Callable[[Candidate], tuple | None] | None = None
    on_kept: Callable[[Candidate, torch.Tensor, torch.Tensor], Candidate] | None = None
    off_kept: Callable[[Candidate, torch.Tensor, fx.GraphModule], Candidate] | None = None


@dataclass(frozen=True)
class Regroup:
    """For a technique whose candidates change other layers' shapes (a pruned group): how
    recovery trains those layers. `layout(gm, chosen)` gives (consumer layer name -> (kept
    input columns, initial weight), weight target -> mask of the entries kept);
    `trained(candidate, consumers_trained)` is the candidate once those consumers were trained
    (so the pass stores them as trained instead of re-fitting them)."""

    layout: Callable[[fx.GraphModule, list[Candidate]],
                     tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]]
    trained: Callable[[Candidate, set[str]], Candidate]


@dataclass(frozen=True)
class Technique:
    """A registered rewrite (see the module docstring)."""

    name: str
    order: int
    propose: Callable[[Layer, Candidate, ProposeContext], tuple[list[Candidate], str | None]]
    make_config: Callable[[list[Candidate]], Any]
    apply: Callable  # (GraphModule, config) -> PassResult
    stack: Callable[[Candidate, ProposeContext], Candidate | None] | None = None
    # optional: rewrites that span several layers (pruning a dependency group), proposed once
    # per graph as extra planner entries: (GroupContext) -> list of planner.LayerOptions
    propose_groups: Callable[[GroupContext], list] | None = None
    # optional: the chosen candidates of this technique with their values re-fitted on the
    # calibration data once the whole plan is known (same structure and costs):
    # (gm, chosen, other candidates of the plan, calibration batches, seed) -> candidates
    refine: Callable[..., list[Candidate]] | None = None
    trainable: Trainable | None = None
    regroup: Regroup | None = None
    # optional: report lines about the plan's candidates: (choice, Calibration) -> lines
    notes: Callable[[Mapping[str, Candidate], Any], list[str]] | None = None
    # stored format -> (candidate -> differentiable fake-quantizer of a weight)
    formats: Mapping[str, Callable[[Candidate], Callable[[torch.Tensor], torch.Tensor]]] = \
        field(default_factory=dict)
    final: bool = False  # nothing stacks on its candidates
    rereads_weight: bool = False  # its pass reads the (possibly reshaped) weight from the graph
    fmt: str | None = None  # the format a profile may require of every layer that can run it
    # its candidates' stored bytes already count what they add to a serialized program (the
    # decode's ops and tensors): the planner's generic estimate is not added to them
    counts_program_bytes: bool = False
    settings: Any = None  # its frozen settings dataclass, with the defaults


@dataclass
class GroupContext:
    """What a technique may consult when it proposes rewrites spanning several layers."""

    gm: Any  # the captured GraphModule (layers tagged with LAYER_META)
    calib: Any  # fxcompress.calibration.Calibration
    options: list  # the per-layer planner.LayerOptions (base costs, shapes)
    profile: Profile
    objective: str
    seed: int
    calibrated: bool
    global_settings: Any = None  # the settings of `overrides["*"]` (LayerSettings)

    def knobs(self, technique: str) -> Any:
        """The global settings of `technique` (its defaults, changed by `overrides["*"]`)."""
        return settings_of(technique, self.global_settings)


@dataclass(frozen=True)
class PartsConfig:
    """A pass config that is each chosen layer's part of one technique, by layer name (for a
    pass that needs nothing else: `parts_config`)."""

    parts: dict[str, Any] = field(default_factory=dict)


def parts_config(technique: str) -> Callable[[list[Candidate]], PartsConfig]:
    """The `make_config` of a technique whose pass needs only its chosen layers' parts."""

    def make_config(chosen: list[Candidate]) -> PartsConfig:
        return PartsConfig({c.layer.name: c.part(technique) for c in chosen
                            if c.part(technique) is not None})

    return make_config


def configured_layers(gm: fx.GraphModule, config: PartsConfig, ops: tuple[str, ...]
                      ) -> list[tuple[fx.Node, str, Any]]:
    """(node, layer, part) of each op of type in `ops` whose layer `config` holds a part for,
    in graph order (a snapshot: the pass may rewrite the graph as it goes)."""
    found = []
    for node in list(gm.graph.nodes):
        layer = node.meta.get(LAYER_META)
        part = config.parts.get(layer)
        if part is not None and op_type(node) in ops:
            found.append((node, layer, part))
    return found


def weight_as_planned(gm: fx.GraphModule, node: fx.Node, layer: str, shape: tuple,
                      technique: str) -> bool:
    """Whether `node`'s weight (its second argument) is still a stored tensor, of the `shape`
    the technique planned for (ValueError where it is another); False where an earlier
    rewrite already computes it."""
    w_node = node.args[1]
    if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
        return False
    have = tuple(get_attr(gm, w_node.target).shape)
    if have != tuple(shape):
        raise ValueError(f"{technique}: {layer}'s weight is {have} in the graph but "
                         f"{tuple(shape)} in the config")
    return True


REGISTRY: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    """Add `technique` to the registry (one registration per name)."""
    if technique.name in REGISTRY and REGISTRY[technique.name] is not technique:
        raise RuntimeError(f"technique {technique.name!r} registered twice")
    REGISTRY[technique.name] = technique
    return technique


def techniques_of(c: Candidate) -> list[Technique]:
    """The registered techniques of `c`'s stack ("svd+int8"), innermost first."""
    return [REGISTRY[t] for t in c.techniques if t in REGISTRY]


def is_final(c: Candidate) -> bool:
    """Whether a technique of `c`'s stack fixes its stored form (nothing stacks on it)."""
    return any(t.final for t in techniques_of(c))


def compatible(a: Candidate, b: Candidate) -> bool:
    """Whether two rewrites can be built together. A rewrite that changes the shapes of other
    layers (`touches`: a pruned dependency group) cannot be combined with a rewrite of one of
    those layers whose weights were computed for the old shapes (SVD factors); techniques that
    read the weight from the graph when they apply (`rereads_weight`) stack on reshaped
    layers, unless a part of the candidate keeps codes made for the old shape (a part whose
    `keeps_codes` is true: int8's 4-bit codes), and pruned groups combine with each other in
    one pass."""
    for x, y in ((a, b), (b, a)):
        if x.touches and not y.touches and y.layer.name in x.touches \
                and not (all(t.rereads_weight for t in techniques_of(y))
                         and not any(getattr(p, "keeps_codes", False)
                                     for p in y.parts.values())):
            return False
    return True


def fake_quantizer(c: Candidate, fmt: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The differentiable fake-quantizer of stored format `fmt` for candidate `c`, from the
    technique that introduces the format; None when no technique does."""
    for t in REGISTRY.values():
        make = t.formats.get(fmt)
        if make is not None:
            return make(c)
    return None


# --------------------------------------------------------------------------------------------
# Settings: a technique's frozen dataclass of knobs, changed per layer by compile(overrides=)
# --------------------------------------------------------------------------------------------


def check_settings(technique: str, given: Any, where: str) -> dict:
    """`given` (a dict of a technique's settings) checked against the technique's settings
    dataclass: the user error for an unknown technique, field or a value its dataclass
    refuses."""
    tech = REGISTRY.get(technique)
    if tech is None or tech.settings is None:
        raise FxCompressError(f"{where}: technique {technique!r} has no settings")
    if not isinstance(given, Mapping):
        raise FxCompressError(f"{where} must be a dict of {technique} settings, not "
                              f"{type(given).__name__}; e.g. {_example(tech)}")
    names = [f.name for f in dataclasses.fields(tech.settings)]
    unknown = [k for k in given if k not in names]
    if unknown:
        raise FxCompressError(f"{where} has unknown {technique} setting(s) "
                              f"{', '.join(map(repr, unknown))}; use {', '.join(names)}")
    try:
        dataclasses.replace(tech.settings, **given)
    except (TypeError, ValueError) as e:
        raise FxCompressError(f"{where}: {e}") from None
    return dict(given)


def _example(tech: Technique) -> str:
    f = dataclasses.fields(tech.settings)[0]
    return f"{{{f.name!r}: {getattr(tech.settings, f.name)!r}}}"


def settings_of(technique: str, layer_settings: Any) -> Any:
    """The settings dataclass of `technique` for a layer whose resolved overrides are
    `layer_settings` (None: the defaults)."""
    tech = REGISTRY[technique]
    given = getattr(layer_settings, "knobs", None) or {}
    changes = given.get(technique)
    return tech.settings if not changes else dataclasses.replace(tech.settings, **changes)


def checked_numbers(settings: Any, name: str, ok: Callable[[float], bool], what: str) -> None:
    """Field `name` of a frozen settings dataclass as a tuple (a list is accepted) of numbers
    that pass `ok`, at least one; ValueError naming `what` otherwise."""
    value = getattr(settings, name)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(settings, name, value)
    checked_field(value, name, tuple,
                  lambda v: len(v) > 0 and all(isinstance(x, int | float)
                                               and not isinstance(x, bool) and ok(x) for x in v),
                  what)


def checked_field(value: Any, name: str, kind: type | tuple, test: Callable[[Any], bool],
                  what: str) -> None:
    """Raise ValueError unless `value` is of `kind` (never bool) and passes `test`; for the
    `__post_init__` of settings dataclasses."""
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) \
            or not test(value):
        raise ValueError(f"{name} must be {what}, not {value!r}")


# --------------------------------------------------------------------------------------------
# Training helpers for techniques' `Trainable` and `formats`
# --------------------------------------------------------------------------------------------


def straight_through(fn: Callable[[torch.Tensor], torch.Tensor]
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` in the forward, identity in the backward (the straight-through estimator)."""

    def ste(x: torch.Tensor) -> torch.Tensor:
        return x + (fn(x) - x).detach()

    return ste


def _base_weight_init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor] | None:
    # a one-step chain whose pass re-encodes the base graph's weight: train that weight itself
    # (a binary step's weight is alpha * sign: its magnitudes are in the original weight only)
    return [base_w.clone()] if len(c.steps) == 1 else None


def _base_weight_write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule
                       ) -> Candidate:
    if len(c.steps) == 1:
        with torch.no_grad():
            get_attr(gm, c.layer.weight_target).copy_(latents[0])
    return c  # stacked: the pass encodes the (already written) factors of the chain


#: The trainable form of a technique whose pass encodes the layer's weight as the graph holds
#: it (int8, binary): alone on a layer it trains that weight, through its format's
#: fake-quantizer; stacked on another technique's chain it defers to that technique's latents.
TRAIN_BASE_WEIGHT = Trainable(_base_weight_init, _base_weight_write)
