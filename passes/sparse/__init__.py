"""sparse: single weights zeroed (unstructured or N:M) and the layer stored sparse.

What the target runs comes from its profile's ``[sparsity]`` table: the patterns
(``"unstructured"``, ``"2:4"``, ...), the fractions zeroed for unstructured masks
(``levels``), and the palette widths the kept values may be stored at (``value_bits``; they
are always offered at full width too). Each linear / conv2d gets a candidate per pattern,
level and value width; the planner costs and measures them like every other. A profile
without patterns gets none, and the report says so.

The mask (`masks.py`) is chosen by the layer's `method` setting: ``"sparsegpt"`` (second order,
the kept weights updated to make up for the zeroed ones; linears with enough calibration rows),
``"wanda"`` (|w| x input RMS; where there is calibration data) or ``"magnitude"``. A method that
lacks what it needs falls back down that list, and the report names the method each layer got.
Kept values on a palette are k-means centroids of the kept weights (weighted by E[x^2] of their
inputs, share's clustering), assigned with the pruning error compensated where SparseGPT ran.

How the graph holds it: the kept values in the weight's flat order (float32, or palette
indices packed 8 / bits a byte plus the palette), and where they go, whichever is smaller: the
mask as bits (eight a byte), or the gaps between kept positions in 1-, 2-, 4- or 8-bit fields
(`gap_fields`; at 90 % zeroed, 4-bit gaps take half a bit a weight). Before the op, a decode of
core ATen ops that every runtime here runs (floor division and remainder unpack the fields; a
cumulative sum numbers the kept positions and a gather places the values, times the mask; or
a cumulative sum of the gaps gives the positions and a scatter places the values there). The
serialized program shrinks by what is stored; the decode runs at every call. No runtime here
reads a native sparse form (the profiles' ``speedup`` entries record what their sparse kernels
measured: nvidia-gpu's 2:4 fp16 matmul ran at 0.73x the dense speed), so every sparse layer is
costed as stored sparse and decoded to dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import fx

from fxcompress.candidates import Candidate, Step
from fxcompress.graph import _fake_like, add_buffer, drop_unused_attrs
from fxcompress.passes.share.cluster import kmeans_1d
from fxcompress.passes.sparse import masks
from fxcompress.passes.svd.decompose import shrinkage, shrunk
from fxcompress.passes_infra import PassResult
from fxcompress.rewrite import call
from fxcompress.technique import (
    PartsConfig,
    ProposeContext,
    Technique,
    Trainable,
    checked_field,
    configured_layers,
    parts_config,
    register,
    straight_through,
    weight_as_planned,
)

aten = torch.ops.aten
#: calibration rows per input column below which SparseGPT's Hessian is not trusted (as
#: intx's GPTQ): the layer falls back to Wanda
ROWS_PER_COLUMN = 2


@dataclass(frozen=True)
class SparseSettings:
    """sparse's settings; `compile(overrides={"*": {"sparse": {...}}})` changes them."""

    #: how the mask is chosen: "sparsegpt" (second order, compensated), "wanda" (|w| x input
    #: RMS), "magnitude" (|w|); falls back down that list where calibration data is missing
    method: str = "sparsegpt"

    def __post_init__(self):
        checked_field(self.method, "method", str, lambda v: v in masks.METHODS,
                      f"one of {', '.join(masks.METHODS)}")


@dataclass(frozen=True)
class SparsePart:
    """What the sparse pass stores for one weight."""

    pattern: str
    sparsity: float  # fraction of the weight zeroed
    method: str  # the method the mask came from
    kept: torch.Tensor  # bool, the weight's shape
    values: torch.Tensor  # float32 (kept,): the kept values in flat order (full width)
    bits: int | None = None  # palette width of the kept values (None: full width)
    lut: torch.Tensor | None = None  # float32 (2^bits,) sorted palette
    codes: torch.Tensor | None = None  # int64 (kept,) palette indices
    # where the kept values go: None, a bit per weight; else the gaps between kept positions
    # in fields of this width (`gap_fields`), the cheaper of the two for this mask
    gap_bits: int | None = None

    def dense(self) -> torch.Tensor:
        """The weight the graph decodes (zeros where not kept)."""
        flat = torch.zeros(self.kept.numel(), dtype=torch.float32)
        vals = self.lut[self.codes] if self.bits is not None else self.values
        flat[self.kept.reshape(-1)] = vals
        return flat.reshape(self.kept.shape)

    @property
    def position_bytes(self) -> int:
        """Bytes of where the kept values go: the mask bits or the gap fields."""
        if self.gap_bits is None:
            return math.ceil(self.kept.numel() / 8)
        return math.ceil(len(gap_fields(self.kept, self.gap_bits)) * self.gap_bits / 8)

    @property
    def stored_bytes(self) -> int:
        """Positions, kept values (or their packed indices and the palette)."""
        nnz = int(self.kept.sum())
        if self.bits is None:
            return self.position_bytes + nnz * 4
        return self.position_bytes + math.ceil(nnz * self.bits / 8) + (1 << self.bits) * 4


