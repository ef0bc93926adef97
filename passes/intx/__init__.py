"""intx: group-wise 2-7-bit integer weights with 8-bit dynamic activations, in the form the
target's kernels run.

Each weight row is cut into groups of `group_size` input columns (the profile's `[intx]
group_size`), each group stored as signed `bits`-bit integers with one scale (`quant.py`). The
integers are chosen with error compensation on the layer's own input Hessian from calibration
(GPTQ: each column's rounding error is moved onto the columns not yet rounded), or rounded to
nearest (`rounding="rtn"`, the cheap form, and what is left without calibration data). Where
it lowers the layer's output error through that Hessian, a linear's input columns are first
scaled as AWQ scales them (Lin et al. 2024; `scaling="awq"`, the default): the weight's columns
multiplied by s = rms(x)^alpha, the input divided by s before it is quantized (one multiply in
the graph, an (in,) tensor stored), alpha from a grid by the error of rounding to nearest.

How the graph holds it (`[intx] activations = "dynamic"`, the form ExecuTorch's XNNPACK
delegate runs as its qd8 x qb4w GEMM on phones): the input is quantized per token, dynamically
(``quantized_decomposed.choose_qparams_per_token_asymmetric`` -> ``quantize_per_token`` ->
``dequantize_per_token``), the weight is held as int8 values in the integer range with
bfloat16-representable scales and dequantized by ``dequantize_per_channel_group``, and the
layer stays ``aten.linear``. XnnpackPartitioner takes the whole pattern into its int4 kernel and
packs the weight two values per byte in the ``.pte`` (scales as bfloat16); an ``.onnx`` holds
each such layer as ONNX Runtime's ``MatMulNBits``, also two per byte (`fxcompress.export.nbits`);
a ``.pt2`` written by `fxcompress.export` stores them two per byte and unpacks them in the
program (`nbits.packed_graph`; the report's serialized size is that file's), while
`torch.export.save` of the compiled model itself keeps one byte per value.

Embeddings (`[intx] ops` with "embedding") store their rows the same way, rounded to nearest
(each output value is one stored value: there is nothing to compensate with), packed in 2-, 4-
or 8-bit containers; the graph gathers the packed rows and their scales and unpacks only those
rows in float arithmetic, which every runtime runs (`_rewrite_embedding`). Convolutions are
not built; a profile that asks for them is refused when it loads.

Weight-only (`[intx] activations = "none"`, nvidia-gpu: TensorRT's INT4 weight-only form): the
input stays float, the codes are dequantized per group (``dequantize_per_channel_group``) and
fed to the float linear; scales in the profile's precision (fp16). The TensorRT ``.onnx``
holds each as ONNX's blocked ``DequantizeLinear`` (opset 21) of an INT4 initializer, two codes
a byte (`fxcompress.export.tensorrt`). Where the objective is latency and the profile does not
say its runtime gains from weight-only storage (`[int8] weight_only_speedup`), no candidate is
proposed: the decode costs more than the narrower weight saves.

The planner simulates a candidate with the same integers, scales and per-token quantizer the
pass writes, so what it measures is what the runtime computes (up to the runtime's own
rounding of the per-token step, which `fxcompress.export` checks).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
from torch import fx

from fxcompress.candidates import Candidate, Step, compact
from fxcompress.export.nbits import container_bits, pack
from fxcompress.graph import add_buffer, drop_unused_attrs, get_attr, op_type
from fxcompress.passes.intx.quant import (
    ACT_QMAX,
    ACT_QMIN,
    PerTokenInt8,
    ScaledPerTokenInt8,
    awq_scale,
    check_groups,
    dequantize,
    fake_quantize,
    gptq,
    hessian_error,
    qrange,
    round_to_scales,
    rtn,
)
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
    weight_as_planned,
)

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
ROUNDINGS = ("gptq", "rtn")
SCALINGS = ("awq", "none")
#: Calibration rows (tokens, examples) per input column below which rounding is to nearest even
#: where "gptq" is asked: compensation fitted to a second moment from fewer rows moves error
#: into directions those rows never took. A 1024-input layer from 32 rows: 0.009 error on the
#: rows, 0.050 on held-out rows (round to nearest: 0.067 and 0.065).
GPTQ_ROWS_PER_COLUMN = 2


@dataclass(frozen=True)
class IntxSettings:
    """intx's settings; `compile(overrides={"*": {"intx": {...}}})` changes them."""

    #: "gptq": error-compensated on the layer's input Hessian (rounds to nearest without
    #: calibration data, or with fewer than `GPTQ_ROWS_PER_COLUMN` rows per input column);
    #: "rtn": round to nearest
    rounding: str = "gptq"
    #: "awq": each linear's input columns scaled by AWQ's s (the weight's by 1 / s) where that
    #: lowers the layer's output error on its calibration inputs; "none": never
    scaling: str = "awq"

    def __post_init__(self):
        checked_field(self.rounding, "rounding", str, lambda v: v in ROUNDINGS,
                      f"one of {', '.join(ROUNDINGS)}")
        checked_field(self.scaling, "scaling", str, lambda v: v in SCALINGS,
                      f"one of {', '.join(SCALINGS)}")


