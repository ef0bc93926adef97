"""Host micro-benchmarks for profiles whose numbers are marked `measure` (x86-server).

Such a profile describes "this machine": its peak fp32 and int8 throughput, memory bandwidth and
per-operator overhead are measured here once (fp32 `linear`, `torch._int_mm`, a large copy, a
tiny op), rounded to two significant figures so small jitter does not change plans, and cached
in `~/.cache/fxcompress/host-<torch version>.json` (or `$FXCOMPRESS_CACHE`). Later compiles on
the same machine read the cache, so the same inputs give the same plan. A measurement taken
while the load average exceeds the core count is used but not cached.
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


def measure_host() -> dict[str, float]:
    """Measure fp32 / int8 GOP/s, bandwidth (GB/s) and op overhead (µs) on this machine."""
    with torch.inference_mode():
        m, k, n = 32, 1024, 1024  # a batch of token rows through a transformer linear
        a, w = torch.randn(m, k), torch.randn(n, k)
        fp32 = 2 * m * k * n / _median_time(lambda: torch.nn.functional.linear(a, w)) / 1e9
        ai = torch.randint(-127, 127, (m, k), dtype=torch.int8)
        bi = torch.randint(-127, 127, (k, n), dtype=torch.int8)
        try:
            int8 = 2 * m * k * n / _median_time(lambda: torch._int_mm(ai, bi)) / 1e9
        except RuntimeError:
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
    return root / f"host-{torch.__version__}-{platform.machine()}.json"


def host_numbers() -> dict[str, float]:
    """The cached host measurements, measuring (and caching atomically) on first use."""
    path = _cache_path()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    numbers = measure_host()
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        # other processes were competing for the cores: use these numbers for this process
        # only, and measure again next time rather than cache a distorted figure
        return numbers
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(numbers, f)
    os.replace(tmp, path)
    return numbers


def calibrated(profile: Profile) -> Profile:
    """`profile` with its throughput numbers replaced by the host's, if it is marked
    `measure`; otherwise `profile` as it is."""
    if not profile.measure:
        return profile
    h = host_numbers()
    peak = dict(profile.peak_gops, fp32=h["fp32"], int8=h["int8"])
    sources = dict(profile.sources, measured="host micro-benchmarks (fxcompress.hostbench)")
    return dataclasses.replace(profile, peak_gops=peak, bandwidth_gbs=h["bandwidth_gbs"],
                               op_overhead_us=h["op_overhead_us"], sources=sources)
