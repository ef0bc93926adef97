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
- min(m, n) >= RANDOMIZED_MIN_DIM: a randomized range finder (seeded `torch.Generator`, a few
  power iterations) on the operator W C W^T, applied without forming it, finds only the top
  ranks the ladder can use, so compile time stays low on large layers.

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from fxcompress.calibration import OverrideInterpreter
from fxcompress.candidates import Candidate, Step
from fxcompress.graph import LAYER_META, add_buffer, drop_unused_attrs, get_attr, op_type
from fxcompress.passes_infra import PassResult
from fxcompress.rewrite import call
from fxcompress.technique import ProposeContext, Technique, register

aten = torch.ops.aten

#: Relative layer-output errors the rank ladder aims at: one candidate per target (after
#: rounding and de-duplication), from nearly lossless to the lossy end where only an
#: evaluate()-driven search would still accept a layer.
LOCAL_ERROR_LADDER = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35)
#: From this size of the smaller dimension on, the top ranks come from a randomized range
#: finder instead of a full eigen-decomposition (BERT-base's 768 is the first size where the
#: full route dominates compile time on 2 cores).
RANDOMIZED_MIN_DIM = 768
#: With the randomized route only ranks up to this share of min(m, n) are computed and offered:
#: past it a factorization saves too little to pay for its second op.
RANDOMIZED_MAX_SHARE = 0.25
#: Whether compile() re-fits the chosen factors sequentially (see the module docstring) when
#: the user passed calibration data. The switch for comparing against one-shot factors.
SEQUENTIAL_REFIT = True
#: Damping of the sequential re-fit's regression, relative to the mean input energy per
#: feature: pulls the re-fit weight towards the original one where calibration rows are few.
REFIT_DAMP = 1e-2


@dataclass(frozen=True)
class SVDConfig:
    """Which layers to factor, and their factors."""

    # layer name -> (V: r x n first factor, U: m x r second factor), as float32 tensors
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # layer name -> a bias replacing the layer's own (the sequential re-fit's), float32
    biases: Mapping[str, torch.Tensor] = field(default_factory=dict)


def shrinkage(cov: torch.Tensor, rows: int, fourth: float) -> float:
    """The Ledoit-Wolf intensity with which `shrunk` pulls the second moment `cov` (E[x x^T]
    over `rows` rows whose squared norms' squares sum to `fourth`) towards mu I, mu = tr(cov)
    / n: rho = min(1, b2 / d2), where b2 = (fourth / rows - ||cov||^2) / rows estimates how far
    the sample moment strays from the true one and d2 = ||cov - mu I||^2 how far that is from
    mu I (Ledoit & Wolf 2004, "A well-conditioned estimator for large-dimensional covariance
    matrices"). Few rows for many features give rho near 1 (plain SVD); many rows give rho near
    0 (the measured covariance). Even a modest rho spreads energy over every direction the rows
    did not see, so no rank reproduces the rows exactly (6 rows of the digits MLP's 512-wide
    layer: rho 0.18, and the ladder picks rank 56, not 6); whether the result holds on other
    inputs is then judged on held-out data (`fxcompress.acceptance`)."""
    if rows < 1:
        return 1.0
    n = cov.shape[0]
    mu = float(cov.diagonal().sum()) / n
    frob2 = float((cov * cov).sum())
    d2 = frob2 - 2 * mu * float(cov.diagonal().sum()) + mu * mu * n
    b2 = max(0.0, (fourth / rows - frob2) / rows)
    if d2 <= 0:
        return 0.0 if b2 == 0 else 1.0
    return min(1.0, b2 / d2)


def shrunk(cov: torch.Tensor, rho: float) -> torch.Tensor:
    """`cov` shrunk by `rho` towards its mean eigenvalue times the identity: the
    activation-aware SVD's regulariser, with `rho` from `shrinkage`. A covariance from fewer
    rows than features is singular, and a fit to it would reproduce the rows seen exactly and
    not other inputs."""
    n = cov.shape[0]
    mean = float(cov.diagonal().mean().clamp_min(0))
    return (1 - rho) * cov + rho * mean * torch.eye(n, dtype=cov.dtype)


