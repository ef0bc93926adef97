"""``.mlpackage``: a Core ML ML Program (iOS 18 / macOS 15 opset, fp16 compute) for the Apple
Neural Engine, written with coremltools, each compressed weight stored in Core ML's own
compressed form exactly as fxcompress chose it.

How it is built. The compiled graph decodes its compressed weights before each op (packed
indices -> lookup table, mask bits / gaps -> kept values, int8 -> float). Those decodes depend
only on the model's tensors, so they are evaluated once here (`_fold_weights`): the result is a
float twin of the graph whose layers read their decoded weights as plain tensors, and for each
decoded weight the form fxcompress stored it in, read from the tensors its decode reads:

- palettes (``share``): the lookup tables the graph gathers from (float, or int8 entries with a
  scale per table), one per tensor or per group of output channels, and the index of every
  element in its table, recovered by looking each decoded value up in its table (exact: every
  value was gathered from it). Stored as ``constexpr_lut_to_dense`` with ``uint<bits>``
  indices, the table in fp16 or as ``constexpr_blockwise_shift_scale`` of its int8 entries.
- int8 weights (``int8``, per output channel): ``constexpr_blockwise_shift_scale`` of the int8
  values with a fp16 scale per channel (activations' quantize / dequantize pairs are converted
  by coremltools to Core ML's ``quantize`` / ``dequantize``).
- sparse weights (``sparse``): ``constexpr_sparse_to_dense`` of the kept values (fp16) and a
  bit mask; kept values on a palette go through ``constexpr_lut_to_sparse`` first (Core ML's
  joint sparse + palettized form). Core ML has only the bit mask: a weight fxcompress stores
  with gap-coded positions takes a bit per weight here.
- every other weight: fp16, as coremltools stores it.

The twin is exported with `torch.export` and converted by ``coremltools.convert`` (fp16
compute), without the passes that fold a following batch norm or scale into a convolution's
weight (a palette scaled per output channel is no longer that palette); then every fp16
constant equal to a decoded weight is replaced by its compressed form.

How it is checked, before the package is moved into place:

1. round trip: the saved package is loaded back by coremltools (``MLModel(...,
   skip_model_load=True)`` and its MIL loader, which reads ``weight.bin``); its ops must be the
   ops written;
2. every compressed weight read back is decompressed by coremltools' own decompression of
   each ``constexpr_*`` op and must equal the compiled model's decoded weight in fp16 (exactly
   for palettes and sparse values; within one fp16 rounding of the scale for int8);
3. bytes: each compressed weight's blobs in ``weight.bin`` (their sizes as the blob headers
   there record them) against the bytes fxcompress's graph stores for the same weight; the
   palettized weights must not take more than `LUT_BYTES_SLACK` times fxcompress's bytes;
4. outputs: Core ML itself (``MLModel.predict``) runs only on macOS; on other hosts the loaded
   program is executed op by op in this process (`run_program`): coremltools' own value
   inference for each op that has one (its constant folding: elementwise ops, ``linear``,
   ``matmul``, ``softmax``, ``layer_norm``, ``gather``, ``quantize`` / ``dequantize``, the
   decompression ops...), and PyTorch for the few it has none for (``conv``, ``batch_norm``,
   ``max_pool``, ``avg_pool``), every tensor kept in the dtype the program gives it (fp16).
   The outputs must agree with the compiled model within the check tolerance, or
   `FP16_CHECK_TOLERANCE` (fp16 compute rounds at every op), whichever is more. Where the
   Core ML runtime exists (macOS) the package is also run there and compared the same way.
"""

from __future__ import annotations

import math
import platform
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.export import ExportedProgram

from fxcompress.errors import ExportError, FxCompressError, InternalError
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
from fxcompress.hardware_profiles import Profile

INSTALL = "pip install 'fxcompress[coreml]'"
#: Relative output error allowed between the package, run in fp16, and the compiled model (run
#: in fp32) when the caller's tolerance is smaller: fp16 keeps 11 significant bits and rounds
#: at every op (measured: digits CNN 6e-4, text transformer 2e-3 for the uncompressed models).
FP16_CHECK_TOLERANCE = 1e-2
#: The palettized weights in ``weight.bin`` may take at most this times the bytes fxcompress
#: stores for them (fp16 tables are half fxcompress's fp32 ones; the blobs' 64-byte alignment
#: adds a little to small weights).
LUT_BYTES_SLACK = 1.10
#: Passes of coremltools' default pipeline left out: they fold a following batch norm or
#: scale into a convolution's weight, or transpose a matmul's weight, so the constant Core ML
#: would store is no longer the weight fxcompress compressed.
_WEIGHT_CHANGING_PASSES = ("common::fuse_conv_batchnorm", "common::fuse_conv_scale",
                           "common::fuse_matmul_weight_bias", "common::fuse_transpose_matmul",
                           "common::fuse_onehot_matmul_to_gather")
