"""``.onnx``: the dynamo ONNX exporter from the compiled model's program.

int8 held as ``quantized_decomposed`` Q/DQ ops becomes QuantizeLinear / DequantizeLinear (with
translations of the ops onnxscript lacks, `_onnx_translations`), the pattern ONNX Runtime fuses
into int8 kernels; full-range int8 weights are re-encoded as uint8 (`_portable_int8`) unless
``onnx_int8="u8s8"``; group-wise low-bit linears (``intx``) become ONNX Runtime's
``MatMulNBits`` on packed codes (`nbits`); the report is kept in the model's metadata. The
file is loaded in ONNX Runtime and run before it is moved into place.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from fxcompress.errors import upstream_failure
from fxcompress.export import (
    ExportResult,
    _batch_is_dynamic,
    _clones,
    _compare,
    _report_json,
    _require,
    _staged,
    file_size,
    nbits,
    to_exported_program,
)
from fxcompress.loading import REPORT_FILE

# Models above this size keep their weights in an external data file (path + ".data"): a
# single protobuf cannot exceed 2 GiB.
ONNX_EXTERNAL_DATA_BYTES = 1 << 30


def _onnx_translations() -> dict:
    """ONNX translations of the ``quantized_decomposed`` ops onnxscript's library lacks or
    handles only with Python-number quantization parameters: dynamic per-tensor activation
    quantization (``choose_qparams.tensor`` and the ``.tensor`` quantize / dequantize that take
    its scale and zero point as tensors). They follow torch's reference arithmetic
    (torch.ao.quantization.utils.determine_qparams, affine per tensor): scale = (max(x⁺) −
    min(x⁻)) / (qmax − qmin), at least eps; zero_point = qmin − round(min(x⁻) / scale)."""
    import onnxscript
    from onnxscript import opset18 as op

    qd = torch.ops.quantized_decomposed
    int8 = onnxscript.ir.DataType.INT8
    onnx_dtype = {torch.int8: int8, torch.uint8: onnxscript.ir.DataType.UINT8}

    def f32(v: float):
        return op.Constant(value_float=float(v))

    def choose_qparams_tensor(x, qmin: int, qmax: int, eps: float, dtype=torch.int8):
        lo = op.Min(op.ReduceMin(x, keepdims=0), f32(0.0))
        hi = op.Max(op.ReduceMax(x, keepdims=0), f32(0.0))
        scale = op.Max(op.Div(op.Sub(hi, lo), f32(qmax - qmin)), f32(eps))
        zero = op.Clip(op.Sub(f32(qmin), op.Round(op.Div(lo, scale))), f32(qmin), f32(qmax))
        shape = op.Constant(value_ints=[1])
        return (op.Cast(op.Reshape(scale, shape), to=onnxscript.ir.DataType.DOUBLE),
                op.Cast(op.Reshape(zero, shape), to=onnxscript.ir.DataType.INT64))

    def _params(scale, zero_point, dtype):
        # per tensor: ONNX takes a scalar scale of the float type and a zero point of the
        # quantized type
        s = op.Squeeze(op.Cast(scale, to=onnxscript.ir.DataType.FLOAT))  # [1] -> scalar
        z = op.Squeeze(op.Cast(zero_point, to=onnx_dtype.get(dtype, int8)))
        return s, z

    def quantize_per_tensor_tensor(x, scale, zero_point, qmin: int, qmax: int, dtype):
        s, z = _params(scale, zero_point, dtype)
        return op.QuantizeLinear(x, s, z)

    def dequantize_per_tensor_tensor(x, scale, zero_point, qmin: int, qmax: int, dtype,
                                     out_dtype=None):
        s, z = _params(scale, zero_point, dtype)
        return op.DequantizeLinear(x, s, z)

    return {
        qd.choose_qparams.tensor: choose_qparams_tensor,
        qd.quantize_per_tensor.tensor: quantize_per_tensor_tensor,
        qd.dequantize_per_tensor.tensor: dequantize_per_tensor_tensor,
    }


#: |q| of int8 weights beyond which x86 u8 x s8 kernels without VNNI may saturate: they add
#: pairs of products in 16 bits, and 2 x 255 x 64 = 32640 is the most that fits.
SATURATION_FREE_WEIGHT = 64


def _portable_int8(model) -> bool:
    """Re-encode a Q/DQ model's int8 as uint8 with the zero point moved by 128 (the same values
    exactly), where its weights are wide enough to saturate an x86 CPU without VNNI. ONNX
    Runtime runs u8 x s8 (and s8 x s8) through 16-bit pair sums there (0.12 relative error on
    the digits CNN, measured under an emulated AVX2 CPU), but u8 x u8 through 32-bit ones, on
    every x86 CPU. The cost on an AVX-512 VNNI CPU (benchmarks/results/host.md): 1.04-1.12x
    the u8 x s8 latency with int8 linears, 1.9x with int8 convolutions; `export(...,
    onnx_int8="u8s8")` keeps u8 x s8 for files that only VNNI / AMX CPUs run.
    Weights within 7 bits (the `x86-avx2` profile) already compute exactly and are left as they
    are. True when it re-encoded; False when nothing needed it or the graph holds an int8
    tensor it cannot re-encode (then the run check decides)."""
    import numpy as np
    import onnx_ir as ir

    qdq = [n for n in model.graph.all_nodes()
           if n.domain in ("", "ai.onnx") and n.op_type in ("QuantizeLinear", "DequantizeLinear")]

    def int8_const(v) -> bool:
        return v is not None and v.const_value is not None and v.dtype == ir.DataType.INT8

    todo: dict[int, object] = {}
    wide = False
    for n in qdq:
        if len(n.inputs) < 3 or not int8_const(n.inputs[2]):
            continue
        todo[id(n.inputs[2])] = n.inputs[2]
        if n.op_type == "DequantizeLinear":
            x = n.inputs[0]
            if int8_const(x):
                todo[id(x)] = x
                wide |= int(np.abs(x.const_value.numpy().astype(np.int16)).max(initial=0)) \
                    > SATURATION_FREE_WEIGHT
            elif x.producer() is None or x.producer().op_type != "QuantizeLinear":
                return False  # an int8 tensor computed some other way: leave the graph as is
    if not wide:
        return False
    for v in todo.values():  # only Q/DQ may read what is re-encoded
        if any(u.node.op_type not in ("QuantizeLinear", "DequantizeLinear") for u in v.uses()):
            return False
    for v in todo.values():
        shifted = (v.const_value.numpy().astype(np.int16) + 128).astype(np.uint8)
        v.const_value = ir.tensor(shifted, name=v.name)
        v.dtype = ir.DataType.UINT8
    for n in qdq:
        if n.op_type == "QuantizeLinear" and id(n.inputs[2]) in todo:
            n.outputs[0].dtype = ir.DataType.UINT8
    return True


def _strip_debug_info(model) -> None:
    """Drop the exporter's per-node and per-value debug records (Python stack traces, module
    paths): they are not part of the model, and on a small model they outweigh its weights."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            value.metadata_props.clear()
            value.doc_string = None
    for value in (*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()):
        value.metadata_props.clear()


