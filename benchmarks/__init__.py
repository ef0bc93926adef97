"""The benchmark scripts, and what they share with the tests: the trained models and their
data (`benchmarks.models`) and the architecture zoo (`benchmarks.zoo`). Not part of the
installed package."""

from pathlib import Path


def publish(path: Path, lines: list[str]) -> None:
    """Write a results file from its lines (a final newline included) and print it."""
    text = "\n".join([*lines, ""])
    path.write_text(text)
    print(text)
