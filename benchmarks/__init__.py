"""The benchmark scripts, and what they share with the tests: the trained models and their
data (`benchmarks.models`) and the architecture zoo (`benchmarks.zoo`). Not part of the
installed package."""

import os
import subprocess
from pathlib import Path

#: The load average when a benchmark script started (it imports this package first).
START_LOAD = os.getloadavg()[0]


def conditions() -> str:
    """How the timings were taken, for a results file's header: the load average when the
    script started, on how many cores (timings are only comparable taken alone)."""
    return (f"load average {START_LOAD:.2f} at the start on {os.cpu_count()} cores "
            "(run alone: timings beside other CPU-bound jobs are not comparable)")


def code_revision() -> str:
    """The commit benchmark rows are measured at (``+changes`` when the code differs from it),
    so that a table resumed or merged across runs can say which row ran where."""
    root = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                              check=False).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "fxcompress", "passes", "hardware_profiles")
    return rev + ("+changes" if dirty else "")


def publish(path: Path, lines: list[str]) -> None:
    """Write a results file from its lines (a final newline included) and print it."""
    text = "\n".join([*lines, ""])
    path.write_text(text)
    print(text)
