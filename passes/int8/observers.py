"""Observers: the range a static int8 activation is quantized over, from calibration samples.

An observer looks at sampled activation values and returns the range [lo, hi] that int8 should
cover. Clipping a few outliers buys a finer step for everything else, so three rules are offered:

- ``minmax``: the whole observed range (no clipping): the default, which compile widens by
  `fxcompress.passes.int8.range_headroom`, because inputs beyond the calibration data's
  extremes are clipped, and a few calibration examples rarely hold the extremes;
- ``percentile``: the 0.01th to 99.99th percentile (outliers clipped);
- ``mse``: the clipping of the min-max range that minimizes the squared quantization error of
  the samples themselves (a grid search over shrink factors, as in TensorRT's and torchao's
  MSE observers).

`affine_qparams` turns a range into the per-tensor (scale, zero point) of int8 in [-128, 127]
exactly as `torch.ao`'s observers do, so ExecuTorch and ONNX Runtime read the same numbers.
"""

from __future__ import annotations

import torch

from fxcompress.errors import FxCompressError

OBSERVERS = ("minmax", "percentile", "mse")
QMIN, QMAX = -128, 127
_MAX_SAMPLES = 1 << 18  # quantile() and the MSE grid need no more values than this


def _flat(values: torch.Tensor) -> torch.Tensor:
    v = values.detach().reshape(-1).float()
    if v.numel() > _MAX_SAMPLES:  # deterministic thinning: every k-th value
        v = v[:: v.numel() // _MAX_SAMPLES + 1]
    return v


#: the smallest activation scale, torch.ao.quantization's (float32 epsilon): a range observed
#: as (nearly) empty must not give a scale that makes a runtime's int32 bias overflow
MIN_SCALE = float(torch.finfo(torch.float32).eps)


def affine_qparams(lo: float, hi: float, min_scale: float = MIN_SCALE) -> tuple[float, int]:
    """(scale, zero_point) of per-tensor affine int8 in [-128, 127] covering [lo, hi] (the range
    is widened to include 0, so that 0 is exact, as torch.ao.quantization does); the scale is
    at least `min_scale`."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / (QMAX - QMIN), min_scale, MIN_SCALE)
    zp = int(QMIN - round(lo / scale))
    return scale, max(QMIN, min(QMAX, zp))


def fake_quant_affine(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Quantize to int8 with (scale, zero_point) and back, as quantized_decomposed does."""
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, QMIN, QMAX)
    return (q - zero_point) * scale


def observe(values: torch.Tensor, method: str = "mse") -> tuple[float, float]:
    """The range [lo, hi] that `method` (one of OBSERVERS) picks for `values`."""
    if method not in OBSERVERS:
        raise FxCompressError(f"unknown observer {method!r}; use one of {', '.join(OBSERVERS)}")
    v = _flat(values)
    if v.numel() == 0:
        return 0.0, 0.0
    lo, hi = float(v.min()), float(v.max())
    if method == "minmax":
        return lo, hi
    if method == "percentile":
        q = torch.quantile(v, torch.tensor([1e-4, 1 - 1e-4]))
        return float(q[0]), float(q[1])
    best, best_err = (lo, hi), None
    for k in range(40):
        shrink = 1.0 - 0.02 * k
        a, b = lo * shrink, hi * shrink
        s, z = affine_qparams(a, b)
        err = float(((fake_quant_affine(v, s, z) - v) ** 2).sum())
        if best_err is None or err < best_err:
            best, best_err = (a, b), err
    return best
