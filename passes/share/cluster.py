"""share's maths: weighted 1-D k-means palettes (`cluster`, `kmeans_1d`), GPTQ-style
error-compensating assignment (`gptq_assign`, `output_hessian`) and bit packing of the indices
(`pack`, `unpack`); the technique and its pass are in `__init__.py`."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import fx

from fxcompress.gptq import BLOCK as GPTQ_BLOCK
from fxcompress.gptq import DAMP, compensate, inverse_cholesky

#: Output channels per group for the grouped palettes (coremltools' per_grouped_channel
#: default); `ShareSettings.group_size` changes it.
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
#: What the decode costs in the `.pt2` fxcompress writes (`pt2.save_program`: its JSON
#: deflated) besides its tensors' bytes: each op's graph description and each extra tensor's
#: record, archive headers included (measured on torch 2.13 with 128 x 128 linears shared at
#: 4 bits: one layer's 4 ops and 2 more tensors cost 0.93 kB, four layers' 11 ops and 2 more
#: tensors 1.2 kB; torch's own archive, JSON stored, cost about 1.2 kB an op). Counted in a
#: shared step's stored bytes, so the planner never shares a weight too small to repay its
#: decoder.
GRAPH_BYTES_PER_OP = 100
GRAPH_BYTES_PER_TENSOR = 200

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
    # the entropy-coded variant (`uniform_lut`): the indices' bytes as the `.pt2` archive
    # stores them, deflated (`pt2.record_bytes`); None: stored packed as they are
    coded_bytes: int | None = None
    # (columns,) fp32 step of each input column of an entropy-coded 2-D weight, which
    # multiplies the looked-up entries (`column_steps`); None: the table's entries as they are
    col_scale: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        """Number of lookup tables."""
        return self.indices.shape[0]

    def decode(self) -> torch.Tensor:
        """The clustered weight (what the graph computes with)."""
        w = torch.gather(self.lut, 1, self.indices.long()).reshape(self.shape)
        return w if self.col_scale is None else w * self.col_scale.to(w.dtype)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed indices (the entropy-coded variant: deflated, as written)."""
        if self.coded_bytes is not None:
            return self.coded_bytes
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
        """Bytes stored for this weight: packed indices plus lookup tables (and column steps)."""
        cols = 0 if self.col_scale is None else self.col_scale.numel() * 4
        return self.packed_bytes + self.lut_bytes + cols

    @property
    def fusible(self) -> bool:
        """Whether the pass decodes this weight from a packed stream shared with the other
        weights of its width and bits (one float lookup table: `_fused_decode`). Entropy-coded
        indices keep a record of their own, which the archive deflates alone."""
        return self.groups == 1 and self.lut_q is None and self.coded_bytes is None

    @property
    def decode_ops(self) -> int:
        """Ops the pass inserts for this weight alone (`_fused_decode` / `_decode_nodes`,
        kept in step with them; a fused stream's shared unpacking is not counted)."""
        if self.fusible:
            return 2 + (len(self.shape) != 2)  # its row slice, its lookup, a reshape
        per_chunk, chunk_bytes = _chunk(self.bits)
        groups, n = self.indices.shape
        ops = 1 + (self.col_scale is not None)  # the final view (and the column steps)
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
        tensors = 0 if self.fusible else \
            1 + (self.lut_q is not None) + (self.col_scale is not None)
        return self.stored_bytes + self.decode_ops * GRAPH_BYTES_PER_OP \
            + tensors * GRAPH_BYTES_PER_TENSOR


#: The entropy-coded variant's grid step, in RMS of the weight times 2^-b, for the step whose
#: rounding error matches a b-bit k-means palette's on a Gaussian weight: Lloyd-Max leaves
#: 0.1175, 0.03455 and 0.0095 of the variance at 2, 3 and 4 bits, a uniform step s leaves
#: s^2 / 12, so s = 4.7, 5.2 and 5.4 x RMS x 2^-b.
GRID_STEP = 5.0
#: Entries of the entropy-coded variant's lookup table (its indices are a byte each).
GRID_ENTRIES = 256


def uniform_lut(rows: torch.Tensor, bits: float) -> torch.Tensor:
    """(groups, `GRID_ENTRIES`) lookup tables on a uniform grid through zero, one per row of
    `rows` (groups, n): the step `GRID_STEP` x RMS x 2^-`bits`, or wider where the row's
    largest magnitude would fall off the grid. The indices are a byte each and unevenly used
    (most weights near zero), so the archive's deflate stores them in about their entropy:
    the entropy-coded quantizer of Deep Compression's last stage. At a 3-bit palette's error
    or less: 2.8 bits a weight on Gaussian weights, 2.7 on Laplacian ones (where the error is
    three quarters of the palette's)."""
    r = rows.detach().double()
    rms = r.pow(2).mean(1, keepdim=True).sqrt()
    half = GRID_ENTRIES // 2
    step = torch.maximum(rms * GRID_STEP * 2.0 ** -bits,
                         r.abs().amax(1, keepdim=True) / (half - 1)).clamp_min(1e-12)
    return (torch.arange(GRID_ENTRIES, dtype=torch.float64) - half) * step


#: The widest ratio between two input columns' steps (`column_steps`).
COLUMN_RANGE = 16.0
#: Share of the mean diagonal entry added to each before the steps are derived.
COLUMN_DAMP = 1.0
#: Column steps closer than this ratio are left as one step.
COLUMN_EVEN = 1.05


