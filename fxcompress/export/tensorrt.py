"""``.onnx`` for TensorRT (the ``tensorrt`` writer, nvidia-gpu): an ONNX file TensorRT 10's
ONNX parser builds an engine from, written through the project's ONNX path (`onnx.write_onnx`).

What makes it TensorRT's rather than ONNX Runtime's, done on a copy of the compiled graph
(`tensorrt_graph`) before it is exported:

- **Precision**: the profile's compute dtype. For fp16 (nvidia-gpu) every float weight and every
  computation is fp16 (a strongly typed TensorRT network follows these types; a weakly typed
  one picks fp16 kernels with the FP16 builder flag the metadata names); inputs and outputs
  keep the model's dtype, with a Cast to fp16 after each float input and back before each
  output, so the file is called exactly as the compiled model is. Float numbers in the graph
  beyond fp16's range are clamped to its largest (a mask bias of ``finfo(float32).min`` would
  be -inf, and 0 x -inf is NaN). Sums keep the fp32 accumulation torch gives fp16 sums (the
  exporter's casts around ReduceSum); `ExportResult.details` counts those fp32 tensors.
- **int8 weights** (the ``dequant`` representation: ``q.to(float) * scale``) become
  ``DequantizeLinear`` of the int8 initializer with its per-output-channel fp16 scale and a
  zero point of 0: the symmetric weight-only DQ TensorRT 10 reads (explicit quantization;
  IDequantizeLayer takes only zero zero-points), feeding the Conv / Gemm / MatMul in fp16.
  The exporter writes DequantizeLinear with an fp32 scale and a Cast after it; the scale is
  stored fp16 (opset 19 allows it) and the Cast dropped (`_dequantize_in`).
- **int4 weights** (intx weight-only, ``dequantize_per_channel_group`` of symmetric 4-bit codes)
  become ONNX's blocked ``DequantizeLinear`` (axis 1, ``block_size`` the group) of an INT4
  initializer, two codes a byte, with fp16 scales: TensorRT's INT4 weight-only form, which
  needs opset 21 (`TENSORRT_BLOCKS_OPSET`; such a file is opset 21, others stay at 20). The
  exporter cannot write opset 21, so the graph carries `nbits.dequantize_blocks`, exported as
  per-axis DequantizeLinear over rows of one block, which `_blocks_to_dq` rewrites.
- **Decoded forms**: weights the graph computes from stored constants (sparse positions and
  kept values, palettes and their indices) are folded into plain initializers: TensorRT has
  no kernel for them, and would run the decode at every call. A 2:4 sparse weight is thus
  stored dense with its zeros, the form TensorRT's sparse tensor-core kernels are picked from
  when the engine is built with sparse weights enabled (``BuilderFlag.SPARSE_WEIGHTS``).
- **Metadata** (``metadata_props``, beside the compile report): `META_PRECISION`, the
  builder flags the engine wants (`META_BUILDER_FLAGS`) and the 2:4 weights
  (`META_SPARSE`: JSON, per initializer the layer it belongs to, the op reading it and the
  axis its runs of four lie along: the reduction axis, input channels for a Conv, K for a
  Gemm / MatMul). A weight whose zeros lie in runs TensorRT does not read (the sparse pass
  masks a k x k convolution along its flattened (in, kh, kw) columns, not along input
  channels) is not listed; `ExportResult.details` counts it.
- Opset and IR version as the exporter writes them, checked to be ones TensorRT 10 reads
  (`TENSORRT_MAX_OPSET`, `TENSORRT_MAX_IR_VERSION`); the batch dynamic where the compiled model's
  is.

How it is checked before it is moved into place: the file is run in ONNX Runtime's
CPUExecutionProvider without its int8 fusions (`_run_fp16_arithmetic`; TensorRT itself, and
ONNX Runtime's CUDA / TensorRT providers, need an NVIDIA GPU this check does not have) on the
example inputs and compared with the compiled model within the fp16 bound
(`fp16_check_tolerance`: the check tolerance, or `FP16_NOISE_FACTOR` x the error fp16 storage
itself causes on this model, measured by running the compiled model with every tensor rounded
to fp16); then its structure (`check_structure`): every float initializer and constant is of
the compute dtype, every weight listed as 2:4 holds the pattern along its axis, the opset and
IR version are ones TensorRT reads, and the ONNX checker passes it (with shape inference).
"""