#: Core ML's palette index widths (``uint<n>``)
_LUT_BITS = (1, 2, 3, 4, 6, 8)
_WEIGHTS_FILE = Path("Data", "com.apple.CoreML", "weights", "weight.bin")
_BLOB_SENTINEL = 0xDEADBEEF


# --- the weights the graph decodes -----------------------------------------------------------
@dataclass
class StoredWeight:
    """One weight the compiled graph decodes, and the form fxcompress stores it in."""

    name: str  # the layer it feeds (or the decode's node name)
    kind: str  # "lut", "int8", "sparse", "sparse+lut" or "fp16" (no compressed form known)
    dense: torch.Tensor  # the decoded weight, fp32
    fxc_bytes: int  # bytes of the tensors fxcompress's graph stores for it
    lut: torch.Tensor | None = None  # (groups, 2^bits) float table (the kept values' for sparse)
    lut_q: torch.Tensor | None = None  # (groups, 2^bits) int8 entries of an int8 table
    lut_scale: torch.Tensor | None = None  # (groups,) their fp32 scales
    int8: torch.Tensor | None = None  # int8 values of an int8 weight, with
    int8_scale: torch.Tensor | None = None  # one fp32 scale per output channel
    found: int = 0  # constants of the Core ML program it replaced
    package_bytes: int = 0  # bytes its blobs take in weight.bin

    @property
    def bits(self) -> int:
        """Palette index width."""
        return int(self.lut.shape[-1]).bit_length() - 1

    def indices(self, values: torch.Tensor) -> torch.Tensor:
        """Each of `values` (one row per table, or one table for all) as its entry's index in
        `lut`; raises `InternalError` where a value is in no entry."""
        groups = self.lut.shape[0]
        v = values.reshape(groups, -1).float()
        order = torch.argsort(self.lut, dim=1)
        table = torch.gather(self.lut, 1, order)
        pos = torch.searchsorted(table.contiguous(), v.contiguous()).clamp_max(table.shape[1] - 1)
        below = (pos - 1).clamp_min(0)
        pick = torch.where((torch.gather(table, 1, below) - v).abs()
                           <= (torch.gather(table, 1, pos) - v).abs(), below, pos)
        idx = torch.gather(order, 1, pick)
        if not torch.equal(torch.gather(self.lut, 1, idx), v):
            raise InternalError(f"weight {self.name}: its decoded values are not all entries of "
                                "its lookup table; please report this")
        return idx.reshape(values.shape)


def _buffer_kind(target: str) -> str | None:
    """What a tensor a decode reads is, from the name its pass gave it (`add_buffer`: layer
    name + the role, underscores for dots, maybe a ``_<n>`` suffix)."""
    for role in ("share_col_scale", "share_lut_scale", "share_lut", "share_idx", "sparse_lut",
                 "sparse_values", "sparse_codes", "sparse_mask", "sparse_gaps", "int8_weight",
                 "int8_scale", "int8_zero_point"):
        if role in target:
            return role
    return None


