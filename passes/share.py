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
from fxcompress.passes_infra import PassResult
from fxcompress.rewrite import call
from fxcompress.technique import ProposeContext, Technique, register

aten = torch.ops.aten
#: Output channels per group for the grouped palettes (coremltools' per_grouped_channel default).
GROUP_SIZE = 16
#: Most points in the quantile summary that k-means++ seeds from (32 per cluster; Lloyd then
#: runs on the full histogram).
SEED_POINTS = 1024
#: Histogram bins per group that Lloyd runs on (exact sums per bin; the final assignment is
#: exact), fine enough for 256 clusters to span many bins each.
HIST_BINS = 16384
#: k-means++ seedings per group (Lloyd runs on all of them at once; the lowest cost wins).
N_INIT = 3
#: Lloyd iterations at most; they stop early once no boundary moves.
MAX_ITERS = 60
#: What the decode costs in a `torch.export.save` file besides its tensors' bytes: each op's
#: graph description and each extra tensor's record (measured on torch 2.13: 3 ops cost
#: 3.85 kB, 7 ops and 2 more tensors 8.9 kB). Counted in a shared step's stored bytes, so the
#: planner never shares a weight too small to repay its decoder.
GRAPH_BYTES_PER_OP = 1200
GRAPH_BYTES_PER_TENSOR = 300
#: Bits stacked on another technique's chain (one stacked candidate per chain): the common
#: palettization sweet spot, or the closest width the profile decodes.
STACK_BITS = 4
#: GPTQ-style assignment: ridge added to the Hessian, relative to its mean diagonal, and the
#: columns updated together before the rest of the row is.
DAMP = 0.01
GPTQ_BLOCK = 128
#: Output projections that estimate an embedding's output Hessian (exact below this many
#: output values per example).
PROBES = 32