@dataclass(frozen=True)
class IntxPart:
    """What the intx pass needs to build a candidate: the stored integers and scales."""

    bits: int
    group_size: int
    q: torch.Tensor  # int8 (out, in) in qrange(bits)
    scale: torch.Tensor  # fp32 (out, in / group_size)
    scale_dtype: str = "fp32"  # the precision the target keeps scales in: bf16, fp16, fp32
    rounding: str = "gptq"
    # AWQ: the input is multiplied by this per column (1 / s) before it is quantized, and q,
    # scale hold the weight's columns multiplied by s; None: no scaling
    inv_scale: torch.Tensor | None = None
    # the input: "dynamic" (8-bit per token) or "none" (weight-only, the profile's
    # `[intx] activations`)
    activations: str = "dynamic"

    def effective(self) -> torch.Tensor:
        """The weight the layer computes with, in its input's units."""
        w = dequantize(self.q, self.scale, self.group_size)
        return w if self.inv_scale is None else w * self.inv_scale


def _stored_bytes(part: IntxPart, op: str = "linear") -> int:
    """Bytes the target stores: the integers packed (bits per value; an embedding's in the
    2-, 4- or 8-bit containers the graph unpacks) and the scales."""
    per_scale = 2 if part.scale_dtype in ("bf16", "fp16") else 4
    bits = container_bits(part.bits) if op == "embedding" else part.bits
    extra = 0 if part.inv_scale is None else part.inv_scale.numel() * 4
    return (part.q.numel() * bits + 7) // 8 + part.scale.numel() * per_scale + extra


def _decode_ops(bits: int) -> int:
    """Element-wise ops an embedding's unpacking adds after its gathers (`_rewrite_embedding`):
    convert, a divide / floor / multiply-subtract per extra code in a byte, the offset, the
    scale's convert and multiply."""
    per = 8 // container_bits(bits)
    return 4 + 4 * (per - 1)


def _step(s: Step, part: IntxPart) -> Step:
    # compact: the part's codes are what the step keeps, decoded each time it runs
    w, decode = s.weight, part.effective
    if s.op == "embedding":
        return compact(s, decode, w, fmt="intx", weight_bytes=_stored_bytes(part, s.op),
                       extra_ops=_decode_ops(part.bits))
    if part.activations == "none":  # weight-only: the float input (scaled by 1 / s for AWQ)
        return compact(s, decode, w, fmt="intx", weight_bytes=_stored_bytes(part),
                       extra_ops=0 if part.inv_scale is None else 1)
    if part.inv_scale is None:
        return compact(s, decode, w, fmt="intx", weight_bytes=_stored_bytes(part),
                       input_quant=PerTokenInt8())
    return compact(s, decode, w, fmt="intx", weight_bytes=_stored_bytes(part), extra_ops=1,
                   input_quant=ScaledPerTokenInt8(part.inv_scale))


