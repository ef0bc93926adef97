"""The benchmark scripts, and what they share with the tests: the trained models and their
data (`benchmarks.models`) and the architecture zoo (`benchmarks.zoo`). Not part of the
installed package."""

import os
from pathlib import Path

#: The load average when a benchmark script started (it imports this package first).
START_LOAD = os.getloadavg()[0]


def conditions() -> str:
    """How the timings were taken, for a results file's header: the load average when the
    script started, on how many cores (timings are only comparable taken alone)."""
    return (f"load average {START_LOAD:.2f} at the start on {os.cpu_count()} cores "
            "(run alone: timings beside other CPU-bound jobs are not comparable)")


def publish(path: Path, lines: list[str]) -> None:
    """Write a results file from its lines (a final newline included) and print it."""
    text = "\n".join([*lines, ""])
    path.write_text(text)
    print(text)
