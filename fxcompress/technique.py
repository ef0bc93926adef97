"""The technique interface: how a rewrite in `passes/` plugs into the planner.

Each technique is registered once (`register`) with an order and three functions:

- ``propose(layer, base, ctx) -> (candidates, reason)``: the rewrites of one layer this
  technique offers on the target, or why it offers none;
- ``stack(candidate, ctx) -> candidate | None`` (optional): this technique applied on top of
  another's chain (int8 on the factors of an SVD);
- ``apply(gm, config) -> PassResult``: the pass itself, a function of the graph and a frozen
  config built by ``make_config(chosen_candidates)``.

The order is the order the passes run in: pruning first, because it changes the shapes every
later rewrite sees; factorization next, so that quantization and sharing act on the factors;
weight sharing and quantization last, because they fix how the final weights are stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fxcompress.calibration import LayerStats
from fxcompress.candidates import Candidate, Shapes
from fxcompress.graph import Layer
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


@dataclass(frozen=True)
class Technique:
    """A registered rewrite."""

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


REGISTRY: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    """Add `technique` to the registry (one registration per name)."""
    if technique.name in REGISTRY and REGISTRY[technique.name] is not technique:
        raise RuntimeError(f"technique {technique.name!r} registered twice")
    REGISTRY[technique.name] = technique
    return technique
