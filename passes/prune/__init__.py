"""prune: structured filter pruning over dependency groups, channels physically removed.

The dependency analysis (`depgraph.py`) splits the graph's channels into groups of
units that must go together (a residual stream, a concat's inputs, an attention layer's heads,
an FFN's neurons). Removing units shrinks every tensor that carries them: producer weights and
biases, norm parameters, layer-scale constants, consumer weights' input axis, the `groups` of
grouped convs, `num_groups` of group norms, and the shape constants of `view` / `reshape` /
`expand`, `slice` bounds and `split` sizes. Model inputs and outputs keep their shapes, and a
unit the analysis blocked is never removed.

Importance of a unit is summed over its whole group: L1 / L2 weight magnitude of every member,
BN scale, or activation-based (the calibration RMS of the channel at each consumer times the
norm of the consumer weights that read it). After removal, each consumer's weights are re-fit
by least squares on the calibration second moment of its input (W' = W G[:, K] G[K, K]^-1),
so the consumer's output stays as close as the kept channels allow without fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from fxcompress.candidates import Candidate, Step, chain_cost, step_of_layer
from fxcompress.graph import Layer, _fake_like, get_attr, node_by_name
from fxcompress.passes.prune.depgraph import (
    DepGraph,
    Group,
    analyze,
    clean_positions,
    varying_axes,
)
from fxcompress.passes_infra import PassResult
from fxcompress.rewrite import set_val
from fxcompress.technique import (
    GroupContext,
    Regroup,
    Technique,
    checked_numbers,
    register,
)

aten = torch.ops.aten
IMPORTANCE = ("l1", "l2", "bn_scale", "activation")


@dataclass(frozen=True)
class PruneConfig:
    """Which units of which dependency groups to remove, and how to compensate."""

    # group name -> indices into the group's units (Group.units) to remove
    remove: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # consumer layer name -> second moment of its input (in-features x in-features, float64)
    # over the calibration data; a consumer listed here is re-fit by least squares
    grams: Mapping[str, torch.Tensor] = field(default_factory=dict)
    damp: float = 1e-3  # ridge added to G[K, K], relative to its mean diagonal
    # the dependency analysis the planner made of the captured graph (node names only, so it
    # holds for any copy of that graph); None: analyze the graph the pass is given
    analysis: DepGraph | None = None

    def graph_analysis(self, gm: fx.GraphModule) -> DepGraph:
        """The planner's analysis where it describes `gm`'s nodes, else `gm` analyzed."""
        if self.analysis is not None and set(self.analysis.shapes) <= {
                n.name for n in gm.graph.nodes}:
            return self.analysis
        return analyze(gm)


@dataclass(frozen=True)
class PruneSettings:
    """prune's settings; `compile(overrides={"*": {"prune": {...}}})` changes them."""

    #: shares of a group's units each candidate removes (rounded to the channel alignment)
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)

    def __post_init__(self):
        checked_numbers(self, "ratios", lambda r: 0 < r < 1,
                        "a non-empty list of shares in (0, 1)")


@dataclass(frozen=True)
class PrunePart:
    """What the prune pass needs to build a group candidate."""

    group: str  # the dependency group's name
    remove: tuple[int, ...]  # indices into the group's units to remove
    grams: Mapping[str, torch.Tensor]  # consumer layer -> input second moment (re-fit)
    analysis: DepGraph | None = None  # the planner's analysis of the captured graph


# --- importance -------------------------------------------------------------------------------
def _per_unit(dg: DepGraph, group: Group, labels: torch.Tensor, values: torch.Tensor,
              out: torch.Tensor) -> None:
    index = {u: i for i, u in enumerate(group.units)}
    for lab, v in zip(labels.tolist(), values.tolist(), strict=True):
        if lab >= 0:
            i = index.get(int(dg.find[lab]))
            if i is not None:
                out[i] += v


def _slices(t: torch.Tensor, axis: int, fn) -> torch.Tensor:
    return fn(t.detach().double().movedim(axis, 0).reshape(t.shape[axis], -1))


