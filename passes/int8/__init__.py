"""int8: per-channel symmetric int8 weights, stored as int8 in the graph.

Each weight W is stored as q = round(W / s) in [-127, 127] (int8) with one fp32 scale s per
output channel (per row of an embedding), so the serialized program holds a quarter of the
bytes. A profile with `[int8] weight_bits = 7` (x86 without VNNI, whose u8 x s8 kernels add
pairs of products in 16 bits) keeps q in [-63, 63], which those kernels compute exactly.

How the int8 weight is used is the profile's representation (`int8_representation`), and how
activations are quantized is the profile's `int8_activations`:

- ``qdq`` (ExecuTorch + XNNPACK, ONNX Runtime): ``quantized_decomposed`` quantize / dequantize
  ops in exactly the shape torchao's ``convert_pt2e`` emits, which is the shape the
  ``XnnpackPartitioner`` and ONNX Runtime fuse into int8 kernels. Static: a q/dq pair on the
  input and on the output (the output pair is what lets the partitioner take the op: without it
  the op stays outside the delegate), weights through ``dequantize_per_channel``. Dynamic:
  ``choose_qparams.tensor`` then q/dq ``.tensor`` on the input. Activations are per-tensor
  affine, 256 levels; static ranges come from calibration through an observer
  (`observers.py`). They are stored as int8 in [-128, 127] (XNNPACK, ONNX Runtime) or,
  where the profile's `int8_activation_dtype` says so, as uint8 in [0, 255] with the zero point
  shifted by 128: the same levels, in the form x86's oneDNN kernels (VNNI multiplies u8 by s8)
  run. Under ``torch.compile`` with Inductor's ``freezing`` on, Inductor folds each such
  dequantize -> linear -> quantize into one ``onednn.qlinear_pointwise`` and fuses the
  element-wise ops between them.
- ``int_mm`` (x86 under Inductor): the input is quantized per token (dynamic) or per tensor
  (static, symmetric), multiplied with ``torch._int_mm`` (int8 x int8 -> int32, VNNI) and
  rescaled. Eagerly that is several ops; under ``torch.compile`` the quantization and rescale
  fuse around the int8 GEMM, which is where it pays.
- ``dequant``: q is converted back to the compute dtype in the graph (q * s) and fed to the
  original op: storage shrinks, compute is unchanged (weight-only).

Embeddings are always gathered as int8 rows and scaled by their row's scale.

Narrower codes (`[int8] packed_bits`, mcu-int8: a runtime whose kernels read int8 weights
only): each layer is also offered with its weights as per-channel symmetric 4-bit codes in
[-8, 7] behind the same ``dequantize_per_channel`` (its range says 4 bits), which the int8 kernel
runs unchanged. The codes are error-compensated (GPTQ on the layer's input Hessian from
calibration: a k x k convolution's over its unfolded input patches; rounded to nearest, each
column's error weighted by its input's second moment, where calibration saw too few rows),
and the file stores them two per byte, unpacked to int8 in the program before the layer
(`fxcompress.export.nbits.unpack_codes`): half the flash, and the unpacked weight (with the
unpacking's intermediates) in RAM while the layer runs, which `Step.scratch_bytes` counts
against the activation budget. A layer whose whole unpacking would not fit that budget is
built as several layers over slices of its output channels (`PerChannelCodes.slices`,
`_rewrite_sliced`), concatenated: one slice's weight is unpacked at a time, and quantization
being per element, the numbers are the unsliced layer's.

The planner simulates each candidate with the same arithmetic the pass writes (`step_mode`
decides both), so the error it measures is the error of the built graph.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
import torch.nn.functional as F
from torch import fx

from fxcompress.candidates import Candidate, Step, compact
from fxcompress.export.nbits import UNPACK_OPS, UNPACK_SCRATCH
from fxcompress.graph import (
    LAYER_META,
    add_buffer,
    drop_unused_attrs,
    get_attr,
    op_type,
    weight_arg_index,
)
from fxcompress.passes.int8.observers import QMAX as AQMAX
from fxcompress.passes.int8.observers import QMIN as AQMIN
from fxcompress.passes.int8.observers import affine_qparams, fake_quant_affine, observe
from fxcompress.passes.intx import GPTQ_ROWS_PER_COLUMN
from fxcompress.passes.intx.quant import gptq, qrange, rtn
from fxcompress.passes.svd.decompose import shrinkage, shrunk
from fxcompress.passes_infra import PassResult
from fxcompress.rewrite import call
from fxcompress.technique import (
    TRAIN_BASE_WEIGHT,
    ProposeContext,
    Technique,
    checked_field,
    is_final,
    register,
    straight_through,
)

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
QMAX = 127
EPS = torch.finfo(torch.float32).eps  # choose_qparams' eps, as torchao's dynamic quantizer
OBSERVER = "minmax"  # the default observer of static activation ranges (see observers.py)


@dataclass(frozen=True)
class Int8Settings:
    """int8's settings; `compile(overrides={"*": {"int8": {...}}})` changes them."""

    #: how static activation ranges are chosen from the calibration samples (`OBSERVERS`)
    observer: str = OBSERVER

    def __post_init__(self):
        from fxcompress.passes.int8.observers import OBSERVERS

        checked_field(self.observer, "observer", str, lambda v: v in OBSERVERS,
                      f"one of {', '.join(OBSERVERS)}")


