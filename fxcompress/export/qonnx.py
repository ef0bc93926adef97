"""QONNX ``.onnx`` (the `fpga-binary` profile's writer): the ONNX dialect FINN and hls4ml read.

QONNX is ONNX plus three quantizer ops in the domain ``qonnx.custom_op.general``; a layer's
weights and activations pass through them, and FINN's front end turns each into its own
hardware (XNOR-popcount for 1 bit, thresholds and DSP multiplies for 8 bits). The compiled
graph is rewritten into that form before the ONNX exporter sees it (`qonnx_graph`):

- binary weights (sign(W)·α per output channel, the `binary` pass's packed bits) become a
  float initializer of ±1 feeding ``BipolarQuant`` with α as its per-channel scale;
- binary activations (x → μ + β·sign(x − μ)) become ``Sub(μ)`` → ``BipolarQuant`` (scale 1,
  the only activation scale FINN takes) → ``Mul(β)`` → ``Add(μ)``: FINN turns the
  BipolarQuant into a threshold and streamlines the affine parts into its neighbours;
- int8 weights (``dequantize_per_channel``, symmetric, q in [−qmax, qmax]) become the float
  weight q·s feeding ``Quant`` (the bits of qmax, signed, narrow, zero point 0, scale s per
  output channel): QONNX's ``round(W / s)`` gives back q exactly;
- static int8 activations (a ``quantize_per_tensor`` → ``dequantize_per_tensor`` pair of scale
  s and zero point z over [lo, hi]) become ``Mul(fp32(1/s))`` → ``Quant`` (scale 1, zero
  point 0, signed 8 bits: the only zero point FINN accepts) → ``Mul(s)``, with the levels moved
  by ``c = z − lo − 128`` around it (``Add(c)`` before, ``Sub(c)`` after; none when c = 0).
  These are torch's levels, round(x · fp32(1/s)) + z, clamped: Quant's own x / s rounds a value
  that sits on a level boundary (the digits CNN's pixels do) the other way now and then, so the
  scale is applied outside it, as torch applies it; FINN absorbs the Mul / Add into its
  thresholds and the Sub / Mul into the next layer when it streamlines;
- a linear with quantized weights becomes ``MatMul`` with its weight stored transposed (in,
  out) and the scale per column: FINN folds a weight quantizer's scale behind a MatMul or a
  Conv, not behind a Gemm.

Anything else keeps its float ONNX ops: layers left in float32 (the first and last layers stay
int8 or float under this profile), normalization, softmax, attention, embeddings (a Gather).
Dynamic int8 activations have no QONNX form (their scale is computed per call) and raise
`FxCompressError`. The batch is fixed at the example inputs' (FINN's front end wants static
shapes; qonnx's ``ChangeBatchSize`` changes it).

QONNX keeps weights as float32 initializers: the quantizer nodes declare the bits FINN packs
them to when it builds the accelerator, so the file is about as large as the fp32 ``.onnx``;
``details`` says how many weights each width declares and what they take packed.

The exported model is cleaned with qonnx's own transformations (`qonnx.util.cleanup
.cleanup_model`: shape inference, constant folding that keeps the quantizer nodes, unique node
and tensor names), saved, loaded back with ``ModelWrapper`` and run by qonnx's ONNX executor
(``qonnx.core.onnx_exec.execute_onnx``, which runs BipolarQuant / Quant with qonnx's reference
arithmetic) on the example inputs; only when its outputs agree with the compiled model is the
file moved into place.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
from torch import fx
from torch.export import ExportedProgram

from fxcompress.errors import FxCompressError, InternalError, upstream_failure
from fxcompress.export import (
    ExportResult,
    _clones,
    _compare,
    _report_json,
    _require,
    _staged,
    file_size,
    nbits,
    to_exported_program,
)
from fxcompress.export import onnx as onnx_format
from fxcompress.graph import LAYER_META, add_buffer, drop_unused_attrs, get_attr, op_type
from fxcompress.hardware_profiles import Profile
from fxcompress.loading import REPORT_FILE
from fxcompress.rewrite import call

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

#: the ONNX domain of QONNX's quantizer ops (what FINN's front end and qonnx's executor read)
QONNX_DOMAIN = "qonnx.custom_op.general"
#: the quantizer ops this writer emits
QUANTIZERS = ("BipolarQuant", "Quant")
INSTALL = "pip install 'fxcompress[qonnx]'"


# --- the quantizers as torch ops (what the exported program computes) ------------------------
@torch.library.custom_op("fxcompress::qonnx_bipolar_quant", mutates_args=())
def bipolar_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """QONNX ``BipolarQuant``: scale where x >= 0, −scale elsewhere."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype) * scale