def unit_importance(gm: fx.GraphModule, dg: DepGraph, group: Group, kind: str = "l2",
                    stats: Mapping | None = None) -> torch.Tensor:
    """Importance of each unit of `group` (higher: keep), float64, one per `group.units`.

    kind: "l1" / "l2" (weight magnitude summed over every member of the group: producers'
    output slices, consumers' input columns, norm and constant slices), "bn_scale" (|gamma|
    of the group's norms; L2 where the group has none), "activation" (calibration RMS of the
    channel at each consumer times the L2 norm of the consumer's weights reading it; needs
    `stats`, the calibration's per-layer statistics keyed by node name)."""
    out = torch.zeros(len(group.units), dtype=torch.float64)
    if kind == "bn_scale":
        scales = [t for t in group.params if t in dg.norm_scales]
        if scales:
            for t in scales:
                _per_unit(dg, group, dg.param_labels[t][0], get_attr(gm, t).detach().abs(), out)
            return out
        kind = "l2"
    if kind == "activation":
        used = False
        for c in group.consumers:
            st = (stats or {}).get(c.node)
            cov = None if st is None else st.covariance
            if cov is None or cov.shape[0] != c.labels.numel():
                continue
            w = get_attr(gm, c.weight)
            rms = cov.diagonal().clamp_min(0).sqrt()
            col = _slices(w, 1, lambda m: (m ** 2).sum(1).sqrt())
            _per_unit(dg, group, c.labels, rms * col, out)
            used = True
        if used:
            return out
        kind = "l2"
    if kind not in ("l1", "l2"):
        raise ValueError(f"unknown importance {kind!r}; use one of {IMPORTANCE}")
    fn = (lambda m: m.abs().sum(1)) if kind == "l1" else (lambda m: (m ** 2).sum(1))
    for t in group.params:
        for axis, labels in dg.param_labels[t].items():
            _per_unit(dg, group, labels, _slices(get_attr(gm, t), axis, fn), out)
    for c in group.consumers:
        _per_unit(dg, group, c.labels, _slices(get_attr(gm, c.weight), 1, fn), out)
    return out.sqrt() if kind == "l2" else out


def units_to_remove(group: Group, importance: torch.Tensor, count: int) -> tuple[int, ...]:
    """The `count` least important prunable units (ties: the later unit goes first)."""
    cand = group.prunable
    order = sorted(cand, key=lambda i: (float(importance[i]), -i))
    return tuple(sorted(order[:count]))


def aligned_removals(group: Group, ratio: float, align: int) -> int:
    """How many units to remove for `ratio` of the group, keeping the lead producer's channel
    count a multiple of `align` where the unit size allows, and at least one unit."""
    n = len(group.units)
    per = max(group.unit_channels[0], 1) if len(set(group.unit_channels)) == 1 else 1
    step = align // math.gcd(align, per)
    keep = max(1, n - int(round(ratio * n)))
    keep = min(n, int(math.ceil(keep / step)) * step)
    return max(0, min(n - keep, len(group.prunable), n - 1))


# --- the pass ---------------------------------------------------------------------------------
def _keep_mask(dg: DepGraph, e: torch.Tensor, axis: int, size: int, removed: torch.Tensor,
               ) -> torch.Tensor:
    if e.dim() <= axis or e.shape[axis] == 1:
        return torch.ones(size, dtype=torch.bool)
    cls = torch.where(e >= 0, dg.find[e.clamp_min(0)], torch.full_like(e, -1))
    return ~torch.isin(clean_positions(cls, axis), removed)


