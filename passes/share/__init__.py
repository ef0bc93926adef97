"""share: weight sharing with k-means codebooks, n-bit indices packed into bytes.

Each weight is split into groups of consecutive output channels (dim 0; a group may be the
whole tensor) and every group's values are clustered into a palette of 2^n entries (n = 1..8)
by weighted 1-D k-means: k-means++ seeding on a quantile summary of the group, then Lloyd
iterations on the sorted values with prefix sums, so one iteration costs O(2^n log N) per group
and every group of every tensor is clustered in the same vectorized call. Each element is
weighted by how much its error reaches the layer's output: the second moment of the input it
multiplies, E[x_j^2], from the calibration activations (the diagonal of the input covariance).
Then the indices are chosen with error compensation (GPTQ-style, `gptq_assign`): column by
column, each column's rounding error pushed onto the columns not yet assigned through the
Cholesky factor of H^-1, with H the input second moment of a linear, or for an embedding (whose
inputs are one-hot, so nothing couples its columns on the input side) the output Hessian
E[J^T J] of the model's outputs with respect to the embedding's output, by autograd over the
calibration batches (`output_hessian`). On the trained text transformer at 4 bits this halves
the relative output error (9.4 % -> 4.7 %) at the same size; the palettes are unchanged.

What is stored: the indices, packed into `uint8` (8 / n per byte where n divides 8; otherwise
lcm(n, 8) / n indices in lcm(n, 8) / 8 bytes), and the palette (the lookup table, one per
group) in the weight's dtype, or as int8 with one scale per group (the stacked "int8-LUT"
variant: share, then int8 on the lookup-table entries). The graph decodes the weight before the
op: bytes -> integers -> indices (floor division by powers of two, remainder) -> `gather` from
the lookup table -> the weight's shape. Only integer arithmetic and a gather, so the program
exports (`.pt2`, ONNX) and its serialized size shrinks by the measured ratio.

Entropy-coded variant (`coded_widths`): where the objective is size and the target loads the
`.pt2` fxcompress writes, each layer is also offered on a uniform grid of 256 entries
(`cluster.uniform_lut`) whose step gives a 2- to 6-bit palette's error (fractional widths too),
with the same error-compensating assignment. Its byte indices are mostly near the middle of
the grid, so the archive's deflate (Huffman codes) stores them in about their entropy: on
Gaussian weights a 3-bit palette's error in 2.8 bits a weight, on Laplacian ones in 2.7. Where
the layer has an error-compensation Hessian H, each input column gets its own step, in
proportion to H_jj^-1/2 (`cluster.column_steps`, one multiply in the decode): at the same
bytes the error through H falls by the ratio of its diagonal's arithmetic to geometric mean.
H_jj is damped toward its mean first, as a column quiet on the calibration data may not be
elsewhere (undamped, MiniLM's worst cosine on unseen sentences fell from 0.96 to 0.93).
The candidate counts the bytes the archive's rule gives them (`pt2.record_bytes`).

Order 80: after pruning and factorization (sharing acts on the weights they leave), before int8
(the int8 pass quantizes only weights that are still `get_attr`s, so it never re-quantizes a
shared weight). The pass clusters the weights the graph holds when it runs: a weight equal to
one the planner clustered reuses that exact codebook (what was measured is what is built);
any other weight (its shape changed upstream) is clustered afresh with the same settings and
the planned Hessian where its columns are unchanged (a pruned layer's output rows). So share
stacks on pruned dependency groups as int8 does (prune -> share -> int8 lookup-table entries:
one share candidate per layer, the group a separate planner entry).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from fxcompress.candidates import Candidate, Step
from fxcompress.graph import (
    LAYER_META,
    _fake_like,
    add_buffer,
    drop_unused_attrs,
    find_layers,
    get_attr,
    op_type,
    weight_arg_index,
)
from fxcompress.passes.share.cluster import (  # noqa: F401  (the maths' public names)
    GRAPH_BYTES_PER_OP,
    GRAPH_BYTES_PER_TENSOR,
    GROUP_SIZE,
    Codebook,
    _byte_weights,
    _chunk,
    _slot_divisors,
    cluster,
    gptq_assign,
    group_count,
    kmeans_1d,
    output_hessian,
    pack,
    packed_shape,
    unpack,
)
from fxcompress.passes_infra import PassResult
from fxcompress.rewrite import call
from fxcompress.technique import ProposeContext, Technique, checked_field, register

aten = torch.ops.aten
#: palette widths whose error the entropy-coded variant matches (`coded_widths`); a grid's
#: step is continuous, so fractional widths give the planner finer steps where the bytes are
CODED_WIDTHS = (2, 2.25, 2.5, 2.75, 3, 3.5, 4, 4.5, 5, 6)


@dataclass(frozen=True)
class ShareSettings:
    """share's settings; `compile(overrides={"*": {"share": {...}}})` changes them. The
    clustering's numerical constants above (seeding, histogram, iterations, damping) are
    properties of the algorithm, not choices a user makes, and stay constants."""

    #: output channels per lookup table of the grouped palettes
    group_size: int = GROUP_SIZE
    #: bits stacked on another technique's chain (one stacked candidate per chain): the common
    #: palettization sweet spot, or the closest width the profile decodes
    stack_bits: int = 4

    def __post_init__(self):
        checked_field(self.group_size, "group_size", int, lambda v: v >= 1, "an integer >= 1")
        checked_field(self.stack_bits, "stack_bits", int, lambda v: 1 <= v <= 8,
                      "an integer from 1 to 8")

# --- planning -----------------------------------------------------------------------------
def _importance(op: str, weight: torch.Tensor, groups_conv: int, cov: torch.Tensor | None,
                ) -> torch.Tensor | None:
    """E[x_j^2] of the input each weight element multiplies, shaped to broadcast to the weight;
    None when the calibration second moment does not match the weight's inputs."""
    if cov is None or op == "embedding":
        return None
    d = cov.diagonal().float().clamp_min(0)
    if op == "linear" and weight.dim() == 2 and d.numel() == weight.shape[1]:
        return d.view(1, -1)
    if op == "conv2d" and weight.dim() == 4 and d.numel() == weight.shape[1] * groups_conv:
        per_group = weight.shape[0] // groups_conv
        chan = (torch.arange(weight.shape[0]) // per_group).view(-1, 1) * weight.shape[1] \
            + torch.arange(weight.shape[1]).view(1, -1)
        return d[chan].view(*weight.shape[:2], 1, 1)
    return None


@dataclass(frozen=True)
class ShareSpec:
    """How one layer is shared: palette width, lookup tables per weight, their dtype, and the
    codebooks the planner measured (reused when the pass meets the same weight)."""

    bits: int
    grouped: bool  # one lookup table per `group_size` output channels (else one per tensor)
    lut_int8: bool  # int8 lookup-table entries with a fp32 scale per table
    seed: int = 0
    # (the weight the planner clustered, its codebook), per step of the candidate's chain
    codebooks: tuple[tuple[torch.Tensor, Codebook], ...] = ()
    # the first step's error-compensation Hessian (`_hessian`), for re-clustering a weight
    # whose rows changed upstream (pruned output channels keep the input columns)
    hessian: torch.Tensor | None = None
    group_size: int = GROUP_SIZE  # output channels per lookup table when `grouped`
    # the entropy-coded variant: a uniform grid at this palette width's error, byte indices
    # that the archive deflates (`cluster.uniform_lut`); None: k-means palettes, packed
    grid: float | None = None


def _hessian(op: str, weight: torch.Tensor, cov: torch.Tensor | None,
             out_h: torch.Tensor | None) -> torch.Tensor | None:
    """What the error-compensating assignment minimizes through: a linear's input second
    moment, an embedding's output Hessian (its rows' inputs are one-hot, so only the output
    side couples its columns); None for convs (their calibration moment is per channel, not
    per kernel element) and when the statistic does not match the weight."""
    if op == "linear" and cov is not None and weight.dim() == 2 \
            and cov.shape == (weight.shape[1], weight.shape[1]):
        return cov
    if op == "embedding" and out_h is not None and out_h.shape == (weight.shape[1],) * 2:
        return out_h
    return None


_OUT_HESSIANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def embedding_hessian(calib, node: str, seed: int = 0) -> torch.Tensor | None:
    """The output Hessian of embedding `node` over the calibration's sensitivity batches
    (`output_hessian`), computed once per calibration, node and seed."""
    if calib is None:
        return None
    cache = _OUT_HESSIANS.setdefault(calib, {})
    if (node, seed) not in cache:
        batches = calib.batches[:calib.sensitivity_batches(256)]
        try:
            cache[(node, seed)] = output_hessian(calib.gm, node, batches, seed)
        except RuntimeError:  # a graph autograd cannot run backward through (in-place on
            cache[(node, seed)] = None  # an inference tensor...): nearest-entry indices
    return cache[(node, seed)]


def _shared_step(step: Step, spec: ShareSpec, cov: torch.Tensor | None,
                 out_h: torch.Tensor | None = None) -> tuple[Step, Codebook]:
    groups = group_count(step.weight.shape[0], spec.grouped, spec.group_size)
    imp = _importance(step.op, step.weight, step.groups, cov)
    cb = cluster(step.weight, spec.bits, groups, imp, spec.lut_int8, spec.seed,
                 _hessian(step.op, step.weight, cov, out_h), spec.grid)
    return replace(step, weight=cb.decode(), fmt="shared", weight_bytes=cb.file_bytes,
                   input_quant=None), cb


def _candidate(base: Candidate, ctx: ProposeContext, bits: int, grouped: bool, lut_int8: bool,
               technique: str, cov: torch.Tensor | None = None, grid: float | None = None
               ) -> Candidate | None:
    """`base` shared; `cov`: the layer's input second moment (computed once per layer by the
    caller, so that its candidates hold one copy of it); `grid`: the entropy-coded variant
    at that palette width's error (`bits` 8)."""
    if cov is None:
        cov = ctx.stats.covariance
    layer_cov = cov
    out_h = embedding_hessian(ctx.calib, base.layer.node, ctx.seed) \
        if base.layer.op == "embedding" and ctx.calibrated else None
    spec = ShareSpec(bits, grouped, lut_int8, ctx.seed,
                     group_size=ctx.knobs("share").group_size, grid=grid)
    steps, books = [], []
    for i, s in enumerate(base.steps):
        if s.fmt != "fp32":
            return None  # already stored in a compact format: nothing to share
        st, cb = _shared_step(s, spec, cov, out_h)
        steps.append(st)
        books.append((s.weight, cb))
        # the next step's input is this step's output: carry its second moment where linear
        cov = s.weight.double() @ cov @ s.weight.double().T \
            if cov is not None and s.op == "linear" and i + 1 < len(base.steps) \
            and cov.shape[0] == s.weight.shape[1] else None
    first = base.steps[0]
    spec = replace(spec, codebooks=tuple(books),
                   hessian=_hessian(first.op, first.weight, layer_cov, out_h))
    params = dict(base.params, bits=bits, clusters=1 << bits,
                  granularity="grouped" if grouped else "tensor",
                  lut="int8" if lut_int8 else "float")
    if grid is not None:
        params["coding"] = f"deflated, {grid:g}-bit palette's error"
    return Candidate(technique, base.layer, params, tuple(steps),
                     parts={**base.parts, "share": spec})


def propose(layer, base: Candidate, ctx: ProposeContext):
    """The layer palettized at every width the profile decodes, one lookup table per tensor
    and one per group of output channels (int8 entries where the target runs int8)."""
    if not ctx.profile.supports(layer.op, "shared") or not ctx.profile.share_bits:
        return [], f"share: {ctx.profile.name} does not decode palettized weights"
    if layer.op == "conv2d" and ctx.weight.numel() < (1 << max(ctx.profile.share_bits)):
        return [], "share: the weight has fewer elements than the palette"
    if ctx.objective == "latency" and not ctx.user_techniques and ctx.shapes is not None \
            and not _can_be_faster(base, ctx):
        # clustering is most of a large model's proposal time (MiniLM: 30 of 33 s a layer):
        # not spent on candidates the planner would reject as slower
        return [], (f"share: even its narrowest palette, decoded in the graph, is not faster "
                    f"than the layer on {ctx.profile.name}")
    cands, cov = [], ctx.stats.covariance
    size = ctx.knobs("share").group_size
    for bits in sorted(ctx.profile.share_bits):
        variants = [False]
        if group_count(layer.weight_shape[0], True, size) > 1:
            variants.append(True)
        for grouped in variants:
            groups = group_count(layer.weight_shape[0], grouped, size)
            lut_int8 = _int8_lut_pays(ctx, groups, bits)
            c = _candidate(base, ctx, bits, grouped, lut_int8, "share", cov)
            if c is not None:
                cands.append(c)
    for grid in coded_widths(ctx):
        c = _candidate(base, ctx, 8, False, False, "share", cov, grid)
        if c is not None:
            cands.append(c)
    return cands, None


def coded_widths(ctx: ProposeContext) -> tuple[float, ...]:
    """The palette widths whose error the entropy-coded variant is offered at: where the
    objective is size and the target loads the `.pt2` fxcompress writes (whose archive
    inflates deflated records), and the profile decodes 8-bit palettes: `CODED_WIDTHS`. Other
    formats (.pte, .onnx, Core ML) store the byte indices as they are."""
    p = ctx.profile
    if ctx.objective != "size" or p.export_format != ".pt2" or 8 not in p.share_bits:
        return ()
    return CODED_WIDTHS


def _can_be_faster(base: Candidate, ctx: ProposeContext) -> bool:
    """Whether the narrowest palette could run faster than `base`: its lower bound (the packed
    indices alone, no lookup table) costed on the profile, against the layer as it is."""
    bits = min(ctx.profile.share_bits)
    probe = replace(base, technique="share", steps=tuple(
        replace(s, fmt="shared", weight_bytes=s.weight.numel() * bits // 8)
        for s in base.steps))
    inp = ctx.shapes.inp
    return probe.costed(inp, ctx.profile).latency < base.costed(inp, ctx.profile).latency


def _int8_lut_pays(ctx: ProposeContext, groups: int, bits: int) -> bool:
    """Whether int8 lookup-table entries save more bytes than the cast, the multiply and the
    scale tensor they add to the serialized program."""
    entry = ctx.weight.element_size()
    saved = groups * (1 << bits) * (entry - 1) - groups * 4
    cost = (2 + (ctx.weight.dtype != torch.float32)) * GRAPH_BYTES_PER_OP \
        + GRAPH_BYTES_PER_TENSOR
    return ctx.profile.share_lut_int8 and saved > cost


def stack(base: Candidate, ctx: ProposeContext) -> Candidate | None:
    """Sharing on top of another technique's chain (the factors of an SVD, a pruned weight),
    at one width: `ShareSettings.stack_bits` or the closest the profile decodes."""
    if not ctx.profile.share_bits or base.uses("share") or any(
            st.fmt != "fp32" for st in base.steps):
        return None  # a weight already stored compactly has nothing to share
    if ctx.objective == "latency" and not ctx.user_techniques and ctx.shapes is not None \
            and not _can_be_faster(base, ctx):
        return None
    knobs: ShareSettings = ctx.knobs("share")
    bits = min(ctx.profile.share_bits, key=lambda b: (abs(b - knobs.stack_bits), b))
    size = knobs.group_size
    grouped = all(group_count(s.weight.shape[0], True, size) > 1 for s in base.steps)
    groups = min(group_count(s.weight.shape[0], grouped, size) for s in base.steps)
    return _candidate(base, ctx, bits, grouped, _int8_lut_pays(ctx, groups, bits),
                      f"{base.technique}+share")


@dataclass(frozen=True)
class ShareConfig:
    """Which layers are shared, and how."""

    layers: Mapping[str, ShareSpec] = field(default_factory=dict)


def make_config(chosen: list[Candidate]) -> ShareConfig:
    """The pass config for the chosen candidates that carry sharing."""
    return ShareConfig({c.layer.name: c.part("share") for c in chosen
                        if c.part("share") is not None})


def uniform_config(gm: fx.GraphModule, bits: int, grouped: bool = False,
                   lut_int8: bool = False, stats: Mapping | None = None, seed: int = 0,
                   calib=None, compensate: tuple[str, ...] = ("linear", "embedding"),
                   ) -> ShareConfig:
    """Every layer of `gm` shared at one width, outside the planner (benchmarks, fixed-budget
    use). `stats` maps a layer's node name to its calibration `LayerStats`, for importance
    weighting and the error-compensating assignment of linears; `calib`, a `Calibration` of
    `gm` (its stats are used when `stats` is None), also gives embeddings their output
    Hessian. `compensate`: the layer kinds whose indices are assigned with error
    compensation (`gptq_assign`); the others get their nearest entries. Layers whose weight
    is read by several nodes are left alone, as the planner does."""
    if stats is None and calib is not None:
        stats = calib.stats
    specs = {}
    for lay in find_layers(gm):
        if lay.shared_with:
            continue
        w = get_attr(gm, lay.weight_target).detach()
        if not w.is_floating_point():
            continue
        st = stats.get(lay.node) if stats else None
        cov = st.covariance if st is not None else None
        imp = _importance(lay.op, w, lay.groups, cov)
        hess = None
        if lay.op in compensate:
            out_h = embedding_hessian(calib, lay.node, seed) if lay.op == "embedding" else None
            hess = _hessian(lay.op, w, cov, out_h)
        cb = cluster(w, bits, group_count(w.shape[0], grouped), imp, lut_int8, seed, hess)
        specs[lay.name] = ShareSpec(bits, grouped, lut_int8, seed, ((w, cb),), hess)
    return ShareConfig(specs)


# --- the pass -----------------------------------------------------------------------------
def codebook_for(weight: torch.Tensor, spec: ShareSpec) -> Codebook:
    """The codebook `spec` holds for `weight` (the one the planner measured, or a trained
    one), else `weight` clustered afresh as `spec` says (a weight whose shape changed
    upstream)."""
    for src, cb in spec.codebooks:
        if src.shape == weight.shape and torch.equal(src, weight.detach()):
            return cb
    groups = group_count(weight.shape[0], spec.grouped, spec.group_size)
    return cluster(weight, spec.bits, groups, None, spec.lut_int8, spec.seed, spec.hessian,
                   spec.grid)


def _constant(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """A `get_attr` of a small constant shared by every layer that needs it (one buffer, and
    one tensor in the serialized program, per distinct constant)."""
    if not hasattr(gm, name):
        gm.register_buffer(name, value)
    ref = getattr(gm, name)
    if not torch.equal(ref, value):
        raise RuntimeError(f"buffer {name} exists with other contents")
    with gm.graph.inserting_before(before):
        ga = gm.graph.get_attr(name)
    ga.meta["val"] = _fake_like(before, value)
    return ga


def _decode_nodes(gm: fx.GraphModule, node: fx.Node, layer: str, cb: Codebook) -> fx.Node:
    """Insert before `node` the ops that rebuild the weight from its packed form: bytes ->
    words -> slot indices (floor division, remainder) -> lookup (index / gather) -> shape."""
    g = gm.graph
    per_chunk, chunk_bytes = _chunk(cb.bits)
    groups, n = cb.indices.shape
    per_tensor = groups == 1
    pn = add_buffer(gm, f"{layer}.share_idx", pack(cb.indices, cb.bits), node)
    lut_q = None if cb.lut_q is None else (cb.lut_q[0] if per_tensor else cb.lut_q)
    lut = cb.lut[0] if per_tensor else cb.lut
    if lut_q is not None:
        qn = add_buffer(gm, f"{layer}.share_lut", lut_q, node)
        sn = add_buffer(gm, f"{layer}.share_lut_scale",
                        cb.lut_scale.view(-1) if per_tensor else cb.lut_scale, node)
    else:
        ln = add_buffer(gm, f"{layer}.share_lut", lut, node)
    div = None
    if per_chunk > 1:
        div = _constant(gm, f"share_slot_div_{cb.bits}", _slot_divisors(cb.bits), node)
    mult = None
    if chunk_bytes > 1:
        mult = _constant(gm, f"share_byte_mult_{chunk_bytes}", _byte_weights(chunk_bytes), node)
    with g.inserting_before(node):
        if lut_q is not None:
            f = call(g, aten._to_copy.default, (qn,), {"dtype": torch.float32}, layer=layer)
            ln = call(g, aten.mul.Tensor, (f, sn), layer=layer)
            if lut.dtype != torch.float32:
                ln = call(g, aten._to_copy.default, (ln,), {"dtype": lut.dtype}, layer=layer)
        word = pn
        if mult is not None:  # byte planes -> one integer per chunk (uint8 * int64 -> int64)
            word = call(g, aten.mul.Tensor, (word, mult), layer=layer)
            word = call(g, aten.sum.dim_IntList, (word, [1]), layer=layer)
        if div is not None:  # slot j of each word: floor(word / 2^(bits j)) mod 2^bits
            word = call(g, aten.div.Tensor_mode, (word, div), {"rounding_mode": "floor"},
                        layer=layer)
            word = call(g, aten.remainder.Scalar, (word, 1 << cb.bits), layer=layer)
        else:  # 8 bits: the bytes are the indices
            word = call(g, aten._to_copy.default, (word,), {"dtype": torch.int64}, layer=layer)
        padded = math.prod(word.meta["val"].shape[1:]) != n
        if per_tensor and not padded:
            w = call(g, aten.index.Tensor, (ln, [word]), layer=layer)
        else:
            word = call(g, aten.view.default, (word, [groups, -1]), layer=layer)
            if padded:
                word = call(g, aten.slice.Tensor, (word, 1, 0, n), layer=layer)
            if per_tensor:
                w = call(g, aten.index.Tensor, (ln, [word]), layer=layer)
            else:
                w = call(g, aten.gather.default, (ln, 1, word), layer=layer)
        w = call(g, aten.view.default, (w, list(cb.shape)), layer=layer)
    if cb.col_scale is not None:  # each input column's step
        cn = add_buffer(gm, f"{layer}.share_col_scale", cb.col_scale.to(cb.lut.dtype), node)
        with g.inserting_before(node):
            w = call(g, aten.mul.Tensor, (w, cn), layer=layer)
    return w


def _fused_decode(gm: fx.GraphModule, members: list[tuple[fx.Node, str, Codebook]],
                  ) -> list[fx.Node]:
    """Weights with one float lookup table each, the same width (last dim) and bits, decoded
    from ONE packed stream: the unpacking runs once, as an (rows, width) index table, and each
    weight is a row slice of it looked up in its own table. Two ops per weight instead of four
    or more: each op adds its graph description to the serialized program."""
    g = gm.graph
    first = members[0][0]
    cb0 = members[0][2]
    bits, width = cb0.bits, cb0.shape[-1]
    per_chunk, chunk_bytes = _chunk(bits)
    stream = torch.cat([cb.indices.reshape(1, -1) for _, _, cb in members], 1)
    total = stream.shape[1]
    rows = total // width
    pn = add_buffer(gm, f"share_idx_{bits}b_w{width}", pack(stream, bits), first)
    div = mult = None
    if per_chunk > 1:
        div = _constant(gm, f"share_slot_div_{bits}", _slot_divisors(bits), first)
    if chunk_bytes > 1:
        mult = _constant(gm, f"share_byte_mult_{chunk_bytes}", _byte_weights(chunk_bytes), first)
    with g.inserting_before(first):
        word = pn
        if mult is not None:
            word = call(g, aten.mul.Tensor, (word, mult))
            word = call(g, aten.sum.dim_IntList, (word, [1]))
        if div is not None:
            word = call(g, aten.div.Tensor_mode, (word, div), {"rounding_mode": "floor"})
            word = call(g, aten.remainder.Scalar, (word, 1 << bits))
        else:
            word = call(g, aten._to_copy.default, (word,), {"dtype": torch.int64})
        if math.prod(word.meta["val"].shape) != total:
            word = call(g, aten.view.default, (word, [-1]))
            word = call(g, aten.slice.Tensor, (word, 0, 0, total))
        table = call(g, aten.view.default, (word, [rows, width]))
    out, start = [], 0
    for node, layer, cb in members:
        n_rows = math.prod(cb.shape) // width
        ln = add_buffer(gm, f"{layer}.share_lut", cb.lut[0], node)
        with g.inserting_before(node):
            idx = table
            if n_rows != rows:
                idx = call(g, aten.slice.Tensor, (table, 0, start, start + n_rows), layer=layer)
            w = call(g, aten.index.Tensor, (ln, [idx]), layer=layer)
            if len(cb.shape) != 2:
                w = call(g, aten.view.default, (w, list(cb.shape)), layer=layer)
        out.append(w)
        start += n_rows
    return out


def share_pass(gm: fx.GraphModule, config: ShareConfig) -> PassResult:
    """Store the weight of every op of each configured layer as packed palette indices plus
    lookup tables, decoded in the graph. Weights with one float table each are packed
    together per (bits, width, dtype) and unpacked once (`_fused_decode`); the shared
    unpacking ops belong to no single layer and carry no layer tag."""
    found = []
    for node in list(gm.graph.nodes):
        layer = node.meta.get(LAYER_META)
        op = op_type(node)
        if layer not in config.layers or op is None:
            continue
        wi = weight_arg_index(op)
        w_node = node.args[wi]
        if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
            continue  # computed by an earlier rewrite: already stored compactly
        weight = get_attr(gm, w_node.target)
        if not weight.is_floating_point():
            continue
        found.append((node, layer, codebook_for(weight, config.layers[layer]), wi))
    buckets: dict[tuple, list] = {}
    for node, layer, cb, wi in found:
        if cb.fusible:
            buckets.setdefault((cb.bits, cb.shape[-1], cb.lut.dtype), []).append(
                (node, layer, cb))
        else:
            _set_weight(node, wi, _decode_nodes(gm, node, layer, cb))
    where = {node: wi for node, _, _, wi in found}
    for members in buckets.values():
        for (node, _, _), w in zip(members, _fused_decode(gm, members), strict=True):
            _set_weight(node, where[node], w)
    for node, layer, _, _ in found:
        _contiguous_input(gm, node, layer)
    if found:
        drop_unused_attrs(gm)
    return PassResult(gm, bool(found))


def _contiguous_input(gm: fx.GraphModule, node: fx.Node, layer: str) -> None:
    """Give a linear whose weight is now decoded in the graph, and whose input has more than
    two dims, a contiguous copy of that input. ExecuTorch keeps a linear with a constant weight
    whole for XNNPACK, but splits one with a computed weight into matmul ops and then rebuilds
    it (`ConvertToLinearPass`); when the input reaches it strided (an attention's merged heads,
    after ExecuTorch's own decomposition of the attention), the split is expand + bmm with a
    3-D weight, which that pass cannot rebuild, and the .pte fails. A contiguous input splits
    into view + mm, which it rebuilds. Costs one copy of the activations per such layer."""
    if op_type(node) != "linear":
        return
    x = node.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() <= 2:
        return
    with gm.graph.inserting_before(node):
        c = call(gm.graph, aten.clone.default, (x,), {"memory_format": torch.contiguous_format},
                 layer=layer)
    node.args = (c, *node.args[1:])


def _set_weight(node: fx.Node, wi: int, value: fx.Node) -> None:
    args = list(node.args)
    args[wi] = value
    node.args = tuple(args)


from fxcompress.passes.share import train as _train  # noqa: E402  (needs the names above)

TECHNIQUE = register(Technique(
    "share", order=80, propose=propose, make_config=make_config, apply=share_pass, stack=stack,
    trainable=_train.TRAINABLE, rereads_weight=True, counts_program_bytes=True,
    settings=ShareSettings()))