@bipolar_quant.register_fake
def _(x, scale):
    return torch.empty(torch.broadcast_shapes(x.shape, scale.shape), dtype=x.dtype,
                       device=x.device)


@torch.library.custom_op("fxcompress::qonnx_quant", mutates_args=())
def quant(x: torch.Tensor, scale: torch.Tensor, zeropt: torch.Tensor, bitwidth: torch.Tensor,
          signed: bool, narrow: bool) -> torch.Tensor:
    """QONNX ``Quant`` (rounding half to even): (clamp(round(x / scale + zeropt), lo, hi) −
    zeropt) · scale, [lo, hi] the range of `bitwidth` bits, `signed`, `narrow`."""
    lo, hi = int_range(int(bitwidth), signed, narrow)
    q = torch.clamp(torch.round(x / scale + zeropt), lo, hi)
    return (q - zeropt) * scale


@quant.register_fake
def _(x, scale, zeropt, bitwidth, signed, narrow):
    return torch.empty(torch.broadcast_shapes(x.shape, scale.shape), dtype=x.dtype,
                       device=x.device)


def int_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """The integer range of QONNX's ``Quant`` (qonnx's min_int / max_int)."""
    if signed:
        return -(1 << (bits - 1)) + int(narrow), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1 - int(narrow)


def signed_form(lo: int, hi: int) -> tuple[int, bool, int] | None:
    """(bits, narrow, shift) of the signed QONNX ``Quant`` whose levels are those of [lo, hi]
    moved by `shift` (= lo − its lowest level), or None where the count of levels is neither
    2^bits nor 2^bits − 1."""
    levels = hi - lo + 1
    for bits in range(2, 33):
        for narrow in (False, True):
            if (1 << bits) - int(narrow) == levels:
                return bits, narrow, lo - int_range(bits, True, narrow)[0]
    return None


