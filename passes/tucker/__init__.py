"""Tucker-2: a k x k `conv2d` -> 1x1 conv (S -> R3) -> k x k core conv (R3 -> R4) -> 1x1 conv
(R4 -> T).

The weight W (T x S x kh x kw) is decomposed along its two channel modes with tensorly's
`partial_tucker` (HOOI from an SVD start): W ~= core x_0 U_out x_1 U_in, with U_out (T x R4)
and U_in (S x R3) orthonormal. The first 1x1 conv projects the input channels (U_in^T), the core
conv keeps the original stride, padding and dilation, the last 1x1 conv expands to the output
channels (U_out) and carries the original bias. A mode whose rank would be its full size is not
decomposed at all (its orthonormal factor is absorbed into the core), so a conv with a single
input channel becomes a two-conv chain instead of gaining a useless 1 x 1 rotation.

Grouped and depthwise convolutions are refused with a reason: a channel factor would mix
channels across groups, which the original layer never does. 1x1 convs are left to the SVD
pass, which factors them with fewer ops.

Rank selection: per mode, the singular values of the mode's unfolding give the weight error a
rank leaves on that mode; for each target of a ladder of relative weight errors the pair of
smallest ranks whose (HOSVD) error bound meets it is offered, rounded up to the profile's
channel alignment, and only where the chain stores fewer parameters than the conv. The planner
measures each candidate's error end to end on the calibration data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import tensorly
import torch
from tensorly.decomposition import partial_tucker
from torch import fx

from fxcompress.candidates import Candidate, Step
from fxcompress.graph import LAYER_META, add_buffer, drop_unused_attrs, get_attr, op_type
from fxcompress.passes_infra import PassResult
from fxcompress.rewrite import call
from fxcompress.technique import (
    ProposeContext,
    Technique,
    Trainable,
    checked_field,
    checked_numbers,
    register,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class TuckerSettings:
    """Tucker's settings; `compile(overrides={"*": {"tucker": {...}}})` changes them."""

    #: relative weight errors the rank ladder aims at (one candidate per target)
    weight_error_ladder: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6)
    #: HOOI sweeps after the SVD start; the fit changes little after a few on conv weights
    hooi_iterations: int = 10

    def __post_init__(self):
        checked_numbers(self, "weight_error_ladder", lambda e: 0 < e < 1,
                        "a non-empty list of errors in (0, 1)")
        checked_field(self.hooi_iterations, "hooi_iterations", int, lambda v: v >= 1,
                      "an integer >= 1")


@dataclass(frozen=True)
class TuckerFactors:
    """One conv's Tucker-2 chain. A missing factor is a mode left whole."""

    first: torch.Tensor | None  # R3 x S x 1 x 1: projects the input channels
    core: torch.Tensor  # R4' x R3' x kh x kw, run with the conv's stride / padding / dilation
    last: torch.Tensor | None  # T x R4 x 1 x 1: expands to the output channels

    @property
    def params(self) -> int:
        """Weight elements of the chain."""
        return sum(t.numel() for t in (self.first, self.core, self.last) if t is not None)

    def weight(self) -> torch.Tensor:
        """The dense conv weight the chain computes (for tests and checks)."""
        w = self.core
        if self.first is not None:
            w = torch.einsum("abhw,bs->ashw", w, self.first[:, :, 0, 0])
        if self.last is not None:
            w = torch.einsum("ta,ashw->tshw", self.last[:, :, 0, 0], w)
        return w


@dataclass(frozen=True)
class TuckerConfig:
    """Which conv layers to factor, and their chains."""

    factors: Mapping[str, TuckerFactors] = field(default_factory=dict)