from __future__ import annotations

import copy
import json
import math
import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
from torch import fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from fxcompress.errors import FxCompressError, InternalError
from fxcompress.export import (
    ExportResult,
    _clones,
    _compare,
    _require,
    _staged,
    file_size,
    relative_error,
    to_exported_program,
)
from fxcompress.export import onnx as onnx_format
from fxcompress.graph import LAYER_META, add_buffer, drop_unused_attrs, get_attr
from fxcompress.hardware_profiles import Profile

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

#: TensorRT 10's ONNX parser reads opsets 9 to 20 and IR versions up to 10 (its operator
#: support matrix, onnx-tensorrt 10.x): a file beyond them is refused at parse time. Block
#: quantization (INT4 weights, DequantizeLinear's block_size) exists from opset 21 only, which
#: TensorRT 10's parser reads for it (NVIDIA/TensorRT issue 4298, 2025: "block-wise
#: quantization is only supported in opset 21 onwards"): a file with INT4 blocks is opset 21.
TENSORRT_MAX_OPSET = 20
TENSORRT_BLOCKS_OPSET = 21
TENSORRT_MAX_IR_VERSION = 10
#: fp16's unit roundoff: round to nearest changes a value by at most this fraction of it.
FP16_UNIT_ROUNDOFF = 2.0 ** -11
#: The fp16 file may differ from the compiled model by this many times the error fp16 storage
#: itself causes on the model (`fp16_rounding_error`), where that is more than the check
#: tolerance. The file rounds the same tensors, but its runtime's kernels round differently
#: inside (fp16 accumulation in some, ops fused or decomposed by the exporter, batch norm folded
#: into the convolution weights before they are rounded): noise of the same size, drawn again.
#: Measured ratio of the ONNX Runtime file's error to the emulated one: 0.29-1.93 over 16
#: compiles (tiny MLP, digits CNN, text transformer, with and without int8 and 2:4 layers; the
#: BLOOM, GPT-2, BERT, Llama, ViT and Whisper-encoder models of benchmarks/archs.py), so 4 is
#: twice the largest; the bound came to 1.3e-3-4.9e-3 there. A wrong lowering (a lost scale, a
#: dropped op, a misplaced weight) is off by the size of the output, some 200x that.
FP16_NOISE_FACTOR = 4.0

META_PRECISION = "tensorrt.precision"  # "fp16" or "fp32": what the weights and compute are
META_BUILDER_FLAGS = "tensorrt.builder_flags"  # e.g. "FP16,SPARSE_WEIGHTS"
META_SPARSE = "tensorrt.sparse_2_4"  # JSON: {initializer: {"layer", "op", "axis"}}

_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
_NAMES = {v: k for k, v in _DTYPES.items()}
_WEIGHT_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1}  # op -> the input that is the weight


