"""Micro-benchmarks of the host's speed, for a profile marked `measure` (the built-in
`x86-host`, "this machine").

Its peak fp32 and int8 throughput, memory bandwidth and per-operator overhead are measured
here once (fp32 `linear`, the int8 GEMM that Inductor lowers int8 Q/DQ linears to, a large
copy, a tiny op), rounded to two significant figures so small jitter does not change plans,
and cached in `~/.cache/fxcompress/host-v3-<torch version>.json` (or `$FXCOMPRESS_CACHE`).
While the load average exceeds the core count, nothing is measured: other processes distort
such figures by an order of magnitude, so the profile's own numbers are used for that
compile, and the host is measured on a later, quieter one. A corrupt cache is measured again,
never trusted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fxcompress.hardware_profiles import Profile
from fxcompress.host.isa import host_isa, int8_weight_bits


def _round2(x: float) -> float:
    return float(f"{x:.2g}")


def _median_time(fn, runs: int = 15) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _int8_gemm(m: int, k: int, n: int):
    """An m x k x n int8 GEMM as Inductor runs it for a Q/DQ linear on x86 (oneDNN, u8
    activations x s8 weights, prepacked), or `torch._int_mm` where oneDNN is not built in."""
    au = torch.randint(0, 255, (m, k), dtype=torch.uint8)
    wq = torch.randint(-127, 127, (n, k), dtype=torch.int8)
    try:
        onednn = torch.ops.onednn
        packed = onednn.qlinear_prepack(wq, (m, k))
        ws, wz = torch.full((n,), 0.01), torch.zeros(n, dtype=torch.int32)

        def run():
            return onednn.qlinear_pointwise(au, 0.02, 128, packed, ws, wz, None, 1.0, 0,
                                            torch.float32, "none", [None], "")
        run()
        return run
    except (AttributeError, RuntimeError):
        ai = torch.randint(-127, 127, (m, k), dtype=torch.int8)
        return lambda: torch._int_mm(ai, wq.t())


def measure_host() -> dict[str, float]:
    """Measure fp32 / int8 GOP/s, bandwidth (GB/s) and op overhead (µs) on this machine."""
    with torch.inference_mode():
        m, k, n = 32, 1024, 1024  # a batch of token rows through a transformer linear
        a, w = torch.randn(m, k), torch.randn(n, k)
        fp32 = 2 * m * k * n / _median_time(lambda: torch.nn.functional.linear(a, w)) / 1e9
        try:
            int8 = 2 * m * k * n / _median_time(_int8_gemm(m, k, n)) / 1e9
        except RuntimeError:  # no int8 GEMM on this build: int8 gains nothing here
            int8 = fp32
        big = torch.empty(64 * 1024 * 1024 // 4)
        dst = torch.empty_like(big)
        bw = 2 * big.numel() * 4 / _median_time(lambda: dst.copy_(big), runs=7) / 1e9
        tiny = torch.ones(4)
        overhead = _median_time(lambda: torch.add(tiny, tiny), runs=200) * 1e6
    return {"fp32": _round2(fp32), "int8": _round2(int8), "bandwidth_gbs": _round2(bw),
            "op_overhead_us": _round2(overhead)}


def _cache_path() -> Path:
    root = Path(os.environ.get("FXCOMPRESS_CACHE", Path.home() / ".cache" / "fxcompress"))
    # v3: validated on read (v2 was trusted as it was; v1 timed torch._int_mm)
    return root / f"host-v3-{torch.__version__}-{platform.machine()}.json"


_HOST_KEYS = ("fp32", "int8", "bandwidth_gbs", "op_overhead_us")


def _valid(numbers: object) -> bool:
    return isinstance(numbers, dict) and all(
        isinstance(numbers.get(k), int | float) and not isinstance(numbers.get(k), bool)
        and 0 < numbers[k] < 1e9 for k in _HOST_KEYS)


def host_numbers() -> dict[str, float] | None:
    """The cached host measurements, measuring (and caching atomically) on first use or when
    the cache is unreadable or corrupt; None while the host is too busy to measure (see the
    module docstring)."""
    path = _cache_path()
    try:
        numbers = json.loads(path.read_text())
        if _valid(numbers):
            return {k: float(numbers[k]) for k in _HOST_KEYS}
    except (OSError, ValueError):
        pass
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        return None
    numbers = measure_host()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(numbers, f)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache costs a measurement next time, not the compile
    return numbers


def calibrated(profile: Profile) -> Profile:
    """`profile` as this host is, if it is marked `measure`: its instruction sets read from the
    host (and with them the exact int8 weight range), its throughput numbers measured here if
    the host's are known or measurable now. Any other profile is returned as it is: it
    describes its target, not this host."""
    if not profile.measure:
        return profile
    isa = host_isa()
    sources = dict(profile.sources, isa=f"this host: {', '.join(isa) or 'no AVX2'}")
    profile = dataclasses.replace(profile, isa=isa, int8_weight_bits=int8_weight_bits(isa),
                                  sources=sources)
    h = host_numbers()
    if h is None:
        return dataclasses.replace(profile, sources=dict(
            profile.sources, measured="not measured: the host was busy (the profile's numbers "
            "were used)"))
    peak = dict(profile.peak_gops, fp32=h["fp32"], int8=h["int8"])
    sources = dict(profile.sources, measured="host micro-benchmarks (fxcompress.host)")
    return dataclasses.replace(profile, peak_gops=peak, bandwidth_gbs=h["bandwidth_gbs"],
                               op_overhead_us=h["op_overhead_us"], sources=sources)