def write_onnx(gm: torch.nn.Module, inputs: tuple, path: Path, report, expected, tol: float,
               onnx_int8: str = "portable", program: ExportedProgram | None = None,
               ) -> ExportResult:
    """Write `gm` as an ``.onnx`` at `path` (checked in ONNX Runtime against `expected`, its
    outputs on `inputs`, within `tol`). `program`: the program compile kept, already known to
    be the one `to_exported_program` would make here (None: export `gm`)."""
    if nbits.has_intx(gm):  # group-wise low-bit layers: MatMulNBits on packed codes
        gm, program = nbits.nbits_graph(gm), None
    install = "pip install 'fxcompress[onnx]'"
    _require("onnxscript", "writing an .onnx", install)
    ort = _require("onnxruntime", "checking an .onnx", install)
    if program is None:
        dynamic = bool(getattr(report, "dynamic_batch", True))
        ep, dynamic = to_exported_program(gm, inputs, dynamic)
    else:
        ep, dynamic = program, _batch_is_dynamic(program)
    try:
        # the exporter prints its progress on stdout, which belongs to the caller (--json)
        with contextlib.redirect_stdout(io.StringIO()), _quiet_logger("torch.onnx"):
            onnx_program = torch.onnx.export(ep, _clones(inputs), dynamo=True, verbose=False,
                                             custom_translation_table={
                                                 **_onnx_translations(),
                                                 **nbits.onnx_translations()})
    except Exception as e:
        raise upstream_failure("the ONNX exporter (torch.onnx)", ".onnx", e) from e
    _strip_debug_info(onnx_program.model)
    if onnx_int8 == "portable":
        _portable_int8(onnx_program.model)
    rj = _report_json(report)
    if rj is not None:
        onnx_program.model.metadata_props[REPORT_FILE] = rj
    weight_bytes = sum(int(t.numel() * t.element_size()) for t in ep.state_dict.values()
                       if isinstance(t, torch.Tensor))
    external = weight_bytes > ONNX_EXTERNAL_DATA_BYTES
    with _staged(path, extra_suffixes=(".data",)) as tmp:
        onnx_program.save(tmp, external_data=external)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        flat = [x.numpy() if isinstance(x, torch.Tensor) else x
                for x in pytree.tree_leaves(_clones(inputs))]
        got = session.run(None, dict(zip(names, flat, strict=True)))
        err = _compare(got, expected, tol, ".onnx", "ONNX Runtime")
        size = file_size(tmp)
    return ExportResult(path, ".onnx", size, err, "onnxruntime", dynamic_batch=dynamic)


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence a library's warnings for a while (the ONNX exporter warns about every optional
    op library, torchvision among them, that is not installed)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def external_files(path: Path) -> list[Path]:
    """The external data files an `.onnx` file names (paths beside it), in name order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return [path.parent / loc for loc in sorted(locations)]
