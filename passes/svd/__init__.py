"""SVD: `linear(x, W)` -> `linear(linear(x, V), U)`, and the same for 1x1 convs.

W (m x n) is approximated by U (m x r) @ V (r x n). Plain SVD minimizes ||W - UV||; the
activation-aware variant minimizes the layer's *output* error on the calibration inputs,
||(W - UV) X||, which is ||(W - UV) S|| for any S with S S^T = C, the inputs' second moment.
It is the default whenever calibration data exists. C is shrunk towards a multiple of the
identity by the Ledoit-Wolf intensity (`shrinkage`, `shrunk`): a covariance from fewer rows
than inputs is singular, and a fit to it would reproduce the rows seen exactly and not other
inputs. A layer is never factored where
r(m + n) >= mn: the factors would be no smaller than the weight.

How the factors are computed, by shape:

- m <= n: the best rank-r approximation under C is P_r W, where P_r projects onto the top r
  eigenvectors of W C W^T (m x m). No whitening is needed, so a covariance that is not positive
  definite costs nothing.
- m > n: the SVD of W S (through the eigen-decomposition of the n x n matrix S^T W^T W S), with
  S from `whitening`: a damped Cholesky factor, or an eigen-decomposition with clamped
  eigenvalues when the covariance is not positive definite. V is un-whitened by S^-1.
- min(m, n) >= `SVDSettings.randomized_min_dim`: a randomized range finder (seeded
  `torch.Generator`, a few power iterations) on the operator W C W^T, applied without
  forming it, finds only the top ranks the ladder can use, so compile time stays low on large
  layers.

Rank selection: every route yields the layer's relative output error at every rank r,
sqrt(tr(dW C dW^T) / tr(W C W^T)), exactly and at once (C = I without calibration: the weight's
energy). The candidates are the smallest ranks that meet a ladder of local errors, rounded up to
the profile's channel alignment; the planner then measures each one end to end.

Sequential re-fit (`refit_factors`, the technique's `refine` hook): once the planner has chosen
which layers to factor and at which rank, the factors are re-computed in graph order from the
inputs the *already-rewritten* model feeds each layer (X~), against what the original layer
computes on the original inputs (X): the reduced-rank regression min_{rank r} ||W X - W' X~||,
solved as B = W (D + l I)(C + l I)^-1 with C = X~ X~^T, D = X X~^T, followed by the
activation-aware rank-r truncation of B under C (what GPTQ's sequential mode and SVD-LLM's
parameter update do). It corrects the error of the layers upstream instead of compounding it.
The damping l pulls B towards W (with X~ = X, B = W exactly), so a layer whose inputs are
unchanged keeps its one-shot factors. Ranks and graph structure do not change, only values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from fxcompress.candidates import Candidate, Step
from fxcompress.graph import LAYER_META, add_buffer, drop_unused_attrs, get_attr, op_type
from fxcompress.passes.svd.decompose import (  # noqa: F401  (the maths' public names)
    RANDOMIZED_MIN_DIM,
    Decomposition,
    decompose,
    max_useful_rank,
    shrinkage,
    shrunk,
    whitening,
)
from fxcompress.passes.svd.refit import REFIT_DAMP, refit_factors  # noqa: F401
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
class SVDSettings:
    """SVD's settings; `compile(overrides={"*": {"svd": {...}}})` changes them (per layer
    where a layer pattern is the key)."""

    #: relative layer-output errors the rank ladder aims at: one candidate per target (after
    #: rounding and de-duplication), from nearly lossless to the lossy end where only an
    #: evaluate()-driven search would still accept a layer
    local_error_ladder: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35)
    #: from this size of min(m, n) on, the randomized route (see the module docstring)
    randomized_min_dim: int = RANDOMIZED_MIN_DIM
    #: with the randomized route, only ranks up to this share of min(m, n) are computed and
    #: offered: past it a factorization saves too little to pay for its second op
    randomized_max_share: float = 0.25
    #: re-fit the chosen factors sequentially (see the module docstring) when the user passed
    #: calibration data; False keeps the one-shot factors (for comparisons)
    sequential_refit: bool = True
    #: damping of the sequential re-fit's regression, relative to the mean input energy per
    #: feature: pulls the re-fit weight towards the original one where calibration rows are few
    refit_damp: float = REFIT_DAMP

    def __post_init__(self):
        checked_numbers(self, "local_error_ladder", lambda e: e > 0,
                        "a non-empty list of errors > 0")
        checked_field(self.randomized_min_dim, "randomized_min_dim", int, lambda v: v >= 1,
                      "an integer >= 1")
        checked_field(self.randomized_max_share, "randomized_max_share", (int, float),
                      lambda v: 0 < v <= 1, "a share in (0, 1]")
        checked_field(self.sequential_refit, "sequential_refit", bool, lambda v: True,
                      "True or False")
        checked_field(self.refit_damp, "refit_damp", (int, float), lambda v: v >= 0,
                      "a number >= 0")


@dataclass(frozen=True)
class SVDPart:
    """What the SVD pass needs to build a candidate: its factors, and the re-fit's bias."""

    v: torch.Tensor  # r x n, the first factor
    u: torch.Tensor  # m x r, the second factor
    local_error: float  # the layer's relative output error at this rank, by the fit's measure
    settings: SVDSettings = SVDSettings()
    bias: torch.Tensor | None = None  # a bias replacing the layer's own (the re-fit's)
    # the factors were re-fitted to the whole plan, or trained by recovery: they are final,
    # and `refine` leaves them as they are
    refit: bool = False