@dataclass(frozen=True)
class Int8Part:
    """What the int8 pass needs to build a candidate: how the target represents int8, and the
    calibrated activation qparams of a static-activation chain."""

    representation: str  # see hardware_profiles.INT8_REPRESENTATIONS
    activations: str  # "static" | "dynamic" | "none"
    act_dtype: str = "int8"  # "int8" | "uint8"
    weight_qmax: int = 127
    # static: per step ((input qparams) or None, output qparams); None for other activations
    act_params: tuple | None = None
    dynamic_grouped_conv: bool = False  # the runtime has dynamic grouped convs
    # narrower codes (`[int8] packed_bits`): per step, the codes and scales the pass stores;
    # None for 8-bit weights, which the pass rounds itself
    codes: tuple[PerChannelCodes, ...] | None = None

    @property
    def keeps_codes(self) -> bool:
        """Whether the pass stores codes chosen for the weight's shape at planning (so the
        layer cannot be reshaped by another rewrite; see `technique.compatible`)."""
        return self.codes is not None


def range_headroom(examples: int | None) -> float:
    """How much wider than observed a static activation range is made, for `examples`
    calibration examples: 1 + 2 / sqrt(examples) (1.25 from 64 examples, 1.06 from 1000).
    The largest activation of a few examples is below that of the many a deployed model sees:
    on the digits CNN, ranges from 64 examples clipped test images whose activations went 40%
    past them, and the test-split error was twice the calibration error (0.0121 vs 0.0065);
    with this headroom the two agree (0.0078 vs 0.0073)."""
    return 1.0 if not examples else 1.0 + 2.0 / math.sqrt(examples)

QParams = tuple[float, int]  # per-tensor (scale, zero point)


def quantize_per_channel(w: torch.Tensor, axis: int = 0, qmax: int = QMAX,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale fp32 per slice along `axis`): symmetric, q in [-qmax, qmax] (127, or 63
    for a target whose int8 kernels would saturate on full-range weights)."""
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
    scale = (amax.float() / qmax).clamp_min(1e-12)
    shape = [1] * w.dim()
    shape[axis] = -1
    q = torch.round(w.detach().float() / scale.view(shape)).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def weight_qmax(bits: int) -> int:
    """The largest |q| of symmetric weights of `bits` bits: 127 for 8, 63 for 7."""
    return (1 << (bits - 1)) - 1


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """q * scale along `axis`, float32."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.float() * scale.view(shape)


@dataclass(frozen=True)
class StaticSymmetric:
    """Per-tensor symmetric int8 fake-quantization with a fixed scale (plain data: a
    candidate's steps pickle)."""

    scale: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `x`."""
        return torch.round(x / self.scale).clamp(-QMAX, QMAX) * self.scale


@dataclass(frozen=True)
class StaticAffine:
    """Per-tensor affine int8 fake-quantization with fixed qparams (the static ``qdq``
    arithmetic), as plain data."""

    scale: float
    zero_point: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `x`."""
        return fake_quant_affine(x, self.scale, self.zero_point)


def fake_quant_static(absmax: float) -> StaticSymmetric:
    """Per-tensor symmetric int8 fake-quantization with a scale fixed from calibration (the
    static ``int_mm`` arithmetic)."""
    return StaticSymmetric(max(absmax, 1e-12) / QMAX)


def fake_quant_dynamic(x: torch.Tensor) -> torch.Tensor:
    """Per-row (per token) symmetric int8 fake-quantization with scales from the input (the
    dynamic ``int_mm`` arithmetic)."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(1e-12)
    return torch.round(x / scale).clamp(-QMAX, QMAX) * scale


def fake_quant_qdq_dynamic(x: torch.Tensor) -> torch.Tensor:
    """The dynamic ``qdq`` arithmetic: per-tensor affine int8 from the input's own range."""
    s, z = qd.choose_qparams.tensor(x, AQMIN, AQMAX, EPS, torch.int8)
    q = qd.quantize_per_tensor.tensor(x, s, z, AQMIN, AQMAX, torch.int8)
    return qd.dequantize_per_tensor.tensor(q, s, z, AQMIN, AQMAX, torch.int8)


def step_mode(op: str, groups: int, representation: str, activations: str,
              dynamic_grouped_conv: bool = False) -> str:
    """How one op is quantized, for the planner's simulation and the pass alike:
    "embedding", "weight_only", "int_mm_static", "int_mm_dynamic", "qdq_static" or
    "qdq_dynamic". `dynamic_grouped_conv`: whether the runtime has dynamically quantized
    grouped / depthwise convs (the profile's `[int8] dynamic_grouped_conv`)."""
    if op == "embedding":
        return "embedding"
    if representation == "dequant" or activations == "none":
        return "weight_only"
    if representation == "int_mm":
        # _int_mm is a matmul: convs keep int8 storage, dequantized for the float conv
        return f"int_mm_{activations}" if op == "linear" else "weight_only"
    if activations == "dynamic" and op == "conv2d" and groups > 1 and not dynamic_grouped_conv:
        return "weight_only"
    return f"qdq_{activations}"


