"""Dependency groups for structured pruning, on the exported ATen graph.

Every output channel of a layer (conv / linear / embedding) gets a *label*, and labels are
propagated through the graph as integer tensors shaped like the values that carry them: a view,
permute, cat, split or slice of an activation is computed by running the very same op on its
label tensor. Where two labelled tensors meet element-wise (a residual `add`, a `mul`), where a
grouped conv ties its input and output channels, where a norm normalizes groups, or where a
matmul / attention contracts head dimensions, the labels that must disappear together are
unioned into one *unit*. A *group* is the set of units that share members (the layers, norms,
constants and shape constants a removal touches); every tensor the group's units reach is
recorded with its label tensor, so the pass can compute, for any set of removed units, which
positions of which axis of every tensor go, and rewrite every shape constant from that.

Nothing is guessed: an op the analysis does not know, a tensor that mixes channels (a reduction
over the channel axis, a layer norm over it), an unprunable tensor combined element-wise with
a channel axis, or a value that reaches the model's output *blocks* the units it touches, with
the reason, and the pass never removes a blocked unit.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from fxcompress.graph import LAYER_META, get_attr, input_arg_index, op_type, weight_arg_index

aten = torch.ops.aten

# Element-wise ops of one tensor (and scalars): labels pass through unchanged.
UNARY = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default,
    aten.silu_.default, aten.sigmoid.default, aten.tanh.default, aten.hardtanh.default,
    aten.hardtanh_.default, aten.hardswish.default, aten.hardswish_.default,
    aten.hardsigmoid.default, aten.leaky_relu.default, aten.elu.default, aten.mish.default,
    aten.dropout.default, aten.dropout_.default, aten.clone.default, aten.contiguous.default,
    aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.detach.default,
    aten.abs.default, aten.neg.default, aten.sqrt.default, aten.rsqrt.default,
    aten.exp.default, aten.erf.default, aten.pow.Tensor_Scalar, aten.clamp.default,
    aten.clamp_min.default, aten.clamp_max.default, aten.relu6.default, aten.square.default,
    aten.feature_dropout.default, aten.type_as.default,
}
# Element-wise ops of several tensors (broadcasting): labels of aligned elements are unioned.
BINARY = {
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul_.Tensor,
    aten.div.Tensor, aten.maximum.default, aten.minimum.default, aten.where.self,
    aten.add.Scalar, aten.mul.Scalar, aten.sub.Scalar, aten.div.Scalar,
}
# Ops that only move elements: computed on the label tensor itself.
SHAPE = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints, aten.unflatten.int,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.cat.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
}
# Ops whose list argument spells the output shape: rewritten when an output axis shrinks.
SIZE_ARG = {aten.view.default: 1, aten.reshape.default: 1, aten._unsafe_view.default: 1,
            aten.expand.default: 1}
# Pooling over the trailing spatial dims: channel labels pass through.
POOL = {aten.max_pool2d.default: 2, aten.avg_pool2d.default: 2,
        aten.adaptive_avg_pool2d.default: 2, aten.adaptive_avg_pool1d.default: 1,
        aten.max_pool1d.default: 1, aten.avg_pool1d.default: 1, aten.adaptive_max_pool2d.default: 2}
REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int}
IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int}


def _hint(s) -> int:
    if isinstance(s, torch.SymInt):
        h = s.node.hint
        if h is None:
            raise ValueError(f"no concrete hint for {s}")
        return int(h)
    return int(s)


def concrete_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape of `node`'s value on the capture's example inputs, as plain ints."""
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return tuple(_hint(s) for s in v.shape)
    return None


def reduce_labels(e: torch.Tensor) -> torch.Tensor:
    """`e` with every axis along which it is constant collapsed to size 1."""
    for a in range(e.dim()):
        if e.shape[a] > 1 and bool((e == e.narrow(a, 0, 1)).all()):
            e = e.narrow(a, 0, 1)
    return e.contiguous()


def varying_axes(e: torch.Tensor) -> list[int]:
    """Axes along which a reduced label tensor varies."""
    return [a for a in range(e.dim()) if e.shape[a] > 1]