def _param_keep(dg: DepGraph, labels: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    cls = torch.where(labels >= 0, dg.find[labels.clamp_min(0)], torch.full_like(labels, -1))
    return ~torch.isin(cls, removed)


def _refit(w: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor | None,
           damp: float) -> torch.Tensor:
    """Consumer weight with input columns `keep` only; re-fit by least squares when `gram`
    (input second moment) is given: argmin_W' E||W x - W' x_K||^2 = W G[:, K] G[K, K]^-1."""
    if gram is None or gram.shape[0] != keep.numel():
        return w.detach()[:, keep].clone()
    g = gram.double()
    energy = g.diagonal().clamp_min(0)
    if float(energy[~keep].sum()) <= 1e-12 * float(energy.sum()):
        # the removed channels carry nothing (dead): plain removal is already exact
        return w.detach()[:, keep].clone()
    gkk = g[keep][:, keep]
    eps = damp * float(gkk.diagonal().mean().clamp_min(1e-30))
    gkk = gkk + eps * torch.eye(gkk.shape[0], dtype=g.dtype)
    proj = torch.linalg.solve(gkk, g[keep]).T  # (C, K): G[:, K] G[K, K]^-1
    wd = w.detach().double()
    if wd.dim() == 2:
        return (wd @ proj).to(w.dtype)
    # conv: the same channel-wise projection for every kernel tap
    return torch.einsum("oihw,ik->okhw", wd, proj).to(w.dtype).contiguous()


def _set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value.contiguous(), requires_grad=False)
    else:
        owner._buffers[attr] = value.contiguous()