def column_steps(hessian: torch.Tensor) -> torch.Tensor | None:
    """Each input column's step relative to the others, for the entropy-coded variant: the
    rounding error a column leaves reaches the output weighted by its diagonal entry h_j, and
    with the indices entropy-coded the bytes depend on the steps' geometric mean, so steps
    proportional to h_j^-1/2 (normalised to geometric mean 1) give the least weighted error
    at the same bytes: below a uniform step's by the ratio of h's arithmetic to geometric
    mean (MiniLM's linears: 1.1 to 3.2, about 0.1 to 0.85 bits a weight at high rate).
    Clamped to within `COLUMN_RANGE` of each other; None where h is all zero or the steps
    would be within `COLUMN_EVEN` of each other (one step: no tensor, no multiply)."""
    h = hessian.diagonal().double().clamp_min(0)
    if not bool((h > 0).any()):
        return None
    # damped toward the mean: a column quiet on the calibration data may not be elsewhere, so
    # no column's step grows past the mean column's by much (MiniLM, undamped: the unseen
    # sentences' worst cosine fell from 0.96 to 0.93 at the same held-out error)
    h = h + COLUMN_DAMP * h.mean()
    h = h.clamp_min(float(h.max()) / COLUMN_RANGE ** 2)
    if float(h.max() / h.min()) < COLUMN_EVEN ** 2:
        return None
    step = (h.log().mean().exp() / h).sqrt()
    return step.float()


def _chunk(bits: int) -> tuple[int, int]:
    """(indices, bytes) of the smallest whole-byte chunk of `bits`-bit indices."""
    span = math.lcm(bits, 8)
    return span // bits, span // 8


def group_count(out_channels: int, grouped: bool, size: int = GROUP_SIZE) -> int:
    """Lookup tables for a weight with `out_channels` rows: one, or one per `size` rows (per
    tensor when `size` does not divide the rows)."""
    if not grouped or out_channels % size or out_channels <= size:
        return 1
    return out_channels // size


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
            seed: int = 0, hessian: torch.Tensor | None = None, grid: float | None = None
            ) -> Codebook:
    """The codebook of `weight` with `groups` lookup tables of 2^bits entries over consecutive
    output channels (dim 0). `importance` broadcasts to the weight's shape (e.g. E[x_j^2] per
    input column). With `lut_int8` the entries are stored as int8 with one scale per group.

    `hessian` (a 2-D weight's columns x columns, e.g. the input second moment of a linear):
    the lookup tables are clustered as above (weighted by its diagonal when no `importance` is
    given), then the indices are chosen column by column with the rounding error of each
    column pushed onto the columns not yet assigned (`gptq_assign`), which minimizes the
    error as seen through `hessian` rather than element by element.

    `grid` (the entropy-coded variant): the lookup tables are `uniform_lut`'s at a `grid`-bit
    palette's error instead of k-means centroids, `bits` must be 8, and the codebook records
    the bytes its indices take deflated in the archive (`coded_bytes`)."""
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
    col = None
    if grid is not None:
        if bits != 8 or lut_int8:
            raise ValueError("an entropy-coded codebook has 8-bit indices and a float table")
        if hessian is not None and groups == 1:  # (2-D: checked above)
            col = column_steps(hessian)
        if col is not None:  # the grid and the assignment on the columns divided by steps
            w = w / col.to(w.dtype)
            hessian = hessian.double() * col.double().view(-1, 1) * col.double().view(1, -1)
            rows = w.reshape(groups, -1)
        c = uniform_lut(rows, grid)
        mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
        idx = torch.searchsorted(mids, rows.double().contiguous())
    else:
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
    cb = Codebook(bits, tuple(w.shape), idx, lut, q, scale, col_scale=col)
    return recoded(cb) if grid is not None else cb


def recoded(cb: Codebook) -> Codebook:
    """`cb` with `coded_bytes` measured on its indices as they are now (entropy-coded)."""
    from fxcompress.export.pt2 import record_bytes  # (export imports the passes)

    return replace(cb, coded_bytes=record_bytes(cb.indices.contiguous().numpy().tobytes()))


def gptq_assign(weight: torch.Tensor, lut_rows: torch.Tensor, hessian: torch.Tensor,
                damp: float = DAMP, block: int = GPTQ_BLOCK) -> torch.Tensor:
    """Indices (R, C) int64 into each row's sorted lookup table `lut_rows` (R, K) for the 2-D
    `weight` (R, C), minimizing sum_r (w_r - q_r) H (w_r - q_r)^T greedily, as GPTQ does:
    columns are assigned in order, each to its nearest entry, and its rounding error is
    propagated onto the later columns through the Cholesky factor of H^-1 (the optimal
    update of the rest of the row given this column's error). Deterministic (no draws)."""
    r, c = weight.shape
    u = inverse_cholesky(hessian, damp)
    if u is None:  # numerically singular despite the damping: plain nearest entries
        u = torch.eye(c, dtype=torch.float64)
    lut = lut_rows.detach().double()
    mids = ((lut[:, 1:] + lut[:, :-1]) / 2).contiguous()
    idx = torch.empty(r, c, dtype=torch.long)

    def round_column(j: int, v: torch.Tensor) -> torch.Tensor:
        i = torch.searchsorted(mids, v.unsqueeze(1).contiguous())
        idx[:, j] = i[:, 0]
        return lut.gather(1, i)[:, 0]

    compensate(weight, u, round_column, block)
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