def gap_fields(kept: torch.Tensor, bits: int) -> torch.Tensor:
    """The kept positions (flat order) as `bits`-bit fields: each field f < 2^bits - 1 moves
    f + 1 on from the last kept position (from -1) and places the next value there; the field
    2^bits - 1 moves 2^bits - 1 on and places nothing (a gap too long for one field). int64."""
    pos = torch.nonzero(kept.reshape(-1)).reshape(-1)
    gaps = torch.diff(pos, prepend=torch.tensor([-1])) - 1  # zeros skipped before each
    top = (1 << bits) - 1
    escapes = torch.div(gaps, top, rounding_mode="floor")
    last = gaps - escapes * top
    per = escapes + 1
    out = torch.full((int(per.sum()),), top, dtype=torch.int64)
    out[torch.cumsum(per, 0) - 1] = last
    return out


def best_gap_bits(kept: torch.Tensor) -> int | None:
    """The field width whose gap fields take fewer bytes than a bit per weight (None: the
    bit mask is smallest)."""
    best, size = None, math.ceil(kept.numel() / 8)
    for b in masks.VALUE_BITS:
        got = math.ceil(len(gap_fields(kept, b)) * b / 8)
        if got < size:
            best, size = b, got
    return best


def _unpack_ops(bits: int) -> int:
    """Ops that unpack a byte stream of `bits`-bit fields (`_unpack`)."""
    return 6 if bits < 8 else 1


def _decode_ops(part: SparsePart) -> int:
    """Ops the pass inserts before the layer (`_decode`, kept in step with it)."""
    if part.gap_bits is None:  # mask bits; cumsum, -1, clamp, gather; convert, multiply
        ops = _unpack_ops(1) + 6
    else:  # fields; escape test and convert, advance, cumsum, -1, value index (4 ops),
        ops = _unpack_ops(part.gap_bits) + 16  # gather, target (3 ops), zeros, scatter, slice
    if part.bits is not None:
        ops += _unpack_ops(part.bits) + 1  # the indices, then their palette lookup
    return ops + 1  # view to the weight's shape


# --- planning -------------------------------------------------------------------------------
def _as_rows(w: torch.Tensor) -> torch.Tensor:
    """A weight as (output rows, input columns): a conv's columns are its (in, kh, kw)."""
    return w.reshape(w.shape[0], -1)


def _col_rms(step: Step, cov: torch.Tensor | None) -> torch.Tensor | None:
    """RMS of the input each column multiplies (a conv: its input channel's, per kernel
    element); None without statistics or for grouped convs (their rows see other channels)."""
    if cov is None:
        return None
    d = cov.diagonal().float().clamp_min(0).sqrt()
    w = step.weight
    if step.op == "linear" and d.numel() == w.shape[1]:
        return d
    if step.op == "conv2d" and step.groups == 1 and d.numel() == w.shape[1]:
        return d.repeat_interleave(w.shape[2] * w.shape[3])
    return None


def _hessian(step: Step, ctx: ProposeContext) -> torch.Tensor | None:
    """A linear's input second moment, shrunk as SVD's, where there are enough rows."""
    cov = ctx.stats.covariance if ctx.calibrated else None
    if step.op != "linear" or cov is None or cov.shape[0] != step.weight.shape[1] \
            or ctx.stats.rows < ROWS_PER_COLUMN * step.weight.shape[1]:
        return None
    return shrunk(cov, shrinkage(cov, ctx.stats.rows, ctx.stats.fourth))


