"""intx's maths: symmetric group-wise n-bit weights, rounded to nearest (`rtn`) or with error
compensation on the layer's input Hessian (`gptq`), and the dynamic per-token int8 input
quantizer the targets pair them with.

A weight (R, C) is cut into groups of `group` consecutive input columns per output row; each
group g of row r has one scale s[r, g] and stores q in [-2^(b-1), 2^(b-1) - 1]; the weight the
layer computes with is q * s. The scale maps the group's range onto the levels (s = max(max / qmax,
min / qmin): both ends of the signed range are used, as XNNPACK's 4-bit blockwise kernels
store it), or a share of that range where clipping the extremes for a finer grid lowers the
group's rounding error weighted by its inputs' second moment (`CLIP_RATIOS`). Scales are
rounded to the precision the target keeps them in (XNNPACK converts them to bfloat16) before
q is chosen, so the weight simulated here is the weight the runtime multiplies with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

from fxcompress.gptq import BLOCK, DAMP, compensate, inverse_cholesky

qd = torch.ops.quantized_decomposed

#: the shares of a group's full range its scale is tried at (the least weighted error wins)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
#: the dynamic activation range of the 8-bit per-token input quantizer
ACT_QMIN, ACT_QMAX = -128, 127


def qrange(bits: int) -> tuple[int, int]:
    """(lowest, highest) stored level of signed `bits`-bit weights: (-8, 7) for 4 bits."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _rounded_scale(s: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    s = s.clamp_min(1e-12)
    if scale_dtype in ("bf16", "fp16"):
        low = torch.bfloat16 if scale_dtype == "bf16" else torch.float16
        # fp16: down to its smallest subnormal, so tiny groups keep a scale of their own
        floor = torch.finfo(low).tiny if low == torch.bfloat16 else 2.0 ** -24
        s = s.to(low).float().clamp_min(floor)
    return s.float()