def _partial_tucker(w: np.ndarray, ranks: list[int], modes: list[int], seed: int,
                    iterations: int = TuckerSettings.hooi_iterations,
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """tensorly's partial_tucker on the numpy backend, whatever the global backend is. From
    tensorly 0.8 on it returns ((core, factors), errors); before, (core, factors)."""
    with tensorly.backend_context("numpy"):
        out = partial_tucker(w, rank=ranks, modes=modes, n_iter_max=iterations,
                             init="svd", tol=1e-7, random_state=seed)
    if isinstance(out[0], np.ndarray):
        core, factors = out
    else:
        (core, factors), _ = out
    return core, list(factors)


def tucker2(weight: torch.Tensor, rank_out: int, rank_in: int, seed: int = 0,
            iterations: int = TuckerSettings.hooi_iterations) -> TuckerFactors:
    """Tucker-2 of a conv weight (T x S x kh x kw) with ranks (rank_out <= T, rank_in <= S).
    A rank equal to its mode's size leaves that mode whole."""
    t, s = weight.shape[:2]
    if not (1 <= rank_out <= t and 1 <= rank_in <= s):
        raise ValueError(f"tucker ranks ({rank_out}, {rank_in}) outside 1..{t}, 1..{s}")
    modes, ranks = [], []
    if rank_out < t:
        modes.append(0)
        ranks.append(rank_out)
    if rank_in < s:
        modes.append(1)
        ranks.append(rank_in)
    w = weight.detach().double()
    if not modes:
        return TuckerFactors(None, w.float().contiguous(), None)
    core, factors = _partial_tucker(w.numpy(), ranks, modes, seed, iterations)
    by_mode = dict(zip(modes, factors, strict=True))
    def conv1x1(m: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(m)).float()[:, :, None, None].contiguous()

    first = conv1x1(by_mode[1].T) if 1 in by_mode else None
    last = conv1x1(by_mode[0]) if 0 in by_mode else None
    return TuckerFactors(first, torch.from_numpy(np.ascontiguousarray(core)).float(), last)


def mode_errors(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Relative weight error left by truncating `mode`'s unfolding to rank 0..size (squared
    tail energy of its singular values)."""
    w = weight.detach().double()
    unfold = w.movedim(mode, 0).reshape(w.shape[mode], -1)
    s2 = torch.linalg.svdvals(unfold) ** 2
    head = torch.cat([torch.zeros(1, dtype=s2.dtype), s2.cumsum(0)])
    return ((s2.sum() - head).clamp_min(0) / s2.sum().clamp_min(1e-300)).sqrt()


def chain_params(t: int, s: int, k: int, r_out: int, r_in: int) -> int:
    """Weight elements of the Tucker-2 chain (a whole mode has no 1x1 factor)."""
    core = r_out * r_in * k
    return core + (s * r_in if r_in < s else 0) + (t * r_out if r_out < t else 0)


def rank_pairs(weight: torch.Tensor, align: Callable[[int], int],
               ladder: tuple[float, ...] = TuckerSettings.weight_error_ladder,
               ) -> list[tuple[int, int]]:
    """(rank_out, rank_in) pairs of the weight-error ladder: each mode takes the smallest rank
    whose error is at most target / sqrt(2), so the HOSVD bound sqrt(e_out^2 + e_in^2) meets
    the target; ranks are rounded up to the alignment and capped at the mode's size."""
    t, s = weight.shape[:2]
    k = math.prod(weight.shape[2:])
    err_out, err_in = mode_errors(weight, 0), mode_errors(weight, 1)
    pairs = set()
    for target in ladder:
        per_mode = target / math.sqrt(2)
        r_out = int((err_out[1:] <= per_mode).nonzero()[0]) + 1
        r_in = int((err_in[1:] <= per_mode).nonzero()[0]) + 1
        r_out, r_in = min(align(r_out), t), min(align(r_in), s)
        if (r_out, r_in) != (t, s) and chain_params(t, s, k, r_out, r_in) < t * s * k:
            pairs.add((r_out, r_in))
    return sorted(pairs, key=lambda p: (p[0] * p[1], p))


def propose(layer, base: Candidate, ctx: ProposeContext):
    """Tucker-2 chains of a k x k conv at the ranks of its weight-error ladder."""
    if layer.op != "conv2d":
        return [], "tucker applies to conv2d layers only"
    if layer.groups != 1:
        kind = "depthwise" if layer.groups == layer.weight_shape[0] and \
            layer.weight_shape[1] == 1 else "grouped"
        return [], (f"tucker: {kind} conv (groups={layer.groups}) is left alone: a channel "
                    "factor would mix channels across groups")
    if tuple(layer.weight_shape[2:]) == (1, 1):
        return [], "tucker: a 1x1 conv is a matrix; the svd technique factors it"
    knobs: TuckerSettings = ctx.knobs("tucker")
    pairs = rank_pairs(ctx.weight, ctx.profile.align, knobs.weight_error_ladder)
    if not pairs:
        t, s = layer.weight_shape[:2]
        return [], (f"tucker: no rank pair (aligned to {ctx.profile.alignment}) stores fewer "
                    f"parameters than the {t}x{s} conv")
    cands = []
    for r_out, r_in in pairs:
        f = tucker2(ctx.weight, r_out, r_in, ctx.seed, knobs.hooi_iterations)
        steps = []
        if f.first is not None:
            steps.append(Step("conv2d", f.first))
        steps.append(Step("conv2d", f.core, ctx.bias if f.last is None else None, layer.stride,
                          layer.padding, layer.dilation))
        if f.last is not None:
            steps.append(Step("conv2d", f.last, ctx.bias))
        cands.append(Candidate("tucker", layer, {"ranks": (r_out, r_in)}, tuple(steps),
                               parts={"tucker": f}))
    return cands, None


def make_config(chosen: list[Candidate]) -> TuckerConfig:
    """The pass config for the chosen Tucker candidates."""
    return TuckerConfig({c.layer.name: c.part("tucker") for c in chosen})


def tucker_pass(gm: fx.GraphModule, config: TuckerConfig) -> PassResult:
    """Replace each configured conv by its Tucker-2 chain."""
    modified = False
    for node in list(gm.graph.nodes):
        layer = node.meta.get(LAYER_META)
        if layer not in config.factors or op_type(node) != "conv2d":
            continue
        f = config.factors[layer]
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = get_attr(gm, w.target)
        if tuple(f.weight().shape) != tuple(weight.shape):
            raise ValueError(f"tucker factors of {layer} do not match its weight")
        rest = list(node.args[3:])  # stride, padding, dilation, groups (1): the core's
        g = gm.graph
        h = x
        first = add_buffer(gm, f"{layer}.tucker_first", f.first, node) \
            if f.first is not None else None
        core = add_buffer(gm, f"{layer}.tucker_core", f.core, node)
        last = add_buffer(gm, f"{layer}.tucker_last", f.last, node) \
            if f.last is not None else None
        with g.inserting_before(node):
            if first is not None:
                h = call(g, aten.conv2d.default, (h, first), layer=layer)
            # the node's own overload: `conv2d.padding` takes a padding string
            h = call(g, node.target, (h, core, bias if last is None else None, *rest),
                     layer=layer)
            if last is not None:
                h = call(g, aten.conv2d.default, (h, last, bias), layer=layer)
        node.replace_all_uses_with(h)
        g.erase_node(node)
        modified = True
    if modified:
        drop_unused_attrs(gm)
    return PassResult(gm, modified)


def _train_init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor]:
    return [s.dense().detach().clone() for s in c.steps]  # first / core / last, as present


def _train_write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule) -> Candidate:
    f = c.part("tucker")
    it = iter(t.contiguous() for t in latents)
    first = next(it) if f.first is not None else None
    core = next(it)
    last = next(it) if f.last is not None else None
    return c.with_part("tucker", replace(f, first=first, core=core, last=last))


TECHNIQUE = register(Technique("tucker", order=25, propose=propose, make_config=make_config,
                               apply=tucker_pass, trainable=Trainable(_train_init, _train_write),
                               settings=TuckerSettings()))