# --- the planner's side ---------------------------------------------------------------------
def _rows(step: Step, x: torch.Tensor) -> torch.Tensor | None:
    """`step` applied to sample rows (inputs flattened to rows of features), where a row-wise
    view of the step exists (linear, ungrouped 1x1 conv)."""
    if step.op == "linear":
        return F.linear(x, step.dense(), step.bias)
    if step.op == "conv2d" and step.weight.shape[2:] == (1, 1) and step.groups == 1:
        return F.linear(x, step.dense()[:, :, 0, 0], step.bias)
    return None


def _bound(step: Step, absmax: float) -> tuple[float, float]:
    """A range that surely holds `step`'s output for inputs within +-absmax."""
    w = step.dense().reshape(step.weight.shape[0], -1)
    r = float(w.abs().sum(1).max()) * absmax
    b = 0.0 if step.bias is None else float(step.bias.abs().max())
    return -(r + b), r + b


def static_qparams(steps: tuple[Step, ...], stats, observer: str = OBSERVER,
                   headroom: float = 1.0) -> tuple[tuple[QParams | None, QParams | None], ...]:
    """Per step: (input qparams or None where the previous step's output pair already
    quantized it, output qparams), from the layer's calibration statistics; each observed
    range is widened `headroom` times (see `range_headroom`)."""
    samples = torch.cat(stats.samples) if stats.samples else torch.zeros(1, 1)
    x_range = observe(samples, observer) if stats.samples else (-stats.absmax, stats.absmax)
    x_range = (x_range[0] * headroom, x_range[1] * headroom)
    out = []
    rows: torch.Tensor | None = samples if stats.samples else None
    absmax = stats.absmax
    for i, s in enumerate(steps):
        in_qp = affine_qparams(*x_range, bias_scale_floor(s)) if i == 0 else None
        if i == len(steps) - 1 and stats.out_samples:
            y_range = observe(torch.cat(stats.out_samples), observer)
        else:
            rows = _rows(s, fake_quant_affine(rows, *(in_qp or out[-1][1]))) \
                if rows is not None else None
            y_range = observe(rows, observer) if rows is not None else _bound(s, absmax)
        y_range = (y_range[0] * headroom, y_range[1] * headroom)
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        out_qp = affine_qparams(*y_range, bias_scale_floor(nxt) if nxt is not None else 0.0)
        out.append((in_qp, out_qp))
        absmax = max(abs(y_range[0]), abs(y_range[1]))
    return tuple(out)


#: Runtimes (XNNPACK, ONNX Runtime's QGemm / QLinearConv) store the bias as int32 at the scale
#: input scale x weight scale: the input scale must keep every bias within int32, with margin
BIAS_INT32_LIMIT = 2 ** 30


def bias_scale_floor(step: Step) -> float:
    """The smallest input scale at which `step`'s bias, quantized at input scale x its
    per-channel weight scale, fits in int32 (0 without a bias)."""
    if step.bias is None or step.op == "embedding":
        return 0.0
    w = step.dense().detach().reshape(step.weight.shape[0], -1).abs().amax(1) / QMAX
    b = step.bias.detach().abs().reshape(-1)
    if b.numel() != w.numel():
        return 0.0
    return float((b / w.clamp_min(1e-30)).max()) / BIAS_INT32_LIMIT


def symmetric_scale(qp: QParams) -> float:
    """The symmetric int8 scale (q in [-127, 127]) covering the range of affine `qp`."""
    s, z = qp
    return max(abs(AQMIN - z), abs(AQMAX - z)) * s / QMAX


