"""SVD: `linear(x, W)` -> `linear(linear(x, V), U)`, and the same for 1x1 convs.

W (m x n) is approximated by U (m x r) @ V (r x n). Plain SVD minimizes ||W - UV||; the
activation-aware variant minimizes the layer's *output* error on the calibration inputs,
||(W - UV) X||, by factoring W S where S S^T is the second moment of the inputs (whitening),
then un-whitening V. It is the default whenever calibration data exists. A layer is never
factored where r(m + n) >= mn: the factors would be no smaller than the weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx

from fxcompress.candidates import Candidate, Step
from fxcompress.graph import LAYER_META, add_buffer, drop_unused_attrs, get_attr, op_type
from fxcompress.passes_infra import PassResult
from fxcompress.rewrite import call
from fxcompress.technique import ProposeContext, Technique, register

aten = torch.ops.aten


@dataclass(frozen=True)
class SVDConfig:
    """Which layers to factor, and their factors."""

    # layer name -> (V: r x n first factor, U: m x r second factor), as float32 tensors
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def whitening(cov: torch.Tensor, damp: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S S^T = cov. Cholesky of the damped second moment; when it is not
    positive definite, an eigen-decomposition with eigenvalues clamped from below."""
    cov = cov.double()
    n = cov.shape[0]
    eps = damp * float(cov.diagonal().mean().clamp_min(1e-30))
    try:
        s = torch.linalg.cholesky(cov + eps * torch.eye(n, dtype=cov.dtype))
        s_inv = torch.linalg.solve_triangular(s, torch.eye(n, dtype=cov.dtype), upper=False)
        return s, s_inv
    except torch.linalg.LinAlgError:
        vals, vecs = torch.linalg.eigh(cov)
        vals = vals.clamp_min(eps)
        return vecs * vals.sqrt(), (vecs / vals.sqrt()).T


@dataclass(frozen=True)
class Decomposition:
    """The SVD of a (possibly whitened) weight, from which factors of any rank are cut."""

    u: torch.Tensor  # m x k
    s: torch.Tensor  # k
    vh: torch.Tensor  # k x n, already un-whitened
    energy: torch.Tensor  # cumulative share of squared singular values, k

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V: rank x n, U: m x rank), float32."""
        v = self.vh[:rank]
        u = self.u[:, :rank] * self.s[:rank]
        return v.float().contiguous(), u.float().contiguous()

    def rank_for_energy(self, share: float) -> int:
        """Smallest rank keeping `share` of the (whitened) spectrum's energy."""
        return int(torch.searchsorted(self.energy, torch.tensor(share, dtype=self.energy.dtype))
                   ) + 1


def decompose(weight: torch.Tensor, cov: torch.Tensor | None = None) -> Decomposition:
    """SVD of a 2-D weight, activation-aware when `cov` (n x n input second moment) is given."""
    w = weight.detach().double()
    if cov is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        sq, sq_inv = whitening(cov)
        u, s, vh = torch.linalg.svd(w @ sq, full_matrices=False)
        vh = vh @ sq_inv
    e = (s**2).cumsum(0)
    return Decomposition(u, s, vh, e / e[-1].clamp_min(1e-300))


def max_useful_rank(m: int, n: int) -> int:
    """Largest rank r with r(m + n) < mn."""
    return (m * n - 1) // (m + n)


def _as_matrix(layer, weight: torch.Tensor) -> torch.Tensor | None:
    if layer.op == "linear":
        return weight
    if layer.op == "conv2d" and weight.shape[2:] == (1, 1) and layer.groups == 1:
        return weight[:, :, 0, 0]
    return None


def propose(layer, base: Candidate, ctx: ProposeContext):
    """Factorizations of `layer` at a ladder of ranks that the cost model says pay off."""
    w = _as_matrix(layer, ctx.weight)
    if w is None:
        return [], "svd applies to linear and ungrouped 1x1 conv layers only"
    m, n = w.shape
    rmax = max_useful_rank(m, n)
    if rmax < 1:
        return [], f"svd: {m}x{n} is too small to factor (r(m+n) >= mn for every r)"
    cov = ctx.stats.covariance if ctx.calibrated and ctx.stats.gram is not None else None
    dec = decompose(w, cov)
    ranks = set()
    for share in (0.8, 0.9, 0.95, 0.98, 0.99, 0.995):
        ranks.add(dec.rank_for_energy(share))
    for frac in (0.125, 0.25, 0.5):
        ranks.add(int(rmax * frac))
    aligned = sorted({min(ctx.profile.align(r), rmax) for r in ranks if r >= 1})
    aligned = [r for r in aligned if r * (m + n) < m * n]
    cands = []
    for r in aligned:
        v, u = dec.factors(r)
        if layer.op == "linear":
            steps = (Step("linear", v), Step("linear", u, ctx.bias))
        else:
            steps = (Step("conv2d", v[:, :, None, None], None, layer.stride, layer.padding,
                          layer.dilation),
                     Step("conv2d", u[:, :, None, None], ctx.bias))
        cands.append(Candidate("svd", layer, {"rank": r,
                                              "aware": cov is not None}, steps,
                               payload={"svd": (v, u)}))
    if not cands:
        return [], "svd: no rank rounded to the profile's alignment is smaller than the weight"
    return cands, None


def make_config(chosen: list[Candidate]) -> SVDConfig:
    """The pass config for the chosen SVD candidates."""
    return SVDConfig({c.layer.name: c.payload["svd"] for c in chosen})


def svd_pass(gm: fx.GraphModule, config: SVDConfig) -> PassResult:
    """Replace each configured layer's linear / 1x1 conv by its two factors."""
    modified = False
    for node in list(gm.graph.nodes):
        layer = node.meta.get(LAYER_META)
        if layer not in config.factors or op_type(node) not in ("linear", "conv2d"):
            continue
        v, u = config.factors[layer]
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if tuple(get_attr(gm, w.target).shape[:2]) != (u.shape[0], v.shape[1]):
            raise ValueError(f"factors of {layer} do not match its weight")
        g = gm.graph
        if op_type(node) == "linear":
            vn = add_buffer(gm, f"{layer}.svd_v", v, node)
            un = add_buffer(gm, f"{layer}.svd_u", u, node)
            with g.inserting_before(node):
                first = call(g, aten.linear.default, (x, vn), layer=layer)
                second = call(g, aten.linear.default, (first, un, bias), layer=layer)
        else:
            rest = list(node.args[3:])
            vn = add_buffer(gm, f"{layer}.svd_v", v[:, :, None, None], node)
            un = add_buffer(gm, f"{layer}.svd_u", u[:, :, None, None], node)
            with g.inserting_before(node):
                first = call(g, aten.conv2d.default, (x, vn, None, *rest), layer=layer)
                second = call(g, aten.conv2d.default, (first, un, bias), layer=layer)
        node.replace_all_uses_with(second)
        g.erase_node(node)
        modified = True
    if modified:
        drop_unused_attrs(gm)
    return PassResult(gm, modified)


TECHNIQUE = register(Technique("svd", order=20, propose=propose, make_config=make_config,
                               apply=svd_pass))