def _part(weight: torch.Tensor, hessian: torch.Tensor | None, importance: torch.Tensor | None,
          bits: int, group: int, scale_dtype: str, rounding: str, scaling: str = "none"
          ) -> IntxPart:
    if rounding == "gptq" and hessian is not None:
        q, s = gptq(weight, hessian, bits, group, scale_dtype)
    else:
        rounding = "rtn"
        q, s = rtn(weight, bits, group, scale_dtype, importance)
    part = IntxPart(bits, group, q, s, scale_dtype, rounding)
    if scaling != "awq" or hessian is None:
        return part
    awq = awq_scale(weight, hessian, bits, group, scale_dtype)
    if awq is None:
        return part
    ws = weight * awq
    hs = hessian / torch.outer(awq.double(), awq.double())
    if rounding == "gptq":
        q, s = gptq(ws, hs, bits, group, scale_dtype)
    else:
        q, s = rtn(ws, bits, group, scale_dtype, hs.diagonal().float().clamp_min(0))
    scaled = replace(part, q=q, scale=s, inv_scale=(1 / awq).float())
    if hessian_error(weight, scaled.effective(), hessian) \
            < hessian_error(weight, part.effective(), hessian):
        return scaled  # AWQ's scaling where it lowers the error, as measured through H
    return part


def _hessian(stats) -> torch.Tensor | None:
    """The layer's input second moment, shrunk towards its mean eigenvalue by the Ledoit-Wolf
    intensity of its calibration rows (as SVD's), which tempers how far the compensation
    trusts directions few rows took. It does not rescue a moment from far too few rows (a
    1024-input layer from 32 rows: 0.007 error on them, 0.052 on held-out rows; shrunk:
    0.009 and 0.050): that is what `GPTQ_ROWS_PER_COLUMN` is for."""
    cov = stats.covariance
    if cov is None:
        return None
    return shrunk(cov, shrinkage(cov, stats.rows, stats.fourth))


def propose(layer, base: Candidate, ctx: ProposeContext):
    """The layer at every width of the profile's `[intx] bits`, group-wise, with 8-bit
    dynamic activations."""
    p = ctx.profile
    if not p.supports(layer.op, "intx") or not p.intx_bits:
        return [], f"intx: {p.name} does not run group-wise low-bit {layer.op}"
    step = base.steps[0]
    if len(base.steps) != 1 or step.op not in ("linear", "embedding"):
        return [], "intx: only linear and embedding layers are built"
    why = check_groups(step.weight.shape[1], p.intx_group_size)
    if why:
        return [], f"intx: {why}"
    if step.op == "embedding":
        return _embedding_candidates(layer, step, p), None
    if p.intx_activations == "none" and ctx.objective == "latency" \
            and not p.weight_only_speedup and not ctx.user_techniques:
        return [], (f"intx: {p.name} runs low-bit weights weight-only (decoded before the "
                    "float op), which gains no speed there")
    rounding = ctx.knobs("intx").rounding
    scaling = ctx.knobs("intx").scaling
    cov = ctx.stats.covariance if ctx.calibrated else None
    importance = None if cov is None else cov.diagonal().clamp_min(0)
    # the shrunk moment only where GPTQ or AWQ reads it (a second in_features^2 float64)
    reads_h = rounding == "gptq" or scaling == "awq"
    hessian = _hessian(ctx.stats) if cov is not None and reads_h \
        and ctx.stats.rows >= GPTQ_ROWS_PER_COLUMN * step.weight.shape[1] else None
    del cov
    cands = []
    for bits in sorted(p.intx_bits):
        part = replace(_part(step.weight, hessian, importance, bits, p.intx_group_size,
                             p.intx_scale_dtype, rounding, scaling),
                       activations=p.intx_activations)
        params = {"bits": bits, "group": p.intx_group_size, "rounding": part.rounding,
                  "activations": "int8 dynamic" if part.activations == "dynamic"
                  else "none (weight-only)"}
        if part.inv_scale is not None:
            params["scaling"] = "awq"
        cands.append(Candidate("intx", layer, params, (_step(step, part),),
                               parts={"intx": part}))
    return cands, None


