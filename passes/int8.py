"""int8: per-channel symmetric int8 weights, stored as int8 in the graph.

Each weight W is stored as q = round(W / s) in [-127, 127] (int8) with one fp32 scale s per
output channel (per row of an embedding), so the serialized program holds a quarter of the
bytes. How the int8 weight is used is the profile's representation:

- ``dequant``: q is converted back to the compute dtype in the graph (q * s) and fed to the
  original op: storage shrinks, compute is unchanged.

Activation quantization (static from calibration, or dynamic per token) is simulated in the
planner exactly as the profile says the target runs it, so the error the planner measures is
the error on the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import fx

from fxcompress.candidates import Candidate, Step
from fxcompress.graph import (
    LAYER_META,
    add_buffer,
    drop_unused_attrs,
    get_attr,
    op_type,
    weight_arg_index,
)
from fxcompress.passes_infra import PassResult
from fxcompress.rewrite import call
from fxcompress.technique import ProposeContext, Technique, register

aten = torch.ops.aten
QMAX = 127


def quantize_per_channel(w: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale fp32 per slice along `axis`): symmetric, q in [-127, 127]."""
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
    scale = (amax.float() / QMAX).clamp_min(1e-12)
    shape = [1] * w.dim()
    shape[axis] = -1
    q = torch.round(w.detach().float() / scale.view(shape)).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """q * scale along `axis`, float32."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.float() * scale.view(shape)


def fake_quant_static(absmax: float):
    """Per-tensor symmetric int8 fake-quantization with a scale fixed from calibration."""
    scale = max(absmax, 1e-12) / QMAX

    def fq(x: torch.Tensor) -> torch.Tensor:
        return torch.round(x / scale).clamp(-QMAX, QMAX) * scale

    return fq


def fake_quant_dynamic(x: torch.Tensor) -> torch.Tensor:
    """Per-row (per token) symmetric int8 fake-quantization with scales from the input."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(1e-12)
    return torch.round(x / scale).clamp(-QMAX, QMAX) * scale


def _quantized_step(step: Step, profile, absmax: float | None) -> Step:
    axis = 0
    q, scale = quantize_per_channel(step.weight, axis)
    act = profile.int8_activations
    if step.op == "embedding":
        iq = None
    elif act == "static":
        iq = fake_quant_static(absmax) if absmax is not None else fake_quant_dynamic
    elif act == "dynamic":
        iq = fake_quant_dynamic
    else:
        iq = None
    return replace(step, weight=dequantize_per_channel(q, scale, axis), fmt="int8",
                   weight_bytes=q.numel() + scale.numel() * 4, input_quant=iq)


def propose(layer, base: Candidate, ctx: ProposeContext):
    """The layer with int8 weights (and activations, as the target runs them)."""
    if not ctx.profile.supports(layer.op, "int8"):
        return [], f"int8: {ctx.profile.name} does not run int8 {layer.op}"
    cand = stack(base, ctx, technique="int8")
    return [cand], None


def stack(base: Candidate, ctx: ProposeContext, technique: str | None = None,
          ) -> Candidate | None:
    """int8 on every step of another candidate's chain (e.g. both SVD factors). None over a
    shared (palettized) chain: its weights are computed from a lookup table, which the int8
    pass does not re-quantize; share offers int8 lookup-table entries itself."""
    if any(s.fmt == "shared" for s in base.steps):
        return None
    steps = []
    for i, s in enumerate(base.steps):
        absmax = ctx.stats.absmax if i == 0 else None  # later steps: dynamic estimate
        steps.append(_quantized_step(s, ctx.profile, absmax) if s.fmt != "int8" else s)
    name = technique or f"{base.technique}+int8"
    params = dict(base.params, bits=8, activations=ctx.profile.int8_activations)
    return Candidate(name, base.layer, params, tuple(steps), payload=dict(base.payload, int8=True))


@dataclass(frozen=True)
class Int8Config:
    """Which layers get int8 weights, and how they are represented."""

    layers: frozenset[str] = field(default_factory=frozenset)
    representation: str = "dequant"  # see hardware_profiles.INT8_REPRESENTATIONS


def make_config(chosen: list[Candidate]) -> Int8Config:
    """The pass config for the chosen candidates (any that carry int8)."""
    return Int8Config(frozenset(c.layer.name for c in chosen if c.payload.get("int8")))


def int8_pass(gm: fx.GraphModule, config: Int8Config) -> PassResult:
    """Store the weight of every op of each configured layer as int8 + per-channel scales."""
    modified = False
    for node in list(gm.graph.nodes):
        layer = node.meta.get(LAYER_META)
        op = op_type(node)
        if layer not in config.layers or op is None:
            continue
        wi = weight_arg_index(op)
        w_node = node.args[wi]
        if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
            continue  # already rewritten (its weight is computed)
        weight = get_attr(gm, w_node.target)
        q, scale = quantize_per_channel(weight, 0)
        qn = add_buffer(gm, f"{layer}.int8_weight", q, node)
        sn = add_buffer(gm, f"{layer}.int8_scale", scale.view([-1] + [1] * (q.dim() - 1)), node)
        g = gm.graph
        with g.inserting_before(node):
            f = call(g, aten._to_copy.default, (qn,), {"dtype": torch.float32}, layer=layer)
            deq = call(g, aten.mul.Tensor, (f, sn), layer=layer)
        args = list(node.args)
        args[wi] = deq
        node.args = tuple(args)
        modified = True
    if modified:
        drop_unused_attrs(gm)
    return PassResult(gm, modified)


TECHNIQUE = register(Technique("int8", order=90, propose=propose, make_config=make_config,
                               apply=int8_pass, stack=stack))
