"""A progress bar for long planner steps, on standard error, only when it is a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    """`update(done, total)` redraws one line: label, bar, count, elapsed seconds."""

    def __init__(self, label: str, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.start = time.perf_counter()

    def update(self, done: int, total: int) -> None:
        """Show `done` of `total`."""
        if not self.enabled or total <= 0:
            return
        width = 30
        filled = int(width * done / total)
        bar = "#" * filled + "-" * (width - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {elapsed:.0f}s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
