"""Helpers over the one IR: the ATen-level FX `GraphModule` that `ep.module()` returns.

A *layer* is a `linear`, `conv2d` or `embedding` node whose weight is a `get_attr` of the
module. Layers are named by their weight's attribute path without `.weight` (the module path a
user knows, e.g. `encoder.layer.0.attention.self.query`), and every node a pass creates for a
layer carries that name in `node.meta["fxcompress_layer"]`, so passes that run later (int8 after
SVD, say) find the pieces of a layer that an earlier pass rewrote.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten
LAYER_META = "fxcompress_layer"

LINEAR_OPS = (aten.linear.default,)
CONV_OPS = (aten.conv2d.default, aten.conv2d.padding)
EMBEDDING_OPS = (aten.embedding.default,)


def op_type(node: fx.Node) -> str | None:
    """"linear", "conv2d" or "embedding" for a layer node, else None."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_OPS:
        return "linear"
    if node.target in CONV_OPS:
        return "conv2d"
    if node.target in EMBEDDING_OPS:
        return "embedding"
    return None


def weight_arg_index(op: str) -> int:
    """Position of the weight among a layer node's args."""
    return 0 if op == "embedding" else 1


def input_arg_index(op: str) -> int:
    """Position of the layer's input among a layer node's args (aten.embedding(weight, ids))."""
    return 1 if op == "embedding" else 0


def get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a `get_attr` target names."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def add_buffer(gm: fx.GraphModule, name_hint: str, value: torch.Tensor,
               before: fx.Node) -> fx.Node:
    """Register `value` as a new buffer of `gm` and return a `get_attr` node for it, inserted
    before `before`. The name is made unique; dots in the hint become underscores so the buffer
    sits on the root module."""
    base = name_hint.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach().clone().contiguous())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = _fake_like(before, value)
    return node


def fake_mode_of(graph: fx.Graph):
    """The fake-tensor mode the graph's `meta["val"]` tensors live in, or None."""
    for n in graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


def _fake_like(anchor: fx.Node, value: torch.Tensor):
    """A meta['val'] for a new constant: a fake tensor from the graph's fake mode if it has
    one, else the real tensor's meta twin."""
    mode = fake_mode_of(anchor.graph)
    if mode is not None:
        with mode:
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


def first_user_order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Topological position of every node (for stable, deterministic ordering)."""
    return {n: i for i, n in enumerate(gm.graph.nodes)}


@dataclass(frozen=True)
class Layer:
    """One compressible layer of the graph, as the planner sees it."""

    name: str  # module path of the weight, e.g. "features.0"
    node: str  # the FX node's name in the base graph
    op: str  # "linear" | "conv2d" | "embedding"
    weight_target: str  # get_attr target of the weight
    bias_target: str | None  # get_attr target of the bias, if any
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    shared_with: tuple[str, ...] = ()  # other nodes reading the same weight

    @property
    def out_features(self) -> int:
        """Output channels / features (embedding: the embedding width)."""
        return self.weight_shape[1] if self.op == "embedding" else self.weight_shape[0]

    @property
    def weight_numel(self) -> int:
        """Number of weight elements."""
        return math.prod(self.weight_shape)


def _pair(v, default) -> tuple:
    if v is None:
        return default
    if isinstance(v, str):
        return v
    v = tuple(v)
    return v * 2 if len(v) == 1 else v


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    """Every linear / conv2d / embedding node whose weight is a `get_attr`, in graph order, and
    tag each node with its layer name in `meta[LAYER_META]`."""
    readers: dict[str, list[fx.Node]] = {}
    candidates = []
    for node in gm.graph.nodes:
        op = op_type(node)
        if op is None:
            continue
        w = node.args[weight_arg_index(op)]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        readers.setdefault(w.target, []).append(node)
        candidates.append((node, op, w))
    layers = []
    for node, op, w in candidates:
        name = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
        if op == "embedding":
            b_target = None
        else:
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            b_target = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None
        kw = {}
        if op == "conv2d":
            a = list(node.args) + [None] * (7 - len(node.args))
            kw = dict(stride=_pair(a[3], (1, 1)), padding=_pair(a[4], (0, 0)),
                      dilation=_pair(a[5], (1, 1)), groups=int(a[6] or 1))
        others = tuple(n.name for n in readers[w.target] if n is not node)
        layer = Layer(name=name if not others else f"{name}@{node.name}", node=node.name, op=op,
                      weight_target=w.target, bias_target=b_target,
                      weight_shape=tuple(get_attr(gm, w.target).shape), shared_with=others, **kw)
        node.meta[LAYER_META] = layer.name
        layers.append(layer)
    return layers


def nodes_of_layer(gm: fx.GraphModule, layer: str, ops: Iterable = ()) -> list[fx.Node]:
    """Nodes tagged with `layer`, optionally only those whose op type is in `ops`."""
    ops = tuple(ops)
    return [n for n in gm.graph.nodes
            if n.meta.get(LAYER_META) == layer and (not ops or op_type(n) in ops)]


def node_by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node called `name` (KeyError if there is none)."""
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Remove dead `get_attr` nodes and the parameters / buffers no node reads any more, so the
    serialized program holds only what runs."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        owner, _, attr = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        mod._parameters.pop(attr, None)
        mod._buffers.pop(attr, None)