@dataclass(frozen=True)
class SVDConfig:
    """Which layers to factor, and their factors."""

    # layer name -> (V: r x n first factor, U: m x r second factor), as float32 tensors
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # layer name -> a bias replacing the layer's own (the sequential re-fit's), float32
    biases: Mapping[str, torch.Tensor] = field(default_factory=dict)


def _as_matrix(layer, weight: torch.Tensor) -> torch.Tensor | None:
    if layer.op == "linear":
        return weight
    if layer.op == "conv2d" and weight.shape[2:] == (1, 1) and layer.groups == 1:
        return weight[:, :, 0, 0]
    return None


def rank_ladder(dec: Decomposition, rmax: int, align: Callable[[int], int],
                ladder: tuple[float, ...] = SVDSettings.local_error_ladder) -> list[int]:
    """Ranks to offer: the smallest meeting each local error of the `ladder`
    (`SVDSettings.local_error_ladder`), rounded up to the alignment, kept where
    r(m + n) < mn and the factors hold the rank."""
    ranks = set()
    for target in ladder:
        r = dec.rank_for_error(target)
        if r is None:
            continue
        r = align(r)
        if r <= min(rmax, dec.max_rank):
            ranks.add(r)
    return sorted(ranks)


def _steps(layer, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
           ) -> tuple[Step, Step]:
    if layer.op == "linear":
        return Step("linear", v), Step("linear", u, bias)
    return (Step("conv2d", v[:, :, None, None], None, layer.stride, layer.padding,
                 layer.dilation),
            Step("conv2d", u[:, :, None, None], bias))


