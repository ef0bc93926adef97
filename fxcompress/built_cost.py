"""What the built graph costs on the target, layer by layer.

The planner weighs candidates by their estimated savings, which interact (a pruned group
shrinks layers that int8 also shrinks); the report's "after" figures instead come from the graph
that was actually built: each layer's ops as they now are (shapes after pruning and
factorization), the format its chosen rewrite runs in, and the bytes of the tensors it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxcompress.candidates import Candidate, Step, chain_cost
from fxcompress.graph import LAYER_META, get_attr, input_arg_index, op_type, weight_arg_index
from fxcompress.hardware_profiles import Profile


@dataclass(frozen=True)
class BuiltCost:
    """One layer of the built graph: parameters, stored bytes, MACs, estimated latency (s)."""

    params: int
    stored_bytes: int
    macs: int
    latency: float


def _concrete(shape, batch: int) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else batch for d in shape)


def _attrs_behind(node: fx.Node, depth: int = 6) -> list[fx.Node]:
    """`get_attr` nodes a weight is computed from (through dequantize / unpack / gather ops)."""
    found, frontier = [], [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node):
                continue
            if n.op == "get_attr":
                found.append(n)
            elif n.op == "call_function":
                nxt.extend(a for a in n.all_input_nodes)
        frontier = nxt
    return list(dict.fromkeys(found))


def _fmt(chosen: Candidate | None, profile: Profile) -> str:
    if chosen is None or not chosen.steps:
        return profile.compute_dtype
    return chosen.steps[0].fmt


def built_costs(gm: fx.GraphModule, chosen: dict[str, Candidate], profile: Profile,
                batch: int) -> dict[str, BuiltCost]:
    """Cost of every tagged layer of `gm` on `profile`, for a batch of `batch` examples."""
    nodes: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        name = n.meta.get(LAYER_META)
        if name is not None and op_type(n) is not None:
            nodes.setdefault(name, []).append(n)
    out = {}
    for name, ops in nodes.items():
        fmt = _fmt(chosen.get(name), profile)
        params = stored = macs = 0
        latency = 0.0
        for n in ops:
            op = op_type(n)
            w = n.args[weight_arg_index(op)]
            x = n.args[input_arg_index(op)]
            wv, xv = w.meta.get("val"), getattr(x, "meta", {}).get("val")
            if not isinstance(wv, torch.Tensor) or not isinstance(xv, torch.Tensor):
                continue
            tensors = [get_attr(gm, a.target) for a in _attrs_behind(w)]
            b = n.args[2] if op != "embedding" and len(n.args) > 2 else None
            if isinstance(b, fx.Node) and b.op == "get_attr":
                tensors.append(get_attr(gm, b.target))
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            kw = {}
            if op == "conv2d":
                a = list(n.args) + [None] * (7 - len(n.args))
                kw = dict(stride=tuple(a[3] or (1, 1)), padding=a[4] or (0, 0),
                          dilation=tuple(a[5] or (1, 1)), groups=int(a[6] or 1))
                if not isinstance(kw["padding"], str):
                    kw["padding"] = tuple(kw["padding"])
            weight = torch.empty(_concrete(wv.shape, batch), device="meta")
            step = Step(op, weight, None, fmt=fmt, weight_bytes=nbytes, **kw)
            m, lat = chain_cost((step,), _concrete(xv.shape, batch), profile)
            params += weight.numel()
            stored += nbytes
            macs += m
            latency += lat
        out[name] = BuiltCost(params, stored, macs, latency)
    return out