def removed_units(dg: DepGraph, config: PruneConfig) -> torch.Tensor:
    """Unit ids the config removes; ValueError for an unknown group or a blocked unit."""
    ids = []
    for name, idx in config.remove.items():
        g = dg.group(name)
        for i in idx:
            u = g.units[i]
            if u in g.blocked:
                raise ValueError(f"unit {i} of group {name} is blocked: {g.blocked[u]}")
            ids.append(u)
        if len(set(idx)) >= len(g.units):
            raise ValueError(f"config removes every unit of group {name}")
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def prune_pass(gm: fx.GraphModule, config: PruneConfig) -> PassResult:
    """Remove the configured units from `gm` (see module docstring)."""
    if not any(config.remove.values()):
        return PassResult(gm, False)
    dg = config.graph_analysis(gm)
    removed = removed_units(dg, config)
    # 1. new tensors: consumers re-fit on their input axis, then every member sliced
    new: dict[str, torch.Tensor] = {}
    consumers = [c for g in dg.groups for c in g.consumers]
    seen = set()
    for c in consumers:
        if c.node in seen:
            continue
        seen.add(c.node)
        keep = _param_keep(dg, c.labels, removed)
        if bool(keep.all()):
            continue
        w = new.get(c.weight, get_attr(gm, c.weight))
        new[c.weight] = _refit(w, keep, config.grams.get(c.layer), config.damp)
    for target, axes in dg.param_labels.items():
        t = new.get(target, get_attr(gm, target).detach())
        for axis, labels in axes.items():
            keep = _param_keep(dg, labels, removed)
            if not bool(keep.all()):
                t = t.index_select(axis, keep.nonzero().flatten())
        if t is not get_attr(gm, target):
            new[target] = t
    for target, t in new.items():
        _set_tensor(gm, target, t.clone())
    # 2. constants in the graph that spell a pruned size
    def keep_of(node: fx.Node, axis: int) -> torch.Tensor:
        size = dg.shapes[node.name][axis]
        e = dg.node_labels.get(node.name)
        if not isinstance(e, torch.Tensor):
            return torch.ones(size, dtype=torch.bool)
        return _keep_mask(dg, e, axis, size, removed)

    rewritten: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.name not in dg.shapes and node.target not in (
                aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            continue
        if _rewrite_constants(node, dg, keep_of):
            rewritten.add(node)
    # 3. the metadata of every value whose inputs changed, from the new tensors (only those:
    # re-running an op on symbolic shapes can fail where the capture's value was fine, e.g.
    # baddbmm's meta function expanding a symbolic batch)
    changed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            old = node.meta.get("val")
            node.meta["val"] = _fake_like(node, get_attr(gm, node.target))
            if not _same_shapes(old, node.meta["val"]):
                changed.add(node)
        elif node.op == "call_function" and (
                node in rewritten or any(a in changed for a in node.all_input_nodes)):
            old = node.meta.get("val")
            set_val(node)
            if not _same_shapes(old, node.meta.get("val")):
                changed.add(node)
    gm.recompile()
    return PassResult(gm, True)


def _rewrite_constants(node: fx.Node, dg: DepGraph, keep_of) -> bool:
    """Rewrite the sizes `node`'s arguments spell after pruning; whether any changed."""
    t = node.target
    args = list(node.args)
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
             aten.expand.default):
        e = dg.node_labels.get(node.name)
        if not isinstance(e, torch.Tensor):
            return
        sizes = list(args[1])
        for a in varying_axes(e):
            k = int(keep_of(node, a).sum())
            if isinstance(sizes[a], int) and sizes[a] != -1 and k != sizes[a]:
                sizes[a] = k
        args[1] = sizes
    elif t is aten.unflatten.int:
        e = dg.node_labels.get(node.name)
        if not isinstance(e, torch.Tensor):
            return
        dim = args[1] % len(dg.shapes[x.name]) if (x := args[0]) is not None else 0
        sizes = list(args[2])
        for j in range(len(sizes)):
            if dim + j in varying_axes(e) and sizes[j] != -1:
                sizes[j] = int(keep_of(node, dim + j).sum())
        args[2] = sizes
    elif t is aten.slice.Tensor:
        x = args[0]
        shp = dg.shapes.get(x.name)
        dim = (args[1] if len(args) > 1 else 0) % len(shp)
        keep = keep_of(x, dim)
        if bool(keep.all()):
            return
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        end = args[3] if len(args) > 3 and args[3] is not None else shp[dim]
        start, end = _bound(start, shp[dim]), _bound(end, shp[dim])
        before = torch.cat([torch.zeros(1, dtype=torch.long), keep.long().cumsum(0)])
        args = [x, dim, int(before[start]), int(before[end]), *args[4:]]
    elif t is aten.select.int:
        x = args[0]
        shp = dg.shapes[x.name]
        dim = args[1] % len(shp)
        keep = keep_of(x, dim)
        idx = args[2] % shp[dim]
        args[2] = int(keep[:idx].sum())
    elif t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        x = args[0]
        shp = dg.shapes[x.name]
        dim = (args[2] if len(args) > 2 else node.kwargs.get("dim", 0)) % len(shp)
        keep = keep_of(x, dim)
        if bool(keep.all()):
            return
        if t is aten.split_with_sizes.default:
            sizes = list(args[1])
        elif t is aten.split.Tensor:
            sizes = [min(args[1], shp[dim] - i) for i in range(0, shp[dim], args[1])]
        else:
            per = math.ceil(shp[dim] / args[1])
            sizes = [min(per, shp[dim] - i) for i in range(0, shp[dim], per)]
        bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        new_sizes = [int(keep[bounds[i]:bounds[i + 1]].sum()) for i in range(len(sizes))]
        node.target = aten.split_with_sizes.default
        node.kwargs = {}
        args = [x, new_sizes, dim]
    elif t in (aten.conv2d.default, aten.conv2d.padding) and len(args) > 6 and args[6] > 1:
        keep = keep_of(node, 1)
        old = dg.shapes[node.name][1]
        args[6] = args[6] * int(keep.sum()) // old
    elif t is aten.group_norm.default:
        x = args[0]
        keep = keep_of(x, 1)
        args[1] = args[1] * int(keep.sum()) // dg.shapes[x.name][1]
    else:
        return False
    changed = tuple(args) != tuple(node.args)
    node.args = tuple(args)
    return changed


