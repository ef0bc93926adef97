"""The free cores, and how many threads a compile uses: `FXCOMPRESS_THREADS` if set, else
`torch.get_num_threads()`, lowered to the cores other processes leave free.

OpenMP threads wait for each other at the end of every parallel region, spinning; with more
runnable processes than cores one of them is descheduled and the others spin for it. On 2
cores beside 3 CPU-bound processes the demo compile took 45 s with 2 threads (34.6 s of CPU)
and 18 s with one (9.0 s of CPU); quiet, 7.6 s with 2 threads.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator

import torch

from fxcompress.errors import FxCompressError


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
