"""`fxcompress.export`: a compiled model into a deployable file.

The suffix of the path picks the format, each written by its own module:

- ``.pt2`` (`fxcompress.export.pt2`): `torch.export.save`; the compile report rides along in
  the archive as an extra file (``fxcompress_report.json``), so ``fxcompress report OUT.pt2``
  can print it later.
- ``.pte`` (`fxcompress.export.pte`): ExecuTorch, lowered with the profile's delegate (XNNPACK
  for mobile-arm), or to ExecuTorch's portable kernels where the profile names none.
- ``.onnx`` (`fxcompress.export.onnx`): the dynamo ONNX exporter. int8 held as
  ``quantized_decomposed`` Q/DQ ops becomes QuantizeLinear / DequantizeLinear, the pattern ONNX
  Runtime fuses into int8 kernels; the report is kept in the model's metadata.
- ``.mlpackage`` (`fxcompress.export.coreml`, apple-ane): a Core ML ML Program through
  coremltools, fp16 compute, palettes as Core ML's own lookup tables (fxcompress's indices and
  tables, ``constexpr_lut_to_dense``), int8 as ``constexpr_blockwise_shift_scale``, sparse
  weights as ``constexpr_sparse_to_dense``; a folder, replaced whole.

A profile's ``[backend] writer`` picks another flavour of its own `export_format`
(`writer_for`; `hardware_profiles.WRITERS`):

- ``qonnx`` (`fxcompress.export.qonnx`, fpga-binary): QONNX, FINN's input: binary weights and
  activations as ``BipolarQuant``, int8 as ``Quant`` nodes (float weights, widths declared by
  the quantizers), static batch, cleaned by qonnx and checked in qonnx's own executor;
- ``tensorrt`` (`fxcompress.export.tensorrt`, nvidia-gpu): ONNX for TensorRT: fp16 weights and
  compute, int8 weight-only as DequantizeLinear, decodes folded into weights, 2:4 weights
  listed in the metadata (``tensorrt.sparse_2_4``, with the builder flags), checked in ONNX
  Runtime within a bound derived from fp16 rounding, then structurally;
- ``cortex-m`` (`fxcompress.export.cortex_m`, mcu-int8): a ``.pte`` through ExecuTorch's
  Cortex-M flow, int8 layers as CMSIS-NN ``cortex_m::`` ops, the planned activation arena and
  the weight bytes read from the file against the profile's budgets.

Every file is written to a temporary name beside the target (`_staged`), loaded back in its own
runtime (torch.export / the ExecuTorch runtime / ONNX Runtime / qonnx's executor), or where the
runtime cannot run here in the most faithful executor that can (a Core ML package: coremltools'
op-by-op evaluation; a Cortex-M program: ExecuTorch's reference kernels), and run on the example
inputs;
only when its outputs agree with the compiled model (`_compare`) is it moved into place, so a
failed export never leaves a partial or wrong file behind.

Export once
-----------
`fxcompress.compile` exports its result with `torch.export` (to check that it exports, and to
measure its size). It keeps that program in the result's ``meta``, under `PROGRAM_KEY`, in a
`StoredProgram` with a fingerprint of the tensors it was exported from: every parameter,
buffer and tensor attribute of the module, by name, identity and ``_version`` (the counter
every in-place change of a tensor increments). `export` lowers from the stored program instead
of exporting the model again when

- the fingerprint still matches (the model was not changed since: no weight modified in place,
  replaced or added, and the same graph code), and
- the stored program is the one `export` would make for the example inputs given: for ``.pte``
  a program with no dynamic dimension whose inputs have exactly the given shapes and dtypes;
  for ``.pt2`` and ``.onnx`` one with a dynamic batch where the model keeps one (else a static
  one of the same shapes), exported the way `to_exported_program` exports (the batch dimension
  of every input dynamic, nothing else), whose dynamic dimensions' ranges hold the given sizes.

Otherwise the model is exported afresh, as before: a ``.pte`` at another shape than the one
compile exported (ExecuTorch programs are static), a model compiled from an `ExportedProgram`
with a dynamic batch (compile exports its result with a static batch then) written as ``.pt2``
or ``.onnx``, a model compiled with `dynamic_shapes` of its own, an ``.onnx`` or ``.pt2`` of a
model with group-wise low-bit layers (they are rewritten into ``MatMulNBits`` calls, or their
codes packed below a byte, first: `nbits`). A
file written from a stored program is loaded and compared with the graph module like any other;
if it disagrees, the model is exported afresh once before the error is raised (a weight changed
in place through ``.data`` bypasses the version counter; the comparison catches any such change
beyond the check tolerance). `stored_program` gives the stored programs while they are current.
They are dropped on copy: `copy.deepcopy` of the compiled model (or a pickle of a
`StoredProgram`) gives an empty `StoredProgram`, never a copy of the program, so the copy,
whose tensors are new ones, is exported afresh; `torch.export.export(result, ...)` works as
before (the program it returns carries the meta along, but a `StoredProgram` only answers for
the module it was made from).

`lower_to_pte` and `count_delegated` are the lowering and the delegation census on their own,
for code that wants to know which ops a backend takes (e.g. whether int8 ops were delegated).

`fxcompress.export` on the package is the function `export`: this module is
``sys.modules["fxcompress.export"]``, and its parts are imported with ``from fxcompress.export
import pte`` (``import fxcompress.export.pte as m`` finds the function, not the module).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from fxcompress.capture import EXPORT_LOCK
from fxcompress.capture import batch_dims as _batch_dims
from fxcompress.capture import clones as _clones
from fxcompress.capture import widen_batch as _widen
from fxcompress.errors import FxCompressError, InternalError
from fxcompress.hardware_profiles import EXPORT_FORMATS, WRITERS, Profile, load_profile
from fxcompress.loading import REPORT_FILE, load_program, read_report  # noqa: F401 (re-exported)
from fxcompress.report import REPORT_KEY

#: `gm.meta` key of the `StoredProgram` of the compiled model (see "Export once").
PROGRAM_KEY = "fxcompress_program"

# Relative output error allowed between the written file, run in its runtime, and the compiled
# model run in eager PyTorch. Float graphs differ only by kernel rounding; graphs with int8
# activations run real int8 kernels there, which round intermediate values differently from
# the reference Q/DQ arithmetic by up to one quantization step.
FLOAT_CHECK_TOLERANCE = 1e-3
INT8_CHECK_TOLERANCE = 5e-2
# ... or, when more, this many times the compiled model's own measured error: one step of
# rounding in every requantization of a deep network with static int8 activations is noise of
# the size of the quantization noise itself. Measured on MiniLM (static int8 on 24 linears,
# mobile-arm): the .pte's error against the original 0.0880, the compiled model's 0.0865,
# the .pte against the compiled model 0.0771. A wrong lowering (a lost scale, a dropped op)
# is off by the size of the output.
INT8_NOISE_FACTOR = 1.5


def default_check_tolerance(gm: fx.GraphModule | torch.nn.Module) -> float:
    """The relative error allowed between `gm`'s written file and `gm` when `export` is not
    given one: `FLOAT_CHECK_TOLERANCE` for float graphs; for graphs with int8 activations
    `INT8_CHECK_TOLERANCE`, or `INT8_NOISE_FACTOR` x the error its report measured when that
    is more."""
    if not has_quantized_activations(gm):
        return FLOAT_CHECK_TOLERANCE
    report = _report_of(gm)
    measured = getattr(report, "error", None)
    if not isinstance(measured, float | int) or not math.isfinite(measured):
        return INT8_CHECK_TOLERANCE
    return max(INT8_CHECK_TOLERANCE, INT8_NOISE_FACTOR * float(measured))


@dataclass
class ExportResult:
    """What `export` wrote."""

    path: Path  # the file written
    format: str  # ".pt2", ".pte", ".onnx" or ".mlpackage"
    size_bytes: int  # bytes on disk, an .onnx file's external data included
    check_error: float  # relative output error of the file's runtime vs the compiled model
    runtime: str  # what ran the check: "torch.export", "executorch", "onnxruntime"
    delegate: str | None = None  # the ExecuTorch delegate a .pte was lowered with
    delegated_ops: dict[str, int] = field(default_factory=dict)  # .pte: ops the delegate took
    undelegated_ops: dict[str, int] = field(default_factory=dict)  # .pte: ops left portable
    dynamic_batch: bool = False  # whether the file accepts any batch size
    writer: str = ""  # the flavour written (hardware_profiles.WRITERS), e.g. "qonnx"
    # what the writer measured in the file beyond its size, e.g. a Core ML package's bytes per
    # weight storage, an MCU program's planned activation memory
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {"path": str(self.path), "format": self.format, "size_bytes": self.size_bytes,
                "check_error": self.check_error, "runtime": self.runtime,
                "delegate": self.delegate, "delegated_ops": dict(self.delegated_ops),
                "undelegated_ops": dict(self.undelegated_ops),
                "dynamic_batch": self.dynamic_batch, "writer": self.writer,
                "details": dict(self.details)}


# --- export ---------------------------------------------------------------------------------
def export(gm: fx.GraphModule | torch.nn.Module, example_inputs: tuple, path: str | Path, *,
           profile: str | Path | Profile | None = None,
           check_tolerance: float | None = None, onnx_int8: str = "portable") -> ExportResult:
    """Write `gm` (usually the result of `fxcompress.compile`) to `path`; its suffix picks the
    format (``.pt2``, ``.pte``, ``.onnx``, ``.mlpackage``), and the profile's ``[backend]
    writer`` the flavour of its own format (QONNX, TensorRT ONNX, Cortex-M ``.pte``).

    `profile` names the target whose delegate a ``.pte`` is lowered with; by default the one in
    ``gm.meta["fxcompress_report"]``. The file is run in its runtime on `example_inputs` and
    compared with ``gm`` before it is moved into place (atomically); a mismatch larger than
    `check_tolerance` (relative output error; by default 1e-3, or for graphs with int8
    activations 5e-2 or 1.5 x the compiled model's measured error, whichever is more:
    `default_check_tolerance`) raises `InternalError` and writes nothing. A ``.pte`` holds a
    program for the example inputs' shapes; ``.pt2`` and ``.onnx`` keep a dynamic batch where
    the model has one. The program `fxcompress.compile` exported is reused where it fits, rather
    than exporting `gm` again (see "Export once" in this module's documentation). User mistakes
    (an unknown suffix, a folder that cannot be written, inputs of another shape than the model
    was compiled for, a runtime not installed) raise `FxCompressError`. Exports (and compiles)
    in one process run one at a time: torch.export keeps process-wide state
    (`fxcompress.capture.EXPORT_LOCK`).

    `onnx_int8` (``.onnx`` only): ``"portable"`` (default) stores full-range int8 weights as
    uint8 with the zero point moved by 128, exact in ONNX Runtime on every x86 CPU;
    ``"u8s8"`` keeps u8 x s8: on CPUs with VNNI / AMX 1.04-1.12x faster with int8 linears,
    1.9x with int8 convolutions (benchmarks/results/host.md), but it saturates on CPUs without
    them, so it can only be written and checked on a host that has them."""
    path = Path(path)
    fmt = _check_path(path)
    tol = _check_tolerance(check_tolerance)
    if onnx_int8 not in ("portable", "u8s8"):
        raise FxCompressError(f"onnx_int8 {onnx_int8!r} is unknown; use 'portable' (exact on "
                              "any x86 CPU) or 'u8s8' (faster with VNNI, wrong without)")
    if onnx_int8 == "u8s8" and fmt == ".onnx":
        from fxcompress.host import host_isa, int8_weight_bits

        if int8_weight_bits(host_isa()) < 8:
            raise FxCompressError(
                f"onnx_int8='u8s8' keeps u8 x s8 int8, exact only on CPUs with VNNI or AMX; "
                f"this host ({', '.join(host_isa()) or 'no AVX2'}) has neither, so the file "
                "could not be checked here: write it on such a host, or keep the default "
                "onnx_int8='portable'")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple | list):
        raise FxCompressError(f"example_inputs must be a tuple of inputs, not "
                              f"{type(example_inputs).__name__}; wrap it: (x,)")
    example_inputs = tuple(example_inputs)
    if not isinstance(gm, torch.nn.Module):
        raise FxCompressError(f"export takes the GraphModule fxcompress.compile returned (or "
                              f"any nn.Module), not {type(gm).__name__}")
    with EXPORT_LOCK:
        return _export(gm, example_inputs, path, fmt, profile, tol, onnx_int8)


def _export(gm, example_inputs: tuple, path: Path, fmt: str, profile, tol,
            onnx_int8: str = "portable") -> ExportResult:
    report = _report_of(gm)
    with torch.no_grad():
        try:
            expected = gm(*_clones(example_inputs))
        except Exception as e:
            raise _inputs_do_not_fit(gm, example_inputs, e) from e
    if tol is None:
        tol = default_check_tolerance(gm)
    prof = _resolve_profile(profile, report) if fmt == ".pte" else \
        _optional_profile(profile, report)
    writer = writer_for(fmt, prof)
    preflight(path, prof)
    # ExecuTorch plans memory for fixed shapes: a .pte is exported for the example shapes
    dynamic = False if fmt == ".pte" else bool(getattr(report, "dynamic_batch", True))

    def write(program: ExportedProgram | None) -> ExportResult:
        args = (gm, example_inputs, path, report, expected, tol)
        if writer == "coreml":
            from fxcompress.export import coreml
            result = coreml.write_mlpackage(*args, prof, program)
        elif writer == "qonnx":
            from fxcompress.export import qonnx
            result = qonnx.write_qonnx(*args, prof, program)
        elif writer == "tensorrt":
            from fxcompress.export import tensorrt
            result = tensorrt.write_tensorrt_onnx(*args, prof, program)
        elif writer == "cortex-m":
            from fxcompress.export import cortex_m
            result = cortex_m.write_cortex_m(*args, prof, program)
        elif fmt == ".pt2":
            result = pt2.write_pt2(*args, program)
        elif fmt == ".onnx":
            result = onnx_format.write_onnx(*args, onnx_int8, program)
        else:
            result = pte.write_pte(gm, example_inputs, path, prof, expected, tol, program)
        result.writer = writer
        return result

    program = _reusable_program(gm, example_inputs, dynamic)
    if program is None:
        return write(None)
    try:
        return write(program)
    except _Disagrees:
        # the stored program no longer matches the model (a weight changed in a way the
        # fingerprint cannot see): export afresh; a second disagreement is raised
        return write(None)


def _check_tolerance(check_tolerance) -> float | None:
    if check_tolerance is None:
        return None
    if isinstance(check_tolerance, bool) or not isinstance(check_tolerance, numbers.Real):
        raise FxCompressError(f"check_tolerance must be a number or None, not "
                              f"{type(check_tolerance).__name__}; e.g. check_tolerance=1e-3")
    t = float(check_tolerance)
    if not (math.isfinite(t) and t > 0):
        raise FxCompressError(
            f"check_tolerance {t:g} is out of range: it is the largest relative output error "
            "allowed between the written file, run in its runtime, and the compiled model, a "
            f"finite number > 0 (e.g. {FLOAT_CHECK_TOLERANCE:g}); or leave it None for the "
            f"default ({FLOAT_CHECK_TOLERANCE:g}; with int8 activations "
            f"{INT8_CHECK_TOLERANCE:g} or {INT8_NOISE_FACTOR:g} x the measured error)")
    return t


def _shape_text(shape) -> str:
    dims = ["N" if i == 0 and not isinstance(d, int) else str(d) for i, d in enumerate(shape)]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _inputs_do_not_fit(gm, inputs: tuple, e: Exception) -> Exception:
    """The error for a model that fails on the example inputs: the user's when they are not
    what it was compiled for (compared with the graph's placeholders), else ours."""
    given = [x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
    given_text = ", ".join(_shape_text(tuple(x.shape)) for x in given) or "(no tensors)"
    head = (str(e).strip().splitlines() or [""])[0][:200]
    graph = getattr(gm, "graph", None)
    placeholders = [] if not isinstance(graph, fx.Graph) else \
        [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    compiled = [v for v in placeholders if isinstance(v, torch.Tensor)]
    if not compiled or len(compiled) != len(placeholders):
        return FxCompressError(f"the model does not run on example inputs of shape "
                               f"{given_text} ({type(e).__name__}: {head}); pass inputs of the "
                               "shape and dtype the model takes")
    fits = len(given) == len(compiled) and all(
        x.dtype == v.dtype and x.dim() == v.dim()
        and all(not isinstance(d, int) or d == n for d, n in zip(v.shape, x.shape, strict=True))
        for x, v in zip(given, compiled, strict=False))
    if fits:
        return InternalError(f"the compiled model fails on inputs of the shape it was compiled "
                             f"for ({type(e).__name__}: {head}); please report this")
    compiled_text = ", ".join(_shape_text(tuple(v.shape)) for v in compiled)
    dtypes = ""
    if len(given) == len(compiled) and any(x.dtype != v.dtype
                                           for x, v in zip(given, compiled, strict=True)):
        names = lambda ts: ", ".join(str(t.dtype).removeprefix("torch.") for t in ts)  # noqa: E731
        dtypes = f" and dtype {names(given)} (compiled for {names(compiled)})"
    return FxCompressError(f"example inputs of shape {given_text}{dtypes} do not fit the "
                           f"compiled model (it was compiled for inputs like {compiled_text}); "
                           "pass inputs of the shape you compiled with")


def _check_path(path: Path) -> str:
    fmt = path.suffix.lower()
    if fmt not in EXPORT_FORMATS:
        raise FxCompressError(f"cannot tell the format of {str(path)!r} from its suffix; name "
                              f"the file with one of {', '.join(EXPORT_FORMATS)}")
    check_output_path(path)
    return fmt


def check_output_path(path: str | Path) -> None:
    """That a file can be written at `path`: its folder exists, is a folder and can be
    written in (permissions checked, and a file actually created and removed there: a
    read-only mount passes `os.access`), and `path` itself is not a folder. Raises
    `FxCompressError` naming the path and the fix."""
    path = Path(path)
    parent = path.parent
    if not parent.exists():
        raise FxCompressError(f"the folder {str(parent)!r} does not exist; create it "
                              "first or write somewhere else")
    if not parent.is_dir():
        raise FxCompressError(f"{str(parent)!r} is a file, not a folder, so {str(path)!r} "
                              "cannot be written; write to a path inside an existing folder")
    if path.is_dir() and path.suffix.lower() != ".mlpackage":  # a package is a folder
        raise FxCompressError(f"{str(path)!r} is a folder; give a file name, e.g. "
                              f"{str(path / ('model' + (path.suffix or '.pt2')))!r}")
    problem = None
    if not os.access(parent, os.W_OK | os.X_OK):
        problem = "no write permission"
    else:
        try:
            fd, probe = tempfile.mkstemp(prefix=".fxcompress-probe-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            problem = e.strerror or type(e).__name__
    if problem is not None:
        raise FxCompressError(f"cannot write in the folder {str(parent)!r} ({problem}), so "
                              f"{str(path)!r} cannot be written; write to a folder you can "
                              "write in, or fix its permissions")


def preflight(path: str | Path, profile: str | Path | Profile | None = None) -> None:
    """Check, before any long work, that `export` can write `path`: a known suffix, an
    existing folder, and the packages its format (and, for `.pte`, `profile`'s delegate)
    needs. Raises `FxCompressError` naming what to fix or install."""
    path = Path(path)
    fmt = _check_path(path)
    if fmt == ".onnx":
        install = "pip install 'fxcompress[onnx]'"
        for module in ("onnx", "onnxscript", "onnxruntime"):
            _require(module, "writing an .onnx", install)
    elif fmt == ".pte":
        install = "pip install 'fxcompress[executorch]'"
        _require("executorch.exir", "writing a .pte", install)
        _require("executorch.runtime", "checking a .pte", install)
        if profile is not None:
            delegate = load_profile(profile).delegate
            pte.partitioner_class(delegate)
            pte.check_runtime_backend(delegate)
    elif fmt == ".mlpackage":
        _require("coremltools", "writing an .mlpackage", "pip install 'fxcompress[coreml]'")
    prof = None if profile is None else load_profile(profile)
    if writer_for(fmt, prof) == "qonnx":
        install = "pip install 'fxcompress[qonnx]'"
        for module in ("onnx", "onnxscript", "onnxruntime", "qonnx"):
            _require(module, "writing a QONNX .onnx", install)
    if writer_for(fmt, prof) == "cortex-m":
        from fxcompress.export import cortex_m

        cortex_m.preflight()


def _report_of(gm) -> Any:
    meta = getattr(gm, "meta", None)
    return meta.get(REPORT_KEY) if isinstance(meta, dict) else None


def _report_json(report) -> str | None:
    if report is None:
        return None
    return json.dumps(report.to_dict() if hasattr(report, "to_dict") else report)


def writer_for(fmt: str, prof: Profile | None) -> str:
    """The writer of format `fmt` (a suffix) for target `prof`: the profile's own ``[backend]
    writer`` where `fmt` is its `export_format`, else the format's default (`WRITERS`)."""
    if prof is not None and prof.export_format == fmt and prof.writer:
        return prof.writer
    return WRITERS[fmt][0]


def _optional_profile(profile, report) -> Profile | None:
    """`profile` loaded, or the one the report names; None where neither is known or the
    report's cannot be loaded (the format's default writer needs none)."""
    if profile is not None:
        return load_profile(profile)
    name = getattr(report, "profile", None)
    if name is None:
        return None
    try:
        return load_profile(name)
    except FxCompressError:
        return None


def _resolve_profile(profile, report) -> Profile:
    if profile is not None:
        return load_profile(profile)
    name = getattr(report, "profile", None)
    if name is None:
        raise FxCompressError("a .pte is lowered for a target's backend, and this model carries "
                              "no fxcompress report naming one; pass profile='mobile-arm' (or "
                              "another profile)")
    try:
        return load_profile(name)
    except FxCompressError as e:
        raise FxCompressError(f"the model was compiled for profile {name!r}, which cannot be "
                              f"loaded here ({e}); pass profile= (a name or a profile file)"
                              ) from None


def has_quantized_activations(gm: torch.nn.Module) -> bool:
    """Whether the graph quantizes activations (``quantized_decomposed.quantize_*`` ops)."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return False
    return any(n.op == "call_function" and "quantized_decomposed.quantize" in str(n.target)
               for n in graph.nodes)


def to_exported_program(gm: torch.nn.Module, example_inputs: tuple,
                        dynamic_batch: bool) -> tuple[ExportedProgram, bool]:
    """`torch.export` of `gm` with cloned inputs; with `dynamic_batch`, dim 0 of every input
    is exported as dynamic where the model allows it. Returns the program and whether its
    batch is dynamic."""
    inputs = _clones(example_inputs)
    if dynamic_batch:
        widened = _widen(inputs)
        dims = _batch_dims(widened)
        try:
            ep = torch.export.export(gm, widened, dynamic_shapes=dims, strict=False)
            if _batch_is_dynamic(ep):
                return ep, True
        except Exception:  # noqa: BLE001 - fall back to a static batch, as capture does
            pass
    try:
        return torch.export.export(gm, inputs, strict=False), False
    except Exception as e:
        raise FxCompressError(f"torch.export cannot capture this model for export "
                              f"({type(e).__name__}: {str(e).strip()[:300]}); pass the "
                              "GraphModule fxcompress.compile returned") from e


def _batch_is_dynamic(ep: ExportedProgram) -> bool:
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]  # in spec order
    for spec, node in zip(ep.graph_signature.input_specs, placeholders, strict=True):
        if spec.kind.name != "USER_INPUT":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0 and not isinstance(val.shape[0], int):
            return True
    return False


def relative_error(actual, expected) -> float:
    """``‖a − e‖ / ‖e‖`` over every floating-point output leaf (flattened in order)."""
    return ratio_of(error_sums(actual, expected))


def error_sums(actual, expected, sums: tuple[float, float] = (0.0, 0.0)
               ) -> tuple[float, float]:
    """(‖a − e‖², ‖e‖²) over every floating-point output leaf, added to `sums`: outputs
    compared piece by piece (chunks of logits) give `relative_error` of the whole through
    `ratio_of`. Leaves that do not match give (inf, 1)."""
    a = [torch.as_tensor(t) for t in _leaves(actual)]
    e = [t for t in _leaves(expected)]
    if len(a) != len(e):
        return float("inf"), 1.0
    num, den = sums
    for x, y in zip(a, e, strict=True):
        y = torch.as_tensor(y).detach().float()
        x = x.detach().float().reshape(y.shape) if x.numel() == y.numel() else None
        if x is None:
            return float("inf"), 1.0
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return num, den


def ratio_of(sums: tuple[float, float]) -> float:
    """The relative error ‖a − e‖ / ‖e‖ from `error_sums`."""
    num, den = sums
    return (num ** 0.5) / max(den ** 0.5, 1e-30)


def _leaves(out) -> list:
    leaves = []
    for t in pytree.tree_leaves(out):
        if hasattr(t, "dtype") and not isinstance(t, torch.Tensor):
            t = torch.from_numpy(t)  # numpy arrays from ONNX Runtime
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            leaves.append(t)
    return leaves


#: A staging folder is ``.{target name}.{pid}-{host tag}.{random}``. One left by a process
#: that was killed (SIGKILL, a power cut) is removed by the next write of the same target: at
#: once when its process is gone (same host), else once it is this old (seconds).
STALE_STAGING_AGE_S = 24 * 3600
_STAGING_TAIL = re.compile(r"(?:(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.)?[a-z0-9_]{8}")


@functools.cache
def _host_tag() -> str:
    # a folder on shared storage may be written from several hosts, whose pids mean nothing
    # here: the host is part of the name
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # exists but is not ours / cannot be asked: assume alive
    return True


def _remove_stale_staging(path: Path) -> None:
    """Remove staging folders of `path` left by writes that never finished (see
    `STALE_STAGING_AGE_S`); folders of live writes, and anything that does not look like a
    staging folder of this target, are left alone."""
    prefix = f".{path.name}."
    try:
        entries = [d for d in path.parent.iterdir() if d.name.startswith(prefix)]
    except OSError:
        return
    now = time.time()
    for d in entries:
        m = _STAGING_TAIL.fullmatch(d.name[len(prefix):])
        try:
            if m is None or d.is_symlink() or not d.is_dir():
                continue
            old = now - d.stat().st_mtime > STALE_STAGING_AGE_S
            dead = (m["pid"] is not None and m["host"] == _host_tag()
                    and not _pid_alive(int(m["pid"])))
            if not (dead or old):
                continue
            if any(not p.name.startswith(path.name) for p in d.iterdir()):
                continue  # holds something a write of ours never stages: not ours to delete
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)


def _write_error(path: Path, e: Exception) -> FxCompressError:
    why = getattr(e, "strerror", None) or f"{type(e).__name__}: {str(e).strip()[:200]}"
    return FxCompressError(f"could not write {str(path)!r} ({why}); nothing was written. Check "
                           "that its folder is writable and has free space, or write somewhere "
                           "else")


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Failures of the file system while a file is written (permissions, a full disk) as the
    user's to fix, naming `path`; torch's archive writer reports them as RuntimeError."""
    try:
        yield
    except OSError as e:
        raise _write_error(path, e) from e
    except RuntimeError as e:
        text = str(e)
        if any(s in text for s in ("file write failed", "No space left", "Permission denied",
                                   "Read-only file system", "Disk quota")):
            raise _write_error(path, e) from e
        raise


@contextlib.contextmanager
def _staged(path: Path, extra_suffixes: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary path in the target's folder; on success the file (and any companion files
    named path + suffix) are moved into place with `os.replace`, companions first so the main
    file never points at a missing one. On failure everything staged is removed. Staging
    folders left by killed writes of the same target are removed first. A failure of the
    file system is an `FxCompressError` naming `path`."""
    _remove_stale_staging(path)
    with _writing(path):
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-{_host_tag()}.",
                                       dir=path.parent))
    staged = tmpdir / path.name
    try:
        with _writing(path):
            yield staged
            for suf in extra_suffixes:
                comp = tmpdir / (path.name + suf)
                if comp.exists():
                    os.replace(comp, path.parent / (path.name + suf))
            if staged.is_dir() and path.is_dir():
                # a package replaces the previous one: moved aside into the staging folder
                # (removed with it), so the new one can take its name
                os.replace(path, tmpdir / (".previous-" + path.name))
            os.replace(staged, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


class _Disagrees(InternalError):
    """The written file, run in its runtime, disagrees with the compiled model."""


def _check(err: float, tol: float, fmt: str, runtime: str) -> None:
    if not err <= tol:
        raise _Disagrees(f"the {fmt} file run in {runtime} disagrees with the compiled model "
                         f"(relative output error {err:.3g} > {tol:g}); nothing was written. "
                         "Please report this")


def _compare(got, expected, tol: float, fmt: str, runtime: str) -> float:
    """The relative error of the written file's outputs `got` (run in `runtime`) against the
    compiled model's `expected`; raises `InternalError` when it exceeds `tol`, before the file
    is moved into place."""
    err = relative_error(got, expected)
    _check(err, tol, fmt, runtime)
    return err


def _require(module: str, what: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise FxCompressError(f"{what} needs {module.split('.')[0]}, which cannot be imported "
                              f"here ({e}); install it: {install}") from None


def file_size(path: str | Path) -> int:
    """Bytes on disk of an exported file; an `.onnx` file's external data files included."""
    path = Path(path)
    if path.is_dir():  # a package (.mlpackage): every file in it
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    size = path.stat().st_size
    if path.suffix.lower() == ".onnx":
        size += sum(p.stat().st_size for p in onnx_format.external_files(path))
    return size


# --- export once: the programs compile exported ----------------------------------------------
def _get_attr(module: torch.nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _tensors_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a module computes with, by name: parameters, buffers and the tensor
    attributes its graph reads (`get_attr`) that are neither."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    graph = getattr(module, "graph", None)
    if isinstance(graph, fx.Graph):
        for node in graph.nodes:
            if node.op == "get_attr" and node.target not in tensors:
                obj = _get_attr(module, str(node.target))
                if isinstance(obj, torch.Tensor):
                    tensors[str(node.target)] = obj
    return tensors


def _fingerprint(tensors: dict[str, torch.Tensor], code: str | None) -> tuple | None:
    """`code` and, per tensor by name, a weak reference to it and its `_version`; None where a
    tensor has no version counter (an inference tensor): such a model is never matched."""
    entries = []
    try:
        for name in sorted(tensors):
            t = tensors[name]
            entries.append((name, weakref.ref(t), t._version))
    except (RuntimeError, TypeError):
        return None
    return code, tuple(entries)


def _same(fingerprint: tuple | None, now: tuple | None) -> bool:
    if fingerprint is None or now is None or fingerprint[0] != now[0] \
            or len(fingerprint[1]) != len(now[1]):
        return False
    return all(name == name2 and ref() is not None and ref() is ref2() and version == version2
               for (name, ref, version), (name2, ref2, version2)
               in zip(fingerprint[1], now[1], strict=True))


class StoredProgram:
    """A `torch.export.ExportedProgram` `fxcompress.compile` made, kept in the compiled
    model's ``meta`` (`PROGRAM_KEY`) so that `export` need not export
    the model again (see "Export once" in `fxcompress.export`).

    `program` is the program, or None in a copy: a deep copy or a pickle of a `StoredProgram`
    is empty, so copying or pickling a compiled model neither copies its programs nor carries
    one that describes other tensors. `standard` says whether it was exported the way
    `to_exported_program` exports (dim 0 of every input dynamic, or nothing dynamic). The
    fingerprint records each tensor of the module the program was exported from by name,
    identity and ``_version``; `current` hands the program out only while they are
    unchanged."""

    def __init__(self, program: ExportedProgram | None, module: torch.nn.Module | None = None,
                 standard: bool = False) -> None:
        """Keep `program`, exported from `module`."""
        self.program = program
        self.standard = standard
        self._module = None if module is None else weakref.ref(module)
        self._fingerprint = None if program is None or module is None else self._take(module)

    @staticmethod
    def _take(module: torch.nn.Module) -> tuple | None:
        return _fingerprint(_tensors_of(module), str(getattr(module, "code", "")))

    def current(self, module: torch.nn.Module) -> ExportedProgram | None:
        """The program if `module` is the module it was exported from and its tensors are
        unchanged, else None."""
        if self.program is None or self._fingerprint is None or self._module is None \
                or self._module() is not module:
            return None
        return self.program if _same(self._fingerprint, self._take(module)) else None

    def __deepcopy__(self, memo: dict) -> StoredProgram:
        """An empty `StoredProgram`: a copied model has other tensors (export it afresh)."""
        return StoredProgram(None)

    def __reduce__(self) -> tuple:
        """Pickled empty, like a deep copy."""
        return (StoredProgram, (None,))

    def __repr__(self) -> str:
        """Short: what is kept, not the whole program."""
        if self.program is None:
            return "StoredProgram(empty)"
        return f"StoredProgram({len(self.program.graph.nodes)} nodes, standard={self.standard})"


def keep_program(gm: torch.nn.Module, program: ExportedProgram, *,
                 module: torch.nn.Module | None = None, example_inputs: tuple = (),
                 dynamic_shapes: Any = None) -> StoredProgram:
    """Keep `program`, exported from `module` (default `gm`) on `example_inputs` with
    `dynamic_shapes`, in ``gm.meta[PROGRAM_KEY]``; returns what was stored."""
    standard = dynamic_shapes is None or _same_dims(dynamic_shapes, _batch_dims(example_inputs))
    stored = StoredProgram(program, gm if module is None else module, standard)
    gm.meta[PROGRAM_KEY] = stored
    return stored


def _same_dims(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable specs: not the standard ones
        return False


def stored_program(gm: torch.nn.Module) -> ExportedProgram | None:
    """The program `fxcompress.compile` exported for `gm`, or None when `gm` carries none or
    it no longer describes the model: a tensor of `gm` was changed, replaced or added since."""
    meta = getattr(gm, "meta", None)
    if not isinstance(meta, dict):
        return None
    stored = meta.get(PROGRAM_KEY)
    if not isinstance(stored, StoredProgram):
        return None
    return stored.current(gm)


def _user_input_vals(ep: ExportedProgram) -> list:
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]  # in spec order
    return [node.meta.get("val") for spec, node
            in zip(ep.graph_signature.input_specs, placeholders, strict=True)
            if spec.kind.name == "USER_INPUT"]


def _accepts(ep: ExportedProgram, inputs: tuple, static: bool = False) -> bool:
    """Whether `ep` takes `inputs` as they are: the same structure, every input a tensor of
    the program's dtype, device and rank, each static dimension equal and each dynamic one
    within its range (one size per symbol); with `static`, only a program without dynamic
    dimensions whose inputs have exactly these shapes."""
    try:
        flat, spec = pytree.tree_flatten((tuple(inputs), {}))
        if ep.call_spec.in_spec is None or spec != ep.call_spec.in_spec:
            return False
        vals = _user_input_vals(ep)
    except Exception:  # noqa: BLE001 - a program this cannot read is not reused
        return False
    ranges = {str(sym): vr for sym, vr in ep.range_constraints.items()}
    if len(vals) != len(flat) or (static and ranges):
        return False
    sizes: dict[str, int] = {}
    for x, v in zip(flat, vals, strict=True):
        if not (isinstance(x, torch.Tensor) and isinstance(v, torch.Tensor)) \
                or x.dtype != v.dtype or x.dim() != v.dim() or x.device.type != v.device.type:
            return False
        for n, d in zip(x.shape, v.shape, strict=True):
            if isinstance(d, int):
                if d != n:
                    return False
                continue
            sym = str(d.node.expr)
            vr = ranges.get(sym)
            if vr is None or sizes.setdefault(sym, n) != n \
                    or not (bool(vr.lower <= n) and bool(n <= vr.upper)):
                return False
    return True


def _reusable_program(gm: torch.nn.Module, example_inputs: tuple,
                     dynamic_batch: bool) -> ExportedProgram | None:
    """The program compile kept for `gm` when it is the one `to_exported_program(gm,
    example_inputs, dynamic_batch)` would make (see "Export once"), else None."""
    program = stored_program(gm)
    if program is None:
        return None
    stored = gm.meta[PROGRAM_KEY]
    if not dynamic_batch:
        # a static export of the example inputs: only a program without dynamic dimensions
        return program if _accepts(program, example_inputs, static=True) else None
    if not stored.standard or not _batch_is_dynamic(program):
        return None
    return program if _accepts(program, example_inputs) else None


def _with_example_inputs(ep: ExportedProgram, inputs: tuple) -> ExportedProgram:
    """A shallow copy of `ep` whose example inputs are `inputs` (the stored program is left as
    it is): the file written stores these, as if `ep` had been exported on them."""
    ep = copy.copy(ep)
    ep.example_inputs = (tuple(inputs), {})
    return ep


# --- the formats, and the names they export (imported last: they use the above) ------------
from fxcompress.export import onnx as onnx_format  # noqa: E402
from fxcompress.export import pt2, pte  # noqa: E402
from fxcompress.export.pte import (  # noqa: E402
    DELEGATES,
    DelegateInfo,
    Delegation,
    PteProgram,
    count_delegated,
    lower_to_pte,
)

__all__ = ["export", "preflight", "check_output_path", "ExportResult", "PteProgram",
           "Delegation", "lower_to_pte", "count_delegated", "load_program", "read_report",
           "file_size", "DELEGATES", "DelegateInfo", "PROGRAM_KEY",
           "StoredProgram", "keep_program", "stored_program"]