def _same_shapes(a, b) -> bool:
    """Whether two fake values (tensors, or tuples / lists of them) have the same shapes."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_shapes(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [str(d) for d in a.shape] == [str(d) for d in b.shape]
    return a is None and b is None or not isinstance(a, torch.Tensor | list | tuple) and \
        not isinstance(b, torch.Tensor | list | tuple)


def _bound(v: int, size: int) -> int:
    if v < 0:
        v += size
    return max(0, min(v, size))


# --- building a config --------------------------------------------------------------------------
def uniform_config(gm: fx.GraphModule, ratio: float, importance: str = "l2",
                   stats: Mapping | None = None, align: int = 1, refit: bool = True,
                   groups: list[str] | None = None) -> PruneConfig:
    """A config removing `ratio` of the units of every prunable group (or of `groups`), the
    least important first; consumers re-fit when `stats` (calibration statistics by node name)
    are given and `refit` is on."""
    dg = analyze(gm)
    remove = {}
    for g in dg.groups:
        if groups is not None and g.name not in groups:
            continue
        n = aligned_removals(g, ratio, align)
        if n <= 0:
            continue
        imp = unit_importance(gm, dg, g, importance, stats)
        remove[g.name] = units_to_remove(g, imp, n)
    return PruneConfig(remove, consumer_grams(dg, stats) if refit and stats else {})


def consumer_grams(dg: DepGraph, stats: Mapping) -> dict[str, torch.Tensor]:
    """Input second moments of every consumer that has calibration statistics."""
    out = {}
    for g in dg.groups:
        for c in g.consumers:
            st = stats.get(c.node)
            # a least-squares fit on fewer rows than twice its unknowns fits the calibration
            # data, not the layer: those consumers keep plain removal
            cov = None if st is None else st.covariance
            if cov is not None and st.rows >= 2 * cov.shape[0]:
                out[c.layer] = cov
    return out


# --- the planner's view: one entry per dependency group -------------------------------------------


@dataclass
class GroupCandidate(Candidate):
    """A pruned group as a planner candidate. Its costs are *deltas* summed over every layer
    the group touches (the per-layer entries keep the layers' full costs), so the report's
    totals stay right: macs / latency / bytes / params are negative savings."""

    bytes_delta: int = 0
    params_delta: int = 0

    @property
    def stored_bytes(self) -> int:
        """Bytes saved across the group (negative), or 0 for the unchanged group."""
        return self.bytes_delta

    @property
    def param_count(self) -> int:
        """Parameters saved across the group (negative), or 0 for the unchanged group."""
        return self.params_delta


def propose(layer, base, ctx):
    """Pruning is proposed per dependency group (`propose_groups`), not per layer."""
    return [], None


def _layer_deltas(gm, dg: DepGraph, group: Group, removed: torch.Tensor, shapes: dict,
                  profile) -> tuple[int, float, int, int, set[str]]:
    """(MACs, latency, bytes, params) saved by removing `removed` units, over every layer the
    group touches, on `profile`; and the names of those layers."""
    touched: dict[str, dict] = {}
    for p in group.producers:
        keep = _param_keep(dg, p.labels, removed)
        touched.setdefault(p.node, {"layer": p.layer})["out"] = keep
    for c in group.consumers:
        keep = _param_keep(dg, c.labels, removed)
        touched.setdefault(c.node, {"layer": c.layer})["in"] = keep
    macs = lat = nbytes = params = 0
    for t in touched.values():
        layer = shapes.get(t["layer"])
        if layer is None:
            continue
        lay, inp = layer
        w = get_attr(gm, lay.weight_target).detach()
        b = get_attr(gm, lay.bias_target).detach() if lay.bias_target else None
        before = step_of_layer(lay, w, b)
        nw, nb, groups, new_inp = w, b, lay.groups, list(inp)
        if "out" in t and lay.op != "embedding":
            nw = nw[t["out"]]
            nb = None if nb is None else nb[t["out"]]
            if lay.groups > 1:
                groups = lay.groups * int(t["out"].sum()) // t["out"].numel()
                new_inp[1] = inp[1] * groups // lay.groups
        elif "out" in t:
            nw = nw[:, t["out"]]
        if "in" in t:
            nw = nw[:, t["in"]]
            axis = 1 if lay.op == "conv2d" else len(inp) - 1
            new_inp[axis] = int(t["in"].sum())
        after = Step(before.op, nw, nb, before.stride, before.padding, before.dilation, groups)
        m0, l0 = chain_cost((before,), tuple(inp), profile)
        m1, l1 = chain_cost((after,), tuple(new_inp), profile)
        macs += m0 - m1
        lat += l0 - l1
        nbytes += before.stored_bytes - after.stored_bytes
        params += before.params - after.params
    return macs, lat, nbytes, params, {t["layer"] for t in touched.values()}


def _simulation(gm, dg: DepGraph, group: Group, removed: torch.Tensor, grams: dict) -> dict:
    """Node overrides computing every consumer of the group with the removed channels gone
    (their weight columns zero) and the kept columns re-fit: the pruned model, on the
    original graph."""
    overrides = {}
    for c in group.consumers:
        keep = _param_keep(dg, c.labels, removed)
        if bool(keep.all()):
            continue
        w = get_attr(gm, c.weight).detach()
        fitted = _refit(w, keep, grams.get(c.layer), PruneConfig.damp)
        full = torch.zeros_like(w)
        full[:, keep] = fitted
        overrides[c.node] = ConsumerOverride(full, str(node_by_name(gm, c.node).target))
    return overrides


@dataclass(frozen=True)
class ConsumerOverride:
    """A node override running a pruned group's consumer with its re-fit weight (removed
    columns zero): `op` is the node's ATen op by name (`aten.linear.default`), so the override
    is plain data and pickles with the candidate."""

    weight: torch.Tensor
    op: str

    def __call__(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The consumer on the node's input."""
        target = torch.ops
        for part in self.op.split("."):
            target = getattr(target, part)
        return target(args[0], self.weight, *args[2:], **kwargs)