@dataclass
class Consumer:
    """A layer that contracts a labelled axis (its input channels shrink)."""

    layer: str  # layer name (LAYER_META)
    node: str  # node name
    op: str  # "linear" | "conv2d"
    weight: str  # get_attr target of the weight
    labels: torch.Tensor  # label of each input position (weight axis 1), -1: none


@dataclass
class Producer:
    """A layer whose output channels carry fresh labels."""

    layer: str
    node: str
    op: str
    weight: str
    bias: str | None
    labels: torch.Tensor  # label of each output channel


@dataclass
class Group:
    """Channels that must be removed together, in units (one unit: a channel, a head, a conv
    group), with every tensor a removal touches."""

    name: str  # the first producer's layer name
    units: list[int]  # unit ids (union-find roots), in order of their first label
    unit_channels: list[int]  # channels of the lead producer in each unit
    blocked: dict[int, list[str]]  # unit -> why it cannot be removed
    producers: list[Producer]
    consumers: list[Consumer]
    params: list[str]  # get_attr targets that shrink

    @property
    def prunable(self) -> list[int]:
        """Indices (into `units`) of the units that may be removed."""
        return [i for i, u in enumerate(self.units) if u not in self.blocked]

    def reasons(self) -> list[str]:
        """Distinct reasons some units are blocked."""
        seen: list[str] = []
        for rs in self.blocked.values():
            for r in rs:
                if r not in seen:
                    seen.append(r)
        return seen