# --- the compiled graph in QONNX form --------------------------------------------------------
class _Rewriter:
    """Rewrites a copy of a compiled graph into QONNX quantizer calls (see the module
    docstring), counting what it wrote."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.g = gm.graph
        self.counts: Counter = Counter()
        self.float_layers: list[str] = []

    def const(self, hint: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        return add_buffer(self.gm, f"qonnx_{hint}", value, before)

    def activations(self) -> None:
        """Static int8 Q/DQ pairs → Quant (zero point 0); binary activations → BipolarQuant."""
        for node in list(self.g.nodes):
            if node.op != "call_function":
                continue
            if node.target == qd.dequantize_per_tensor.default:
                self._qdq_pair(node)
            elif node.target == aten.ge.Scalar:
                self._binary_activation(node)

    def _qdq_pair(self, dq: fx.Node) -> None:
        qn = dq.args[0]
        layer = dq.meta.get(LAYER_META)
        if not (isinstance(qn, fx.Node) and qn.target == qd.quantize_per_tensor.default
                and tuple(qn.args[1:]) == tuple(dq.args[1:]) and len(qn.users) == 1):
            raise InternalError(f"a dequantize_per_tensor ({dq.name}, layer {layer}) does not "
                                "follow its own quantize_per_tensor; please report this")
        x, s, z, lo, hi, _dtype = qn.args
        form = signed_form(int(lo), int(hi))
        if form is None:
            raise InternalError(f"int8 activations of {layer} over [{lo}, {hi}] have no "
                                "QONNX Quant form; please report this")
        bits, narrow, shift = form
        # torch's levels, round(x · fp32(1 / s)) + z (see the module docstring)
        c = int(z) - shift
        inv = float(torch.tensor(1.0 / float(s), dtype=torch.float32))
        s32 = float(torch.tensor(float(s), dtype=torch.float32))
        with self.g.inserting_before(dq):
            x = call(self.g, aten.mul.Tensor, (x, inv), layer=layer)
            if c:
                x = call(self.g, aten.add.Tensor, (x, float(c)), layer=layer)
            q = call(self.g, torch.ops.fxcompress.qonnx_quant.default,
                     (x, self.const("one", torch.tensor(1.0), dq),
                      self.const("zero", torch.tensor(0.0), dq),
                      self.const("bits", torch.tensor(float(bits)), dq), True, narrow),
                     layer=layer)
            if c:
                q = call(self.g, aten.sub.Tensor, (q, float(c)), layer=layer)
            q = call(self.g, aten.mul.Tensor, (q, s32), layer=layer)
        dq.replace_all_uses_with(q)
        self.g.erase_node(dq)
        self.g.erase_node(qn)
        self.counts["quant_activations"] += 1

    def _binary_activation(self, ge: fx.Node) -> None:
        """add(mul(float(x >= μ), 2β), μ − β), as the binary pass writes it."""
        x, mu = ge.args
        chain = [ge]
        for target in (aten._to_copy.default, aten.mul.Tensor, aten.add.Tensor):
            users = list(chain[-1].users)
            if len(users) != 1 or users[0].target != target:
                return  # a comparison of some other origin: kept as it is
            chain.append(users[0])
        _, cast, mul, add = chain
        two_beta, shift = mul.args[1], add.args[1]
        if not (isinstance(two_beta, float) and isinstance(shift, float)
                and cast.kwargs.get("dtype") == torch.float32):
            return
        beta = two_beta / 2
        if abs((mu - beta) - shift) > 1e-6 * max(1.0, abs(shift)):
            return
        layer = ge.meta.get(LAYER_META)
        mu32 = float(torch.tensor(float(mu), dtype=torch.float32))
        with self.g.inserting_before(add):
            d = call(self.g, aten.sub.Tensor, (x, mu32), layer=layer)
            b = call(self.g, torch.ops.fxcompress.qonnx_bipolar_quant.default,
                     (d, self.const("one", torch.tensor(1.0), add)), layer=layer)
            y = call(self.g, aten.add.Tensor,
                     (call(self.g, aten.mul.Tensor, (b, beta), layer=layer), mu), layer=layer)
        add.replace_all_uses_with(y)
        for n in (add, mul, cast, ge):
            self.g.erase_node(n)
        self.counts["bipolar_activations"] += 1

    def weights(self) -> None:
        """Every linear / conv2d weight: BipolarQuant, Quant, or a float initializer."""
        for node in list(self.g.nodes):
            op = op_type(node)
            if op not in ("linear", "conv2d"):
                continue
            w = node.args[1]
            layer = node.meta.get(LAYER_META, node.name)
            if not isinstance(w, fx.Node) or w.op == "get_attr":
                self.float_layers.append(layer)
                continue
            if w.target == qd.dequantize_per_channel.default and w.args[3] == 0:
                self._int8_weight(node, w, op, layer)
            elif any(str(a.target).endswith("binary_signs") for a in _attrs_under(w)):
                self._binary_weight(node, w, op, layer)
            else:  # decoded in the graph some other way (shared, sparse): a float weight
                value = _constant(self.gm, w)
                if value is None:
                    self.float_layers.append(layer)
                    continue
                node.replace_input_with(w, self.const("weight", value, node))
                self.float_layers.append(layer)

    def _int8_weight(self, node: fx.Node, w: fx.Node, op: str, layer: str) -> None:
        qn, sn, zn = w.args[:3]
        lo, hi = int(w.args[4]), int(w.args[5])
        form = signed_form(lo, hi)
        zero = get_attr(self.gm, zn.target)
        if form is None or form[2] != 0 or bool(zero.any()):
            raise InternalError(f"int8 weights of {layer} over [{lo}, {hi}] with zero points "
                                f"{zero.unique().tolist()} have no QONNX Quant form; please "
                                "report this")
        q, s = get_attr(self.gm, qn.target), get_attr(self.gm, sn.target).float()
        value = qd.dequantize_per_channel(q, s, zero, 0, lo, hi, q.dtype)
        bits, narrow, _ = form
        self._quantized(node, w, op, layer, value, s,
                        lambda x, sc, before: (torch.ops.fxcompress.qonnx_quant.default, (
                            x, sc, self.const("zero", torch.tensor(0.0), before),
                            self.const("bits", torch.tensor(float(bits)), before),
                            True, narrow)))
        self.counts["quant_weights"] += 1
        self.counts["int8_weight_count"] += value.numel()

    def _binary_weight(self, node: fx.Node, w: fx.Node, op: str, layer: str) -> None:
        value = _constant(self.gm, w)
        if value is None:
            raise InternalError(f"the binary weight of {layer} is not a constant; please "
                                "report this")
        rows = value.reshape(value.shape[0], -1)
        alpha = rows.abs().amax(1)
        if not torch.equal(rows.abs(), alpha[:, None].expand_as(rows)):
            raise InternalError(f"the binary weight of {layer} is not ±α per output channel; "
                                "please report this")
        signs = torch.where(value >= 0, 1.0, -1.0)
        self._quantized(node, w, op, layer, signs, alpha,
                        lambda x, sc, before: (torch.ops.fxcompress.qonnx_bipolar_quant.default,
                                               (x, sc)))
        self.counts["bipolar_weights"] += 1
        self.counts["binary_weight_count"] += value.numel()

    def _quantized(self, node: fx.Node, w: fx.Node, op: str, layer: str,
                   value: torch.Tensor, scale: torch.Tensor, quantizer) -> None:
        """`node` reading `quantizer(value, scale)`: a conv2d with the scale per output
        channel; a linear as MatMul on the transposed weight (scale per column), plus bias."""
        g = self.g
        if op == "conv2d":
            scale = scale.reshape(-1, *[1] * (value.dim() - 1))
        else:
            value, scale = value.t().contiguous(), scale.reshape(1, -1)
        with g.inserting_before(node):
            x = self.const("weight", value, node)
            target, args = quantizer(x, self.const("weight_scale", scale.float(), node), node)
            wq = call(g, target, args, layer=layer)
            if op == "conv2d":
                node.replace_input_with(w, wq)
                return
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            y = call(g, aten.matmul.default, (node.args[0], wq), layer=layer)
            if bias is not None:
                y = call(g, aten.add.Tensor, (y, bias), layer=layer)
        y.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(y)
        g.erase_node(node)


def _attrs_under(node: fx.Node) -> list[fx.Node]:
    """The get_attr nodes `node` is computed from."""
    seen, todo, out = set(), [node], []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            out.append(n)
        todo.extend(n.all_input_nodes)
    return out


def _constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The value of `node` when it is computed from the module's tensors alone (no input),
    else None."""
    values: dict[fx.Node, Any] = {}

    def value(n: fx.Node):
        if n in values:
            return values[n]
        if n.op == "get_attr":
            v = get_attr(gm, n.target)
        elif n.op == "call_function":
            args = fx.node.map_arg(n.args, value)
            kwargs = fx.node.map_arg(n.kwargs, value)
            v = n.target(*args, **kwargs)
        else:
            raise LookupError(n.name)
        values[n] = v
        return v

    try:
        with torch.no_grad():
            v = value(node)
    except LookupError:
        return None
    return v.detach().clone() if isinstance(v, torch.Tensor) else None