def _embedding_candidates(layer, step: Step, p) -> list[Candidate]:
    """An embedding's rows in groups of its columns, rounded to nearest: each output value is
    one stored value, so there is no error to move between columns (GPTQ has nothing to
    compensate with); the scales still take the clipped range with the least error."""
    cands = []
    for bits in sorted(p.intx_bits):
        q, sc = rtn(step.weight, bits, p.intx_group_size, p.intx_scale_dtype)
        part = IntxPart(bits, p.intx_group_size, q, sc, p.intx_scale_dtype, "rtn")
        params = {"bits": bits, "group": p.intx_group_size, "rounding": "rtn",
                  "activations": "none (rows gathered, then unpacked)"}
        cands.append(Candidate("intx", layer, params, (_step(step, part),),
                               parts={"intx": part}))
    return cands


def notes(choice, calib) -> list[str]:
    """How much error compensation lowered the chosen layers' output error on calibration
    inputs, against rounding to nearest."""
    mine = [c for c in choice.values() if c.part("intx") is not None
            and c.part("intx").rounding == "gptq"]
    if not mine or calib is None:
        return []
    ratios = []
    for c in mine:
        part = c.part("intx")
        st = calib.stats.get(c.layer.node)
        h = None if st is None else st.covariance
        w = get_attr(calib.gm, c.layer.weight_target).detach()
        near = dequantize(*rtn(w, part.bits, part.group_size, part.scale_dtype,
                               None if h is None else h.diagonal().clamp_min(0)),
                          part.group_size)
        e_rtn = hessian_error(w, near, h)
        if e_rtn > 0:
            ratios.append(hessian_error(w, c.steps[0].dense(), h) / e_rtn)
    if not ratios:
        return []
    ratios.sort()
    awq = sum(c.part("intx").inv_scale is not None for c in mine)
    with_awq = f" (AWQ's input scaling on {awq} of them)" if awq else ""
    return [f"intx: error-compensated rounding{with_awq} left {len(ratios)} layer(s) with "
            f"{ratios[len(ratios) // 2]:.2f}x (median; {ratios[0]:.2f}-{ratios[-1]:.2f}) the "
            "output error of rounding to nearest, on the calibration inputs"]


# --- the pass -------------------------------------------------------------------------------
def _rewrite(gm: fx.GraphModule, node: fx.Node, layer: str, part: IntxPart) -> None:
    g = gm.graph
    lo, hi = qrange(part.bits)
    qn = add_buffer(gm, f"{layer}.intx_weight", part.q, node)
    sn = add_buffer(gm, f"{layer}.intx_scale", part.scale, node)
    zn = add_buffer(gm, f"{layer}.intx_zero_point", torch.zeros_like(part.q[:, ::part.group_size]),
                    node)
    x = node.args[0]
    if part.inv_scale is not None:  # AWQ: the input divided by s, per column
        inv = add_buffer(gm, f"{layer}.intx_input_scale", part.inv_scale, node)
        with g.inserting_before(node):
            x = call(g, aten.mul.Tensor, (x, inv), layer=layer)
    if part.activations == "none":  # weight-only: the codes dequantized for the float op
        with g.inserting_before(node):
            wd = call(g, qd.dequantize_per_channel_group.default,
                      (qn, sn, zn, lo, hi, torch.int8, part.group_size, torch.float32),
                      layer=layer)
        node.args = (x, wd, *node.args[2:])
        return
    with g.inserting_before(node):
        cq = call(g, qd.choose_qparams_per_token_asymmetric.default, (x, torch.int8),
                  layer=layer)
        s = call(g, operator.getitem, (cq, 0), layer=layer)
        z = call(g, operator.getitem, (cq, 1), layer=layer)
        xq = call(g, qd.quantize_per_token.default, (x, s, z, ACT_QMIN, ACT_QMAX, torch.int8),
                  layer=layer)
        xd = call(g, qd.dequantize_per_token.default,
                  (xq, s, z, ACT_QMIN, ACT_QMAX, torch.int8, torch.float32), layer=layer)
        wd = call(g, qd.dequantize_per_channel_group.default,
                  (qn, sn, zn, lo, hi, torch.int8, part.group_size, torch.float32), layer=layer)
    args = list(node.args)
    args[0], args[1] = xd, wd
    node.args = tuple(args)


