"""Speed as the project reports it: original and compressed timed in one process, interleaved,
medians of many runs, given as a ratio (never a timing assertion in a test)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Medians of interleaved runs, in seconds, and their ratio."""

    baseline_s: float
    candidate_s: float
    runs: int

    @property
    def ratio(self) -> float:
        """candidate / baseline: below 1 is faster."""
        return self.candidate_s / self.baseline_s

    @property
    def speedup(self) -> float:
        """baseline / candidate: above 1 is faster."""
        return self.baseline_s / self.candidate_s


def interleaved(baseline: Callable[[], object], candidate: Callable[[], object],
                runs: int = 50, warmup: int = 5) -> Timing:
    """Time two callables alternately (A B A B ...) and return the medians."""
    a, b = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            baseline()
            candidate()
        for i in range(runs):
            order = ((baseline, a), (candidate, b)) if i % 2 == 0 else \
                ((candidate, b), (baseline, a))
            for fn, acc in order:
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
    return Timing(statistics.median(a), statistics.median(b), runs)