def _mask(w2: torch.Tensor, method: str, sparsity: float, nm, hessian, col_rms
          ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(kept mask, weight the kept entries take, method used) of `w2` (R, C)."""
    if method == "sparsegpt" and hessian is not None:
        got = masks.sparsegpt(w2, hessian, sparsity, nm)
        if got is not None:
            return got[1], got[0], "sparsegpt"
    if method in ("sparsegpt", "wanda") and col_rms is not None:
        return masks.wanda(w2, sparsity, nm, col_rms), w2, "wanda"
    return masks.magnitude(w2, sparsity, nm), w2, "magnitude"


def _part(w2: torch.Tensor, shape: tuple, kept: torch.Tensor, fitted: torch.Tensor,
          pattern: str, sparsity: float, method: str, bits: int | None, hessian,
          col_rms, seed: int) -> SparsePart:
    values = fitted[kept].float()
    part = SparsePart(pattern, sparsity, method, kept.reshape(shape), values,
                      gap_bits=best_gap_bits(kept))
    if bits is None:
        return part
    imp = None if col_rms is None else (col_rms ** 2).view(1, -1).expand_as(w2)[kept]
    lut, codes = kmeans_1d(values.view(1, -1), bits, None if imp is None else imp.view(1, -1),
                           seed)
    lut = lut[0].float()
    codes = codes[0]
    if method == "sparsegpt" and hessian is not None:
        comp = masks.compensate_kept(w2, kept, lut, hessian)
        if comp is not None:
            codes = comp[kept]
    return replace(part, bits=bits, lut=lut, codes=codes.long())


def _sparse_step(step: Step, part: SparsePart) -> Step:
    return replace(step, weight=part.dense(), fmt="sparse", weight_bytes=part.stored_bytes,
                   input_quant=None, extra_ops=_decode_ops(part))


def _sparsest(step: Step, p) -> Step:
    """The layer at the profile's most compact sparse form (its bytes only), for the probe of
    whether sparse can be faster at all."""
    s = max(masks.sparsity_of(pt, lv) for pt in p.sparsity_patterns
            for lv in ((None,) if masks.nm_of(pt) else p.sparsity_levels))
    n = step.weight.numel()
    bits = min(p.sparsity_value_bits, default=32)
    return replace(step, fmt="sparse", extra_ops=0,
                   weight_bytes=math.ceil(n / 8) + math.ceil((n - round(n * s)) * bits / 8))


def propose(layer, base: Candidate, ctx: ProposeContext):
    """The layer at every pattern, level and value width of the profile's ``[sparsity]``."""
    p = ctx.profile
    if not p.allows("sparse") or not p.sparsity_patterns:
        return [], (f"sparse: {p.name} runs no sparse weights (its profile lists no "
                    "[sparsity] patterns)")
    step = base.steps[0]
    if len(base.steps) != 1 or step.op not in ("linear", "conv2d"):
        return [], "sparse: only linear and conv2d weights are stored sparse"
    if ctx.objective == "latency" and not ctx.user_techniques and ctx.shapes is not None:
        probe = replace(base, technique="sparse", steps=(_sparsest(step, p),))
        inp = ctx.shapes.inp
        if probe.costed(inp, p).latency >= base.costed(inp, p).latency:
            return [], (f"sparse: decoded to dense before the op, even the sparsest form is "
                        f"not faster than the layer on {p.name}"
                        + _speedup_text(p))
    want = ctx.knobs("sparse").method
    hessian = _hessian(step, ctx)
    col_rms = _col_rms(step, ctx.stats.covariance if ctx.calibrated else None)
    w2 = _as_rows(step.dense().detach().float())
    cands, skipped = [], []
    for pattern in p.sparsity_patterns:
        nm = masks.nm_of(pattern)
        if nm is not None and w2.shape[1] % nm[1]:
            skipped.append(f"{pattern}: {w2.shape[1]} input columns are not runs of {nm[1]}")
            continue
        for level in (p.sparsity_levels if nm is None else (None,)):
            s = masks.sparsity_of(pattern, level)
            kept, fitted, method = _mask(w2, want, s, nm, hessian, col_rms)
            for bits in (None, *p.sparsity_value_bits):
                part = _part(w2, tuple(step.weight.shape), kept, fitted, pattern, s, method,
                             bits, hessian, col_rms, ctx.seed)
                params = {"pattern": pattern, "sparsity": round(s, 4), "method": method,
                          "values": "fp32" if bits is None else f"{bits}-bit palette",
                          "positions": "bit mask" if part.gap_bits is None
                          else f"{part.gap_bits}-bit gaps"}
                cands.append(Candidate("sparse", layer, params, (_sparse_step(step, part),),
                                       parts={"sparse": part}))
    return cands, ("sparse: " + "; ".join(skipped)) if skipped and not cands else None


def _speedup_text(p) -> str:
    if not p.sparsity_speedup:
        return ""
    got = ", ".join(f"{k} {v:g}x" for k, v in sorted(p.sparsity_speedup.items()))
    return f" (its runtime's sparse kernels measured {got} the dense speed)"


def notes(choice, calib) -> list[str]:
    """What the chosen sparse layers store and how they run."""
    mine = [c for c in choice.values() if c.part("sparse") is not None]
    if not mine:
        return []
    methods = sorted({c.part("sparse").method for c in mine})
    return [f"sparse: {len(mine)} layer(s) stored sparse (positions, kept values), masks by "
            f"{', '.join(methods)}; decoded to dense before the op at every call"]


# --- the pass -------------------------------------------------------------------------------
def pack_fields(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit fields (bits dividing 8), low fields first, as bytes."""
    per = 8 // bits
    n = codes.numel()
    c = torch.nn.functional.pad(codes.reshape(-1).long(), (0, (-n) % per)).view(-1, per)
    return (c << (torch.arange(per) * bits)).sum(1).to(torch.uint8)


def unpack_fields(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` fields `pack_fields` stored, int64."""
    per = 8 // bits
    parts = [(packed.long() >> (j * bits)) & ((1 << bits) - 1) for j in range(per)]
    return torch.stack(parts, -1).reshape(-1)[:n]


def _divisors(gm: fx.GraphModule, bits: int, before: fx.Node) -> fx.Node:
    """A get_attr of the field divisors 2^(bits j), one buffer per width in the graph."""
    name = f"sparse_field_div_{bits}"
    if not hasattr(gm, name):
        gm.register_buffer(name, 2 ** (torch.arange(8 // bits, dtype=torch.int64) * bits))
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = _fake_like(before, getattr(gm, name))
    return node


def _unpack(gm: fx.GraphModule, node: fx.Node, buf: fx.Node, bits: int, n: int, layer: str
            ) -> fx.Node:
    """Graph ops for `unpack_fields` (int64 fields), by floor division and remainder (core
    ATen: ExecuTorch's portable kernels, ONNX and eager all run them)."""
    g = gm.graph
    per = 8 // bits
    div = _divisors(gm, bits, node) if per > 1 else None
    with g.inserting_before(node):
        wide = call(g, aten._to_copy.default, (buf,), {"dtype": torch.int64}, layer=layer)
        if per == 1:
            return wide
        fields = call(g, aten.remainder.Scalar, (call(
            g, aten.div.Tensor_mode, (call(g, aten.unsqueeze.default, (wide, -1), layer=layer),
                                      div), {"rounding_mode": "floor"}, layer=layer),
            1 << bits), layer=layer)
        flat = call(g, aten.reshape.default, (fields, [-1]), layer=layer)
        return call(g, aten.slice.Tensor, (flat, 0, 0, n), layer=layer)


def _decode(gm: fx.GraphModule, node: fx.Node, layer: str, part: SparsePart) -> fx.Node:
    g = gm.graph
    if part.bits is None:
        vn = add_buffer(gm, f"{layer}.sparse_values", part.values, node)
    else:
        cn = add_buffer(gm, f"{layer}.sparse_codes", pack_fields(part.codes, part.bits), node)
        ln = add_buffer(gm, f"{layer}.sparse_lut", part.lut, node)
    idx = None if part.bits is None else _unpack(gm, node, cn, part.bits, len(part.codes), layer)
    if idx is not None:
        with g.inserting_before(node):
            vn = call(g, aten.index_select.default, (ln, 0, idx), layer=layer)
    if part.gap_bits is None:
        w = _place_by_mask(gm, node, layer, part, vn)
    else:
        w = _place_by_gaps(gm, node, layer, part, vn)
    with g.inserting_before(node):
        return call(g, aten.view.default, (w, list(part.kept.shape)), layer=layer)


def _place_by_mask(gm, node, layer, part: SparsePart, vals: fx.Node) -> fx.Node:
    """Mask bits -> each weight's kept value (cumulative count of kept bits), times the bit."""
    g = gm.graph
    n = part.kept.numel()
    mn = add_buffer(gm, f"{layer}.sparse_mask", pack_fields(part.kept.reshape(-1), 1), node)
    m = _unpack(gm, node, mn, 1, n, layer)
    with g.inserting_before(node):
        pos = call(g, aten.clamp_min.default, (call(g, aten.sub.Tensor, (
            call(g, aten.cumsum.default, (m, 0), layer=layer), 1), layer=layer), 0), layer=layer)
        got = call(g, aten.index_select.default, (vals, 0, pos), layer=layer)
        fm = call(g, aten._to_copy.default, (m,), {"dtype": torch.float32}, layer=layer)
        return call(g, aten.mul.Tensor, (got, fm), layer=layer)


def _place_by_gaps(gm, node, layer, part: SparsePart, vals: fx.Node) -> fx.Node:
    """Gap fields -> positions (cumulative advances), each real field's value scattered there;
    the long-gap fields scatter into one slot past the end, which is cut off."""
    g = gm.graph
    n, b = part.kept.numel(), part.gap_bits
    fields = gap_fields(part.kept, b)
    # the last byte filled with long-gap fields (which place nothing), not zeros (which would)
    fields = torch.cat([fields, fields.new_full(((-len(fields)) % (8 // b),), (1 << b) - 1)])
    fn = add_buffer(gm, f"{layer}.sparse_gaps", pack_fields(fields, b), node)
    f = _unpack(gm, node, fn, b, len(fields), layer)
    with g.inserting_before(node):
        esc = call(g, aten._to_copy.default, (call(g, aten.eq.Scalar, (f, (1 << b) - 1),
                                                   layer=layer),), {"dtype": torch.int64},
                   layer=layer)
        adv = call(g, aten.sub.Tensor, (call(g, aten.add.Tensor, (f, 1), layer=layer), esc),
                   layer=layer)
        pos = call(g, aten.sub.Tensor, (call(g, aten.cumsum.default, (adv, 0), layer=layer),
                                        1), layer=layer)
        real = call(g, aten.rsub.Scalar, (esc, 1), layer=layer)
        vidx = call(g, aten.clamp_min.default, (call(g, aten.sub.Tensor, (
            call(g, aten.cumsum.default, (real, 0), layer=layer), 1), layer=layer), 0),
            layer=layer)
        got = call(g, aten.index_select.default, (vals, 0, vidx), layer=layer)
        # escapes go to slot n: pos + esc * (n - pos)
        tgt = call(g, aten.add.Tensor, (pos, call(g, aten.mul.Tensor, (
            esc, call(g, aten.rsub.Scalar, (pos, n), layer=layer)), layer=layer)), layer=layer)
        zeros = call(g, aten.zeros.default, ([n + 1],), {"dtype": torch.float32}, layer=layer)
        dense = call(g, aten.scatter.src, (zeros, 0, tgt, got), layer=layer)
        return call(g, aten.slice.Tensor, (dense, 0, 0, n), layer=layer)


def sparse_pass(gm: fx.GraphModule, config: PartsConfig) -> PassResult:
    """Store the weight of each configured linear / conv2d as mask bits and kept values,
    decoded before the op."""
    modified = False
    for node, layer, part in configured_layers(gm, config, ("linear", "conv2d")):
        if not weight_as_planned(gm, node, layer, part.kept.shape, "sparse"):
            continue
        args = list(node.args)
        args[1] = _decode(gm, node, layer, part)
        node.args = tuple(args)
        modified = True
    if modified:
        drop_unused_attrs(gm)
    return PassResult(gm, modified)


# --- recovery: the mask fixed, the kept values (or their palette indices) trained ------------
def _fake_of(c: Candidate):
    part = c.part("sparse")
    keep = part.kept.float()
    if part.bits is None:
        return lambda w: w * keep
    lut = part.lut
    return straight_through(lambda w: lut[masks.nearest(w.detach(), lut)] * keep)


def _init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor]:
    return [c.steps[0].dense().clone()]


def _write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule) -> Candidate:
    part = c.part("sparse")
    kept = latents[0].detach().float()[part.kept]
    if part.bits is None:
        part = replace(part, values=kept.clone())
    else:
        part = replace(part, codes=masks.nearest(kept, part.lut).long())
    return replace(c, steps=(_sparse_step(c.steps[0], part),),
                   parts={**c.parts, "sparse": part},
                   params={**c.params, "method": f"{part.method}, trained"})


TECHNIQUE = register(Technique(
    "sparse", order=85, propose=propose, make_config=parts_config("sparse"), apply=sparse_pass,
    trainable=Trainable(_init, _write), notes=notes, formats={"sparse": _fake_of}, final=True,
    settings=SparseSettings()))
