"""Which weights a sparse layer keeps, and the values it keeps them at.

Patterns: "unstructured" (any weights, a fraction `sparsity` of them zeroed) or "N:M" (in every
run of M consecutive input columns of an output row, N kept: 2:4, 4:8). Masks are chosen three
ways, the weights seen as (output rows, input columns):

- `magnitude`: the smallest |w| of the whole layer zeroed (N:M: the smallest M - N of each run);
- `wanda`: |w_ij| * ||x_j|| (Sun et al. 2023, "Wanda"), the weight times the root mean square of
  the input it multiplies, compared within each output row;
- `sparsegpt`: second order (Frantar & Alistarh 2023, "SparseGPT", after OBS): columns in
  blocks of `BLOCK`; at each block's start the weights with the least w^2 / [H^-1]_jj^2 in it
  are chosen (N:M: at each run's start, within the run), then column by column each zeroed (or
  rounded) weight's error is moved onto the row's columns not yet done through the Cholesky
  factor of H^-1, H the layer's input second moment.

`compensate_kept` is the second pass where the kept values go onto a palette: with the mask
fixed, each column's kept weights are rounded to their nearest palette entry and its zeroed
ones to 0, the errors moved onto the later columns as above, so pruning and rounding are
compensated together. Deterministic: ties break by position (stable sorts), no draws.
"""

from __future__ import annotations

import re

import torch

from fxcompress.gptq import compensate, inverse_cholesky

METHODS = ("sparsegpt", "wanda", "magnitude")
#: palette widths of kept values whose indices pack whole into bytes (the decode's shifts)
VALUE_BITS = (1, 2, 4, 8)
#: columns whose mask is chosen together, as SparseGPT's adaptive mask selection
BLOCK = 128
_NM = re.compile(r"([1-9][0-9]*):([1-9][0-9]*)")


def nm_of(pattern: str) -> tuple[int, int] | None:
    """(N, M) of an "N:M" pattern, None for "unstructured"; ValueError for anything else."""
    if pattern == "unstructured":
        return None
    m = _NM.fullmatch(pattern)
    if m is None or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"pattern {pattern!r} is neither \"unstructured\" nor N:M with N < M")
    return int(m.group(1)), int(m.group(2))


def sparsity_of(pattern: str, level: float | None) -> float:
    """The fraction of weights a pattern zeroes (an N:M pattern: 1 - N/M)."""
    nm = nm_of(pattern)
    return float(level) if nm is None else 1.0 - nm[0] / nm[1]


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (True: among the k lowest) of each row of `score`; ties by position."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(score, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, idx, True)
    return mask


def _pruned(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
            per_row: bool) -> torch.Tensor:
    """Mask (True: zeroed) with the lowest scores zeroed: in runs of M (N:M), per row, or over
    the whole tensor."""
    r, c = score.shape
    if nm is not None:
        n, m = nm
        return _lowest(score.reshape(r, c // m, m), m - n).reshape(r, c)
    if per_row:
        return _lowest(score, round(c * sparsity))
    return _lowest(score.reshape(1, -1), round(score.numel() * sparsity)).reshape(r, c)


def magnitude(w: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Kept mask (True: kept) of `w` (R, C) by |w| over the layer (runs of M for N:M)."""
    return ~_pruned(w.abs(), sparsity, nm, per_row=False)


def wanda(w: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
          col_rms: torch.Tensor) -> torch.Tensor:
    """Kept mask of `w` (R, C) by |w_ij| * rms(x_j), compared within each output row."""
    return ~_pruned(w.abs() * col_rms.view(1, -1), sparsity, nm, per_row=True)


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, sparsity: float,
              nm: tuple[int, int] | None, block: int = BLOCK
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(updated weight, kept mask) of `w` (R, C) pruned with second-order compensation on
    `hessian` (C, C); None where H cannot be factored even damped."""
    u = inverse_cholesky(hessian)
    if u is None:
        return None
    wd = w.detach().double().clone()
    r, c = wd.shape
    pruned = torch.zeros((r, c), dtype=torch.bool)
    for b0 in range(0, c, block):
        b1 = min(b0 + block, c)
        wb, ub = wd[:, b0:b1], u[b0:b1, b0:b1]
        d2 = ub.diagonal() ** 2
        pb = pruned[:, b0:b1]
        if nm is None:
            pb |= _pruned(wb ** 2 / d2, sparsity, None, per_row=False)
        err = torch.empty_like(wb)
        for j in range(b1 - b0):
            if nm is not None and j % nm[1] == 0:
                m = nm[1]
                pb[:, j:j + m] = _lowest(wb[:, j:j + m] ** 2 / d2[j:j + m], m - nm[0])
            v = wb[:, j]
            q = torch.where(pb[:, j], torch.zeros_like(v), v)
            e = (v - q) / ub[j, j]
            wb[:, j + 1:] -= e.unsqueeze(1) * ub[j, j + 1:].unsqueeze(0)
            wb[:, j] = q
            err[:, j] = e
        wd[:, b1:] -= err @ u[b0:b1, b1:]
    return wd.to(w.dtype), ~pruned


def nearest(values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `lut` for each of `values`."""
    mid = (lut[1:] + lut[:-1]) / 2
    return torch.bucketize(values.to(lut.dtype), mid)


def compensate_kept(w: torch.Tensor, kept: torch.Tensor, lut: torch.Tensor,
                    hessian: torch.Tensor) -> torch.Tensor | None:
    """Palette indices (R, C) of `w`'s kept weights (zeroed ones: 0, ignored) rounded with
    error compensation on `hessian`, the mask fixed; None where H cannot be factored."""
    u = inverse_cholesky(hessian)
    if u is None:
        return None
    lut64 = lut.double()
    idx = torch.zeros(w.shape, dtype=torch.long)

    def round_column(j: int, v: torch.Tensor) -> torch.Tensor:
        i = nearest(v, lut64)
        idx[:, j] = i
        return torch.where(kept[:, j], lut64[i], torch.zeros_like(v))

    compensate(w, u, round_column)
    return idx