def qonnx_graph(gm: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of the compiled graph `gm` (sharing its weights; `gm` is left as it is) whose
    quantized layers call QONNX's quantizers (`bipolar_quant`, `quant`; see the module
    docstring), and what was rewritten: counts of quantizers by kind and the layers left in
    float. Any other module is returned as it is (it holds no fxcompress quantization)."""
    if not isinstance(gm, fx.GraphModule):  # a model of its own (the fp32 baseline, say)
        return gm, {}
    new = nbits._copy(gm)
    rw = _Rewriter(new)
    rw.activations()
    rw.weights()
    drop_unused_attrs(new)
    left = sorted({str(n.target) for n in new.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("quantized_decomposed")})
    if left:
        raise FxCompressError(
            f"this model quantizes in a way QONNX cannot express ({', '.join(left)}: dynamic "
            "or per-token activations, whose scale is computed at every call, or group-wise "
            "weights); compile it for fpga-binary (static int8, binary), or write the plain "
            ".onnx with another profile's writer (export(..., profile='x86-server'))")
    new.delete_all_unused_submodules()
    new.graph.lint()
    new.recompile()
    return new, {**rw.counts, "float_layers": rw.float_layers}


# --- ONNX -----------------------------------------------------------------------------------
def _schemas() -> dict:
    """The signatures of QONNX's BipolarQuant and Quant, which ONNX's schema registry does not
    hold and the exporter needs to build the nodes."""
    from onnx import defs

    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    floats = [("T", ["tensor(float)"], "float tensors")]
    return {
        "BipolarQuant": defs.OpSchema(
            "BipolarQuant", QONNX_DOMAIN, 1, inputs=[param("X", "T"), param("scale", "T")],
            outputs=[param("Y", "T")], type_constraints=floats),
        "Quant": defs.OpSchema(
            "Quant", QONNX_DOMAIN, 1,
            inputs=[param(n, "T") for n in ("X", "scale", "zeropt", "bitwidth")],
            outputs=[param("Y", "T")], type_constraints=floats,
            attributes=[attr("signed", defs.OpSchema.AttrType.INT, "signed range"),
                        attr("narrow", defs.OpSchema.AttrType.INT, "narrow range"),
                        attr("rounding_mode", defs.OpSchema.AttrType.STRING, "rounding")]),
    }


def onnx_translations() -> dict:
    """``fxcompress::qonnx_bipolar_quant`` / ``qonnx_quant`` as QONNX's BipolarQuant / Quant
    (rounding ``ROUND``: half to even, as torch.round)."""
    import onnxscript

    opset = onnxscript.values.Opset(QONNX_DOMAIN, 1)
    ops = {name: onnxscript.values.Op(opset, name, schema)
           for name, schema in _schemas().items()}

    def bipolar(x, scale):
        return ops["BipolarQuant"](x, scale)

    def quantize(x, scale, zeropt, bitwidth, signed: bool, narrow: bool):
        return ops["Quant"](x, scale, zeropt, bitwidth, signed=int(signed),
                            narrow=int(narrow), rounding_mode="ROUND")

    return {torch.ops.fxcompress.qonnx_bipolar_quant.default: bipolar,
            torch.ops.fxcompress.qonnx_quant.default: quantize}


def _file_details(model, rewritten: dict[str, Any]) -> dict[str, Any]:
    """What the cleaned QONNX model holds: quantizer nodes by kind, the op types, and the
    weights each quantizer width declares."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    kinds: Counter = Counter()
    declared: Counter = Counter()  # bits -> weights declared at that width
    stored = 0
    for n in graph.node:
        if n.op_type not in QUANTIZERS:
            continue
        on_weight = n.input[0] in inits
        kinds[f"{n.op_type}_{'weights' if on_weight else 'activations'}"] += 1
        if on_weight:
            w = model.get_initializer(n.input[0])
            bits = 1 if n.op_type == "BipolarQuant" else int(model.get_initializer(n.input[3]))
            declared[bits] += int(w.size)
            stored += int(w.nbytes)
    float_weights = sum(int(model.get_initializer(n.input[1]).size) for n in graph.node
                        if n.op_type in ("MatMul", "Conv", "Gemm") and n.input[1] in inits)
    return {
        "BipolarQuant": sum(v for k, v in kinds.items() if k.startswith("BipolarQuant")),
        "Quant": sum(v for k, v in kinds.items() if k.startswith("Quant")),
        "quantizers": dict(sorted(kinds.items())),
        "op_types": dict(sorted(Counter(n.op_type for n in graph.node).items())),
        # QONNX stores every weight as float32; the quantizer declares its width, which FINN
        # packs to when it builds the accelerator
        "weight_bits_stored": 32,
        "quantized_weight_bytes_stored": stored,
        "weights_by_declared_bits": {str(b): n for b, n in sorted(declared.items())},
        "quantized_weight_bytes_packed": sum((n * b + 7) // 8 for b, n in declared.items()),
        "float_weights": float_weights,
        "float_layers": list(rewritten.get("float_layers", [])),
    }


def write_qonnx(gm: torch.nn.Module, example_inputs: tuple, path: Path, report, expected,
                tol: float, prof: Profile | None = None,
                program: ExportedProgram | None = None,
                ) -> ExportResult:
    """Write `gm` as a QONNX ``.onnx`` at `path`, cleaned with qonnx's transformations and
    checked by qonnx's executor against `expected` (its outputs on `example_inputs`) within
    `tol`. `prof` and `program` are not used: the rewritten graph is exported afresh, at the
    example inputs' batch."""
    _require("onnxscript", "writing a QONNX .onnx", INSTALL)
    _require("qonnx", "writing a QONNX .onnx", INSTALL)
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    new, rewritten = qonnx_graph(gm)
    ep, _ = to_exported_program(new, example_inputs, dynamic_batch=False)
    try:
        with contextlib.redirect_stdout(io.StringIO()), \
                onnx_format._quiet_logger("torch.onnx"):
            onnx_program = torch.onnx.export(ep, _clones(example_inputs), dynamo=True,
                                             verbose=False,
                                             custom_translation_table=onnx_translations())
    except Exception as e:
        raise upstream_failure("the ONNX exporter (torch.onnx)", ".onnx", e) from e
    onnx_format._strip_debug_info(onnx_program.model)
    rj = _report_json(report)
    if rj is not None:
        onnx_program.model.metadata_props[REPORT_FILE] = rj
    model = cleanup_model(ModelWrapper(onnx_program.model_proto))
    flat = [x.numpy() for x in _clones(example_inputs) if isinstance(x, torch.Tensor)]
    with _staged(path) as tmp:
        model.save(str(tmp))
        loaded = ModelWrapper(str(tmp))
        names = [i.name for i in loaded.graph.input]
        out = execute_onnx(loaded, dict(zip(names, flat, strict=True)))
        got = [out[o.name] for o in loaded.graph.output]
        err = _compare(got, expected, tol, ".onnx (QONNX)", "qonnx's ONNX executor")
        size = file_size(tmp)
        details = _file_details(loaded, rewritten)
    details["batch"] = int(flat[0].shape[0]) if flat and flat[0].ndim else None
    return ExportResult(path, ".onnx", size, err, "qonnx.core.onnx_exec", dynamic_batch=False,
                        details=details)