def propose_groups(ctx: GroupContext) -> list:
    """One planner entry per prunable dependency group, with candidates at a ladder of
    ratios (unit counts rounded to the profile's channel alignment)."""
    from fxcompress.planner import LayerOptions, gain

    gm, profile = ctx.gm, ctx.profile
    dg = analyze(gm)
    stats = ctx.calib.stats
    kind = "activation" if ctx.calibrated else "l2"
    grams = consumer_grams(dg, stats) if ctx.calibrated else {}
    shapes = {o.layer.name: (o.layer, o.shapes.inp if o.shapes else stats[o.layer.node].shape)
              for o in ctx.options}
    out = []
    for g in dg.groups:
        lead = shapes.get(g.producers[0].layer)
        if lead is None:
            continue
        lay = lead[0]
        w = get_attr(gm, lay.weight_target).detach()
        glayer = Layer(f"prune[{g.name}]", lay.node, lay.op, lay.weight_target, lay.bias_target,
                       lay.weight_shape, lay.stride, lay.padding, lay.dilation, lay.groups)
        base = GroupCandidate("none", glayer, {}, (step_of_layer(lay, w, None),))
        opt = LayerOptions(glayer, base)
        out.append(opt)
        if len(g.prunable) < 2 or not g.consumers:
            why = "; ".join(g.reasons()[:2]) or "no layer reads these channels"
            opt.skip_reason = f"group not prunable: {why}"
            opt.rejected.append(("prune", opt.skip_reason))
            continue
        imp = unit_importance(gm, dg, g, kind, stats)
        seen = set()
        for ratio in ctx.knobs("prune").ratios:
            n = aligned_removals(g, ratio, profile.alignment)
            if n <= 0 or n in seen:
                continue
            seen.add(n)
            idx = units_to_remove(g, imp, n)
            removed = torch.tensor([g.units[i] for i in idx], dtype=torch.long)
            macs, lat, nbytes, params, touched = _layer_deltas(gm, dg, g, removed, shapes,
                                                               profile)
            kept = sum(ch for i, ch in enumerate(g.unit_channels) if i not in set(idx))
            c = GroupCandidate(
                "prune", glayer, {"removed": f"{n}/{len(g.units)}", "kept_channels": kept,
                                  "importance": kind}, base.steps,
                parts={"prune": PrunePart(g.name, tuple(idx), grams, dg)}, macs=-macs,
                latency=-lat,
                overrides=_simulation(gm, dg, g, removed, grams), touches=frozenset(touched),
                bytes_delta=-nbytes, params_delta=-params)
            if gain(c, base, ctx.objective) <= 0:
                what = "slower" if ctx.objective == "latency" else "larger"
                opt.rejected.append((c.describe(), f"not {what}-saving on {profile.name}"))
                continue
            opt.candidates.append(c)
        blocked = g.reasons()
        if blocked:
            opt.rejected.append(("prune", f"{len(g.blocked)} of {len(g.units)} units blocked: "
                                 + "; ".join(blocked[:2])))
    return out