def propose(layer, base: Candidate, ctx: ProposeContext):
    """Factorizations of `layer` at the ranks of its local-error ladder."""
    w = _as_matrix(layer, ctx.weight)
    if w is None:
        return [], "svd applies to linear and ungrouped 1x1 conv layers only"
    m, n = w.shape
    rmax = max_useful_rank(m, n)
    if rmax < 1:
        return [], f"svd: {m}x{n} is too small to factor (r(m+n) >= mn for every r)"
    cov = None
    if ctx.calibrated and ctx.stats.covariance is not None:
        cov = ctx.stats.covariance
        cov = shrunk(cov, shrinkage(cov, ctx.stats.rows, ctx.stats.fourth))
    knobs: SVDSettings = ctx.knobs("svd")
    full = min(m, n)
    cap = rmax
    randomized = full >= knobs.randomized_min_dim
    if randomized:
        cap = min(rmax, max(ctx.profile.alignment, int(full * knobs.randomized_max_share)))
    fixed = getattr(ctx.settings, "rank", None)
    if fixed is not None:  # compile(overrides=...) fixed the rank
        if fixed > rmax:
            return [], (f"svd: rank {fixed} (overrides) saves nothing on a {m}x{n} weight "
                        f"(at most rank {rmax} does)")
        cap = fixed
    dec = decompose(w, cov, aware=True, max_rank=cap, seed=ctx.seed,
                    randomized=randomized and cap < full // 2)
    ranks = [fixed] if fixed is not None else rank_ladder(dec, rmax, ctx.profile.align,
                                                          knobs.local_error_ladder)
    if not ranks:
        lowest = dec.error_at(min(cap, dec.max_rank))
        return [], (f"svd: no rank below {cap} (aligned to {ctx.profile.alignment}) meets even "
                    f"the loosest local error {max(knobs.local_error_ladder):g} "
                    f"(best {lowest:.3g})")
    cands = []
    for r in ranks:
        v, u = dec.factors(r)
        steps = _steps(layer, v, u, ctx.bias)
        cands.append(Candidate("svd", layer, {"rank": r, "aware": dec.aware}, steps,
                               parts={"svd": SVDPart(v, u, dec.error_at(r), knobs)}))
    return cands, None


def make_config(chosen: list[Candidate]) -> SVDConfig:
    """The pass config for the chosen SVD candidates."""
    # a re-fitted bias is the last step's (recovery may have trained it since)
    return SVDConfig({c.layer.name: (c.part("svd").v, c.part("svd").u) for c in chosen},
                     {c.layer.name: c.steps[-1].bias for c in chosen
                      if c.part("svd").bias is not None})


def svd_pass(gm: fx.GraphModule, config: SVDConfig) -> PassResult:
    """Replace each configured layer's linear / 1x1 conv by its two factors."""
    modified = False
    for node in list(gm.graph.nodes):
        layer = node.meta.get(LAYER_META)
        if layer not in config.factors or op_type(node) not in ("linear", "conv2d"):
            continue
        v, u = config.factors[layer]
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if tuple(get_attr(gm, w.target).shape[:2]) != (u.shape[0], v.shape[1]):
            raise ValueError(f"factors of {layer} do not match its weight")
        g = gm.graph
        if layer in config.biases:
            if bias is None:
                raise ValueError(f"{layer} has no bias to replace")
            bias = add_buffer(gm, f"{layer}.svd_bias", config.biases[layer], node)
        if op_type(node) == "linear":
            vn = add_buffer(gm, f"{layer}.svd_v", v, node)
            un = add_buffer(gm, f"{layer}.svd_u", u, node)
            with g.inserting_before(node):
                first = call(g, aten.linear.default, (x, vn), layer=layer)
                second = call(g, aten.linear.default, (first, un, bias), layer=layer)
        else:
            # stride / padding / dilation go on the first factor (a padded 1x1 conv gives
            # zeros there, which the bias-free first factor keeps zero); groups is 1. The
            # node's own overload is kept, since `conv2d.padding` takes a padding string.
            rest = list(node.args[3:])
            vn = add_buffer(gm, f"{layer}.svd_v", v[:, :, None, None], node)
            un = add_buffer(gm, f"{layer}.svd_u", u[:, :, None, None], node)
            with g.inserting_before(node):
                first = call(g, node.target, (x, vn, None, *rest), layer=layer)
                second = call(g, aten.conv2d.default, (first, un, bias), layer=layer)
        node.replace_all_uses_with(second)
        g.erase_node(node)
        modified = True
    if modified:
        drop_unused_attrs(gm)
    return PassResult(gm, modified)


def refit_config(refitted: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                 ) -> SVDConfig:
    """The pass config for the output of `refit_factors`."""
    return SVDConfig({k: (v, u) for k, (v, u, _) in refitted.items()},
                     {k: b for k, (_, _, b) in refitted.items() if b is not None})


def refine(gm: fx.GraphModule, chosen: list[Candidate], others: list[Candidate],
           batches: list[tuple], seed: int = 0) -> list[Candidate]:
    """The chosen SVD candidates with sequentially re-fitted factors (`refit_factors`), the
    rest of the plan (`others`) simulated upstream; same ranks, so the same costs. Stacked
    candidates (svd+int8) keep their one-shot factors: their steps hold quantized weights;
    so do layers whose settings turn the re-fit off (`SVDSettings.sequential_refit`), and
    candidates already re-fitted."""
    plain = [c for c in chosen if c.techniques == ["svd"] and c.part("svd").settings
             .sequential_refit and not c.part("svd").refit]
    if not plain:
        return list(chosen)
    ids = {id(c) for c in plain}
    sims: dict[str, Callable] = {}
    for c in others + [c for c in chosen if id(c) not in ids]:
        sims.update(c.simulation())
    new = refit_factors(gm, batches, {c.layer.name: (c.part("svd").v, c.part("svd").u)
                                      for c in plain}, sims,
                        {c.layer.name: c.part("svd").settings.refit_damp for c in plain},
                        seed=seed)
    out = []
    for c in chosen:
        if id(c) in ids and c.layer.name in new:
            v, u, bias = new[c.layer.name]
            if bias is None:
                bias = c.steps[-1].bias
            c = replace(c, steps=_steps(c.layer, v, u, bias),
                        parts={**c.parts, "svd": replace(c.part("svd"), v=v, u=u, bias=bias,
                                                         refit=True)})
        out.append(c)
    return out


def thin_fits(choice: Mapping[str, Candidate], calib) -> list[str]:
    """Report notes for chosen activation-aware factorizations fitted to fewer calibration
    rows than the layer has input features: an activation-aware SVD is fitted to the span of
    the rows it saw, so with fewer rows than features it can match the calibration data
    exactly (error near 0 there) and not other inputs. Each note says how much more data to
    pass."""
    notes = []
    for c in choice.values():
        if c.techniques[:1] != ["svd"] or not c.params.get("aware"):
            continue
        features = int(c.layer.weight_shape[1])
        stats = calib.stats.get(c.layer.node)
        rows = stats.rows if stats is not None else 0
        if rows >= features:
            continue
        more = math.ceil(features / max(rows, 1))
        cov = stats.covariance
        rho = shrinkage(cov, rows, stats.fourth) if cov is not None else 1.0
        notes.append(f"layer {c.layer.name}: activation-aware SVD (rank {c.params.get('rank')}) "
                     f"was fitted to {rows} calibration rows, fewer than its {features} input "
                     f"features, so its input covariance was shrunk {rho:.0%}"
                     " of the way to the identity (nearer plain SVD) and the fit still leans on "
                     f"the rows seen: pass at least {features} rows ({more}x the calibration "
                     "data the fits used)")
    return notes


def _train_init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor]:
    p = c.part("svd")
    return [p.v.reshape(c.steps[0].weight.shape).clone(),
            p.u.reshape(c.steps[1].weight.shape).clone()]


def _train_write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule) -> Candidate:
    v, u = latents[0], latents[1]
    return c.with_part("svd", replace(c.part("svd"), v=v.reshape(v.shape[0], -1).contiguous(),
                                      u=u.reshape(u.shape[0], -1).contiguous(), refit=True))


TECHNIQUE = register(Technique(
    "svd", order=20, propose=propose, make_config=make_config, apply=svd_pass, refine=refine,
    trainable=Trainable(_train_init, _train_write), notes=thin_fits, settings=SVDSettings()))
