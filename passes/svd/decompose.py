"""SVD's maths: the activation-aware low-rank decomposition of a weight under its
inputs' second moment (`decompose`), with the Ledoit-Wolf shrinkage of that moment
(`shrinkage`, `shrunk`); see `__init__.py` for how it is used."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: From this size of the smaller dimension on, the top ranks come from a randomized range
#: finder instead of a full eigen-decomposition (BERT-base's 768 is the first size where the
#: full route dominates compile time on 2 cores).
RANDOMIZED_MIN_DIM = 768


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