def _rewrite_embedding(gm: fx.GraphModule, node: fx.Node, layer: str, part: IntxPart) -> None:
    """aten.embedding(W, ids) -> the packed rows and their scales gathered, the codes unpacked
    in float arithmetic (each byte: floor-divide by 2^c, the remainder is the lower code),
    moved back by 2^(c-1) and scaled per group. Only the looked-up rows are decoded; every op
    is one that the .pte's portable kernels, ONNX and eager PyTorch run."""
    g = gm.graph
    cb = container_bits(part.bits)
    per, base = 8 // cb, float(1 << cb)
    v, d = part.q.shape
    packed = pack(part.q, part.bits, part.group_size).reshape(v, d * cb // 8)
    scale = part.scale.to(torch.bfloat16) if part.scale_dtype == "bf16" else part.scale
    pn = add_buffer(gm, f"{layer}.intx_packed", packed, node)
    sn = add_buffer(gm, f"{layer}.intx_scale", scale, node)
    ids = node.args[1]
    with g.inserting_before(node):
        rows = call(g, aten.embedding.default, (pn, ids), layer=layer)
        rest = call(g, aten._to_copy.default, (rows,), {"dtype": torch.float32}, layer=layer)
        codes = []
        for _ in range(per - 1):
            high = call(g, aten.floor.default,
                        (call(g, aten.mul.Tensor, (rest, 1.0 / base), layer=layer),), layer=layer)
            low = call(g, aten.sub.Tensor,
                       (rest, call(g, aten.mul.Tensor, (high, base), layer=layer)), layer=layer)
            codes.append(low)
            rest = high
        codes.append(rest)
        u = codes[0] if per == 1 else call(
            g, aten.flatten.using_ints,
            (call(g, aten.stack.default, (codes, -1), layer=layer), -2, -1), layer=layer)
        f = call(g, aten.sub.Tensor, (u, float(1 << (cb - 1))), layer=layer)
        grouped = call(g, aten.unflatten.int, (f, -1, [d // part.group_size, part.group_size]),
                       layer=layer)
        srows = call(g, aten.embedding.default, (sn, ids), layer=layer)
        if scale.dtype != torch.float32:
            srows = call(g, aten._to_copy.default, (srows,), {"dtype": torch.float32},
                         layer=layer)
        scaled = call(g, aten.mul.Tensor,
                      (grouped, call(g, aten.unsqueeze.default, (srows, -1), layer=layer)),
                      layer=layer)
        out = call(g, aten.flatten.using_ints, (scaled, -2, -1), layer=layer)
    node.replace_all_uses_with(out)
    g.erase_node(node)


def intx_pass(gm: fx.GraphModule, config: PartsConfig) -> PassResult:
    """Store the weight of each configured linear as group-wise integers and scales, with the
    input quantized per token."""
    modified = False
    for node, layer, part in configured_layers(gm, config, ("linear", "embedding")):
        if op_type(node) == "embedding":
            _rewrite_embedding(gm, node, layer, part)
            modified = True
            continue
        if not weight_as_planned(gm, node, layer, part.q.shape, "intx"):
            continue
        _rewrite(gm, node, layer, part)
        modified = True
    if modified:
        drop_unused_attrs(gm)
    return PassResult(gm, modified)


# --- recovery -------------------------------------------------------------------------------
def _fake_of(c: Candidate):
    part = c.part("intx")
    if part.inv_scale is not None:  # the weight's columns scaled by s = 1 / inv before rounding
        inv = part.inv_scale
        return lambda w: fake_quantize(w / inv, part.scale, part.bits) * inv
    return lambda w: fake_quantize(w, part.scale, part.bits)


def _init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor]:
    return [c.steps[0].dense().clone()]  # start from the (error-compensated) stored weight


def _write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule) -> Candidate:
    part = c.part("intx")
    w = latents[0] if part.inv_scale is None else latents[0] / part.inv_scale
    part = replace(part, q=round_to_scales(w, part.scale, part.bits))
    return replace(c, steps=(_step(c.steps[0], part),), parts={**c.parts, "intx": part},
                   params={**c.params, "rounding": f"{part.rounding}, trained"})


TECHNIQUE = register(Technique(
    "intx", order=88, propose=propose, make_config=parts_config("intx"), apply=intx_pass,
    trainable=Trainable(_init, _write), notes=notes, formats={"intx": _fake_of}, final=True,
    settings=IntxSettings()))
