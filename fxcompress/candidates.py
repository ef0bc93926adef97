"""Candidates: one possible rewrite of one layer, as the planner weighs it.

A candidate says what a layer becomes as a *chain* of steps (SVD: two linears; Tucker: three
convs; int8: the same op with an int8 weight), each step with the effective weight it computes
with, the bytes it stores, and the format it runs in on the target. From the chain the planner
gets the candidate's cost on the profile (roofline latency, stored bytes, MACs) and its
simulation (a node override evaluated on the original graph), so every technique is weighed with
the same cost model and the same error measurement. Techniques stack by rewriting the steps of
another candidate's chain (int8 on the two factors of an SVD).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from fxcompress.graph import Layer, input_arg_index
from fxcompress.hardware_profiles import BYTES_PER_ELEMENT, FLOAT_FORMATS, Profile

aten = torch.ops.aten


@dataclass(frozen=True)
class Step:
    """One op of a rewritten layer."""

    op: str  # "linear" | "conv2d" | "embedding"
    weight: torch.Tensor  # the effective (dequantized / decoded) weight it computes with
    bias: torch.Tensor | None = None
    stride: tuple = (1, 1)
    padding: Any = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    fmt: str = "fp32"  # format on the target: "fp32", "fp16", "int8", "binary", "shared"
    weight_bytes: int | None = None  # bytes stored; None: numel x 4 (fp32)
    input_quant: Callable[[torch.Tensor], torch.Tensor] | None = None  # activation fake-quant
    extra_ops: int = 0  # ops the rewrite adds beside the layer op (decode, rescale, gather)
    # where set, the step is compact: `weight` is a meta tensor (the effective weight's shape
    # and dtype, no values) and `decode()` computes the values from what the step keeps (its
    # integer codes and scales), each time they are read (`dense`). A layer's candidates then
    # hold a byte per weight each rather than a float copy (see `compact`)
    decode: Callable[[], torch.Tensor] | None = None
    # working memory the step needs while it runs, beside its input and output (a weight the
    # program unpacks to int8 before the layer, with the unpacking's intermediates)
    scratch_bytes: int = 0

    def __post_init__(self) -> None:
        # a step given real weight values (`replace(step, weight=w)` of a compact one) is dense
        if self.decode is not None and self.weight.device.type != "meta":
            object.__setattr__(self, "decode", None)

    def dense(self) -> torch.Tensor:
        """The effective weight's values (decoded from the codes of a compact step)."""
        return self.weight if self.decode is None else self.decode()

    @property
    def stored_bytes(self) -> int:
        """Bytes this step stores (weight and bias)."""
        w = self.weight.numel() * 4 if self.weight_bytes is None else self.weight_bytes
        return w + (0 if self.bias is None else self.bias.numel() * 4)

    @property
    def params(self) -> int:
        """Parameter count (weight and bias elements)."""
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel())

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Compute this step on `x`."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        w = self.dense()
        if self.op == "linear":
            return F.linear(x, w, self.bias)
        if self.op == "conv2d":
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        return F.embedding(x, w)


def compact(step: Step, decode: Callable[[], torch.Tensor], like: torch.Tensor, **changes
            ) -> Step:
    """`step` made compact (see `Step.decode`): its weight the values `decode()` gives, of the
    shape and dtype of `like`, kept as what `decode` holds. `changes`: other fields to replace,
    as `dataclasses.replace` takes them."""
    return replace(step, weight=torch.empty(like.shape, dtype=like.dtype, device="meta"),
                   decode=decode, **changes)