def write_tensorrt_onnx(gm: torch.nn.Module, example_inputs: tuple, path: Path, report,
                        expected, tol: float, prof: Profile | None,
                        program: ExportedProgram | None = None) -> ExportResult:
    """Write `gm` as a TensorRT-ready ``.onnx`` at `path` (see the module documentation),
    checked in ONNX Runtime against `expected` (its outputs on `example_inputs`) within `tol`
    or the fp16 bound (`fp16_check_tolerance`), and structurally. `prof` gives the compute
    dtype (fp16 where it is None); `program` is not used: the graph is rewritten, so it is
    exported afresh."""
    install = "pip install 'fxcompress[onnx]'"
    onnx = _require("onnx", "writing a TensorRT .onnx", install)
    ort = _require("onnxruntime", "checking a TensorRT .onnx", install)
    ir = _require("onnx_ir", "writing a TensorRT .onnx", install)
    precision = "fp16" if prof is None else prof.compute_dtype
    if precision not in _DTYPES:
        raise FxCompressError(f"the tensorrt writer builds fp16 or fp32 files, not "
                              f"{precision!r}; set [backend] compute_dtype to one of them")
    dtype = _DTYPES[precision]
    if not isinstance(gm, fx.GraphModule):  # a model of the user's own: its ATen graph
        gm = to_exported_program(gm, example_inputs,
                                 bool(getattr(report, "dynamic_batch", True)))[0].module()
    rounding = fp16_rounding_error(gm, example_inputs, expected) if dtype == torch.float16 \
        else 0.0
    bound = fp16_check_tolerance(tol, rounding)
    trt_gm, sparse_layers = tensorrt_graph(gm, dtype, _sparse_2_4_layers(report))
    with _staged(path, extra_suffixes=(".data",)) as tmp:
        # the project's ONNX writer exports and checks the rewritten graph (int8 left as int8:
        # "u8s8" keeps the DQ weights signed, the type TensorRT reads) into the staging folder
        plain = tmp.with_name(f"{path.name}.onnxruntime.onnx")
        written = onnx_format.write_onnx(trt_gm, example_inputs, plain, report, expected,
                                         bound, "u8s8")
        model = ir.load(plain)
        dropped = _dequantize_in(model, dtype)
        blocks = _blocks_to_dq(model)
        sparse = _mark_2_4(model, sparse_layers)
        # fp32 is TensorRT's default (no flag); fp16 kernels need FP16 in a weakly typed network
        flags = (["FP16"] if dtype == torch.float16 else []) \
            + (["SPARSE_WEIGHTS"] if sparse else [])
        model.metadata_props[META_PRECISION] = precision
        model.metadata_props[META_BUILDER_FLAGS] = ",".join(flags)
        model.metadata_props[META_SPARSE] = json.dumps(sparse, sort_keys=True)
        external = _initializer_bytes(model) > onnx_format.ONNX_EXTERNAL_DATA_BYTES
        ir.save(model, tmp, external_data=f"{path.name}.data" if external else None)
        onnx.checker.check_model(str(tmp), full_check=True)
        structure = check_structure(onnx.load(str(tmp)), dtype)
        got = _run_fp16_arithmetic(ort, tmp, example_inputs)
        err = _compare(got, expected, bound, ".onnx (TensorRT)", "ONNX Runtime")
        size = file_size(tmp)
    not_trt = sorted(set(sparse_layers) - {v["layer"] for v in sparse.values()})
    details = {**structure, "precision": precision, "check_bound": bound,
               "fp16_rounding_error": rounding, "sparse_2_4_not_trt_layout": len(not_trt),
               "casts_dropped": dropped, "int4_blocks": blocks}
    return ExportResult(path, ".onnx", size, err, "onnxruntime",
                        dynamic_batch=written.dynamic_batch, details=details)