@dataclass
class DepGraph:
    """The result of the analysis."""

    groups: list[Group]
    find: torch.Tensor  # label -> unit id
    node_labels: dict[str, object]  # node name -> label tensor (reduced) or list for tuples
    param_labels: dict[str, dict[int, torch.Tensor]]  # get_attr target -> axis -> labels
    shapes: dict[str, tuple[int, ...]]  # node name -> concrete shape
    norm_scales: list[str] = field(default_factory=list)  # norm scale targets
    notes: list[str] = field(default_factory=list)

    def group(self, name: str) -> Group:
        """The group called `name` (KeyError if none)."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


class _UF:
    def __init__(self):
        self.parent: list[int] = []
        self.block: dict[int, list[str]] = {}

    def new(self, n: int) -> torch.Tensor:
        base = len(self.parent)
        self.parent.extend(range(base, base + n))
        return torch.arange(base, base + n)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1), b.reshape(-1)
        ok = (a >= 0) & (b >= 0) & (a != b)
        if not bool(ok.any()):
            return
        pairs = torch.unique(torch.stack([a[ok], b[ok]], 1), dim=0)
        for x, y in pairs.tolist():
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                lo, hi = min(rx, ry), max(rx, ry)
                self.parent[hi] = lo

    def union_all(self, labels: torch.Tensor) -> None:
        u = torch.unique(labels[labels >= 0])
        if u.numel() > 1:
            self.union_pairs(u[:1].expand(u.numel() - 1), u[1:])

    def blocked(self, labels: torch.Tensor, reason: str) -> None:
        for lab in torch.unique(labels[labels >= 0]).tolist():
            self.block.setdefault(lab, [])
            if reason not in self.block[lab]:
                self.block[lab].append(reason)

    def table(self) -> torch.Tensor:
        return torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)


def _desc(node: fx.Node) -> str:
    t = node.target
    name = getattr(t, "__name__", str(t))
    return f"{node.name} ({name})"


class _Analysis:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.uf = _UF()
        self.labels: dict[str, object] = {}  # node -> reduced label tensor | list | None
        self.params: dict[str, dict[int, torch.Tensor]] = {}
        self.producers: list[Producer] = []
        self.consumers: list[Consumer] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.space_of: list[int] = []  # label -> producer index
        self.norm_scales: list[str] = []  # get_attr targets of norm scales (BN gamma)
        # weights read by more than one layer node (ALBERT's one layer run N times)
        readers = Counter(n.args[weight_arg_index(op_type(n))].target
                          for n in gm.graph.nodes if op_type(n) is not None
                          and isinstance(n.args[weight_arg_index(op_type(n))], fx.Node)
                          and n.args[weight_arg_index(op_type(n))].op == "get_attr")
        self.shared = {t for t, k in readers.items() if k > 1}

    # -- helpers -------------------------------------------------------------------------
    def lab(self, a) -> torch.Tensor | None:
        if isinstance(a, fx.Node):
            v = self.labels.get(a.name)
            return v if isinstance(v, torch.Tensor) else None
        return None

    def full(self, node: fx.Node) -> torch.Tensor:
        """The node's label tensor expanded to its concrete shape (-1 where unlabelled)."""
        e = self.lab(node)
        shape = self.shapes.get(node.name) or concrete_shape(node)
        if e is None:
            return torch.full(shape, -1, dtype=torch.long)
        return e.expand(shape).contiguous()

    def block_node_inputs(self, node: fx.Node, reason: str) -> None:
        for a in node.all_input_nodes:
            e = self.labels.get(a.name)
            for t in (e if isinstance(e, list) else [e]):
                if isinstance(t, torch.Tensor):
                    self.uf.blocked(t, f"{_desc(node)}: {reason}")

    def concrete_arg(self, a):
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if isinstance(v, torch.SymInt | int):
                return _hint(v)
            return self.full(a)
        if isinstance(a, list | tuple):
            return type(a)(self.concrete_arg(x) for x in a)
        return a

    def set_out(self, node: fx.Node, e) -> None:
        if isinstance(e, torch.Tensor):
            e = reduce_labels(e)
            if not bool((e >= 0).any()):
                e = None
        self.labels[node.name] = e

    # -- the walk ------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            shp = concrete_shape(node)
            if shp is not None:
                self.shapes[node.name] = shp
            if node.op == "call_function":
                self.visit(node)
            elif node.op == "output":
                self.block_node_inputs(node, "reaches the model output, whose shape must stay")

    def visit(self, node: fx.Node) -> None:
        t = node.target
        ins = [a for a in node.all_input_nodes if self.lab(a) is not None
               or isinstance(self.labels.get(a.name), list)]
        kind = op_type(node)
        w = node.args[weight_arg_index(kind)] if kind else None
        if kind and isinstance(w, fx.Node) and w.op == "get_attr":
            return self.layer(node, kind)
        if t is operator.getitem:
            src = self.labels.get(node.args[0].name)
            self.labels[node.name] = src[node.args[1]] if isinstance(src, list) else None
            return
        if not ins:
            self.labels[node.name] = None
            return
        if t in IGNORED:
            if t is aten._assert_tensor_metadata.default and (
                    node.kwargs.get("size") is not None or node.kwargs.get("stride") is not None):
                self.block_node_inputs(node, "asserts the tensor's shape")
            self.labels[node.name] = None
            return
        if t in UNARY:
            return self.set_out(node, self.lab(node.args[0]))
        if t in BINARY:
            return self.binary(node)
        if t in SHAPE:
            return self.shape_op(node)
        if t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            return self.norm(node, params=[a for a in node.args[1:5]], tuple_out=t is not
                             aten.batch_norm.default)
        if t is aten.group_norm.default:
            return self.group_norm(node)
        if t is aten.layer_norm.default:
            return self.layer_norm(node)
        if t in POOL:
            return self.spatial(node, POOL[t])
        if t is aten.pad.default:
            return self.spatial(node, len(node.args[1]) // 2)
        if t in REDUCE:
            return self.reduce(node)
        if t in SOFTMAX:
            e = self.lab(node.args[0])
            d = node.args[1] % e.dim()
            if d in varying_axes(e):
                self.block_node_inputs(node, "normalizes over a channel axis")
                return self.set_out(node, None)
            return self.set_out(node, e)
        if t in (aten.matmul.default, aten.bmm.default):
            return self.matmul(node)
        if t is aten.scaled_dot_product_attention.default:
            return self.sdpa(node)
        self.block_node_inputs(node, "op not understood by the dependency analysis")
        self.labels[node.name] = None

    def layer(self, node: fx.Node, kind: str) -> None:
        name = node.meta.get(LAYER_META, node.name)
        wi = weight_arg_index(kind)
        w = node.args[wi]
        weight = get_attr(self.gm, w.target)
        x = node.args[input_arg_index(kind)]
        e = self.lab(x)
        groups = 1
        if kind == "conv2d":
            groups = int(node.args[6]) if len(node.args) > 6 else 1
        bias = None
        if kind != "embedding":
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bias = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None
            if isinstance(b, fx.Node) and b.op != "get_attr":
                self.block_node_inputs(node, "bias is computed, not a constant")
        n_out = weight.shape[1] if kind == "embedding" else weight.shape[0]
        out_axis = 1 if kind == "conv2d" else len(self.shapes[node.name]) - 1
        fresh = self.uf.new(n_out)
        self.space_of.extend([len(self.producers)] * n_out)
        self.producers.append(Producer(name, node.name, kind, w.target, bias, fresh))
        self.add_param(w.target, 1 if kind == "embedding" else 0, fresh)
        if bias is not None:
            self.add_param(bias, 0, fresh)
        if w.target in self.shared:
            # one weight read by several nodes shrinks once for all of them: its rows with
            # every reader's outputs, its columns with every reader's inputs. Not analysed:
            # its channels stay, and so do those of the layers feeding it
            self.uf.blocked(fresh, f"{_desc(node)}: weight shared with another layer")
            if e is not None:
                self.uf.blocked(e, f"{_desc(node)}: weight shared with another layer")
                e = None
        if e is not None:
            in_axis = 1 if kind == "conv2d" else e.dim() - 1
            if kind == "embedding" or any(a != in_axis for a in varying_axes(e)):
                self.uf.blocked(e, f"{_desc(node)}: input varies along a non-channel axis")
            elif groups == 1:
                cin = self.shapes[x.name][in_axis]
                labels = self.full(x).movedim(in_axis, 0).reshape(cin, -1)[:, 0]
                self.consumers.append(Consumer(name, node.name, kind, w.target, labels.clone()))
        if groups > 1:
            # a grouped conv ties input group g to output group g: a unit is a whole group
            cin = self.shapes[x.name][1]
            ein = self.full(x).movedim(1, 0).reshape(cin, -1)[:, 0]
            if bool((ein < 0).any()):
                self.uf.blocked(fresh, f"{_desc(node)}: grouped conv on input channels that "
                                "cannot be pruned")
            for g, (i_blk, o_blk) in enumerate(zip(ein.chunk(groups), fresh.chunk(groups),
                                                     strict=True)):
                del g
                self.uf.union_all(torch.cat([i_blk, o_blk]))
        shape = [1] * len(self.shapes[node.name])
        shape[out_axis] = n_out
        self.set_out(node, fresh.view(shape))

    def add_param(self, target: str, axis: int, labels: torch.Tensor) -> None:
        axes = self.params.setdefault(target, {})
        if axis in axes:
            self.uf.union_pairs(axes[axis], labels)
        else:
            axes[axis] = labels.clone()

    def param_member(self, node: fx.Node, p: fx.Node, e_out: torch.Tensor) -> bool:
        """Make constant `p` (combined element-wise into `e_out`) shrink with the labels;
        False when its elements do not map to one label each."""
        shape = self.shapes[p.name]
        nd = len(shape)
        if nd == 0:
            return True
        e = e_out.reshape(e_out.shape[len(e_out.shape) - nd:]) if e_out.dim() >= nd else None
        if e is None or e_out.dim() > nd and any(e_out.shape[i] > 1 for i in
                                                 range(e_out.dim() - nd)):
            return False
        var = [a for a in range(nd) if e.shape[a] > 1 and shape[a] > 1]
        if not var:
            return True
        if len(var) > 1:
            return False
        a = var[0]
        labels = e.movedim(a, 0).reshape(e.shape[a], -1)
        if not bool((labels == labels[:, :1]).all()):
            return False
        if any(e.shape[d] > 1 for d in range(nd) if d != a):
            return False
        self.add_param(p.target, a, labels[:, 0])
        return True

    def binary(self, node: fx.Node) -> None:
        out_shape = self.shapes.get(node.name)
        tensors = [a for a in node.args if isinstance(a, fx.Node)
                   and isinstance(a.meta.get("val"), torch.Tensor)]
        labelled = [a for a in tensors if self.lab(a) is not None]
        nd = len(out_shape)
        fulls = []
        for a in labelled:
            e = self.lab(a)
            e = e.reshape((1,) * (nd - e.dim()) + tuple(e.shape))
            fulls.append(e)
        red = [max(f.shape[d] for f in fulls) for d in range(nd)]
        exp = [f.expand(red) for f in fulls]
        out = exp[0].clone()
        for f in exp[1:]:
            both = (out >= 0) & (f >= 0)
            self.uf.union_pairs(out[both], f[both])
            mixed = (out >= 0) != (f >= 0)
            if bool(mixed.any()):
                self.uf.blocked(torch.cat([out[mixed], f[mixed]]),
                                f"{_desc(node)}: a channel is combined with one that cannot be "
                                "pruned")
            out = torch.where(out >= 0, out, f)
        for a in tensors:
            if self.lab(a) is not None:
                continue
            shp = self.shapes[a.name]
            full_shp = (1,) * (nd - len(shp)) + tuple(shp)
            varies = [d for d in range(nd) if red[d] > 1 and full_shp[d] > 1]
            if not varies:
                continue
            if a.op == "get_attr" and len(a.users) == 1 and self.param_member(node, a, out):
                continue
            self.uf.blocked(out, f"{_desc(node)}: combined element-wise with a tensor that "
                            "varies along the channel axis and cannot be pruned")
        self.set_out(node, out)

    def shape_op(self, node: fx.Node) -> None:
        t = node.target
        args = self.concrete_arg(node.args)
        kwargs = self.concrete_arg(dict(node.kwargs))
        x = node.args[0]
        if t is aten.cat.default:
            pass
        elif t is aten.select.int:
            e = self.lab(x)
            d = args[1] % e.dim()
            if d in varying_axes(e):
                # the selected channel's index is kept fixed: that channel stays
                self.uf.blocked(self.full(x).select(d, args[2]),
                                f"{_desc(node)}: selects one channel")
        elif t is aten.slice.Tensor:
            step = args[4] if len(args) > 4 else 1
            e = self.lab(x)
            if step != 1 and (args[1] if len(args) > 1 else 0) % e.dim() in varying_axes(e):
                self.block_node_inputs(node, "strided slice of a channel axis")
        try:
            out = t(*args, **kwargs)
        except Exception as err:  # a shape op that rejects integer tensors
            self.block_node_inputs(node, f"shape op could not be traced ({type(err).__name__})")
            self.labels[node.name] = None
            return
        if isinstance(out, list | tuple):
            self.labels[node.name] = [reduce_labels(o) if bool((o >= 0).any()) else None
                                      for o in out]
            return
        self.set_out(node, out)

    def norm(self, node: fx.Node, params: list, tuple_out: bool) -> None:
        e = self.lab(node.args[0])
        if any(a != 1 for a in varying_axes(e)):
            self.block_node_inputs(node, "norm input varies along a non-channel axis")
            self.labels[node.name] = None
            return
        c = self.shapes[node.args[0].name][1]
        labels = self.full(node.args[0]).movedim(1, 0).reshape(c, -1)[:, 0]
        for p in params:
            if isinstance(p, fx.Node) and p.op == "get_attr":
                self.add_param(p.target, 0, labels)
                if p is params[0]:
                    self.norm_scales.append(p.target)
            elif isinstance(p, fx.Node):
                self.block_node_inputs(node, "norm parameter is computed")
        self.labels[node.name] = [e, None, None] if tuple_out else reduce_labels(e)

    def group_norm(self, node: fx.Node) -> None:
        e = self.lab(node.args[0])
        groups = int(node.args[1])
        if any(a != 1 for a in varying_axes(e)):
            self.block_node_inputs(node, "norm input varies along a non-channel axis")
            self.labels[node.name] = None
            return
        c = self.shapes[node.args[0].name][1]
        labels = self.full(node.args[0]).movedim(1, 0).reshape(c, -1)[:, 0]
        for blk in labels.chunk(groups):
            if bool((blk < 0).any()):
                self.uf.blocked(blk, f"{_desc(node)}: normalizes a group holding channels that "
                                "cannot be pruned")
            self.uf.union_all(blk)
        for p in node.args[2:4]:
            if isinstance(p, fx.Node) and p.op == "get_attr":
                self.add_param(p.target, 0, labels)
        if isinstance(node.args[2], fx.Node):
            self.norm_scales.append(node.args[2].target)
        self.set_out(node, e)

    def layer_norm(self, node: fx.Node) -> None:
        e = self.lab(node.args[0])
        k = len(node.args[1])
        if any(a >= e.dim() - k for a in varying_axes(e)):
            self.block_node_inputs(node, "layer_norm normalizes over the channel axis (removing "
                                   "channels would change its mean and variance)")
            self.labels[node.name] = None
            return
        self.set_out(node, e)

    def spatial(self, node: fx.Node, k: int) -> None:
        e = self.lab(node.args[0])
        if any(a >= e.dim() - k for a in varying_axes(e)):
            self.block_node_inputs(node, "pools / pads along a channel axis")
            self.labels[node.name] = None
            return
        out_nd = len(self.shapes[node.name])
        self.set_out(node, e.reshape(tuple(e.shape[: e.dim() - k]) + (1,) * (out_nd - e.dim() + k)))

    def reduce(self, node: fx.Node) -> None:
        e = self.lab(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else None
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = list(range(e.dim())) if not dims else [d % e.dim() for d in dims]
        if any(d in varying_axes(e) for d in dims):
            self.block_node_inputs(node, "reduces over a channel axis")
            self.labels[node.name] = None
            return
        out = e
        for d in sorted(dims, reverse=True):
            out = out.narrow(d, 0, 1)
            if not keep:
                out = out.squeeze(d)
        self.set_out(node, out)

    def matmul(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        ea, eb = self.full(a), self.full(b)
        if ea.dim() < 2 or eb.dim() < 2:
            self.block_node_inputs(node, "matrix-vector product over a channel axis")
            self.labels[node.name] = None
            return
        self.set_out(node, self._contract(ea, eb, node))

    def _contract(self, ea: torch.Tensor, eb: torch.Tensor, node: fx.Node) -> torch.Tensor:
        # out[..., i, j] depends on a[..., i, :] and b[..., :, j]: removing it removes all of
        # them, so they form one unit (a head: its q, k and v channels)
        batch = torch.broadcast_shapes(ea.shape[:-2], eb.shape[:-2])
        ea = ea.expand(*batch, *ea.shape[-2:])
        eb = eb.expand(*batch, *eb.shape[-2:])
        ra = ea.max(dim=-1).values
        self.uf.union_pairs(ra.unsqueeze(-1).expand_as(ea), ea)
        cb = eb.max(dim=-2).values
        self.uf.union_pairs(cb.unsqueeze(-2).expand_as(eb), eb)
        n, m = ea.shape[-2], eb.shape[-1]
        rows = ra.unsqueeze(-1).expand(*batch, n, m)
        cols = cb.unsqueeze(-2).expand(*batch, n, m)
        self.uf.union_pairs(rows, cols)
        return torch.maximum(rows, cols)

    def sdpa(self, node: fx.Node) -> None:
        q, k, v = (self.full(a) for a in node.args[:3])
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        scores = self._contract(q, k.transpose(-1, -2), node)
        if isinstance(mask, fx.Node) and self.lab(mask) is None:
            ms = self.shapes[mask.name]
            if len(ms) >= 3 and ms[-3] > 1 and scores.shape[-3] > 1:
                self.uf.blocked(scores, f"{_desc(node)}: attention mask varies per head")
        self.set_out(node, self._contract(scores, v, node))


def analyze(gm: fx.GraphModule) -> DepGraph:
    """Dependency groups of `gm` (an ATen-level graph whose layers carry `LAYER_META`)."""
    an = _Analysis(gm)
    an.run()
    uf = an.uf
    n = len(uf.parent)
    find = uf.table() if n else torch.zeros(0, dtype=torch.long)
    _check_separable(an, find)
    blocked: dict[int, list[str]] = {}
    for lab, reasons in uf.block.items():
        r = int(find[lab])
        for why in reasons:
            blocked.setdefault(r, [])
            if why not in blocked[r]:
                blocked[r].append(why)
    # groups: producers connected through shared units
    space = torch.tensor(an.space_of, dtype=torch.long)
    gparent = list(range(len(an.producers)))

    def gfind(i):
        while gparent[i] != i:
            gparent[i] = gparent[gparent[i]]
            i = gparent[i]
        return i

    first_space: dict[int, int] = {}
    for lab in range(n):
        r = int(find[lab])
        s = int(space[lab])
        if r in first_space:
            a, b = gfind(first_space[r]), gfind(s)
            if a != b:
                gparent[max(a, b)] = min(a, b)
        else:
            first_space[r] = s
    groups: dict[int, Group] = {}
    for pi, p in enumerate(an.producers):
        gi = gfind(pi)
        if gi not in groups:
            groups[gi] = Group(p.layer, [], [], {}, [], [], [])
        groups[gi].producers.append(p)
    for g in groups.values():
        lead = g.producers[0].labels
        lead_units = find[lead]
        all_labels = torch.cat([p.labels for p in g.producers])
        units = []
        for u in find[all_labels].tolist():
            if u not in units:
                units.append(u)
        g.units = units
        g.unit_channels = [int((lead_units == u).sum()) for u in units]
        g.blocked = {u: blocked[u] for u in units if u in blocked}
    unit_group = {u: g for g in groups.values() for u in g.units}

    def groups_of(labels: torch.Tensor) -> list[Group]:
        found: list[Group] = []
        for u in torch.unique(find[labels[labels >= 0]]).tolist():
            g = unit_group.get(u)
            if g is not None and all(g is not f for f in found):
                found.append(g)
        return found

    for c in an.consumers:
        for g in groups_of(c.labels):
            g.consumers.append(c)
    for t, axes in an.params.items():
        for g in groups_of(torch.cat([e.reshape(-1) for e in axes.values()])):
            g.params.append(t)
    return DepGraph(list(groups.values()), find, an.labels, an.params, an.shapes,
                    an.norm_scales)


def _check_separable(an: _Analysis, find: torch.Tensor) -> None:
    """Block every unit that some tensor holds in a position it shares with another unit or
    with unprunable values: removing that unit would need to cut part of a position."""
    if find.numel() == 0:
        return
    values: list[tuple[str, torch.Tensor]] = []
    for name, e in an.labels.items():
        for t in (e if isinstance(e, list) else [e]):
            if isinstance(t, torch.Tensor):
                values.append((name, t))
    for target, axes in an.params.items():
        for ax, lab in axes.items():
            shape = [1] * (max(axes) + 1)
            shape[ax] = lab.numel()
            values.append((target, lab.view(shape)))
    for name, e in values:
        cls = torch.where(e >= 0, find[e.clamp_min(0)], torch.full_like(e, -1))
        covered = torch.zeros(e.shape, dtype=torch.bool)
        for a in varying_axes(e):
            clean = clean_positions(cls, a)
            shape = [1] * e.dim()
            shape[a] = -1
            covered |= clean.view(shape) == cls
        bad = (cls >= 0) & ~covered
        if bool(bad.any()):
            an.uf.blocked(e[bad], f"{name}: a channel shares a position with others along "
                          "every axis (cannot be cut out)")


def clean_positions(cls: torch.Tensor, axis: int) -> torch.Tensor:
    """Per position along `axis`: its unit if every element there belongs to that one unit,
    else -2."""
    moved = cls.movedim(axis, 0).reshape(cls.shape[axis], -1)
    first = moved[:, 0]
    ok = (moved == first[:, None]).all(dim=1) & (first >= 0)
    return torch.where(ok, first, torch.full_like(first, -2))