def _quantized_step(step: Step, mode: str, in_qp: QParams | None, sym_absmax: float | None,
                    wqmax: int = QMAX, codes: PerChannelCodes | None = None) -> Step:
    q, scale = (codes.q, codes.scale) if codes is not None \
        else quantize_per_channel(step.dense(), 0, wqmax)
    iq: Callable | None = None
    if mode == "int_mm_dynamic":
        iq = fake_quant_dynamic
    elif mode == "int_mm_static":
        iq = fake_quant_static(sym_absmax) if sym_absmax is not None else fake_quant_dynamic
    elif mode == "qdq_dynamic":
        iq = fake_quant_qdq_dynamic
    elif mode == "qdq_static" and in_qp is not None:
        iq = StaticAffine(*in_qp)
    extra = scale.numel() * (4 + (8 if mode.startswith("qdq") else 0))  # + int64 zero points
    if codes is not None:  # packed two per byte, unpacked in the program (see `unpack_codes`)
        widest = max(e - b for b, e in codes.slice_rows()) * (q.numel() // q.shape[0])
        k = len(codes.slice_rows())
        # each slice unpacks its codes; the slices' outputs are concatenated (one op more)
        return compact(step, codes, step.weight, fmt="int8",
                       weight_bytes=(q.numel() * codes.bits + 7) // 8 + extra, input_quant=iq,
                       extra_ops=UNPACK_OPS * k + (k > 1),
                       scratch_bytes=UNPACK_SCRATCH * widest)
    # an int8 embedding gathers its rows and their scales and rescales them: three more ops
    return compact(step, PerChannelCodes(q, scale), step.weight, fmt="int8",
                   weight_bytes=q.numel() + extra, input_quant=iq,
                   extra_ops=3 if mode == "embedding" else 0)


def packed_codes(step: Step, bits: int, stats, calibrated: bool) -> PerChannelCodes:
    """`step`'s weight as per-channel symmetric `bits`-bit codes (the `[int8] packed_bits`
    form): GPTQ on the layer's input Hessian (a linear's or 1x1 convolution's input second
    moment; a k x k convolution's over its unfolded input patches, which calibration keeps
    where the profile packs codes, `LayerStats.patch_moment`), where calibration saw at least
    `GPTQ_ROWS_PER_COLUMN` rows (patches) per column; else rounded to nearest, each channel's
    scale chosen by the rounding error weighted by its columns' input second moment."""
    w = step.dense().detach()
    w2 = w.reshape(w.shape[0], -1).float()
    cols = w2.shape[1]
    hessian = _gptq_hessian(step, stats, cols) if calibrated and stats is not None else None
    cov = stats.covariance if calibrated and stats is not None else None
    if hessian is not None:
        q, s = gptq(w2, hessian, bits, cols)
        rounding = "gptq"
    else:
        importance = None
        if cov is not None and step.groups == 1 and cov.shape[0] * math.prod(w.shape[2:]) == cols:
            importance = cov.diagonal().float().clamp_min(0).repeat_interleave(
                math.prod(w.shape[2:]))
        q, s = rtn(w2, bits, cols, "fp32", importance)
        rounding = "rtn"
    return PerChannelCodes(q.reshape(w.shape), s.reshape(-1), bits, rounding)


def _sliced(codes: PerChannelCodes, mode: str, ctx: ProposeContext) -> PerChannelCodes:
    """`codes` cut into the fewest slices of output channels whose unpacking (`UNPACK_SCRATCH`
    bytes a code), beside the layer's int8 input and output, fits the profile's activation
    budget; one slice where there is no budget, or where the layer's activations are not
    static int8 (only those layers are sliced)."""
    budget = ctx.profile.activation_budget_bytes
    shapes = ctx.shapes
    if budget is None or mode != "qdq_static" or shapes is None or not shapes.inp \
            or not shapes.out:
        return codes
    act = math.prod(shapes.inp[1:]) + math.prod(shapes.out[1:])
    rows, per_row = codes.q.shape[0], codes.q.numel() // codes.q.shape[0]
    for k in range(1, rows + 1):
        sliced = replace(codes, slices=k)
        widest = max(e - b for b, e in sliced.slice_rows())
        if act + UNPACK_SCRATCH * widest * per_row <= budget:
            return sliced
    return replace(codes, slices=rows)  # even one channel a slice does not fit: rejected


def _gptq_hessian(step: Step, stats, cols: int) -> torch.Tensor | None:
    """The shrunk input Hessian of `step` over its `cols` weight columns, where calibration
    kept one from enough rows; else None."""
    if step.op == "linear" or (step.op == "conv2d" and step.groups == 1
                               and tuple(step.weight.shape[2:]) == (1, 1)):
        moment, rows, fourth = stats.covariance, stats.rows, stats.fourth
    elif step.op == "conv2d" and stats.patch_moment is not None:
        moment, rows, fourth = stats.patch_moment.double(), stats.patch_rows, stats.patch_fourth
    else:
        return None
    if moment is None or moment.shape[0] != cols or rows < GPTQ_ROWS_PER_COLUMN * cols:
        return None
    return shrunk(moment, shrinkage(moment, rows, fourth))


@dataclass(frozen=True)
class PerChannelCodes:
    """An int8 step's weight as it keeps it: codes and per-output-channel scales, decoded when
    the step runs (plain data: a candidate's steps pickle)."""

    q: torch.Tensor  # int8
    scale: torch.Tensor  # fp32, per output channel
    bits: int = 8  # the codes' width: 8, or a `[int8] packed_bits` width (in qrange(bits))
    rounding: str = "rtn"  # how they were chosen: "rtn", "gptq" (packed widths), "... trained"
    # packed codes: the layer is built as this many layers over consecutive slices of its
    # output channels, so that only one slice's weight is unpacked in RAM at a time
    slices: int = 1

    def slice_rows(self) -> list[tuple[int, int]]:
        """The (first, end) output channels of each slice."""
        rows = self.q.shape[0]
        per = -(-rows // self.slices)
        return [(r, min(r + per, rows)) for r in range(0, rows, per)]

    def __call__(self) -> torch.Tensor:
        """The dequantized weight."""
        return dequantize_per_channel(self.q, self.scale, 0)


@dataclass(frozen=True)
class ChainSimulation:
    """A node override running a chain of int8 steps with static output quantization between
    them, as the pass builds it (plain data: a candidate's simulation pickles)."""

    steps: tuple[Step, ...]
    out_qps: tuple[QParams | None, ...]

    def __call__(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The chain on the node's input."""
        x = args[0]
        for s, oq in zip(self.steps, self.out_qps, strict=True):
            x = s.run(x)
            if oq is not None:
                x = fake_quant_affine(x, *oq)
        return x


def _chain_simulation(layer_node: str, steps: tuple[Step, ...],
                      out_qps: tuple[QParams | None, ...]) -> dict[str, Callable]:
    return {layer_node: ChainSimulation(steps, out_qps)}


def propose(layer, base: Candidate, ctx: ProposeContext):
    """The layer with int8 weights (and activations, as the target runs them)."""
    if not ctx.profile.supports(layer.op, "int8"):
        return [], f"int8: {ctx.profile.name} does not run int8 {layer.op}"
    p = ctx.profile
    if step_mode(layer.op, layer.groups, p.int8_representation, p.int8_activations,
                 p.int8_dynamic_grouped_conv) \
            == "weight_only" and p.int8_activations != "none" and not p.weight_only_speedup \
            and ctx.objective == "latency" and not ctx.user_techniques:
        return [], (f"int8: {p.name} runs {layer.op} (groups={layer.groups}) weight-only in "
                    "this representation, which gains no speed there")
    cand = stack(base, ctx, technique="int8")
    if cand is None:
        return [], "int8: nothing to quantize"
    narrow = [c for b in p.int8_packed_bits
              if (c := stack(base, ctx, technique="int8", bits=b)) is not None]
    return [cand, *narrow], None


def stack(base: Candidate, ctx: ProposeContext, technique: str | None = None,
          bits: int = 8) -> Candidate | None:
    """int8 on every step of another candidate's chain (e.g. both SVD factors). None over a
    chain that is already quantized, binary, or shared (palettized): a shared weight is computed
    from a lookup table, which the int8 pass does not re-quantize; share offers int8
    lookup-table entries itself. `bits` below 8 (a `[int8] packed_bits` width): the one step
    of a plain layer with narrower codes (`packed_codes`), where the layer is ``qdq``; None
    otherwise."""
    if is_final(base):
        return None  # already quantized
    if any(s.fmt == "shared" for s in base.steps):
        return None
    p = ctx.profile
    rep, act = p.int8_representation, p.int8_activations
    wqmax = weight_qmax(p.int8_weight_bits)
    grouped = p.int8_dynamic_grouped_conv
    modes = [step_mode(s.op, s.groups, rep, act, grouped) for s in base.steps]
    if bits < 8 and (len(base.steps) != 1 or not modes[0].startswith("qdq")):
        return None
    static = any(m in ("qdq_static", "int_mm_static") for m in modes)
    examples = ctx.calib.example_count(ctx.calib.batches) if ctx.calib is not None else None
    qparams = static_qparams(base.steps, ctx.stats, ctx.knobs("int8").observer,
                             headroom=range_headroom(examples)) if static else None
    steps, out_qps, act_params = [], [], []
    for i, (s, m) in enumerate(zip(base.steps, modes, strict=True)):
        in_qp = qparams[i][0] if qparams else None
        sym = None
        if m == "int_mm_static":
            # symmetric per-tensor: the scale covering the range observed at this step's input
            sym = symmetric_scale(qparams[i][0] or qparams[i - 1][1])
            act_params.append(((sym, 0), None))
        elif qparams:
            act_params.append(qparams[i])
        codes = _sliced(packed_codes(s, bits, ctx.stats, ctx.calibrated), m, ctx) \
            if bits < 8 else None
        steps.append(_quantized_step(s, m, in_qp, None if sym is None else sym * QMAX, wqmax,
                                     codes))
        out_qps.append(qparams[i][1] if m == "qdq_static" else None)
    name = technique or f"{base.technique}+int8"
    params = dict(base.params, bits=bits,
                  **({} if wqmax == QMAX or bits < 8 else {"weight_range": wqmax}),
                  activations=act if modes[0] not in ("weight_only", "embedding") else "none")
    if bits < 8:
        params.update(rounding=steps[0].decode.rounding, stored="packed, unpacked to int8")
        if steps[0].decode.slices > 1:
            params.update(slices=steps[0].decode.slices)
    part = Int8Part(rep, act, p.int8_activation_dtype, wqmax,
                    tuple(act_params) if static else None, grouped,
                    tuple(s.decode for s in steps) if bits < 8 else None)
    cand = Candidate(name, base.layer, params, tuple(steps), parts={**base.parts, "int8": part})
    if any(q is not None for q in out_qps):
        cand.overrides = _chain_simulation(base.layer.node, tuple(steps), tuple(out_qps))
    return cand


# --- the pass ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Config:
    """Which layers get int8 weights, and how they are represented."""

    layers: frozenset[str] = field(default_factory=frozenset)
    representation: str = "dequant"  # see hardware_profiles.INT8_REPRESENTATIONS
    activations: str = "none"  # "static" | "dynamic" | "none" (weight-only)
    # static activations: layer -> per op of the layer, in graph order, ((input scale, zero
    # point) or None where the previous op's output pair already quantized it, output qparams)
    act_params: Mapping[str, tuple] = field(default_factory=dict)
    act_dtype: str = "int8"  # "int8" | "uint8": how qdq stores quantized activations
    weight_qmax: int = QMAX  # weights in [-weight_qmax, weight_qmax]: 127, or 63 (7 bits)
    dynamic_grouped_conv: bool = False  # see `step_mode`
    # layers with narrower codes (`[int8] packed_bits`): per op of the layer, in graph order,
    # the codes and scales to store
    codes: Mapping[str, tuple[PerChannelCodes, ...]] = field(default_factory=dict)


def _act_range(act_dtype: str) -> tuple[int, int, int, torch.dtype]:
    """(zero-point shift, qmin, qmax, dtype) of stored activations: the observers' int8 levels
    [-128, 127], or the same levels moved to uint8 [0, 255]."""
    if act_dtype == "uint8":
        return 128, AQMIN + 128, AQMAX + 128, torch.uint8
    return 0, AQMIN, AQMAX, torch.int8


def make_config(chosen: list[Candidate]) -> Int8Config:
    """The pass config for the chosen candidates (any that carry int8)."""
    mine = [c for c in chosen if c.part("int8") is not None]
    kinds = {(p.representation, p.activations, p.act_dtype, p.weight_qmax,
              p.dynamic_grouped_conv) for p in (c.part("int8") for c in mine)}
    if len(kinds) > 1:
        raise ValueError(f"int8 candidates disagree on representation: {sorted(kinds)}")
    rep, act, dtype, wqmax, grouped = kinds.pop() if kinds else ("dequant", "none", "int8",
                                                                 QMAX, False)
    params = {c.layer.name: c.part("int8").act_params for c in mine
              if c.part("int8").act_params}
    codes = {c.layer.name: c.part("int8").codes for c in mine if c.part("int8").codes}
    return Int8Config(frozenset(c.layer.name for c in mine), rep, act, params, dtype, wqmax,
                      grouped, codes)


def _weight_buffers(gm, layer, node, weight, mode, wqmax, codes=None, suffix=""):
    q, scale = (codes.q, codes.scale) if codes is not None \
        else quantize_per_channel(weight, 0, wqmax)
    qn = add_buffer(gm, f"{layer}.int8_weight{suffix}", q, node)
    if mode.startswith("qdq"):
        sn = add_buffer(gm, f"{layer}.int8_scale{suffix}", scale, node)
        zn = add_buffer(gm, f"{layer}.int8_zero_point{suffix}",
                        torch.zeros(scale.numel(), dtype=torch.int64), node)
        return qn, sn, zn
    return qn, scale


def _qdq_pair(g, x, qp: QParams, layer, act_dtype: str) -> fx.Node:
    s, z = qp
    shift, lo, hi, dtype = _act_range(act_dtype)
    q = call(g, qd.quantize_per_tensor.default, (x, s, z + shift, lo, hi, dtype), layer=layer)
    return call(g, qd.dequantize_per_tensor.default, (q, s, z + shift, lo, hi, dtype),
                layer=layer)


def _rewrite_qdq(gm, node, layer, weight, mode, step_qp, act_dtype, wqmax, codes=None):
    g = gm.graph
    wi = weight_arg_index(op_type(node))
    qn, sn, zn = _weight_buffers(gm, layer, node, weight, mode, wqmax, codes)
    lo, hi = (-wqmax, wqmax) if codes is None else qrange(codes.bits)
    x = node.args[0]
    with g.inserting_before(node):
        wd = call(g, qd.dequantize_per_channel.default,
                  (qn, sn, zn, 0, lo, hi, torch.int8), layer=layer)
        if mode == "qdq_dynamic":
            _, lo, hi, dtype = _act_range(act_dtype)
            cq = call(g, qd.choose_qparams.tensor, (x, lo, hi, EPS, dtype), layer=layer)
            s = call(g, operator.getitem, (cq, 0), layer=layer)
            z = call(g, operator.getitem, (cq, 1), layer=layer)
            xq = call(g, qd.quantize_per_tensor.tensor, (x, s, z, lo, hi, dtype), layer=layer)
            x = call(g, qd.dequantize_per_tensor.tensor, (xq, s, z, lo, hi, dtype), layer=layer)
        elif step_qp[0] is not None:
            x = _qdq_pair(g, x, step_qp[0], layer, act_dtype)
    args = list(node.args)
    args[0], args[wi] = x, wd
    node.args = tuple(args)
    if mode == "qdq_static":
        users = list(node.users)
        nxt = node.next  # the pair goes between the op and what followed it
        with g.inserting_before(nxt):
            out = _qdq_pair(g, node, step_qp[1], layer, act_dtype)
        for u in users:
            u.replace_input_with(node, out)


def _rewrite_sliced(gm, node, layer, step_qp, act_dtype, codes: PerChannelCodes):
    """A static int8 layer with packed codes in `codes.slices` slices of output channels: one
    layer per slice (its codes, scales and bias rows) on the same quantized input, each with
    the layer's output quantization, concatenated along the channels. Quantization is per
    element, so the numbers are those of the layer unsliced; a runtime unpacking the codes
    holds one slice's weight at a time."""
    g = gm.graph
    op = op_type(node)
    bias = node.args[2] if len(node.args) > 2 else None
    b = get_attr(gm, bias.target).detach() if isinstance(bias, fx.Node) else None
    lo, hi = qrange(codes.bits)
    x = node.args[0]
    with g.inserting_before(node):
        if step_qp[0] is not None:
            x = _qdq_pair(g, x, step_qp[0], layer, act_dtype)
    outs = []
    for j, (r0, r1) in enumerate(codes.slice_rows()):
        rows = replace(codes, q=codes.q[r0:r1].contiguous(),
                       scale=codes.scale[r0:r1].contiguous())
        qn, sn, zn = _weight_buffers(gm, layer, node, None, "qdq_static", 0, rows, f"_{j}")
        bn = None if b is None else add_buffer(gm, f"{layer}.bias_{j}", b[r0:r1].clone(), node)
        with g.inserting_before(node):
            wd = call(g, qd.dequantize_per_channel.default, (qn, sn, zn, 0, lo, hi, torch.int8),
                      layer=layer)
            y = call(g, node.target, (x, wd, bn, *node.args[3:]), dict(node.kwargs),
                     layer=layer)
            outs.append(_qdq_pair(g, y, step_qp[1], layer, act_dtype))
    with g.inserting_before(node):
        cat = call(g, aten.cat.default, (outs, 1 if op == "conv2d" else -1), layer=layer)
    node.replace_all_uses_with(cat)
    g.erase_node(node)


def _rewrite_int_mm(gm, node, layer, weight, mode, sym_scale, wqmax):
    g = gm.graph
    n_out, k = weight.shape
    x = node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    q, wscale = quantize_per_channel(weight, 0, wqmax)
    qn = add_buffer(gm, f"{layer}.int8_weight", q, node)  # (N, K): _int_mm reads it transposed
    with g.inserting_before(node):
        xv = x.meta["val"]
        lead = [d if isinstance(d, int) else call(g, aten.sym_size.int, (x, i))
                for i, d in enumerate(xv.shape[:-1])]
        x2 = call(g, aten.reshape.default, (x, [-1, k]), layer=layer) if xv.dim() != 2 else x
        if mode == "int_mm_dynamic":
            a = call(g, aten.amax.default, (call(g, aten.abs.default, (x2,), layer=layer), [1],
                                            True), layer=layer)
            s = call(g, aten.clamp_min.default, (call(g, aten.div.Tensor, (a, float(QMAX)),
                                                      layer=layer), 1e-12), layer=layer)
            r = call(g, aten.div.Tensor, (x2, s), layer=layer)
            sn = add_buffer(gm, f"{layer}.int8_scale", wscale, node)
        else:
            r = call(g, aten.div.Tensor, (x2, sym_scale), layer=layer)
            sn = add_buffer(gm, f"{layer}.int8_scale", wscale * sym_scale, node)
        r = call(g, aten.clamp.default, (call(g, aten.round.default, (r,), layer=layer), -QMAX,
                                         QMAX), layer=layer)
        xq = call(g, aten._to_copy.default, (r,), {"dtype": torch.int8}, layer=layer)
        wt = call(g, aten.t.default, (qn,), layer=layer)
        acc = call(g, aten._int_mm.default, (xq, wt), layer=layer)
        y = call(g, aten._to_copy.default, (acc,), {"dtype": torch.float32}, layer=layer)
        if mode == "int_mm_dynamic":
            y = call(g, aten.mul.Tensor, (y, s), layer=layer)
        y = call(g, aten.mul.Tensor, (y, sn), layer=layer)
        if bias is not None:
            y = call(g, aten.add.Tensor, (y, bias), layer=layer)
        if xv.dim() != 2:
            y = call(g, aten.reshape.default, (y, [*lead, n_out]), layer=layer)
    node.replace_all_uses_with(y)
    g.erase_node(node)


def _rewrite_embedding(gm, node, layer, weight, wqmax):
    g = gm.graph
    q, scale = quantize_per_channel(weight, 0, wqmax)
    qn = add_buffer(gm, f"{layer}.int8_weight", q, node)
    sn = add_buffer(gm, f"{layer}.int8_scale", scale.view(-1, 1), node)
    ids = node.args[1]
    with g.inserting_before(node):
        rows = call(g, aten.embedding.default, (qn, ids), layer=layer)
        rs = call(g, aten.embedding.default, (sn, ids), layer=layer)
        f = call(g, aten._to_copy.default, (rows,), {"dtype": torch.float32}, layer=layer)
        out = call(g, aten.mul.Tensor, (f, rs), layer=layer)
    node.replace_all_uses_with(out)
    g.erase_node(node)


def _rewrite_weight_only(gm, node, layer, weight, wqmax):
    g = gm.graph
    wi = weight_arg_index(op_type(node))
    q, scale = quantize_per_channel(weight, 0, wqmax)
    qn = add_buffer(gm, f"{layer}.int8_weight", q, node)
    sn = add_buffer(gm, f"{layer}.int8_scale", scale.view([-1] + [1] * (q.dim() - 1)), node)
    with g.inserting_before(node):
        f = call(g, aten._to_copy.default, (qn,), {"dtype": torch.float32}, layer=layer)
        deq = call(g, aten.mul.Tensor, (f, sn), layer=layer)
    args = list(node.args)
    args[wi] = deq
    node.args = tuple(args)


def int8_pass(gm: fx.GraphModule, config: Int8Config) -> PassResult:
    """Store the weight of every op of each configured layer as int8 + per-channel scales,
    written in the configured representation."""
    modified = False
    step_index: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        layer = node.meta.get(LAYER_META)
        op = op_type(node)
        if layer not in config.layers or op is None:
            continue
        w_node = node.args[weight_arg_index(op)]
        if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
            continue  # already rewritten (its weight is computed)
        weight = get_attr(gm, w_node.target)
        if not weight.is_floating_point():
            continue
        i = step_index.get(layer, 0)
        step_index[layer] = i + 1
        groups = int(node.args[6]) if op == "conv2d" and len(node.args) > 6 else 1
        mode = step_mode(op, groups, config.representation, config.activations,
                         config.dynamic_grouped_conv)
        step_qp = None
        if mode in ("qdq_static", "int_mm_static"):
            per_layer = config.act_params.get(layer)
            if per_layer is None or i >= len(per_layer):
                raise ValueError(f"int8: static activations for {layer} need calibrated "
                                 "act_params (build the config with make_config)")
            step_qp = per_layer[i]
        wqmax = config.weight_qmax
        codes = config.codes.get(layer)
        if codes is not None:
            if i >= len(codes) or not mode.startswith("qdq") \
                    or tuple(codes[i].q.shape) != tuple(weight.shape):
                raise ValueError(f"int8: {layer}'s weight is {tuple(weight.shape)} in the graph "
                                 "but its packed codes do not match it")
            if codes[i].slices > 1:
                _rewrite_sliced(gm, node, layer, step_qp, config.act_dtype, codes[i])
            else:
                _rewrite_qdq(gm, node, layer, weight, mode, step_qp, config.act_dtype, wqmax,
                             codes[i])
        elif mode == "embedding":
            _rewrite_embedding(gm, node, layer, weight, wqmax)
        elif mode == "weight_only":
            _rewrite_weight_only(gm, node, layer, weight, wqmax)
        elif mode.startswith("int_mm"):
            sym = step_qp[0][0] if mode == "int_mm_static" else None
            _rewrite_int_mm(gm, node, layer, weight, mode, sym, wqmax)
        else:
            _rewrite_qdq(gm, node, layer, weight, mode, step_qp, config.act_dtype, wqmax)
        modified = True
    if modified:
        drop_unused_attrs(gm)
    return PassResult(gm, modified)


# --- recovery: the straight-through forms ---------------------------------------------------
def fake_int8(w: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """`w` quantized per output channel, symmetric (q in [-qmax, qmax]), and dequantized, as
    the pass stores it."""
    return dequantize_per_channel(*quantize_per_channel(w, 0, qmax), 0).to(w.dtype)


def _fake_int8_of(c: Candidate) -> Callable[[torch.Tensor], torch.Tensor]:
    part = c.part("int8")
    if part is not None and part.codes is not None:  # narrower codes: on their fixed scales
        codes = part.codes[0]
        return straight_through(lambda w: dequantize_per_channel(
            _round_to(w, codes), codes.scale, 0).to(w.dtype))
    qmax = QMAX if part is None else part.weight_qmax  # 63 on a 7-bit target (x86 w/o VNNI)
    return straight_through(lambda w: fake_int8(w, qmax))


def _round_to(w: torch.Tensor, codes: PerChannelCodes) -> torch.Tensor:
    """`w` rounded to nearest on `codes`' per-channel scales, within its width."""
    lo, hi = qrange(codes.bits)
    s = codes.scale.view([-1] + [1] * (w.dim() - 1))
    return torch.round(w.detach().float() / s).clamp(lo, hi).to(torch.int8)


def _train_init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor] | None:
    part = c.part("int8")
    if part is not None and part.codes is not None:
        return [c.steps[0].dense().clone()]  # from the (error-compensated) stored codes
    return TRAIN_BASE_WEIGHT.init(c, base_w)


def _train_write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule) -> Candidate:
    part = c.part("int8")
    if part is None or part.codes is None:
        return TRAIN_BASE_WEIGHT.write(c, latents, gm)
    old = part.codes[0]
    codes = replace(old, q=_round_to(latents[0], old), rounding=f"{old.rounding}, trained")
    part = replace(part, codes=(codes,))
    step = compact(c.steps[0], codes, c.steps[0].weight)
    return replace(c, steps=(step,), parts={**c.parts, "int8": part},
                   params={**c.params, "rounding": codes.rounding})


def static_outputs(c: Candidate) -> tuple | None:
    """The per-step output quantization (affine qparams or None) of an int8 chain with static
    activations, as the planner simulates it and the pass builds it; None for any other
    candidate."""
    part = c.part("int8")
    if part is None or part.act_params is None or len(part.act_params) != len(c.steps):
        return None
    modes = [step_mode(s.op, s.groups, part.representation, part.activations,
                       part.dynamic_grouped_conv) for s in c.steps]
    return tuple(a[1] if m == "qdq_static" else None
                 for a, m in zip(part.act_params, modes, strict=True))


def _output_quantizers(c: Candidate) -> tuple | None:
    qps = static_outputs(c)
    if qps is None:
        return None
    return tuple(None if qp is None else StaticAffine(*qp) for qp in qps)


TECHNIQUE = register(Technique(
    "int8", order=90, propose=propose, make_config=make_config, apply=int8_pass, stack=stack,
    trainable=replace(TRAIN_BASE_WEIGHT, init=_train_init, write=_train_write,
                      output_quant=_output_quantizers),
    formats={"int8": _fake_int8_of}, final=True, rereads_weight=True, fmt="int8",
    settings=Int8Settings()))