def _fold_weights(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[StoredWeight]]:
    """A float twin of `gm` (a copy; `gm` is left as it is) whose constant subgraphs (the
    weight decodes) are evaluated into tensors, and the weights so decoded."""
    from fxcompress.graph import get_attr

    twin = fx.GraphModule(gm, _copy_graph(gm.graph))  # shares gm's tensors, never writes them
    g = twin.graph
    values: dict[fx.Node, Any] = {}
    sources: dict[fx.Node, set[str]] = {}
    for node in g.nodes:
        if node.op == "get_attr":
            values[node] = get_attr(gm, str(node.target))
            sources[node] = {str(node.target)}
        elif node.op == "call_function" and all(
                a in values for a in node.all_input_nodes) and node.all_input_nodes:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
            sources[node] = set().union(*(sources[a] for a in node.all_input_nodes))
    frontier = [n for n in values if n.op == "call_function" and isinstance(values[n], torch.Tensor)
                and any(u not in values for u in n.users)]
    users_of: Counter = Counter(t for n in frontier for t in sources[n])
    weights = []
    for i, node in enumerate(frontier):
        dense = values[node].detach().float().contiguous()
        user = next(u for u in node.users if u not in values)
        name = str(user.meta.get("fxcompress_layer") or user.name)
        sw = _stored_weight(gm, name, dense, sources[node], users_of)
        if sw.kind != "fp16" or dense.dtype.is_floating_point:
            weights.append(sw)
        target = f"fxcompress_decoded_{i}"
        twin.register_buffer(target, values[node].detach().clone().contiguous())
        with g.inserting_before(node):
            ga = g.get_attr(target)
        ga.meta = dict(node.meta)
        node.replace_all_uses_with(ga)
    for node in list(g.nodes):  # coremltools has no converter for aten.alias (an identity)
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
    g.eliminate_dead_code()
    _fp16_range(g)
    for name, _ in list(twin.named_buffers()):  # tensors only the decodes read
        if "." not in name and not any(n.op == "get_attr" and n.target == name for n in g.nodes):
            delattr(twin, name)
    twin.recompile()
    return twin, weights


#: the largest finite fp16
FP16_MAX = 65504.0


def _fp16_range(graph: fx.Graph) -> int:
    """Clamp the finite float literals of `graph` beyond fp16's range to its largest finite
    value: computed in fp16 they would be infinite, and an attention mask written as
    ``(1 - keep) * torch.finfo(torch.float32).min`` would give 0 x -inf = NaN for every kept
    position (it is the mask ``torch.finfo(torch.float16).min`` gives). Returns how many."""
    count = 0

    def clamp(a):
        nonlocal count
        if isinstance(a, float) and math.isfinite(a) and abs(a) > FP16_MAX:
            count += 1
            return math.copysign(FP16_MAX, a)
        return a

    for node in graph.nodes:
        if node.op == "call_function":
            node.args = fx.node.map_aggregate(node.args, clamp)
            node.kwargs = fx.node.map_aggregate(node.kwargs, clamp)
    return count


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def _stored_weight(gm, name: str, dense: torch.Tensor, targets: set[str],
                   users_of: Counter) -> StoredWeight:
    from fxcompress.graph import get_attr

    roles = {_buffer_kind(t): get_attr(gm, t) for t in targets}
    # a packed stream several weights are sliced from counts for each by its share
    fxc = sum(get_attr(gm, t).numel() * get_attr(gm, t).element_size() / users_of[t]
              for t in targets if _buffer_kind(t) is not None)
    sw = StoredWeight(name, "fp16", dense, round(fxc))
    if "sparse_values" in roles or "sparse_codes" in roles:
        sw.kind = "sparse"
        if "sparse_lut" in roles:
            sw.kind, sw.lut = "sparse+lut", roles["sparse_lut"].float().reshape(1, -1)
    elif "share_lut" in roles and "share_col_scale" not in roles:  # (column steps: fp16)
        sw.kind = "lut"
        lut = roles["share_lut"]
        groups = 1 if lut.dim() == 1 else lut.shape[0]
        if not lut.is_floating_point():
            sw.lut_q = lut.reshape(groups, -1)
            sw.lut_scale = roles["share_lut_scale"].float().reshape(groups)
            lut = sw.lut_q.float() * sw.lut_scale.view(-1, 1)
        sw.lut = lut.float().reshape(groups, -1)
    elif "int8_weight" in roles:
        sw.kind = "int8"
        sw.int8 = roles["int8_weight"]
        sw.int8_scale = roles["int8_scale"].float().reshape(-1)
    if sw.lut is not None and sw.bits not in _LUT_BITS:
        raise FxCompressError(f"weight {name} is palettized with {sw.bits}-bit indices, which "
                              f"Core ML does not store ({', '.join(map(str, _LUT_BITS))} bits); "
                              "compile with the apple-ane profile, whose palettes it stores")
    if sw.kind == "fp16":
        sw.fxc_bytes = dense.numel() * 4
    return sw


# --- conversion ------------------------------------------------------------------------------
def _ct():
    return _require("coremltools", "writing an .mlpackage", INSTALL)