# --- clustering ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Codebook:
    """A clustered weight: indices into one lookup table per group of output channels."""

    bits: int
    shape: tuple[int, ...]  # the weight's shape
    indices: torch.Tensor  # (groups, n) uint8 in [0, 2^bits), unpacked
    lut: torch.Tensor  # (groups, 2^bits) centroids, in the weight's dtype (int8-LUT: dequantized)
    lut_q: torch.Tensor | None = None  # (groups, 2^bits) int8 entries of the int8-LUT variant
    lut_scale: torch.Tensor | None = None  # (groups, 1) fp32 scale of the int8-LUT variant

    @property
    def groups(self) -> int:
        """Number of lookup tables."""
        return self.indices.shape[0]

    def decode(self) -> torch.Tensor:
        """The clustered weight (what the graph computes with)."""
        return torch.gather(self.lut, 1, self.indices.long()).reshape(self.shape)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed indices."""
        per_chunk, chunk_bytes = _chunk(self.bits)
        n = self.indices.shape[1]
        return self.groups * math.ceil(n / per_chunk) * chunk_bytes

    @property
    def lut_bytes(self) -> int:
        """Bytes of the lookup tables (int8 entries plus a fp32 scale each, or full width)."""
        if self.lut_q is not None:
            return self.lut_q.numel() + self.lut_scale.numel() * 4
        return self.lut.numel() * self.lut.element_size()

    @property
    def stored_bytes(self) -> int:
        """Bytes stored for this weight: packed indices plus lookup tables."""
        return self.packed_bytes + self.lut_bytes

    @property
    def fusible(self) -> bool:
        """Whether the pass decodes this weight from a packed stream shared with the other
        weights of its width and bits (one float lookup table: `_fused_decode`)."""
        return self.groups == 1 and self.lut_q is None

    @property
    def decode_ops(self) -> int:
        """Ops the pass inserts for this weight alone (`_fused_decode` / `_decode_nodes`,
        kept in step with them; a fused stream's shared unpacking is not counted)."""
        if self.fusible:
            return 2 + (len(self.shape) != 2)  # its row slice, its lookup, a reshape
        per_chunk, chunk_bytes = _chunk(self.bits)
        groups, n = self.indices.shape
        ops = 1  # the final view to the weight's shape
        if self.lut_q is not None:
            ops += 2 + (self.lut.dtype != torch.float32)
        ops += 2 if chunk_bytes > 1 else 0
        ops += 2 if per_chunk > 1 else 1
        padded = per_chunk * math.ceil(n / per_chunk) != n
        ops += 1 if groups == 1 and not padded else 2 + padded
        return ops

    @property
    def file_bytes(self) -> int:
        """Estimated bytes this weight adds to a serialized program: packed indices, lookup
        tables, and the decode's graph description and tensor records."""
        # tensors beyond the one the weight was (a fused weight's indices join a shared one)
        tensors = 0 if self.fusible else 1 + (self.lut_q is not None)
        return self.stored_bytes + self.decode_ops * GRAPH_BYTES_PER_OP \
            + tensors * GRAPH_BYTES_PER_TENSOR


def _chunk(bits: int) -> tuple[int, int]:
    """(indices, bytes) of the smallest whole-byte chunk of `bits`-bit indices."""
    span = math.lcm(bits, 8)
    return span // bits, span // 8


def group_count(out_channels: int, grouped: bool) -> int:
    """Lookup tables for a weight with `out_channels` rows: one, or one per GROUP_SIZE rows
    (per tensor when GROUP_SIZE does not divide the rows)."""
    if not grouped or out_channels % GROUP_SIZE or out_channels <= GROUP_SIZE:
        return 1
    return out_channels // GROUP_SIZE


def _seed(pts: torch.Tensor, cw: torch.Tensor, cwx: torch.Tensor, k: int,
          gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding, per group, on a weighted quantile summary of the ordered points
    `pts` (G, B) whose prefix sums of weight and weight x value are `cw`, `cwx` (G, B + 1)."""
    g, b = pts.shape
    m = min(b, SEED_POINTS, max(256, 32 * k))
    total = cw[:, -1:]
    # SEED_POINTS summary points of equal weight (quantiles), each the mean of its slice
    targets = total * torch.linspace(0, 1, m + 1, dtype=torch.float64).view(1, -1)
    edges = torch.searchsorted(cw.contiguous(), targets.contiguous()).clamp(0, b)
    mass = (cw.gather(1, edges[:, 1:]) - cw.gather(1, edges[:, :-1])).clamp_min(0)
    summ = (cwx.gather(1, edges[:, 1:]) - cwx.gather(1, edges[:, :-1])) / mass.clamp_min(1e-300)
    mid = pts.gather(1, ((edges[:, 1:] + edges[:, :-1]) // 2).clamp(0, b - 1))
    summ = torch.where(mass > 0, summ, mid)
    mass = mass + 1e-12 * total.clamp_min(1e-300) / m  # no point has zero probability
    centers = torch.empty(g, k, dtype=torch.float64)
    u = torch.rand(g, k, generator=gen, dtype=torch.float64)
    centers[:, 0] = summ.gather(1, _draw(mass, u[:, :1]))[:, 0]
    d2 = (summ - centers[:, :1]) ** 2
    for j in range(1, k):
        p = mass * d2
        dead = p.sum(1) <= 0  # every point is already a center: any pick is a duplicate
        p[dead] = mass[dead]
        centers[:, j] = summ.gather(1, _draw(p, u[:, j:j + 1]))[:, 0]
        d2 = torch.minimum(d2, (summ - centers[:, j:j + 1]) ** 2)
    return centers.sort(dim=1).values


def _draw(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row drawn with probability proportional to `p` (G, M), by inverting the
    cumulative sum at the uniform draws `u` (G, 1)."""
    c = p.cumsum(1)
    return torch.searchsorted(c, (u * c[:, -1:]).contiguous(), right=True).clamp_max(
        p.shape[1] - 1)


def kmeans_1d(x: torch.Tensor, bits: int, importance: torch.Tensor | None = None,
              seed: int = 0, iters: int = MAX_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means of each row of `x` (G, N) into 2^bits centroids.

    Returns (centroids (G, 2^bits) float64 sorted, indices (G, N) int64). `importance` (G, N),
    non-negative, weighs each element's squared error (None: uniform). Deterministic for a seed.

    Lloyd runs on a fine histogram of each row (HIST_BINS bins holding the exact weighted sums
    of their values, so no sort of N values is needed): in 1-D the clusters are intervals, so
    an assignment is the bin where each midpoint between centroids falls and an update is a
    difference of prefix sums. The final assignment is of every element by the exact
    midpoints, and the centroids are then the exact weighted means of their members.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    k = 1 << bits
    g, n = x.shape
    x = x.detach().float()
    w = None if importance is None else importance.detach().float().clamp_min(0)
    lo = x.amin(1, keepdim=True)
    span = (x.amax(1, keepdim=True) - lo).clamp_min(1e-30)
    # a few values per bin at most, at least 64 bins per cluster
    nb = min(HIST_BINS, max(64 * k, 1 << max(n // 4 - 1, 1).bit_length()))
    bins = ((x - lo) * (nb / span)).long().clamp_(0, nb - 1)
    bins += torch.arange(g).view(-1, 1) * nb
    flat = bins.view(-1)
    hw = torch.bincount(flat, None if w is None else w.reshape(-1).double(),
                        minlength=g * nb).view(g, nb).double()
    hwx = torch.bincount(flat, (x if w is None else w * x).reshape(-1).double(),
                         minlength=g * nb).view(g, nb)
    centers = lo.double() + span.double() * (torch.arange(nb, dtype=torch.float64) + 0.5) / nb
    pts = torch.where(hw > 0, hwx / hw.clamp_min(1e-300), centers)  # non-decreasing per row
    hwx2 = torch.bincount(flat, ((x * x) if w is None else w * x * x).reshape(-1).double(),
                          minlength=g * nb).view(g, nb)
    # N_INIT seedings per group, as extra rows, Lloyd on all at once; the best row per group
    r = N_INIT
    zero = torch.zeros(g * r, 1, dtype=torch.float64)
    pts = pts.repeat(r, 1).contiguous()
    cw = torch.cat([zero, hw.cumsum(1).repeat(r, 1)], 1)
    cwx = torch.cat([zero, hwx.cumsum(1).repeat(r, 1)], 1)
    cwx2 = torch.cat([zero, hwx2.cumsum(1).repeat(r, 1)], 1)
    gen = torch.Generator().manual_seed(seed)
    c = _seed(pts, cw, cwx, k, gen)
    bounds = None
    for _ in range(iters + 1):
        b = torch.searchsorted(pts, ((c[:, 1:] + c[:, :-1]) / 2).contiguous())
        edges = torch.cat([torch.zeros(g * r, 1, dtype=torch.long), b,
                           torch.full((g * r, 1), nb, dtype=torch.long)], 1)
        wsum = cw.gather(1, edges[:, 1:]) - cw.gather(1, edges[:, :-1])
        xsum = cwx.gather(1, edges[:, 1:]) - cwx.gather(1, edges[:, :-1])
        if bounds is not None and torch.equal(b, bounds):
            break
        bounds = b
        c = torch.where(wsum > 0, xsum / wsum.clamp_min(1e-300), c).sort(dim=1).values
    x2sum = cwx2.gather(1, edges[:, 1:]) - cwx2.gather(1, edges[:, :-1])
    cost = (x2sum - xsum ** 2 / wsum.clamp_min(1e-300)).sum(1).view(r, g)
    best = cost.argmin(0)  # first best on ties: deterministic
    c = c.view(r, g, k)[best, torch.arange(g)]
    # exact final step: every element to its nearest centroid, centroids to their members' means
    mids = ((c[:, 1:] + c[:, :-1]) / 2).float().contiguous()
    idx = torch.searchsorted(mids, x.contiguous())
    flat = (idx + torch.arange(g).view(-1, 1) * k).view(-1)
    wsum = torch.bincount(flat, None if w is None else w.reshape(-1).double(), minlength=g * k)
    xsum = torch.bincount(flat, (x if w is None else w * x).reshape(-1).double(),
                          minlength=g * k)
    wsum, xsum = wsum.view(g, k).double(), xsum.view(g, k)
    c = torch.where(wsum > 0, xsum / wsum.clamp_min(1e-300), c)
    return c, idx


def cluster(weight: torch.Tensor, bits: int, groups: int = 1,
            importance: torch.Tensor | None = None, lut_int8: bool = False,
            seed: int = 0, hessian: torch.Tensor | None = None) -> Codebook:
    """The codebook of `weight` with `groups` lookup tables of 2^bits entries over consecutive
    output channels (dim 0). `importance` broadcasts to the weight's shape (e.g. E[x_j^2] per
    input column). With `lut_int8` the entries are stored as int8 with one scale per group.

    `hessian` (a 2-D weight's columns x columns, e.g. the input second moment of a linear):
    the lookup tables are clustered as above (weighted by its diagonal when no `importance` is
    given), then the indices are chosen column by column with the rounding error of each
    column pushed onto the columns not yet assigned (`gptq_assign`), which minimizes the
    error as seen through `hessian` rather than element by element."""
    w = weight.detach()
    if w.shape[0] % groups:
        raise ValueError(f"{groups} groups do not divide {w.shape[0]} output channels")
    if hessian is not None and (w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1])):
        hessian = None  # not the weight's columns (a conv, a stale statistic)
    if hessian is not None and importance is None:
        importance = hessian.diagonal().float().clamp_min(0).view(1, -1)
    rows = w.reshape(groups, -1)
    imp = None
    if importance is not None:
        imp = importance.expand(w.shape).reshape(groups, -1)
    c, idx = kmeans_1d(rows, bits, imp, seed)
    if lut_int8:
        scale = (c.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12).float()
        q = torch.round(c.float() / scale).clamp(-127, 127).to(torch.int8)
        lut = (q.float() * scale).to(w.dtype)
    else:
        q = scale = None
        lut = c.to(w.dtype)
    if hessian is not None:
        idx = gptq_assign(w, lut.repeat_interleave(w.shape[0] // groups, 0), hessian)
        idx = idx.reshape(groups, -1)
    idx = idx.to(torch.uint8)  # a byte per index while planning; packed tighter in the graph
    return Codebook(bits, tuple(w.shape), idx, lut, q, scale)


def gptq_assign(weight: torch.Tensor, lut_rows: torch.Tensor, hessian: torch.Tensor,
                damp: float = DAMP, block: int = GPTQ_BLOCK) -> torch.Tensor:
    """Indices (R, C) int64 into each row's sorted lookup table `lut_rows` (R, K) for the 2-D
    `weight` (R, C), minimizing sum_r (w_r - q_r) H (w_r - q_r)^T greedily, as GPTQ does:
    columns are assigned in order, each to its nearest entry, and its rounding error is
    propagated onto the later columns through the Cholesky factor of H^-1 (the optimal
    update of the rest of the row given this column's error). Deterministic (no draws)."""
    w = weight.detach().double().clone()
    r, c = w.shape
    h = hessian.detach().double().clone()
    dead = h.diagonal() <= 0  # an input that is always zero: any index will do
    h[dead, dead] = 1.0
    h += damp * float(h.diagonal().mean()) * torch.eye(c, dtype=torch.float64)
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # numerically singular despite the damping: plain nearest entries
        u = torch.eye(c, dtype=torch.float64)
    lut = lut_rows.detach().double()
    mids = ((lut[:, 1:] + lut[:, :-1]) / 2).contiguous()
    idx = torch.empty(r, c, dtype=torch.long)
    for b0 in range(0, c, block):
        b1 = min(b0 + block, c)
        wb = w[:, b0:b1]
        err = torch.empty_like(wb)
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            v = wb[:, j:j + 1]
            i = torch.searchsorted(mids, v.contiguous())
            idx[:, b0 + j] = i[:, 0]
            e = (v - lut.gather(1, i)) / ub[j, j]
            wb[:, j + 1:] -= e * ub[j:j + 1, j + 1:]
            err[:, j:j + 1] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return idx


def output_hessian(gm: fx.GraphModule, node: str, batches: list[tuple], seed: int = 0,
                   probes: int = PROBES) -> torch.Tensor | None:
    """E[J^T J] of the graph's floating-point outputs with respect to the output of `node`
    (its last dimension: D x D), summed over the calibration `batches` and every other
    dimension: how an error added to that node's output reaches the model's outputs, to
    first order. Exact (one backward pass per output coordinate) when the outputs have at
    most `probes` values per example, else estimated with `probes` Rademacher projections
    (E[J^T r r^T J] = J^T J), drawn from `seed`. None when the outputs do not depend on the
    node differentiably."""
    from fxcompress.calibration import OverrideInterpreter, float_leaves

    target = next((n for n in gm.graph.nodes if n.name == node), None)
    if target is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    total = None
    for batch in batches:
        held = {}

        def leaf(args, kwargs, target=target, held=held):
            out = target.target(*args, **kwargs).detach().requires_grad_(True)
            held["x"] = out
            return out

        with torch.enable_grad():
            outs = float_leaves(OverrideInterpreter(gm, {node: leaf}).run(*batch))
            x = held.get("x")
            outs = [o for o in outs if o.requires_grad]
            if x is None or not outs or not x.is_floating_point():
                return None
            per_example = sum(o[0].numel() if o.dim() else 1 for o in outs)
            exact = per_example <= probes and all(o.dim() >= 1 for o in outs)
            dirs = []
            if exact:
                for k, o in enumerate(outs):
                    for j in range(o[0].numel()):
                        r = [torch.zeros_like(t) for t in outs]
                        r[k].view(o.shape[0], -1)[:, j] = 1.0
                        dirs.append(r)
            else:
                for _ in range(probes):
                    dirs.append([(torch.randint(0, 2, o.shape, generator=gen) * 2 - 1).to(o.dtype)
                                 for o in outs])
            part = None
            for i, r in enumerate(dirs):
                g, = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outs, r, strict=True)),
                                         x, retain_graph=i + 1 < len(dirs), allow_unused=True)
                if g is None:
                    return None
                g = g.detach().reshape(-1, g.shape[-1]).double()
                part = g.T @ g if part is None else part + g.T @ g
            if not exact:
                part /= probes  # each projection alone estimates J^T J
            total = part if total is None else total + part
    return total


# --- packing ------------------------------------------------------------------------------
# Layout, per group of n indices: chunk_bytes byte planes of P = ceil(n / per_chunk) bytes;
# index f sits in slot j = f // P of word r = f % P, word r = sum_j idx * 2^(bits j), and byte
# plane i holds byte i of every word. Slots are planes rather than neighbours so the graph
# unpacks a whole plane with one broadcast division (few ops: every op of a serialized program
# costs about a kilobyte of graph description, as much as 2,000 4-bit indices).
def packed_shape(groups: int, n: int, bits: int) -> tuple[int, ...]:
    """Shape of the packed `uint8` buffer: (G, 1, P), or (G, bytes, 1, P) where an index
    chunk spans several bytes (bits 3, 5, 6, 7)."""
    per_chunk, chunk_bytes = _chunk(bits)
    p = math.ceil(n / per_chunk)
    return (groups, 1, p) if chunk_bytes == 1 else (groups, chunk_bytes, 1, p)


def pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """(G, n) indices < 2^bits -> packed `uint8` of `packed_shape` (zero-padded)."""
    per_chunk, chunk_bytes = _chunk(bits)
    g, n = indices.shape
    p = math.ceil(n / per_chunk)
    idx = torch.nn.functional.pad(indices.long(), (0, per_chunk * p - n)).view(g, per_chunk, p)
    word = (idx << (torch.arange(per_chunk) * bits).view(1, -1, 1)).sum(1)  # (G, P) <= 56 bits
    planes = (word.unsqueeze(1) >> (torch.arange(chunk_bytes) * 8).view(1, -1, 1)) & 0xFF
    return planes.to(torch.uint8).reshape(packed_shape(g, n, bits))


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack` -> (G, n) int64, with the same arithmetic the graph runs."""
    per_chunk, chunk_bytes = _chunk(bits)
    word = packed.long()
    if chunk_bytes > 1:
        word = (word * _byte_weights(chunk_bytes)).sum(1)
    idx = torch.div(word, _slot_divisors(bits), rounding_mode="floor") % (1 << bits)
    return idx.reshape(packed.shape[0], -1)[:, :n]


def _slot_divisors(bits: int) -> torch.Tensor:
    per_chunk, _ = _chunk(bits)
    return (2 ** (torch.arange(per_chunk, dtype=torch.int64) * bits)).view(-1, 1)


def _byte_weights(chunk_bytes: int) -> torch.Tensor:
    return (256 ** torch.arange(chunk_bytes, dtype=torch.int64)).view(-1, 1, 1)


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
    grouped: bool  # one lookup table per GROUP_SIZE output channels (else one per tensor)
    lut_int8: bool  # int8 lookup-table entries with a fp32 scale per table
    seed: int = 0
    # (the weight the planner clustered, its codebook), per step of the candidate's chain
    codebooks: tuple[tuple[torch.Tensor, Codebook], ...] = ()
    # the first step's error-compensation Hessian (`_hessian`), for re-clustering a weight
    # whose rows changed upstream (pruned output channels keep the input columns)
    hessian: torch.Tensor | None = None


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
    groups = group_count(step.weight.shape[0], spec.grouped)
    imp = _importance(step.op, step.weight, step.groups, cov)
    cb = cluster(step.weight, spec.bits, groups, imp, spec.lut_int8, spec.seed,
                 _hessian(step.op, step.weight, cov, out_h))
    return replace(step, weight=cb.decode(), fmt="shared", weight_bytes=cb.file_bytes,
                   input_quant=None), cb


def _candidate(base: Candidate, ctx: ProposeContext, bits: int, grouped: bool, lut_int8: bool,
               technique: str, cov: torch.Tensor | None = None) -> Candidate | None:
    """`base` shared; `cov`: the layer's input second moment (computed once per layer by the
    caller, so that its candidates hold one copy of it)."""
    if cov is None:
        cov = ctx.stats.covariance
    layer_cov = cov
    out_h = embedding_hessian(ctx.calib, base.layer.node, ctx.seed) \
        if base.layer.op == "embedding" and ctx.calibrated else None
    spec = ShareSpec(bits, grouped, lut_int8, ctx.seed)
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
    return Candidate(technique, base.layer, params, tuple(steps),
                     payload=dict(base.payload, share=spec))


def propose(layer, base: Candidate, ctx: ProposeContext):
    """The layer palettized at every width the profile decodes, one lookup table per tensor
    and one per group of output channels (int8 entries where the target runs int8)."""
    if not ctx.profile.supports(layer.op, "shared") or not ctx.profile.share_bits:
        return [], f"share: {ctx.profile.name} does not decode palettized weights"
    if layer.op == "conv2d" and ctx.weight.numel() < (1 << max(ctx.profile.share_bits)):
        return [], "share: the weight has fewer elements than the palette"
    cands, cov = [], ctx.stats.covariance
    for bits in sorted(ctx.profile.share_bits):
        variants = [False]
        if group_count(layer.weight_shape[0], True) > 1:
            variants.append(True)
        for grouped in variants:
            groups = group_count(layer.weight_shape[0], grouped)
            lut_int8 = _int8_lut_pays(ctx, groups, bits)
            c = _candidate(base, ctx, bits, grouped, lut_int8, "share", cov)
            if c is not None:
                cands.append(c)
    return cands, None


def _int8_lut_pays(ctx: ProposeContext, groups: int, bits: int) -> bool:
    """Whether int8 lookup-table entries save more bytes than the cast, the multiply and the
    scale tensor they add to the serialized program."""
    entry = ctx.weight.element_size()
    saved = groups * (1 << bits) * (entry - 1) - groups * 4
    cost = (2 + (ctx.weight.dtype != torch.float32)) * GRAPH_BYTES_PER_OP \
        + GRAPH_BYTES_PER_TENSOR
    return ctx.profile.allows("int8") and saved > cost


def stack(base: Candidate, ctx: ProposeContext) -> Candidate | None:
    """Sharing on top of another technique's chain (the factors of an SVD, a pruned weight),
    at one width: STACK_BITS or the closest the profile decodes."""
    if not ctx.profile.share_bits or "share" in base.technique.split("+"):
        return None
    bits = min(ctx.profile.share_bits, key=lambda b: (abs(b - STACK_BITS), b))
    grouped = all(group_count(s.weight.shape[0], True) > 1 for s in base.steps)
    groups = min(group_count(s.weight.shape[0], grouped) for s in base.steps)
    return _candidate(base, ctx, bits, grouped, _int8_lut_pays(ctx, groups, bits),
                      f"{base.technique}+share")


@dataclass(frozen=True)
class ShareConfig:
    """Which layers are shared, and how."""

    layers: Mapping[str, ShareSpec] = field(default_factory=dict)


def make_config(chosen: list[Candidate]) -> ShareConfig:
    """The pass config for the chosen candidates that carry sharing."""
    return ShareConfig({c.layer.name: c.payload["share"] for c in chosen
                        if "share" in c.payload})


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
        cov = st.covariance if st is not None and st.gram is not None else None
        imp = _importance(lay.op, w, lay.groups, cov)
        hess = None
        if lay.op in compensate:
            out_h = embedding_hessian(calib, lay.node, seed) if lay.op == "embedding" else None
            hess = _hessian(lay.op, w, cov, out_h)
        cb = cluster(w, bits, group_count(w.shape[0], grouped), imp, lut_int8, seed, hess)
        specs[lay.name] = ShareSpec(bits, grouped, lut_int8, seed, ((w, cb),), hess)
    return ShareConfig(specs)


# --- the pass -----------------------------------------------------------------------------
def _codebook_for(weight: torch.Tensor, spec: ShareSpec) -> Codebook:
    for src, cb in spec.codebooks:
        if src.shape == weight.shape and torch.equal(src, weight.detach()):
            return cb
    groups = group_count(weight.shape[0], spec.grouped)
    return cluster(weight, spec.bits, groups, None, spec.lut_int8, spec.seed, spec.hessian)


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
    return w


def _fused_decode(gm: fx.GraphModule, members: list[tuple[fx.Node, str, Codebook]],
                  ) -> list[fx.Node]:
    """Weights with one float lookup table each, the same width (last dim) and bits, decoded
    from ONE packed stream: the unpacking runs once, as an (rows, width) index table, and each
    weight is a row slice of it looked up in its own table. Two ops per weight instead of four
    or more: each op costs about a kilobyte of graph description in the serialized program."""
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
        found.append((node, layer, _codebook_for(weight, config.layers[layer]), wi))
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
    if found:
        drop_unused_attrs(gm)
    return PassResult(gm, bool(found))


def _set_weight(node: fx.Node, wi: int, value: fx.Node) -> None:
    args = list(node.args)
    args[wi] = value
    node.args = tuple(args)


TECHNIQUE = register(Technique("share", order=80, propose=propose, make_config=make_config,
                               apply=share_pass, stack=stack))