def _run_fp16_arithmetic(ort, path: Path, example_inputs: tuple) -> list:
    """The outputs of the file at `path` in ONNX Runtime on CPU, without its int8 fusions:
    ONNX Runtime's CPU fusion of DequantizeLinear + MatMul (MatMulNBits) quantizes the
    activations to int8 too, a kernel choice of its own and not the file's arithmetic (the
    text transformer with int8 weights: 3.6e-3 from the plain fp16 arithmetic with it, 7e-5
    without); TensorRT runs the fp16 MatMul on the dequantized weight."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    leaves = pytree.tree_leaves(_clones(example_inputs))
    feeds = {spec.name: x.numpy() if isinstance(x, torch.Tensor) else x
             for spec, x in zip(session.get_inputs(), leaves, strict=True)}
    return session.run(None, feeds)


# --- the check's bound ----------------------------------------------------------------------
def fp16_rounding_error(gm: torch.nn.Module, example_inputs: tuple, expected) -> float:
    """The relative output error of `gm` on `example_inputs` when every float tensor it reads
    or computes (inputs, weights, each op's output) is rounded to fp16, each op computing in
    fp32 from the rounded values: what storing every tensor in fp16 costs, the part of an fp16
    engine's error that does not depend on its kernels. Raises `FxCompressError` where a value
    overflows fp16 (an infinite or NaN output)."""
    graph = getattr(gm, "graph", None)
    if not isinstance(graph, fx.Graph):
        raise FxCompressError("the tensorrt writer rewrites the model's graph: pass the "
                              "GraphModule fxcompress.compile returned")
    with torch.no_grad():
        got = _RoundedTo16(gm).run(*pytree.tree_leaves(_clones(example_inputs)))
    err = relative_error(got, expected)
    if not math.isfinite(err):
        raise FxCompressError(
            "the model overflows fp16: with its tensors rounded to fp16 its outputs are "
            "infinite or NaN (fp16 holds magnitudes up to 65504), so a TensorRT fp16 engine "
            "would be wrong; compile for a profile whose [backend] compute_dtype is \"fp32\", "
            "or rescale the model's activations")
    return err


class _RoundedTo16(fx.Interpreter):
    """Runs a graph with every float tensor a node yields rounded to fp16 (kept in its
    dtype)."""

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        return pytree.tree_map(_round16, out)


def _round16(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float16:
        return x.to(torch.float16).to(x.dtype)
    return x


def fp16_check_tolerance(tol: float, rounding_error: float) -> float:
    """The relative error the TensorRT file may have against the compiled model: `tol`, or
    `FP16_NOISE_FACTOR` x `rounding_error` (`fp16_rounding_error`) where that is more."""
    return max(tol, FP16_NOISE_FACTOR * rounding_error)


# --- the graph TensorRT reads ---------------------------------------------------------------
def tensorrt_graph(gm: torch.nn.Module, dtype: torch.dtype = torch.float16,
                   sparse_layers: Any = ()) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """A copy of `gm` (left as it is) as TensorRT reads it: int8 weight-only dequantization
    as ``quantized_decomposed.dequantize_per_channel`` (DequantizeLinear in ONNX), every weight
    computed from constants folded into a plain buffer, and floats in `dtype` with casts at the
    inputs and outputs. Returns it and, for each of `sparse_layers` whose weight was folded,
    that weight (in `dtype`)."""
    out = copy.deepcopy(gm)  # a deep copy carries no stored program (`StoredProgram`)
    _weight_only_to_dq(out)
    _group_dq_to_blocks(out)
    folded = _fold_constants(out)
    sparse = {layer: w for layer, w in folded.items() if layer in set(sparse_layers)}
    if dtype != torch.float32:
        _to_dtype(out, dtype)
        sparse = {k: v.to(dtype) for k, v in sparse.items()}
    drop_unused_attrs(out)
    out.graph.lint()
    out.recompile()
    return out, sparse


def _weight_only_to_dq(gm: fx.GraphModule) -> None:
    """``mul(q.to(float32), s)`` of an int8 buffer q and a per-output-channel scale s (int8's
    ``dequant`` representation) as ``dequantize_per_channel(q, s, 0, axis 0)``."""
    g = gm.graph
    for node in list(g.nodes):
        if node.target != aten.mul.Tensor or len(node.args) != 2:
            continue
        convert, scale = node.args
        if not (isinstance(convert, fx.Node) and convert.target == aten._to_copy.default
                and convert.kwargs.get("dtype") == torch.float32 and len(convert.users) == 1
                and _is_attr(convert.args[0]) and _is_attr(scale)):
            continue
        q, s = get_attr(gm, convert.args[0].target), get_attr(gm, scale.target)
        if q.dtype != torch.int8 or not s.is_floating_point() or s.dim() != q.dim() \
                or s.shape[0] != q.shape[0] or s.numel() != q.shape[0]:
            continue
        layer = node.meta.get(LAYER_META, "weight")
        sn = add_buffer(gm, f"{layer}.dq_scale", s.reshape(-1).float(), node)
        zn = add_buffer(gm, f"{layer}.dq_zero_point", torch.zeros(q.shape[0], dtype=torch.int64),
                        node)
        with g.inserting_before(node):
            dq = g.call_function(qd.dequantize_per_channel.default,
                                 (convert.args[0], sn, zn, 0, -128, 127, torch.int8),
                                 {"out_dtype": torch.float32})
        dq.meta.update(node.meta)
        node.replace_all_uses_with(dq)
        g.erase_node(node)
        g.erase_node(convert)


def _group_dq_to_blocks(gm: fx.GraphModule) -> int:
    """Each weight-only ``dequantize_per_channel_group`` of stored symmetric 4-bit codes (intx
    with `[intx] activations = "none"`) as `dequantize_blocks`; returns how many."""
    g, done = gm.graph, 0
    for node in list(g.nodes):
        if node.target != qd.dequantize_per_channel_group.default:
            continue
        q, s, z, lo, hi, _dt, group = node.args[:7]
        if not (_is_attr(q) and _is_attr(s) and _is_attr(z)) or (lo, hi) != (-8, 7) \
                or get_attr(gm, z.target).any():
            continue
        n, k = get_attr(gm, q.target).shape
        with g.inserting_before(node):
            blocks = g.call_function(torch.ops.fxcompress.dequantize_blocks.default,
                                     (q, s, int(group), int(n), int(k)))
        blocks.meta.update(node.meta)
        node.replace_all_uses_with(blocks)
        g.erase_node(node)
        done += 1
    return done


def _blocks_to_dq(model) -> int:
    """The ONNX of each `nbits.dequantize_blocks` (a per-axis ``DequantizeLinear`` of int8
    codes in rows of one block, reshaped to (n, k)) as ONNX's blocked ``DequantizeLinear``
    (axis 1, ``block_size``) of the (n, k) codes stored as INT4, two a byte, with the (n, k /
    block) scales; the model then in opset `TENSORRT_BLOCKS_OPSET`. Returns how many."""
    import ml_dtypes
    import onnx_ir as ir

    graph, done = model.graph, 0
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") \
                or len(node.inputs) > 2 and node.inputs[2] is not None:
            continue
        codes, scale = _constant(node.inputs[0]), _constant(node.inputs[1])
        if codes is None or scale is None or node.inputs[0].dtype != ir.DataType.INT8:
            continue
        back = _only_use(node.outputs[0], "Reshape")
        if back is not None and back.inputs[1].const_value is not None:
            n, k = (int(d) for d in back.inputs[1].const_value.numpy())
            out = back.outputs[0]
        elif len(codes.shape) == 2 and int(scale.numpy().size) == codes.shape[0]:
            # one block a row: the exporter dropped the reshapes, which did nothing
            (n, k), out = (int(d) for d in codes.shape), node.outputs[0]
        else:
            continue
        q = codes.numpy()
        rows = int(scale.numpy().size)
        if q.size != n * k or (n * k) % rows or q.min() < -8 or q.max() > 7:
            continue
        group = n * k // rows
        q4 = ir.Value(name=_free_name(graph, f"{node.inputs[0].name}.int4"),
                      shape=ir.Shape([n, k]), type=ir.TensorType(ir.DataType.INT4),
                      const_value=ir.Tensor(q.reshape(n, k).astype(ml_dtypes.int4)))
        s = ir.Value(name=_free_name(graph, f"{node.inputs[1].name}.blocks"),
                     shape=ir.Shape([n, k // group]), type=ir.TensorType(node.inputs[1].dtype),
                     const_value=ir.tensor(scale.numpy().reshape(n, k // group)))
        graph.initializers[q4.name] = q4
        graph.initializers[s.name] = s
        dq = ir.Node("", "DequantizeLinear", [q4, s],
                     attributes=[ir.AttrInt64("axis", 1), ir.AttrInt64("block_size", group)])
        graph.insert_before(node, dq)
        dq.outputs[0].dtype = out.dtype
        dq.outputs[0].shape = out.shape
        ir.convenience.replace_all_uses_with(out, dq.outputs[0])
        done += 1
    if done:
        _drop_dead(model)
        model.opset_imports[""] = TENSORRT_BLOCKS_OPSET
    return done


def _constant(value):
    """The constant tensor `value` holds, directly or through a Reshape of a constant (the
    exporter folds the reshape of a small initializer, not of a large one); else None."""
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape" \
            and producer.inputs[0].const_value is not None:
        return producer.inputs[0].const_value
    return None


def _only_use(value, op_type: str):
    """The one node reading `value` where it is an `op_type`; else None."""
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and uses[0].node.op_type == op_type else None


def _is_attr(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _fold_constants(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Replace every tensor the graph computes from its buffers alone (a decode) by a buffer
    holding it; dequantization is kept (TensorRT runs it on the int8 weight). Returns the
    folded weights by the layer their nodes belong to. A decode's intermediate tensors are
    dropped once every op reading them has run."""
    g = gm.graph
    values: dict[fx.Node, Any] = {}
    waiting = {n: len(n.users) for n in g.nodes}
    folded: dict[fx.Node, torch.Tensor] = {}
    for node in list(g.nodes):
        inputs = node.all_input_nodes
        if node.op == "get_attr":
            values[node] = get_attr(gm, node.target)
        elif node.op == "call_function" and node.target not in (
                qd.dequantize_per_channel.default,
                torch.ops.fxcompress.dequantize_blocks.default) \
                and all(a in values for a in inputs) and _pure(node):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
            values[node] = node.target(*args, **kwargs)
        else:  # computed at run time: what it reads from a decode becomes a buffer
            folded.update((a, values[a]) for a in inputs if a in values and a.all_input_nodes
                          and a.op != "get_attr" and isinstance(values[a], torch.Tensor))
        for a in inputs:
            waiting[a] -= 1
            if not waiting[a]:
                values.pop(a, None)
    by_layer: dict[str, torch.Tensor] = {}
    for node, value in folded.items():
        layer = node.meta.get(LAYER_META) or "constant"
        node.replace_all_uses_with(add_buffer(gm, f"{layer}.decoded", value, node))
        by_layer[layer] = value
    g.eliminate_dead_code()
    return by_layer


def _pure(node: fx.Node) -> bool:
    """An op whose result depends on its arguments only (not random, no side effect)."""
    target = node.target
    if target in (operator.getitem,):
        return True
    schema = getattr(target, "_schema", None)
    if schema is None:
        return False
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags and not schema.is_mutable


def _to_dtype(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """Every float buffer and computation of `gm` in `dtype`; a cast after each float input
    and, back to the model's own dtype, before each float output."""
    g = gm.graph
    for node in g.nodes:
        if node.op == "get_attr":
            t = get_attr(gm, node.target)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
                _set_attr(gm, node.target, t.detach().to(dtype))
        elif node.op == "call_function":
            node.args, node.kwargs = _swap_float_dtypes((node.args, node.kwargs), dtype)
    for node in list(g.nodes):
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, torch.Tensor) \
                or not val.is_floating_point() or val.dtype == dtype:
            continue
        users = list(node.users)
        with g.inserting_after(node):
            cast = g.call_function(aten._to_copy.default, (node,), {"dtype": dtype})
        for u in users:
            u.replace_input_with(node, cast)
    out = next(n for n in reversed(g.nodes) if n.op == "output")

    def back(a: fx.Node) -> fx.Node:
        val = a.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point() \
                or val.dtype == dtype:
            return a
        with g.inserting_before(out):
            return g.call_function(aten._to_copy.default, (a,), {"dtype": val.dtype})

    out.args = fx.node.map_arg(out.args, back)


def _swap_float_dtypes(tree: Any, dtype: torch.dtype) -> Any:
    """Float dtype arguments as `dtype`; float numbers beyond its range clamped to its largest
    finite value (a mask bias of ``finfo(float32).min`` would be -inf, and 0 x -inf is NaN)."""
    top = torch.finfo(dtype).max

    def swap(v: Any) -> Any:
        if isinstance(v, torch.dtype):
            return dtype if v in (torch.float32, torch.float64) else v
        if isinstance(v, float) and math.isfinite(v) and abs(v) > top:
            return math.copysign(top, v)
        return v

    return pytree.tree_map(swap, tree)


def _set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def _sparse_2_4_layers(report) -> list[str]:
    """The layers the compile report says were stored 2:4 sparse."""
    return [la.name for la in getattr(report, "layers", ())
            if str(la.applied).startswith("sparse") and la.params.get("pattern") == "2:4"]


# --- the ONNX file --------------------------------------------------------------------------
def _dequantize_in(model, dtype: torch.dtype) -> int:
    """DequantizeLinear with its scale in the compute dtype and its output too (opset 19 takes
    fp16 scales): the exporter writes an fp32 scale and a Cast of the output after it, which
    TensorRT would run as a separate op. Returns the casts removed."""
    import numpy as np
    import onnx_ir as ir

    want = ir.DataType.FLOAT16 if dtype == torch.float16 else ir.DataType.FLOAT
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    dropped = 0
    graph = model.graph
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        casts = [u.node for u in out.uses()]
        if out.is_graph_output() or not casts or any(
                c.op_type != "Cast" or c.attributes.get_int("to") != int(want)
                or c.outputs[0].is_graph_output() for c in casts):
            continue  # not the exporter's pattern: left as it is (the structure check decides)
        scale = node.inputs[1]
        producer = scale.producer()
        if producer is not None and producer.op_type == "Cast" \
                and producer.inputs[0].const_value is not None:
            scale = producer.inputs[0]  # the stored scale, before the exporter's cast
        if scale.const_value is None:
            continue
        value = scale.const_value.numpy().astype(np_dtype)
        new = ir.Value(name=_free_name(graph, f"{node.inputs[0].name}.scale"),
                       shape=scale.shape, type=ir.TensorType(want),
                       const_value=ir.tensor(value))
        graph.initializers[new.name] = new
        node.replace_input_with(1, new)
        out.dtype = want
        for cast in casts:
            ir.convenience.replace_all_uses_with(cast.outputs[0], out)
            graph.remove(cast, safe=True)
            dropped += 1
    _drop_dead(model)
    return dropped


def _drop_dead(model) -> None:
    """Nodes whose outputs nothing reads, and initializers nothing reads."""
    graph = model.graph
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if not any(v.uses() or v.is_graph_output() for v in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]


def _initializer_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


def _weights_read(graph) -> Iterator[tuple[str, str, int]]:
    """(initializer name, op, reduction axis) of each constant weight a Conv, Gemm or MatMul
    reads."""
    for node in graph:
        i = _WEIGHT_OPS.get(node.op_type)
        if i is None or len(node.inputs) <= i or node.inputs[i] is None:
            continue
        w = node.inputs[i]
        if w.const_value is None or w.name not in graph.initializers:
            continue
        rank = len(w.shape)
        if node.op_type == "Conv":
            axis = 1  # (out, in / groups, kh, kw): runs of four input channels
        elif node.op_type == "Gemm":
            axis = 1 if node.attributes.get_int("transB", 0) else 0
        elif rank >= 2:  # MatMul: x @ W, W is (..., K, N)
            axis = rank - 2
        else:
            continue
        yield w.name, node.op_type, axis


def holds_2_4(w, axis: int) -> bool:
    """Whether array `w` has at most two nonzeros in every run of four along `axis` (runs
    from index 0; the length along `axis` a multiple of four)."""
    import numpy as np

    w = np.moveaxis(np.asarray(w), axis, -1)
    if w.shape[-1] % 4:
        return False
    nonzero = (w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4) != 0).sum(-1)
    return bool((nonzero <= 2).all())