def _convert(program: ExportedProgram):
    """The Core ML program of `program` (fp16 compute, iOS 18 opset), not yet saved."""
    ct = _ct()
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(list(_WEIGHT_CHANGING_PASSES))
    try:
        return ct.convert(program.run_decompositions({}), convert_to="mlprogram",
                          minimum_deployment_target=ct.target.iOS18,
                          compute_precision=ct.precision.FLOAT16, pass_pipeline=pipeline,
                          skip_model_load=True)
    except FxCompressError:
        raise
    except Exception as e:
        raise _refused("coremltools' converter", e) from e


def _fp16_key(a: np.ndarray) -> tuple:
    """A weight's identity in fp16: shape and bytes (+ 0 makes -0.0, which a decode that
    multiplies by a mask leaves, the 0.0 a sparse form stores)."""
    return tuple(a.shape), np.ascontiguousarray(a.astype(np.float16) + np.float16(0)).tobytes()


def _compress(prog, weights: list[StoredWeight]) -> None:
    """Replace every fp16 constant of `prog` equal to a decoded weight by its compressed
    form."""
    from coremltools.converters.mil.mil import Builder as mb

    wanted = {_fp16_key(w.dense.numpy()): w for w in weights if w.kind != "fp16"}
    for func in prog.functions.values():
        for op in list(func.operations):
            if op.op_type != "const":
                continue
            val = op.outputs[0].val
            if not isinstance(val, np.ndarray) or val.dtype != np.float16 or val.size < 2:
                continue
            w = wanted.get(_fp16_key(val))
            if w is None:
                continue
            with func, mb.scope(*_scopes(op)):
                new = _build(mb, w, op)
            func.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
            func.remove_ops([op])
            w.found += 1
    missing = [w.name for w in wanted.values() if not w.found]
    if missing:
        raise InternalError(f"the Core ML converter did not keep the weights of "
                            f"{', '.join(missing)} as they are (fused or transposed them), so "
                            "they cannot be stored in their compressed form; please report this")


def _scopes(op) -> list:
    """The scope records of `op`, for the ops that replace it (the writer requires each op
    to say where in the source program it came from)."""
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    scopes = {s: list(d) for s, d in op.scopes.items()
              if d and s != ScopeSource.COREMLTOOLS_GRAPH_PASS}  # which passes made it: none
    scopes.setdefault(ScopeSource.EXIR_STACK_TRACE, [op.name])
    return [ScopeInfo(source=s, data=d) for s, d in scopes.items()]


def _uint(bits: int, values: torch.Tensor) -> np.ndarray:
    from coremltools.converters.mil.mil import types

    dtype = types.nptype_from_builtin(getattr(types, f"uint{bits}"))
    return values.numpy().astype(np.uint8).astype(dtype)


def _lut_var(mb, w: StoredWeight, rank: int, before, name: str):
    """The lookup tables as Core ML wants them, (groups, 1, ..., 2^bits, 1): fp16, or int8
    entries scaled per table."""
    shape = (w.lut.shape[0],) + (1,) * (rank - 1) + (w.lut.shape[1], 1)
    if w.lut_q is None:
        return w.lut.reshape(shape).numpy().astype(np.float16)
    return mb.constexpr_blockwise_shift_scale(
        data=w.lut_q.reshape(shape).numpy().astype(np.int8),
        scale=w.lut_scale.reshape((-1,) + (1,) * (len(shape) - 1)).numpy().astype(np.float16),
        before_op=before, name=name + "_lut")


def _build(mb, w: StoredWeight, op):
    """`w`'s compressed form as constexpr ops before `op` (the constant it replaces)."""
    name, dense = op.name, w.dense
    if w.kind == "lut":
        return mb.constexpr_lut_to_dense(
            indices=_uint(w.bits, w.indices(dense)),
            lut=_lut_var(mb, w, dense.dim(), op, name), before_op=op, name=name + "_palettized")
    if w.kind == "int8":
        scale = w.int8_scale.reshape((-1,) + (1,) * (dense.dim() - 1))
        return mb.constexpr_blockwise_shift_scale(
            data=w.int8.numpy().astype(np.int8), scale=scale.numpy().astype(np.float16),
            before_op=op, name=name + "_int8")
    mask = (dense != 0).numpy().astype(_uint(1, torch.zeros(1)).dtype)
    kept = dense[dense != 0]
    if w.kind == "sparse+lut":
        lut = w.lut.reshape((1,) * dense.dim() + (-1, 1)).numpy().astype(np.float16)
        mask_v, data = mb.constexpr_lut_to_sparse(
            indices_mask=mask, indices_nonzero_data=_uint(w.bits, w.indices(kept)), lut=lut,
            before_op=op, name=name + "_sparse_palettized")
        return mb.constexpr_sparse_to_dense(nonzero_data=data, mask=mask_v, before_op=op,
                                            name=name + "_sparse")
    return mb.constexpr_sparse_to_dense(nonzero_data=kept.numpy().astype(np.float16),
                                        mask=mask, before_op=op, name=name + "_sparse")


