"""The host: its instruction sets, its free cores, and micro-benchmarks of its speed.

A built-in profile describes a *target* (`x86-server` is an AVX-512 VNNI server, whatever
machine compiles for it), so the same inputs give the same plan on any host. Only a profile
marked `measure` (the built-in `x86-host`) describes "this machine": its peak fp32 and int8
throughput, memory bandwidth and per-operator overhead are measured here once (fp32 `linear`,
the int8 GEMM that Inductor lowers int8 Q/DQ linears to, a large copy, a tiny op), rounded to
two significant figures so small jitter does not change plans, and cached in
`~/.cache/fxcompress/host-v3-<torch version>.json` (or `$FXCOMPRESS_CACHE`); its instruction
sets are read from the host (`host_isa`), and with them the int8 weight range its kernels
compute exactly (`int8_weight_bits`). While the load average exceeds the core count, nothing is
measured: other processes distort such figures by an order of magnitude, so the profile's own
numbers are used for that compile, and the host is measured on a later, quieter one. A corrupt
cache is measured again, never trusted.

`compile_threads` picks how many threads a compile uses: `FXCOMPRESS_THREADS` if set, else
`torch.get_num_threads()`, lowered to the cores other processes leave free. OpenMP threads wait
for each other at the end of every parallel region, spinning; with more runnable processes
than cores one of them is descheduled and the others spin for it. On 2 cores beside 3
CPU-bound processes the demo compile took 45 s with 2 threads (34.6 s of CPU) and 18 s with
one (9.0 s of CPU); quiet, 7.6 s with 2 threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from fxcompress.errors import FxCompressError
from fxcompress.hardware_profiles import Profile

#: Instruction-set flags that decide int8 arithmetic (as /proc/cpuinfo spells them).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
#: Flags with which a u8 x s8 dot product accumulates in 32 bits (VPDPBUSD, AMX). Without them
#: x86 int8 kernels (oneDNN, ONNX Runtime's MLAS) use VPMADDUBSW, which adds pairs of u8 x s8
#: products into 16 bits and saturates above 32767.
EXACT_U8S8 = ("avx512_vnni", "avx_vnni", "amx_int8")


def host_isa() -> tuple[str, ...]:
    """The int8-relevant instruction sets of this CPU (`ISA_FLAGS`, as /proc/cpuinfo names
    them), or what `FXCOMPRESS_HOST_ISA` (comma-separated) says, for testing a host one does
    not have. Without /proc/cpuinfo, torch's own capability probe."""
    forced = os.environ.get("FXCOMPRESS_HOST_ISA")
    if forced is not None:
        return tuple(f for f in (s.strip().lower() for s in forced.split(",")) if f)
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        cap = torch.backends.cpu.get_cpu_capability().lower()
        flags = {"avx2", "fma"} if cap.startswith("avx") else set()
        if cap.startswith("avx512"):
            flags |= {"avx512f", "avx512bw", "avx512_vnni"}
    return tuple(f for f in ISA_FLAGS if f in flags)


def int8_weight_bits(isa: tuple[str, ...]) -> int:
    """Bits of int8 weight range that x86 u8 x s8 kernels compute exactly on a CPU with `isa`:
    8 with a 32-bit-accumulating dot product, else 7 (|q| <= 63 keeps 2 x 255 x 63 < 32767)."""
    return 8 if any(f in isa for f in EXACT_U8S8) else 7


def target_vs_host(profile: Profile) -> str | None:
    """A note when the profile's target computes int8 exactly with instruction sets this host
    lacks: the plan is the target's, and what differs when it runs here."""
    if profile.measure or profile.int8_weight_bits <= 7:
        return None
    exact_on_target = [f for f in EXACT_U8S8 if f in profile.isa]
    host = host_isa()
    if not exact_on_target or int8_weight_bits(host) == 8:
        return None
    return (f"the plan is for {profile.name}'s target ({', '.join(profile.isa)}); this host "
            f"({', '.join(host) or 'no AVX2'}) has no {' / '.join(exact_on_target)}, so int8 "
            "GEMMs run here under Inductor saturate (u8 x s8 pairs summed in 16 bits) and "
            "timings here are not the target's. The .onnx that fxcompress.export writes is "
            "correct on any x86 CPU; to run the .pt2 under Inductor on this host, compile with "
            "profile='x86-avx2' (7-bit weights) or 'x86-host' (this host, measured)")


def _own_running() -> int:
    """Threads of this process that are running now (its OpenMP or ONNX Runtime workers may
    still be spinning after their last task: they are not other processes)."""
    n = 0
    try:
        for task in os.scandir("/proc/self/task"):
            try:
                with open(f"{task.path}/stat") as f:
                    n += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                continue
    except OSError:
        return 1
    return max(1, n)


def _others_running() -> int:
    """Runnable threads of other processes, the median of a few samples of /proc/loadavg's
    running count less this process's own (the load average itself lags by a minute)."""
    samples = []
    for _ in range(5):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        samples.append(running - _own_running())
        time.sleep(0.01)
    return max(0, int(statistics.median(samples)))


def compile_threads() -> int:
    """Threads for a compile: `FXCOMPRESS_THREADS`, else `torch.get_num_threads()`, at most
    the cores that other runnable processes leave free, at least one. The thread count is an
    input like the seed: float sums split over threads round differently, which can move a
    recovery run or a borderline plan, so pin it with `FXCOMPRESS_THREADS` where results must
    repeat exactly on a busy host (the report records it)."""
    env = os.environ.get("FXCOMPRESS_THREADS")
    if env is not None:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise FxCompressError(f"FXCOMPRESS_THREADS={env!r} is not a positive whole number; "
                                  "set it to the threads a compile may use, e.g. 2, or unset it")
        return n
    want = torch.get_num_threads()
    free = (os.cpu_count() or 1) - _others_running()
    return max(1, min(want, free))


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """torch's intra-op threads set to `n` for a while, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


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
    sources = dict(profile.sources, measured="host micro-benchmarks (fxcompress.hostbench)")
    return dataclasses.replace(profile, peak_gops=peak, bandwidth_gbs=h["bandwidth_gbs"],
                               op_overhead_us=h["op_overhead_us"], sources=sources)