def whitening(cov: torch.Tensor, damp: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S S^T = cov (damped). Cholesky of the damped second moment; when it is not
    positive definite, an eigen-decomposition with eigenvalues clamped from below."""
    cov = cov.double()
    n = cov.shape[0]
    eps = damp * float(cov.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(n, dtype=cov.dtype)
    s, info = torch.linalg.cholesky_ex(cov + eps * eye)
    if int(info) == 0 and bool(torch.isfinite(s).all()):
        return s, torch.linalg.solve_triangular(s, eye, upper=False)
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    vals = vals.clamp_min(eps)
    return vecs * vals.sqrt(), (vecs / vals.sqrt()).T


@dataclass(frozen=True)
class Decomposition:
    """Factors of a weight from which any rank up to `max_rank` is cut, and the relative output
    error at every rank: W_r = second[:, :r] @ first[:r]."""

    first: torch.Tensor  # k x n (float64)
    second: torch.Tensor  # m x k (float64)
    errors: torch.Tensor  # k + 1: relative layer-output error at rank 0..k
    aware: bool  # whether the factors minimize the output error under the covariance
    randomized: bool  # whether only the top ranks were computed, by a randomized range finder

    @property
    def max_rank(self) -> int:
        """Largest rank the factors hold."""
        return self.first.shape[0]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V: rank x n, U: m x rank), float32."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside 1..{self.max_rank}")
        return (self.first[:rank].float().contiguous(),
                self.second[:, :rank].float().contiguous())

    def error_at(self, rank: int) -> float:
        """Relative layer-output error at `rank` (on the calibration inputs when a covariance
        was given, else relative weight error)."""
        return float(self.errors[rank])

    def rank_for_error(self, target: float) -> int | None:
        """Smallest rank whose error is at most `target`, or None past `max_rank`."""
        ok = (self.errors[1:] <= target).nonzero()
        return int(ok[0]) + 1 if len(ok) else None


def _descending_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vals.flip(0).clamp_min(0), vecs.flip(1)


def _top_eigh_randomized(op: Callable[[torch.Tensor], torch.Tensor], dim: int, k: int,
                         generator: torch.Generator, oversample: int = 10,
                         power_iters: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of a PSD operator `op` (dim x dim) given only its products: a Gaussian
    sketch, subspace (power) iterations, and the eigen-decomposition of the projected
    matrix (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.3)."""
    q = min(dim, k + oversample)
    sketch = torch.randn(dim, q, generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(op(sketch)).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(op(basis)).Q
    vals, vecs = _descending_eigh(basis.T @ op(basis))
    return vals[:k], basis @ vecs[:, :k]


def _errors(total: float, captured: torch.Tensor) -> torch.Tensor:
    """Relative error at ranks 0..k from the energy each rank captures."""
    head = torch.cat([torch.zeros(1, dtype=torch.float64), captured.cumsum(0)])
    return ((total - head).clamp_min(0) / max(total, 1e-300)).sqrt()


def decompose(weight: torch.Tensor, cov: torch.Tensor | None = None, *, aware: bool = True,
              max_rank: int | None = None, seed: int = 0,
              randomized: bool | None = None) -> Decomposition:
    """Low-rank factors of a 2-D weight (m x n), with the relative output error at every rank.

    `cov` is the n x n second moment of the layer's inputs; with `aware` the factors minimize
    the output error under it, else they are the plain SVD's and `cov` only weighs the errors.
    `max_rank` bounds the ranks computed; `randomized` forces (True) or forbids (False) the
    randomized route, which by default is taken from min(m, n) >= RANDOMIZED_MIN_DIM on."""
    w = weight.detach().double()
    m, n = w.shape
    full = min(m, n)
    k = full if max_rank is None else max(1, min(full, max_rank))
    if randomized is None:
        randomized = full >= RANDOMIZED_MIN_DIM and k < full // 2
    c = None if cov is None else cov.detach().double()
    weigh = c is not None
    if not weigh:
        aware = False
    wc = w @ c if weigh else w
    total = float((w * wc).sum())  # tr(W C W^T)

    if randomized:
        gen = torch.Generator().manual_seed(seed)
        if aware:
            def op(x):
                return wc @ (w.T @ x)
        else:
            def op(x):
                return w @ (w.T @ x)
        _, u = _top_eigh_randomized(op, m, k, gen)
        first, second = u.T @ w, u
    elif m <= n or not aware:
        if m <= n:
            _, u = _descending_eigh(wc @ w.T if aware else w @ w.T)
            u = u[:, :k]
            first, second = u.T @ w, u
        else:
            _, v = _descending_eigh(w.T @ w)
            v = v[:, :k]
            first, second = v.T, w @ v
    else:
        s, s_inv = whitening(c)
        a = w @ s
        _, v = _descending_eigh(a.T @ a)
        v = v[:, :k]
        first, second = v.T @ s_inv, a @ v
    # Every route leaves the columns of `second` mutually orthogonal, so the components'
    # output energies ||second_i||^2 * first_i C first_i^T add up without cross terms: their
    # prefix sums are exactly what ranks 1..k keep of tr(W C W^T).
    if weigh:
        captured = (second ** 2).sum(0) * ((first @ c) * first).sum(1)
    else:
        captured = (second ** 2).sum(0) * (first ** 2).sum(1)
    return Decomposition(first, second, _errors(total, captured), aware, randomized)


def max_useful_rank(m: int, n: int) -> int:
    """Largest rank r with r(m + n) < mn."""
    return (m * n - 1) // (m + n)


def _as_matrix(layer, weight: torch.Tensor) -> torch.Tensor | None:
    if layer.op == "linear":
        return weight
    if layer.op == "conv2d" and weight.shape[2:] == (1, 1) and layer.groups == 1:
        return weight[:, :, 0, 0]
    return None


def rank_ladder(dec: Decomposition, rmax: int, align: Callable[[int], int]) -> list[int]:
    """Ranks to offer: the smallest meeting each local error of LOCAL_ERROR_LADDER, rounded up
    to the alignment, kept where r(m + n) < mn and the factors hold the rank."""
    ranks = set()
    for target in LOCAL_ERROR_LADDER:
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
    if ctx.calibrated and ctx.stats.gram is not None:
        cov = ctx.stats.covariance
        cov = shrunk(cov, shrinkage(cov, ctx.stats.rows, ctx.stats.fourth))
    full = min(m, n)
    cap = rmax
    if full >= RANDOMIZED_MIN_DIM:
        cap = min(rmax, max(ctx.profile.alignment, int(full * RANDOMIZED_MAX_SHARE)))
    fixed = getattr(ctx.settings, "rank", None)
    if fixed is not None:  # compile(overrides=...) fixed the rank
        if fixed > rmax:
            return [], (f"svd: rank {fixed} (overrides) saves nothing on a {m}x{n} weight "
                        f"(at most rank {rmax} does)")
        cap = fixed
    dec = decompose(w, cov, aware=True, max_rank=cap, seed=ctx.seed)
    ranks = [fixed] if fixed is not None else rank_ladder(dec, rmax, ctx.profile.align)
    if not ranks:
        lowest = dec.error_at(min(cap, dec.max_rank))
        return [], (f"svd: no rank below {cap} (aligned to {ctx.profile.alignment}) meets even "
                    f"the loosest local error {LOCAL_ERROR_LADDER[-1]:g} (best {lowest:.3g})")
    cands = []
    for r in ranks:
        v, u = dec.factors(r)
        steps = _steps(layer, v, u, ctx.bias)
        cands.append(Candidate("svd", layer, {"rank": r, "aware": dec.aware}, steps,
                               payload={"svd": (v, u), "local_error": dec.error_at(r)}))
    return cands, None


def make_config(chosen: list[Candidate]) -> SVDConfig:
    """The pass config for the chosen SVD candidates."""
    return SVDConfig({c.layer.name: c.payload["svd"] for c in chosen},
                     {c.layer.name: c.payload["bias"] for c in chosen
                      if c.payload.get("bias") is not None})


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


class _Reached(Exception):
    """Raised to stop an interpreter run just before a node (see `_advance`)."""


def _advance(gm: fx.GraphModule, batch: tuple, env: dict | None, overrides: Mapping,
             target: fx.Node) -> tuple[torch.Tensor, dict]:
    """Run `gm` on `batch` from the snapshot `env` up to (not including) `target`: the input
    of `target`, and the snapshot to resume from (values garbage-collected as dead are None, so
    a resumed run skips them)."""
    seen: dict = {}

    def on_reach(node, live):
        seen["x"] = live[node.args[0]]
        seen["env"] = {m: live.get(m) for m in before}
        raise _Reached

    nodes = list(gm.graph.nodes)
    before = nodes[: nodes.index(target)]
    try:
        OverrideInterpreter(gm, overrides, reach=[target.name], on_reach=on_reach).run(
            *batch, initial_env=dict(env) if env is not None else None)
    except _Reached:
        return seen["x"], seen["env"]
    raise RuntimeError(f"{target.name} was not reached")  # every node runs in an FX graph


def _rows(x: torch.Tensor, op: str) -> torch.Tensor:
    # one row per input vector the layer's matrix multiplies, as calibration's LayerStats
    if op == "linear":
        return x.detach().reshape(-1, x.shape[-1]).double()
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1).T.double()


def _effective(node: fx.Node, w: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    """Override that runs `node` with weight `w` (the product of its factors) and, when given,
    bias `bias`."""
    def run(args, kwargs):
        rest = list(args[2:])
        if bias is not None:
            if rest:
                rest[0] = bias
            else:
                kwargs = {**kwargs, "bias": bias}
        return node.target(args[0], w, *rest, **kwargs)
    return run


def refit_factors(gm: fx.GraphModule, batches: list[tuple],
                  factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  overrides: Mapping[str, Callable] | None = None, damp: float = REFIT_DAMP,
                  seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor,
                                                    torch.Tensor | None]]:
    """Sequentially re-fitted factors (same ranks) for the layers in `factors` (layer name ->
    (V, U), as `SVDConfig`) of the original graph `gm`, on the calibration `batches`:
    layer name -> (V, U, bias), the bias re-fitted too where the layer has one (None where not).

    Layers are re-fitted in graph order; each sees the inputs of the graph in which the layers
    before it run with their re-fitted factors and `overrides` (node name -> override, the other
    rewrites of the plan) apply, and is fitted to the original layer's output on the original
    inputs. With a bias the regression is on centred inputs and the bias absorbs the mean of
    the error (the shift a truncated layer upstream leaves after a ReLU / GELU). Deterministic:
    same graph, batches and factors give the same result."""
    overrides = dict(overrides or {})
    targets = [n for n in gm.graph.nodes if n.meta.get(LAYER_META) in factors
               and op_type(n) in ("linear", "conv2d")]
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    orig_env: list[dict | None] = [None] * len(batches)
    new_env: list[dict | None] = [None] * len(batches)
    for node in targets:
        name = node.meta[LAYER_META]
        v0, u0 = factors[name]
        weight = get_attr(gm, node.args[1].target).detach()
        w = weight.double().reshape(weight.shape[0], -1)
        if w.shape[1] != v0.shape[1]:
            raise ValueError(f"factors of {name} do not match its weight")
        bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = None if bias_node is None else get_attr(gm, bias_node.target).detach().double()
        op = op_type(node)
        n = w.shape[1]
        c = torch.zeros(n, n, dtype=torch.float64)
        d = torch.zeros(n, n, dtype=torch.float64)
        sx = torch.zeros(n, dtype=torch.float64)
        st = torch.zeros(n, dtype=torch.float64)
        rows = 0
        fourth = 0.0
        with torch.no_grad():
            for i, batch in enumerate(batches):
                x, orig_env[i] = _advance(gm, batch, orig_env[i], {}, node)
                xt, new_env[i] = _advance(gm, batch, new_env[i], overrides, node)
                x, xt = _rows(x, op), _rows(xt, op)
                c += xt.T @ xt
                d += x.T @ xt
                sx += x.sum(0)
                st += xt.sum(0)
                fourth += float((xt * xt).sum(1).square().sum())
                rows += x.shape[0]
        rows = max(rows, 1)
        mx, mt = sx / rows, st / rows
        # the regression's inputs are few rows for many features: the covariance is shrunk and
        # the ridge raised by the same Ledoit-Wolf intensity (see `shrinkage`)
        rho = shrinkage(c / rows, rows, fourth)
        if bias is not None:
            # centred second moments: the bias takes the means, the factors the rest
            c = c - rows * torch.outer(mt, mt)
            d = d - rows * torch.outer(mx, mt)
        lam = max(damp, rho / max(1 - rho, 1e-6)) * float(c.diagonal().mean().clamp_min(1e-30))
        eye = torch.eye(n, dtype=torch.float64)
        # B = W (D + l I)(C + l I)^-1: C + l I is symmetric positive definite, so Cholesky
        # (a third of a general solve's cost on BERT-base's 3072-wide FFN inputs)
        chol, info = torch.linalg.cholesky_ex(c + lam * eye)
        rhs = (w @ (d + lam * eye)).T
        if int(info) == 0:
            b = torch.cholesky_solve(rhs, chol).T
        else:  # round-off made it indefinite: the general solve still has an answer
            b = torch.linalg.solve(c + lam * eye, rhs).T
        rank = v0.shape[0]
        dec = decompose(b, shrunk(c / rows, rho), aware=True, max_rank=rank, seed=seed)
        v, u = dec.factors(rank)
        new_bias = None
        if bias is not None:
            new_bias = (bias + w @ mx - u.double() @ (v.double() @ mt)).float()
        out[name] = (v, u, new_bias)
        eff = (u @ v).reshape(u.shape[0], *weight.shape[1:])
        overrides[node.name] = _effective(node, eff, new_bias)
    return out


def refit_config(refitted: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                 ) -> SVDConfig:
    """The pass config for the output of `refit_factors`."""
    return SVDConfig({k: (v, u) for k, (v, u, _) in refitted.items()},
                     {k: b for k, (_, _, b) in refitted.items() if b is not None})


def refine(gm: fx.GraphModule, chosen: list[Candidate], others: list[Candidate],
           batches: list[tuple], seed: int = 0) -> list[Candidate]:
    """The chosen SVD candidates with sequentially re-fitted factors (`refit_factors`), the
    rest of the plan (`others`) simulated upstream; same ranks, so the same costs. Stacked
    candidates (svd+int8) keep their one-shot factors: their steps hold quantized weights."""
    plain = [c for c in chosen if c.technique == "svd"]
    if not SEQUENTIAL_REFIT or not plain:
        return list(chosen)
    sims: dict[str, Callable] = {}
    for c in others + [c for c in chosen if c.technique != "svd"]:
        sims.update(c.simulation())
    new = refit_factors(gm, batches, {c.layer.name: c.payload["svd"] for c in plain}, sims,
                        seed=seed)
    out = []
    for c in chosen:
        if c.technique == "svd" and c.layer.name in new:
            v, u, bias = new[c.layer.name]
            if bias is None:
                bias = c.steps[-1].bias
            c = replace(c, steps=_steps(c.layer, v, u, bias),
                        payload={**c.payload, "svd": (v, u), "bias": bias, "refit": True})
        out.append(c)
    return out


TECHNIQUE = register(Technique("svd", order=20, propose=propose, make_config=make_config,
                               apply=svd_pass, refine=refine))