# --- reading the package back ----------------------------------------------------------------
def load_package(path: str | Path):
    """The MIL program of a saved ``.mlpackage``, read back by coremltools (its weights from
    ``weight.bin``), and the model's spec."""
    ct = _ct()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    prog = milproto_load(model_spec=spec, specification_version=spec.specificationVersion,
                         file_weights_dir=model.weights_dir)
    return prog, spec


def blob_sizes(path: str | Path, spec) -> dict[str, int]:
    """Bytes each constant of the package's program takes, by ``<op output>:<input name>`` for
    a value written inside an op (a ``constexpr_*`` op's indices, tables, masks...) and by the
    output name of a ``const`` op: for a value stored in ``weight.bin`` the data size its blob
    header there records, for one stored inline in the program its bytes there."""
    data = (Path(path) / _WEIGHTS_FILE).read_bytes()
    sizes = {}

    def size(val) -> int:
        if val.WhichOneof("value") != "blobFileValue":
            return val.ByteSize()
        sentinel, _, n = struct.unpack_from("<IIQ", data, val.blobFileValue.offset)
        if sentinel != _BLOB_SENTINEL:
            raise InternalError(f"{path}: no blob at offset {val.blobFileValue.offset} of "
                                "weight.bin; please report this")
        return n

    for func in spec.mlProgram.functions.values():
        for block in func.block_specializations.values():
            for op in block.operations:
                out = op.outputs[0].name
                if op.type == "const":
                    sizes[out] = size(op.attributes["val"])
                    continue
                for key, arg in op.inputs.items():
                    vals = [a.value for a in arg.arguments if a.WhichOneof("binding") == "value"]
                    if vals:
                        sizes[f"{out}:{key}"] = sum(size(v) for v in vals)
    return sizes


def decompress(op) -> np.ndarray | tuple:
    """The value a ``constexpr_*`` op of a Core ML program stands for, by coremltools' own
    decompression of each op, through the constexpr ops before it (a lookup table that is
    itself int8 scaled)."""
    if op.op_type == "constexpr_lut_to_dense" and op.lut.val is None:
        axis = None if op.vector_axis is None else op.vector_axis.val
        return type(op).decompress(op.indices.val, decompress(op.lut.op), axis)
    return op.materialized_val_inference()


def _ops(prog) -> Counter:
    return Counter(op.op_type for f in prog.functions.values() for op in f.operations)


def _stored_bytes(op, sizes: dict[str, int]) -> int:
    """Bytes of the values a constexpr op reads (`blob_sizes`), through any constexpr op
    before it."""
    total = 0
    for key, v in op.inputs.items():
        for var in v if isinstance(v, list | tuple) else (v,):
            if var.op is not None and var.op.op_type.startswith("constexpr_"):
                total += _stored_bytes(var.op, sizes)
            elif var.op is not None and var.op.op_type == "const":
                total += sizes.get(f"{op.outputs[0].name}:{key}", sizes.get(var.name, 0))
    return total


