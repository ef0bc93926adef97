"""Error-compensated rounding of a weight's columns (GPTQ, Frantar et al. 2023), shared by the
techniques that round weights onto a grid (int4 groups: `passes/intx`; palette indices:
`passes/share`): the grid is theirs, the compensation is this.

Columns are rounded in order, each by the technique's `round_column`; each column's rounding
error is pushed onto the columns not yet rounded through the Cholesky factor of H^-1 (the
optimal update of the rest of each row given this column's error, for the layer-output error
sum_r (w_r - q_r) H (w_r - q_r)^T), a block of columns at a time. Deterministic (no draws).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: The ridge added to H, relative to its mean diagonal, and the columns updated together
#: before their error is pushed onto the rest of the row.
DAMP = 0.01
BLOCK = 128


def inverse_cholesky(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor | None:
    """The upper Cholesky factor of (H + damp * mean(diag H) I)^-1 (float64), an input that is
    always zero given a unit diagonal (any value will do for its column); None where even the
    damped H cannot be factored."""
    h = hessian.detach().double().clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    h += damp * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=torch.float64)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                     upper=True)
    except RuntimeError:  # numerically singular despite the damping
        return None


def compensate(weight: torch.Tensor, u: torch.Tensor,
               round_column: Callable[[int, torch.Tensor], torch.Tensor],
               block: int = BLOCK) -> None:
    """Round the columns of `weight` (R, C) in order: `round_column(j, v)` gets column j as
    updated by the errors before it (float64, (R,)) and returns its rounded values (recording
    whatever it stores); the error is pushed onto the later columns through `u`
    (`inverse_cholesky`)."""
    w = weight.detach().double().clone()
    c = w.shape[1]
    for b0 in range(0, c, block):
        b1 = min(b0 + block, c)
        wb = w[:, b0:b1]
        err = torch.empty_like(wb)
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            v = wb[:, j]
            e = (v - round_column(b0 + j, v)) / ub[j, j]
            wb[:, j + 1:] -= e.unsqueeze(1) * ub[j, j + 1:].unsqueeze(0)
            err[:, j] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
