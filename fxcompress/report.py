"""The report: what was done to every layer and why, and what it cost.

`str(report)` is a table; `report.to_dict()` is plain JSON-able data; `Report.from_dict`
reads it back (the command line's `report` reads it from a saved program).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

#: `GraphModule.meta` key of the `Report` of a compiled model.
REPORT_KEY = "fxcompress_report"


@dataclass
class CandidateReport:
    """One rewrite the planner considered for a layer."""

    rewrite: str  # e.g. "svd(rank=32, aware=True)"
    gain: float  # estimated saving on the objective (seconds or bytes)
    error: float | None  # measured relative output error, this rewrite alone
    verdict: str  # "chosen", or why it lost


@dataclass
class LayerReport:
    """What happened to one layer."""

    name: str
    op: str
    weight_shape: list[int]
    input_shape: list[int]
    output_shape: list[int]
    applied: str  # the rewrite applied, or "none"
    params: dict[str, Any]  # rank / bits / clusters / kept channels of the applied rewrite
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    macs_before: int
    macs_after: int
    latency_before_us: float  # estimated on the profile
    latency_after_us: float
    error: float | None  # measured relative output error the applied rewrite introduces alone
    reason: str  # why it was chosen, or why the layer was left alone
    candidates: list[CandidateReport] = field(default_factory=list)


@dataclass
class Report:
    """The compile report: per layer, and totals."""

    profile: str
    objective: str
    tolerance: float
    metric: str  # "relative output error" or "evaluate() drop"
    seed: int
    layers: list[LayerReport]
    serialized_bytes_before: int
    serialized_bytes_after: int
    macs_before: int
    macs_after: int
    latency_before_us: float
    latency_after_us: float
    error: float  # end-to-end relative output error on the data plans are judged on
    score_before: float | None = None  # evaluate() of the original, when given
    score_after: float | None = None
    accepted_on: str = ""  # what the tolerance was judged on (see fxcompress.acceptance)
    error_interval: list[float] | None = None  # bootstrap interval of `error` [low, high]
    drop: float | None = None  # evaluate()'s drop as judged (per-example mean or as measured)
    drop_interval: list[float] | None = None  # its paired-bootstrap interval [low, high]
    dynamic_batch: bool = True
    compile_seconds: float = 0.0
    #: where the compile time went: capture, calibration, propose (candidate fitting),
    #: measure (candidate errors and costs), select (building and judging plans), recover,
    #: export (the original's and the result's programs); shared steps count in every model
    #: of a sweep
    phase_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, numbers, strings)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from `to_dict()` output."""
        d = dict(data)
        layers = []
        for lay in d.pop("layers"):
            lay = dict(lay)
            lay["candidates"] = [CandidateReport(**c) for c in lay.get("candidates", [])]
            layers.append(LayerReport(**lay))
        return cls(layers=layers, **d)

    def __str__(self) -> str:
        head = ["layer", "op", "applied", "params", "bytes", "est. µs", "error", "why"]
        rows = []
        for lay in self.layers:
            err = "" if lay.error is None else f"{lay.error:.4f}"
            rows.append([
                lay.name, lay.op, lay.applied,
                f"{_n(lay.params_before)}→{_n(lay.params_after)}",
                f"{_n(lay.bytes_before)}→{_n(lay.bytes_after)}",
                f"{lay.latency_before_us:.1f}→{lay.latency_after_us:.1f}", err, lay.reason])
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        widths[-1] = min(widths[-1], 70)
        line = lambda r: "  ".join(str(c)[:widths[i]].ljust(widths[i]) for i, c in enumerate(r))
        out = [f"fxcompress report — profile {self.profile}, objective {self.objective}, "
               f"tolerance {self.tolerance:g} ({self.metric}), seed {self.seed}",
               line(head), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        ratio = self.serialized_bytes_after / max(self.serialized_bytes_before, 1)
        out.append("")
        out.append(f"serialized size  {_n(self.serialized_bytes_before)}B → "
                   f"{_n(self.serialized_bytes_after)}B  ({ratio:.3f}×)")
        out.append(f"MACs             {_n(self.macs_before)} → {_n(self.macs_after)}")
        out.append(f"est. latency     {self.latency_before_us:.1f} µs → "
                   f"{self.latency_after_us:.1f} µs (layers, on {self.profile})")
        interval = lambda iv: "" if not iv else f", 90% interval {iv[0]:.5f} to {iv[1]:.5f}"
        out.append(f"measured error   {self.error:.5f} (relative output error"
                   f"{interval(self.error_interval)})")
        if self.score_before is not None:
            out.append(f"evaluate()       {self.score_before:.4f} → {self.score_after:.4f}"
                       + ("" if self.drop is None else f" (drop {self.drop:.4f}"
                          f"{interval(self.drop_interval)})"))
        if self.accepted_on:
            out.append(f"judged on        {self.accepted_on}")
        out.append(f"batch dimension  {'dynamic' if self.dynamic_batch else 'static'}")
        out.append(f"compile time     {self.compile_seconds:.1f} s"
                   + ("" if not self.phase_seconds else " (" + ", ".join(
                       f"{k} {v:.1f}" for k, v in self.phase_seconds.items()) + ")"))
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def _n(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(int(x))