def _check_weights(prog, sizes: dict[str, int], weights: list[StoredWeight]) -> float:
    """Decompress every compressed weight of the package's program with coremltools and
    compare it with the decoded weight it stands for; records each weight's bytes. Returns
    the largest difference (0.0: every weight equal in fp16)."""
    by_key = {_fp16_key(w.dense.numpy()): w for w in weights if w.kind != "fp16"}
    seen: set[int] = set()
    worst = 0.0
    for func in prog.functions.values():
        outer = [op for op in func.operations if op.op_type.startswith("constexpr_")
                 and not any(c.op_type.startswith("constexpr_") for o in op.outputs
                             for c in o.child_ops)]
        for op in outer:
            got = decompress(op)
            got = got[-1] if isinstance(got, tuple) else got
            w = by_key.get(_fp16_key(got))
            if w is None:  # not equal in fp16: the int8 form's product rounds once more
                w = _nearest(got, weights)
                if w is None or w.kind != "int8":
                    raise InternalError(f"a compressed weight of the written package "
                                        f"({op.name}) decodes to no weight of the compiled "
                                        "model; nothing was written. Please report this")
                ref = w.dense.numpy().astype(np.float16).astype(np.float32)
                err = np.abs(got.astype(np.float32) - ref)
                step = np.abs(ref) * 2.0 ** -10 + 2.0 ** -24
                if not np.all(err <= step):
                    raise InternalError(f"int8 weight {w.name} reads back from the package "
                                        f"off by up to {float(err.max()):.3g}; nothing was "
                                        "written. Please report this")
                worst = max(worst, float(err.max()))
            if id(w) not in seen:
                seen.add(id(w))
                w.package_bytes = 0
            w.package_bytes += _stored_bytes(op, sizes)
    lost = [w.name for w in weights if w.kind != "fp16" and id(w) not in seen]
    if lost:
        raise InternalError(f"the written package does not hold the compressed weights of "
                            f"{', '.join(lost)}; nothing was written. Please report this")
    return worst


def _nearest(got: np.ndarray, weights: list[StoredWeight]) -> StoredWeight | None:
    best, gap = None, math.inf
    for w in weights:
        if tuple(w.dense.shape) == got.shape:
            d = float(np.abs(w.dense.numpy() - got.astype(np.float32)).max())
            if d < gap:
                best, gap = w, d
    return best


# --- running the program ---------------------------------------------------------------------
def run_program(prog, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Execute the ``main`` function of a Core ML MIL program on `inputs` (name -> array),
    op by op: coremltools' value inference for the ops that have one, PyTorch for ``conv``,
    ``batch_norm``, ``max_pool`` and ``avg_pool``. Raises `FxCompressError` naming an op
    neither can run."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, types

    func = prog.functions["main"]
    env: dict[int, Any] = {}
    for name, var in func.inputs.items():
        env[id(var)] = np.asarray(inputs[name]).astype(types.nptype_from_builtin(var.dtype))

    def val(var):
        v = env[id(var)] if id(var) in env else var.val
        # a flag read back as a numpy bool: numpy's reductions take only a Python one
        return bool(v) if isinstance(v, np.bool_) else v

    for op in func.operations:
        if op.op_type == "const":
            continue
        if op.op_type.startswith("constexpr_"):
            out = decompress(op)
        elif op.op_type in _TORCH_OPS:
            out = _TORCH_OPS[op.op_type](op, val)
        else:
            kwargs = {k: (tuple(val(x) for x in v) if isinstance(v, list | tuple) else val(v))
                      for k, v in op.inputs.items()}
            with Function({}, opset_version=prog.functions["main"].opset_version):
                res = getattr(mb, op.op_type)(**kwargs)
            res = res if isinstance(res, list | tuple) else (res,)
            out = tuple(r.val for r in res)
            if len(out) == 1 and out[0] is None \
                    and hasattr(res[0].op, "materialized_val_inference"):
                out = (res[0].op.materialized_val_inference(),)  # dequantize
            if any(o is None for o in out):
                raise FxCompressError(f"the Core ML program's op {op.op_type} ({op.name}) "
                                      "cannot be run here (coremltools has no evaluation of "
                                      "it), so the package cannot be checked; export to .pt2")
        out = out if isinstance(out, tuple) else (out,)
        for var, o in zip(op.outputs, out, strict=True):
            env[id(var)] = np.asarray(o)
    return [env[id(v)] for v in func.outputs]


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float32)))


def _padded(op, x: torch.Tensor, val, fill: float = 0.0) -> torch.Tensor:
    kind = str(val(op.pad_type))
    if kind == "valid":
        return x
    if kind != "custom":
        raise FxCompressError(f"the Core ML program's op {op.op_type} ({op.name}) has padding "
                              f"{kind!r}, which the check cannot run; export to .pt2")
    pad = [int(p) for p in val(op.pad)]
    pairs = [pad[i:i + 2] for i in range(0, len(pad), 2)]
    flat = [p for pair in reversed(pairs) for p in pair]  # torch pads the last dim first
    return torch.nn.functional.pad(x, flat, value=fill)