def consumer_weights(gm: fx.GraphModule, config: PruneConfig,
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For every consumer layer whose input channels `config` removes: (keep mask over its
    input channels, its weight as the pass computes it (re-fit where the config has its gram)
    at full width with the removed columns zero). Fine-tuning trains these; a consumer whose
    gram is then dropped from the config is sliced as it is (`_refit` without a gram)."""
    dg = config.graph_analysis(gm)
    removed = removed_units(dg, config)
    out = {}
    for g in dg.groups:
        for c in g.consumers:
            if c.layer in out:
                continue
            keep = _param_keep(dg, c.labels, removed)
            if bool(keep.all()):
                continue
            w = get_attr(gm, c.weight).detach()
            full = torch.zeros_like(w)
            full[:, keep] = _refit(w, keep, config.grams.get(c.layer), config.damp)
            out[c.layer] = (keep, full)
    return out


def weight_keeps(gm: fx.GraphModule, config: PruneConfig) -> dict[str, torch.Tensor]:
    """Weight target -> a mask of its shape, True at the entries the pass keeps (a product of
    per-axis masks, so the kept entries in row-major order are the sliced tensor's), for every
    layer weight `config` slices."""
    dg = config.graph_analysis(gm)
    removed = removed_units(dg, config)
    masks: dict[str, torch.Tensor] = {}

    def narrow(target: str, axis: int, keep: torch.Tensor) -> None:
        t = get_attr(gm, target)
        m = masks.setdefault(target, torch.ones(t.shape, dtype=torch.bool))
        m &= keep.view([-1 if i == axis else 1 for i in range(t.dim())])

    for c in (c for g in dg.groups for c in g.consumers):
        narrow(c.weight, 1, _param_keep(dg, c.labels, removed))  # `_refit`'s input columns
    for target, axes in dg.param_labels.items():
        for axis, labels in axes.items():
            narrow(target, axis, _param_keep(dg, labels, removed))
    return {t: m for t, m in masks.items() if not bool(m.all())}


def make_config(chosen: list[Candidate]) -> PruneConfig:
    """The pass config for the chosen group candidates."""
    remove, grams, analysis = {}, {}, None
    for c in chosen:
        part = c.part("prune")
        remove[part.group] = part.remove
        grams.update(part.grams)
        analysis = analysis or part.analysis
    return PruneConfig(remove, grams, analysis=analysis)


def _recovery_layout(gm: fx.GraphModule, chosen: list[Candidate]):
    config = make_config(chosen)
    return consumer_weights(gm, config), weight_keeps(gm, config)


def _trained(c: Candidate, consumers_trained: set[str]) -> Candidate:
    part = c.part("prune")
    grams = {k: v for k, v in part.grams.items() if k not in consumers_trained}
    return c.with_part("prune", replace(part, grams=grams))


TECHNIQUE = register(Technique(
    "prune", order=10, propose=propose, make_config=make_config, apply=prune_pass,
    propose_groups=propose_groups, regroup=Regroup(_recovery_layout, _trained),
    settings=PruneSettings()))