def linear_from_matmul(gm: fx.GraphModule) -> list[str]:
    """Rewrite matrix products with a 2-D weight as the `linear` they compute, so they become
    layers every technique knows: `addmm(b, x, W)`, `mm(x, W)` and `matmul(x, W)` (GPT-2's
    `Conv1D` stores its weight transposed), whose `W` is then stored transposed under its own
    name, and `matmul(x, Wᵀ)` / `mm(x, Wᵀ)` through a transpose op (Falcon's `x @ W.T`),
    which reads `W` as it is. Only weights that no other node reads. The same sums in another
    layout: outputs agree to float rounding. Returns the rewritten weights' names."""
    readers: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, []).extend(node.users)
    done = []
    for target, users in readers.items():
        w = get_attr(gm, target)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point() \
                or not users:
            continue
        if all(_matmul_weight(u, target) for u in users):
            _store_transposed(gm, target, w)
            for u in users:
                _to_linear(gm, u, u.args[1] if u.target is not aten.addmm.default
                           else u.args[2])
        elif all(_is_transpose(u) and u.users and all(_matmul_weight(v, u) for v in u.users)
                 for u in users):
            for u in users:
                for v in list(u.users):
                    _to_linear(gm, v, u.args[0])
                gm.graph.erase_node(u)
        else:
            continue
        done.append(target)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _store_transposed(gm: fx.GraphModule, target: str, w: torch.Tensor) -> None:
    owner, _, attr = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    t = w.detach().t().contiguous()
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=w.requires_grad)
    else:
        mod._buffers[attr] = t
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            n.meta["val"] = _fake_like(n, t)


def _to_linear(gm: fx.GraphModule, node: fx.Node, weight: fx.Node) -> None:
    """Replace matrix-product `node` by `linear(x, weight, bias)`."""
    if node.target is aten.addmm.default:
        bias, x = node.args[:2]
    else:
        bias, x = None, node.args[0]
    with gm.graph.inserting_before(node):
        lin = gm.graph.call_function(aten.linear.default, (x, weight, bias))
    lin.meta.update(node.meta)
    node.replace_all_uses_with(lin)
    gm.graph.erase_node(node)


_TRANSPOSES = (aten.numpy_T.default, aten.t.default)


def _is_transpose(node: fx.Node) -> bool:
    """A node giving the transpose of its 2-D input (`.T`, `t`, `transpose(0, 1)`,
    `permute([1, 0])`)."""
    if node.op != "call_function":
        return False
    if node.target in _TRANSPOSES:
        return True
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    if node.target is aten.permute.default:
        return [d % 2 for d in node.args[1]] == [1, 0]
    return False


def _matmul_weight(node: fx.Node, w) -> bool:
    """Whether `node` is `addmm(b, x, W)` (1-D bias), `mm(x, W)` or `matmul(x, W)` with `W`
    (a get_attr target name, or a node) only as its second matrix and plain arguments."""
    if node.op != "call_function" or node.kwargs:
        return False
    is_w = (lambda a: isinstance(a, fx.Node) and a.op == "get_attr" and a.target == w) \
        if isinstance(w, str) else (lambda a: a is w)
    if node.target is aten.addmm.default and len(node.args) == 3:
        b, x, m = node.args
        bias = b.meta.get("val") if isinstance(b, fx.Node) else None
        return isinstance(bias, torch.Tensor) and bias.dim() == 1 and is_w(m) \
            and not is_w(x) and not is_w(b)
    if node.target in (aten.mm.default, aten.matmul.default) and len(node.args) == 2:
        x, m = node.args
        xv = x.meta.get("val") if isinstance(x, fx.Node) else None
        return is_w(m) and not is_w(x) and isinstance(xv, torch.Tensor) and xv.dim() >= 1
    return False


def is_getitem(node: fx.Node) -> bool:
    """Whether `node` is `operator.getitem` (tuple unpacking in the graph)."""
    return node.op == "call_function" and node.target is operator.getitem