def _conv(op, val):
    x, w = _t(val(op.x)), _t(val(op.weight))
    if x.dim() != 4:
        raise FxCompressError(f"the check runs 2-d convolutions only ({op.name} is "
                              f"{x.dim() - 2}-d); export to .pt2")
    b = None if op.bias is None else _t(val(op.bias))
    y = torch.nn.functional.conv2d(_padded(op, x, val), w, b,
                                   stride=[int(s) for s in val(op.strides)],
                                   dilation=[int(d) for d in val(op.dilations)],
                                   groups=int(val(op.groups)))
    return y.numpy().astype(val(op.x).dtype)


def _batch_norm(op, val):
    x = _t(val(op.x))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    gamma = 1.0 if op.gamma is None else _t(val(op.gamma)).view(shape)
    beta = 0.0 if op.beta is None else _t(val(op.beta)).view(shape)
    y = (x - _t(val(op.mean)).view(shape)) / torch.sqrt(
        _t(val(op.variance)).view(shape) + float(val(op.epsilon))) * gamma + beta
    return y.numpy().astype(val(op.x).dtype)


def _pool(op, val):
    x = _t(val(op.x))
    if x.dim() != 4:
        raise FxCompressError(f"the check runs 2-d pooling only ({op.name}); export to .pt2")
    kw = {"kernel_size": [int(k) for k in val(op.kernel_sizes)],
          "stride": [int(s) for s in val(op.strides)], "ceil_mode": bool(val(op.ceil_mode))}
    if op.op_type == "max_pool":
        y = torch.nn.functional.max_pool2d(_padded(op, x, val, -math.inf), **kw)
    else:
        exclude = bool(val(op.exclude_padding_from_average))
        if exclude and str(val(op.pad_type)) == "custom" and any(val(op.pad)):
            raise FxCompressError(f"the check cannot run {op.name} (average excluding "
                                  "padding); export to .pt2")
        y = torch.nn.functional.avg_pool2d(_padded(op, x, val), **kw)
    return y.numpy().astype(val(op.x).dtype)


_TORCH_OPS = {"conv": _conv, "batch_norm": _batch_norm, "max_pool": _pool, "avg_pool": _pool}


# --- the writer ------------------------------------------------------------------------------
@dataclass
class _Bytes:
    package: Counter = field(default_factory=Counter)
    fxcompress: Counter = field(default_factory=Counter)


def _storage_bytes(weights: list[StoredWeight], sizes: dict[str, int], prog) -> _Bytes:
    """Bytes per storage (lut / int8 / sparse / fp16) in the package and in fxcompress's
    graph: the compressed weights', and the fp16 weights' (every other float constant of
    the package, against 4 bytes an element in fxcompress's graph)."""
    out = _Bytes()
    storage = {"lut": "lut", "int8": "int8", "sparse": "sparse", "sparse+lut": "sparse"}
    for w in weights:
        if w.kind in storage:
            out.package[storage[w.kind]] += w.package_bytes
            out.fxcompress[storage[w.kind]] += w.fxc_bytes
    for func in prog.functions.values():
        for op in func.operations:
            v = op.outputs[0] if op.op_type == "const" else None
            if v is None or not any(not c.op_type.startswith("constexpr_")
                                    for c in v.child_ops):
                continue
            arr = v.val
            if isinstance(arr, np.ndarray) and arr.dtype == np.float16 and arr.size > 1:
                out.package["fp16"] += sizes.get(v.name, arr.nbytes)
                out.fxcompress["fp16"] += arr.size * 4
    return out


def _model_inputs(spec, inputs: tuple) -> dict[str, np.ndarray]:
    names = [i.name for i in spec.description.input]
    flat = [x for x in _clones(inputs) if isinstance(x, torch.Tensor)]
    if len(names) != len(flat):
        raise InternalError(f"the Core ML program takes {len(names)} inputs, the model "
                            f"{len(flat)}; please report this")
    return {n: x.numpy() for n, x in zip(names, flat, strict=True)}