def step_of_layer(layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None) -> Step:
    """The layer as it is, as a one-step chain."""
    return Step(layer.op, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@dataclass(frozen=True)
class Shapes:
    """Input / output shapes of a layer on the batch that latency is estimated for."""

    inp: tuple[int, ...]
    out: tuple[int, ...]


def step_macs(step: Step, inp: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """MACs of `step` on an input of shape `inp`, and its output shape."""
    w = step.weight.shape
    if step.op == "linear":
        rows = math.prod(inp[:-1])
        return rows * w[0] * w[1], (*inp[:-1], w[0])
    if step.op == "embedding":
        return 0, (*inp, w[1])
    n, _, h, wd = inp
    kh, kw = w[2], w[3]
    if isinstance(step.padding, str):
        oh, ow = (h, wd) if step.padding == "same" else (
            (h - step.dilation[0] * (kh - 1) - 1) // step.stride[0] + 1,
            (wd - step.dilation[1] * (kw - 1) - 1) // step.stride[1] + 1)
    else:
        oh = (h + 2 * step.padding[0] - step.dilation[0] * (kh - 1) - 1) // step.stride[0] + 1
        ow = (wd + 2 * step.padding[1] - step.dilation[1] * (kw - 1) - 1) // step.stride[1] + 1
    return n * w[0] * oh * ow * w[1] * kh * kw, (n, w[0], oh, ow)


def chain_cost(steps: tuple[Step, ...], inp: tuple[int, ...], profile: Profile,
               ) -> tuple[int, float]:
    """(MACs, estimated latency in seconds) of a chain on `profile`."""
    macs_total, latency, shape = 0, 0.0, inp
    for s in steps:
        macs, out = step_macs(s, shape)
        act = BYTES_PER_ELEMENT.get(profile.precision_of(s.fmt), 4)
        act_bytes = (math.prod(shape) + math.prod(out)) * act
        wbytes = s.stored_bytes
        if s.op == "embedding":
            # a gather reads the rows it looks up, not the table: at most one row per index
            wbytes *= min(1.0, math.prod(shape) / s.weight.shape[0])
        if s.fmt not in FLOAT_FORMATS and profile.precision_of(s.fmt) == profile.compute_dtype \
                and not profile.weight_only_speedup:
            # weight-only, decoded in the graph: the decode is its own ops (convert, scale /
            # look up) that read the stored weight and write a full-width copy, which the
            # kernel then reads. Measured on an H100: ignoring this made weight-only int8 look
            # free while it ran 1.4x slower in eager.
            decoded = s.weight.numel() * BYTES_PER_ELEMENT[profile.compute_dtype]
            latency += profile.latency(0, wbytes + decoded, 0, profile.compute_dtype, n_ops=2)
            wbytes = decoded
        latency += profile.latency(macs, wbytes, act_bytes, s.fmt)
        if s.extra_ops and profile.fuses_elementwise:
            # fused into the step's kernel: its output is written once, at full width
            wide = math.prod(out) * (BYTES_PER_ELEMENT[profile.compute_dtype] - act)
            latency += profile.latency(0, 0, max(0, wide), profile.compute_dtype, n_ops=0)
        elif s.extra_ops:
            out_bytes = math.prod(out) * BYTES_PER_ELEMENT[profile.compute_dtype]
            latency += profile.latency(0, 0, 2 * out_bytes, profile.compute_dtype,
                                       n_ops=s.extra_ops)
        macs_total += macs
        shape = out
    return macs_total, latency


@dataclass
class Candidate:
    """One way to rewrite one layer, with its cost on the target and (once measured) its
    error."""

    technique: str  # the stack of techniques, innermost first, e.g. "svd", "svd+int8"
    layer: Layer
    params: dict[str, Any]  # rank / bits / clusters / kept channels ...
    steps: tuple[Step, ...]
    # what each technique of the stack needs to build it: technique name -> that technique's
    # own typed (frozen dataclass) part, e.g. the SVD factors, the int8 qparams
    parts: dict[str, Any] = field(default_factory=dict)
    macs: int = 0
    latency: float = 0.0
    error: float | None = None  # measured relative output error, this candidate alone
    overrides: dict[str, Callable] | None = None  # custom simulation (else: from the steps)
    # layers whose weight shapes this rewrite changes besides its own (a pruned group)
    touches: frozenset[str] = frozenset()
    # bytes the rewrite adds to a serialized program besides its weights (its ops' and
    # tensors' records), where the graph is a sizeable part of the file: measured per kind of
    # rewrite by `planner.charge_program_bytes`, counted by the size objective
    program_bytes: int = 0

    @property
    def techniques(self) -> list[str]:
        """The names of the stack's techniques, innermost first (none for the unchanged
        layer)."""
        return [t for t in self.technique.split("+") if t != "none"]

    def uses(self, technique: str) -> bool:
        """Whether `technique` is part of this candidate's stack."""
        return technique in self.techniques

    def part(self, technique: str) -> Any:
        """`technique`'s part of this candidate (None if it has none)."""
        return self.parts.get(technique)

    def with_part(self, technique: str, part: Any) -> Candidate:
        """This candidate with `technique`'s part replaced."""
        return replace(self, parts={**self.parts, technique: part})

    @property
    def stored_bytes(self) -> int:
        """Bytes of weights stored after the rewrite."""
        return sum(s.stored_bytes for s in self.steps)

    def same_rewrite(self, other: Candidate) -> bool:
        """Whether `other` is this rewrite (the same layer, techniques and parameters), with
        values perhaps re-fitted or trained since."""
        return other is self or (other.layer.name == self.layer.name
                                 and other.technique == self.technique
                                 and other.params == self.params)

    @property
    def param_count(self) -> int:
        """Parameters after the rewrite."""
        return sum(s.params for s in self.steps)

    def costed(self, inp: tuple[int, ...], profile: Profile) -> Candidate:
        """This candidate with MACs and latency filled in for input shape `inp`."""
        macs, lat = chain_cost(self.steps, inp, profile)
        return replace(self, macs=macs, latency=lat)

    def simulation(self) -> dict[str, Callable]:
        """Node overrides that make the original graph compute this candidate."""
        if self.overrides is not None:
            return self.overrides
        steps = self.steps

        # aten.embedding(weight, indices): the layer's input is its second argument
        inp = input_arg_index(self.layer.op)

        def run(args, kwargs):
            x = args[inp]
            for s in steps:
                x = s.run(x)
            return x

        return {self.layer.node: run}

    def describe(self) -> str:
        """Short text: technique and its parameters."""
        if not self.params:
            return self.technique
        inner = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.technique}({inner})"