def _mark_2_4(model, sparse_layers: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The initializers that are the weights of `sparse_layers` (by value) and hold 2:4 along
    the reduction axis of the op that reads them."""
    if not sparse_layers:
        return {}
    wanted = {layer: w.detach().cpu().numpy() for layer, w in sparse_layers.items()}
    found: dict[str, dict] = {}
    for name, op, axis in list(_weights_read(model.graph)):
        if name not in model.graph.initializers:
            continue  # read by two ops: renamed at the first
        arr = model.graph.initializers[name].const_value.numpy()
        layer = next((la for la, w in wanted.items() if _same_weight(arr, w)), None)
        if layer is not None and holds_2_4(arr, axis):
            # named for its layer, as TensorRT's refitter and a reader of the metadata see it
            value = model.graph.initializers[name]
            value.name = _free_name(model.graph, f"{layer}.weight")
            found[value.name] = {"layer": layer, "op": op, "axis": int(axis)}
    return found


def _free_name(graph, want: str) -> str:
    """`want`, or `want` with a number added where a value of the graph has that name."""
    taken = {*graph.initializers, *(v.name for v in graph.inputs),
             *(v.name for n in graph for v in n.outputs)}
    name, i = want, 0
    while name in taken:
        i += 1
        name = f"{want}_{i}"
    return name


def _same_weight(arr, w) -> bool:
    import numpy as np

    if arr.dtype != w.dtype:
        return False
    if arr.shape == w.shape and np.array_equal(arr, w):
        return True
    return arr.ndim == 2 and arr.shape == w.shape[::-1] and np.array_equal(arr, w.T)


def check_structure(proto, dtype: torch.dtype) -> dict[str, Any]:
    """Raise `InternalError` unless ONNX model `proto` is what TensorRT is to read: an opset
    and IR version it parses, every float initializer and Constant in `dtype`, and every
    weight `META_SPARSE` lists holding 2:4 along its axis. Returns what it counted: bytes of
    float initializers, int8 weights DequantizeLinear reads, 2:4 weights and their elements,
    float32 tensors between the boundary casts (by shape inference)."""
    import onnx
    from onnx import numpy_helper

    want = onnx.TensorProto.FLOAT16 if dtype == torch.float16 else onnx.TensorProto.FLOAT
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    problems = []
    # opset 21 where the file holds INT4 blocks (the opset they need), else TensorRT's 20
    blocked = any(n.op_type == "DequantizeLinear" and any(a.name == "block_size"
                                                            for a in n.attribute)
                  for n in proto.graph.node)
    top = TENSORRT_BLOCKS_OPSET if blocked else TENSORRT_MAX_OPSET
    if opset > top or proto.ir_version > TENSORRT_MAX_IR_VERSION:
        problems.append(f"opset {opset} / IR version {proto.ir_version} (TensorRT 10 reads "
                        f"up to {top} / {TENSORRT_MAX_IR_VERSION})")
    inits = {t.name: t for t in proto.graph.initializer}
    constants = [a.t for n in proto.graph.node if n.op_type == "Constant"
                 for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    wrong = [t.name or "Constant" for t in (*inits.values(), *constants)
             if t.data_type in floats and t.data_type != want]
    if wrong:
        problems.append(f"float constants not in {dtype}: {', '.join(wrong[:5])}")
    dq_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    int8 = sum(math.prod(inits[n].dims) for n in dq_inputs
               if n in inits and inits[n].data_type == onnx.TensorProto.INT8)
    meta = {p.key: p.value for p in proto.metadata_props}
    sparse = json.loads(meta.get(META_SPARSE, "{}"))
    sparse_params = 0
    for name, info in sparse.items():
        if name not in inits or not holds_2_4(numpy_helper.to_array(inits[name]),
                                              info["axis"]):
            problems.append(f"{name} is listed as 2:4 but does not hold the pattern")
        else:
            sparse_params += math.prod(inits[name].dims)
    if problems:
        raise InternalError("the TensorRT .onnx is not what TensorRT is to read ("
                            + "; ".join(problems) + "); nothing was written. Please report this")
    inferred = onnx.shape_inference.infer_shapes(proto)
    fp32 = sum(1 for v in inferred.graph.value_info
               if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT)
    width = 2 if want == onnx.TensorProto.FLOAT16 else 4
    return {f"{_NAMES[dtype]}_initializer_bytes": sum(width * math.prod(t.dims)
                                                      for t in inits.values()
                                                      if t.data_type == want),
            "int8_weights": int(int8), "sparse_2_4_weights": len(sparse),
            "sparse_2_4_params": int(sparse_params), "fp32_tensors": fp32, "opset": opset}