def group_scale(w: torch.Tensor, bits: int, scale_dtype: str,
                importance: torch.Tensor | None = None) -> torch.Tensor:
    """Scales of the groups of `w` (..., group): the last dim is one group. Of the scales
    that map the group's range onto the levels, shrunk by each of `CLIP_RATIOS` (clipping the
    extremes for a finer grid), each group keeps the one whose rounding error, weighted by
    `importance` (per column of the group: the input's second moment), is least."""
    lo, hi = qrange(bits)
    full = torch.maximum(w.amax(-1).clamp_min(0) / hi, w.amin(-1).clamp_max(0) / lo).float()
    best, best_err = None, None
    wf = w.float()
    for ratio in CLIP_RATIOS:
        s = _rounded_scale(full * ratio, scale_dtype)
        d = wf - torch.round(wf / s.unsqueeze(-1)).clamp(lo, hi) * s.unsqueeze(-1)
        err = (d.square() * (1.0 if importance is None else importance)).sum(-1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best = torch.where(better, s, best)
            best_err = torch.where(better, err, best_err)
    return best


def check_groups(cols: int, group: int) -> str | None:
    """Why a weight with `cols` input columns cannot be cut into groups of `group`, or None."""
    if cols % group:
        return f"its {cols} input columns are not a multiple of the group size {group}"
    return None


def rtn(w: torch.Tensor, bits: int, group: int, scale_dtype: str = "fp32",
        importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest: (q int8 (R, C), scale fp32 (R, C / group)); `importance` (C,): the
    weight of each input column's error when the scales are chosen."""
    r, c = w.shape
    g = w.detach().float().reshape(r, c // group, group)
    imp = None if importance is None else importance.float().reshape(c // group, group)
    s = group_scale(g, bits, scale_dtype, imp)
    return round_to_scales(w, s, bits), s


def dequantize(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """q * scale, float32 (R, C), as `quantized_decomposed.dequantize_per_channel_group`
    computes it."""
    r, c = q.shape
    return (q.float().reshape(r, c // group, group) * scale.unsqueeze(-1)).reshape(r, c)


def round_to_scales(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """q int8 (R, C): `w` rounded to nearest on the given group scales (R, C / group)."""
    r, c = w.shape
    lo, hi = qrange(bits)
    g = w.detach().float().reshape(r, scale.shape[1], -1)
    return torch.round(g / scale.unsqueeze(-1)).clamp(lo, hi).to(torch.int8).reshape(r, c)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """`w` rounded on the fixed group scales `scale` and dequantized, differentiable in `w`
    straight through the rounding (recovery's form: the scales stay those the planner chose,
    so training starts from the error-compensated weight exactly)."""
    r, c = w.shape
    lo, hi = qrange(bits)
    s = scale.to(w.dtype).unsqueeze(-1)
    g = w.reshape(r, scale.shape[1], -1)
    q = g / s
    q = q + (torch.round(q).clamp(lo, hi) - q).detach()
    return (q * s).reshape(r, c)


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int,
         scale_dtype: str = "fp32", damp: float = DAMP, block: int = BLOCK,
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-compensated rounding (GPTQ, Frantar et al. 2023) with group-wise scales:
    (q int8 (R, C), scale fp32 (R, C / group)) minimizing sum_r (w_r - q_r s_r) H (w_r -
    q_r s_r)^T greedily. The group scales are chosen first, on the weight as it is (as
    `rtn` chooses them, weighted by H's diagonal); then the columns are rounded in order,
    each column's rounding error pushed onto the columns not yet rounded through the
    Cholesky factor of H^-1. Falls back to `rtn` where H cannot be factored.

    Measured on the docs language model (every linear at 4 bits, group 32): scales fixed
    first, columns in order: relative output error 0.0229, perplexity +0.024 %; the same with
    the columns of largest H diagonal first ("act order"): 0.0223, +0.098 %; scales chosen
    as each group is reached, on the updated weights: 0.0220, +0.063 %; round to nearest:
    0.0336, +0.050 %."""
    diag = hessian.diagonal().clamp_min(0)
    r, c = w.shape
    _, scale = rtn(w, bits, group, scale_dtype, diag)
    u = inverse_cholesky(hessian, damp)
    if u is None:
        return rtn(w, bits, group, scale_dtype, diag)
    lo, hi = qrange(bits)
    cols = scale.double().repeat_interleave(group, dim=1)  # each column's scale
    q = torch.empty(r, c, dtype=torch.int8)

    def round_column(j: int, v: torch.Tensor) -> torch.Tensor:
        qj = torch.round(v / cols[:, j]).clamp(lo, hi)
        q[:, j] = qj.to(torch.int8)
        return qj * cols[:, j]

    compensate(w, u, round_column, block)
    return q, scale


def hessian_error(w: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """sum_r (w_r - wq_r) H (w_r - wq_r)^T / sum_r w_r H w_r^T: the layer's relative output
    error on its calibration inputs (plain weight error where there is no H)."""
    d = (w.detach().double() - wq.double())
    if hessian is None:
        return float(d.square().sum() / w.double().square().sum().clamp_min(1e-30))
    h = hessian.double()
    num = float(((d @ h) * d).sum())
    den = float(((w.double() @ h) * w.double()).sum())
    return num / max(den, 1e-30)


@dataclass(frozen=True)
class PerTokenInt8:
    """Dynamic asymmetric int8 quantization of each row (token) of the input, from its own
    range: the arithmetic of the `quantized_decomposed` per-token ops the pass writes (plain
    data: a candidate's steps pickle)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `x`."""
        s, z = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
        q = qd.quantize_per_token(x, s, z, ACT_QMIN, ACT_QMAX, torch.int8)
        return qd.dequantize_per_token(q, s, z, ACT_QMIN, ACT_QMAX, torch.int8, x.dtype)


@dataclass(frozen=True)
class ScaledPerTokenInt8:
    """`PerTokenInt8` of the input multiplied per column by `inv_scale` (AWQ's scaling, the
    weight's columns multiplied by its inverse), expressed back in the input's own units: the
    runtime's q(x / s) against the scaled weight equals q(x / s) * s against the weight's
    effective columns (plain data: a candidate's steps pickle)."""

    inv_scale: torch.Tensor  # (in,) float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `x` as the scaled input is quantized."""
        return PerTokenInt8()(x * self.inv_scale) / self.inv_scale


#: AWQ's exponents tried for the input-column scale s_j = rms_j^alpha (0: no scaling)
AWQ_ALPHAS = tuple(i / 10 for i in range(1, 11))


def awq_scale(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int,
              scale_dtype: str) -> torch.Tensor | None:
    """AWQ's per-input-column scale (Lin et al. 2024) for `w` (out, in) on its input second
    moment: s = rms^alpha normalised so that max(s) min(s) = 1, alpha the grid point whose
    rounding to nearest of w * s, brought back by 1 / s, has the least error through
    `hessian`; None where no alpha beats no scaling."""
    d = hessian.diagonal().double().clamp_min(0)
    if not bool((d > 0).all()):
        return None  # an input column that is always zero: nothing to scale it by
    rms = d.sqrt()
    best = hessian_error(w, dequantize(*rtn(w, bits, group, scale_dtype, d.float()), group),
                         hessian)
    scale = None
    for alpha in AWQ_ALPHAS:
        s = rms ** alpha
        s = s / (s.max() * s.min()).sqrt()
        q, sc = rtn((w.double() * s).float(), bits, group, scale_dtype, (d / s ** 2).float())
        err = hessian_error(w, (dequantize(q, sc, group).double() / s).float(), hessian)
        if err < best:
            best, scale = err, s.float()
    return scale