def write_mlpackage(gm: torch.nn.Module, example_inputs: tuple, path: Path, report: Any,
                    expected: Any, tol: float, prof: Profile | None,
                    program: ExportedProgram | None = None) -> ExportResult:
    """Write `gm` as a Core ML ``.mlpackage`` (ML Program, fp16 compute) at `path`, its
    compressed weights in Core ML's compressed forms, checked as this module's documentation
    says against `expected` (its outputs on `example_inputs`) within `tol` (or
    `FP16_CHECK_TOLERANCE`, whichever is more). `program` is not used: the package is
    converted from the float twin of `gm`. `details` of the result: the bytes of
    ``weight.bin``, per storage the bytes in the package and in fxcompress's graph and their
    ratio, the weights stored compressed, the largest difference of a weight read back, and
    what ran the outputs."""
    _ct()
    if not isinstance(gm, fx.GraphModule):  # a plain module: its graph, weights as they are
        gm = to_exported_program(gm, example_inputs, dynamic_batch=False)[0].module()
    twin, weights = _fold_weights(gm)
    ep, dynamic = to_exported_program(twin, example_inputs, dynamic_batch=False)
    mlmodel = _convert(ep)
    _compress(mlmodel._mil_program, weights)
    written = _ops(mlmodel._mil_program)
    mlmodel = _resave(mlmodel)
    check_tol = max(tol, FP16_CHECK_TOLERANCE)
    with _staged(path) as tmp:
        mlmodel.save(str(tmp))
        prog, spec = load_package(tmp)
        if _ops(prog) != written:
            raise InternalError(f"the package read back holds other ops than were written "
                                f"({dict(_ops(prog) - written)} more, "
                                f"{dict(written - _ops(prog))} fewer); please report this")
        sizes = blob_sizes(tmp, spec)
        worst = _check_weights(prog, sizes, weights)
        counts = _storage_bytes(weights, sizes, prog)
        lut_pkg, lut_fxc = counts.package["lut"], counts.fxcompress["lut"]
        if lut_fxc and lut_pkg > LUT_BYTES_SLACK * lut_fxc:
            raise InternalError(f"the palettized weights take {lut_pkg} bytes in the package, "
                                f"more than {LUT_BYTES_SLACK:g} x the {lut_fxc} fxcompress "
                                "stores; nothing was written. Please report this")
        feeds = _model_inputs(spec, example_inputs)
        got = [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in run_program(prog,
                                                                                      feeds)]
        runtime = "coremltools MIL (value inference + torch for conv / pool / batch norm)"
        err = _compare(got, expected, check_tol, ".mlpackage", runtime)
        if platform.system() == "Darwin":  # Core ML itself runs here
            model = _ct().models.MLModel(str(tmp))
            out = model.predict(feeds)
            got = [torch.from_numpy(np.asarray(out[o.name], dtype=np.float32))
                   for o in spec.description.output]
            err = _compare(got, expected, check_tol, ".mlpackage", "Core ML")
            runtime = "coreml"
        size = file_size(tmp)
        weight_bin = (tmp / _WEIGHTS_FILE).stat().st_size
    details = {
        "weight_bin_bytes": weight_bin,
        "package_bytes": dict(counts.package),
        "fxcompress_bytes": dict(counts.fxcompress),
        "ratio": {k: round(counts.package[k] / counts.fxcompress[k], 4)
                  for k in counts.fxcompress if counts.fxcompress[k]},
        "compressed_weights": dict(Counter(w.kind for w in weights if w.kind != "fp16")),
        "weight_readback_max_diff": worst,
        "outputs_run_in": runtime,
        "check_tolerance": check_tol,
        "relative_error_vs_compiled": relative_error(got, expected),
        "ops": dict(written),
    }
    return ExportResult(path, ".mlpackage", size, err, runtime, dynamic_batch=dynamic,
                        details=details)


def _resave(mlmodel):
    """The model rebuilt from its edited MIL program (nothing else changed)."""
    ct = _ct()
    try:
        return ct.convert(mlmodel._mil_program, convert_to="mlprogram",
                          minimum_deployment_target=ct.target.iOS18,
                          compute_precision=ct.precision.FLOAT16,
                          pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    except Exception as e:
        raise _refused("coremltools' program writer", e) from e


def _refused(tool: str, e: Exception) -> ExportError:
    """coremltools refusing the program, with the check that tells its limits from ours."""
    head = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return ExportError(
        f"{tool} could not write this program as .mlpackage ({type(e).__name__}: "
        f"{head[:300]}). coremltools does not convert every architecture: run "
        "coremltools.convert(torch.export.export(model, inputs).run_decompositions({}), "
        "minimum_deployment_target=coremltools.target.iOS18) on your original model; if that "
        "fails too, it is coremltools' limitation: ship the .pt2 (fxcompress.export(model, "
        "inputs, 'model.pt2')); if only the compiled model fails, please report it to "
        "fxcompress with this message")
