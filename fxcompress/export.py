"""`fxcompress.export`: a compiled model into a deployable file.

The suffix of the path picks the format:

- ``.pt2``: `torch.export.save`; the compile report rides along in the archive as an extra
  file (``fxcompress_report.json``), so ``fxcompress report OUT.pt2`` can print it later.
- ``.pte``: ExecuTorch, lowered with the profile's delegate (XNNPACK for mobile-arm), or to
  ExecuTorch's portable kernels where the profile names none.
- ``.onnx``: the dynamo ONNX exporter. int8 held as ``quantized_decomposed`` Q/DQ ops becomes
  QuantizeLinear / DequantizeLinear, the pattern ONNX Runtime fuses into int8 kernels; the
  report is kept in the model's metadata.

Every file is written to a temporary name beside the target, loaded back in its own runtime
(torch.export / the ExecuTorch runtime / ONNX Runtime) and run on the example inputs; only when
its outputs agree with the compiled model is it moved into place, so a failed export never
leaves a partial or wrong file behind.

`lower_to_pte` and `count_delegated` are the lowering and the delegation census on their own,
for code that wants to know which ops a backend takes (e.g. whether int8 ops were delegated).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import numbers
import os
import re
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from fxcompress.capture import EXPORT_LOCK
from fxcompress.errors import FxCompressError, InternalError
from fxcompress.hardware_profiles import EXPORT_FORMATS, Profile, load_profile
from fxcompress.loading import REPORT_FILE, load_program, read_report  # noqa: F401 (re-exported)

REPORT_KEY = "fxcompress_report"

@dataclass(frozen=True)
class DelegateInfo:
    """How to lower to one ExecuTorch delegate and run what was lowered."""

    module: str  # where its partitioner lives
    partitioner: str  # the partitioner class
    runtime_backend: str  # the backend id the ExecuTorch runtime registers for it
    install: str  # what to install where it is missing


#: ExecuTorch delegates a profile's `backend.delegate` may name.
DELEGATES: dict[str, DelegateInfo] = {
    "xnnpack": DelegateInfo("executorch.backends.xnnpack.partition.xnnpack_partitioner",
                            "XnnpackPartitioner", "XnnpackBackend",
                            "pip install 'fxcompress[executorch]'"),
    "coreml": DelegateInfo("executorch.backends.apple.coreml.partition", "CoreMLPartitioner",
                           "CoreMLBackend", "macOS with pip install 'fxcompress[executorch]' "
                           "coremltools (the Core ML runtime exists only on Apple systems)"),
    "mps": DelegateInfo("executorch.backends.apple.mps.partition", "MPSPartitioner",
                        "MPSBackend", "macOS with an ExecuTorch build that has the MPS backend"),
    "vulkan": DelegateInfo("executorch.backends.vulkan.partitioner.vulkan_partitioner",
                           "VulkanPartitioner", "VulkanBackend",
                           "an ExecuTorch build with the Vulkan backend (EXECUTORCH_BUILD_VULKAN)"),
    "qnn": DelegateInfo("executorch.backends.qualcomm.partition.qnn_partitioner",
                        "QnnPartitioner", "QnnBackend",
                        "an ExecuTorch build with the Qualcomm QNN backend and the QNN SDK"),
}

# Relative output error allowed between the written file, run in its runtime, and the compiled
# model run in eager PyTorch. Float graphs differ only by kernel rounding; graphs with int8
# activations run real int8 kernels there, which round intermediate values differently from
# the reference Q/DQ arithmetic by up to one quantization step.
FLOAT_CHECK_TOLERANCE = 1e-3
INT8_CHECK_TOLERANCE = 5e-2


@dataclass
class ExportResult:
    """What `export` wrote."""

    path: Path  # the file written
    format: str  # ".pt2", ".pte" or ".onnx"
    size_bytes: int  # bytes on disk, an .onnx file's external data included
    check_error: float  # relative output error of the file's runtime vs the compiled model
    runtime: str  # what ran the check: "torch.export", "executorch", "onnxruntime"
    delegate: str | None = None  # the ExecuTorch delegate a .pte was lowered with
    delegated_ops: dict[str, int] = field(default_factory=dict)  # .pte: ops the delegate took
    undelegated_ops: dict[str, int] = field(default_factory=dict)  # .pte: ops left portable
    dynamic_batch: bool = False  # whether the file accepts any batch size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {"path": str(self.path), "format": self.format, "size_bytes": self.size_bytes,
                "check_error": self.check_error, "runtime": self.runtime,
                "delegate": self.delegate, "delegated_ops": dict(self.delegated_ops),
                "undelegated_ops": dict(self.undelegated_ops),
                "dynamic_batch": self.dynamic_batch}


@dataclass
class Delegation:
    """Which ops a delegate took and which were left to ExecuTorch's portable kernels, by op
    name (e.g. ``"aten.convolution.default"``,
    ``"quantized_decomposed.dequantize_per_channel.default"``)."""

    delegated: Counter = field(default_factory=Counter)
    undelegated: Counter = field(default_factory=Counter)
    partitions: int = 0  # number of delegated subgraphs

    def count(self, substring: str, delegated: bool = True) -> int:
        """How many delegated (or undelegated) ops have `substring` in their name."""
        ops = self.delegated if delegated else self.undelegated
        return sum(n for name, n in ops.items() if substring in name)


# --- formats --------------------------------------------------------------------------------
def export(gm: fx.GraphModule | torch.nn.Module, example_inputs: tuple, path: str | Path, *,
           profile: str | Path | Profile | None = None,
           check_tolerance: float | None = None, onnx_int8: str = "portable") -> ExportResult:
    """Write `gm` (usually the result of `fxcompress.compile`) to `path`; its suffix picks the
    format (``.pt2``, ``.pte``, ``.onnx``).

    `profile` names the target whose delegate a ``.pte`` is lowered with; by default the one
    in ``gm.meta["fxcompress_report"]``. The file is run in its runtime on `example_inputs`
    and compared with ``gm`` before it is moved into place (atomically); a mismatch larger
    than `check_tolerance` (relative output error; by default 1e-3, or 5e-2 for graphs with
    int8 activations) raises `InternalError` and writes nothing. A ``.pte`` holds a program for
    the example inputs' shapes; ``.pt2`` and ``.onnx`` keep a dynamic batch where the model
    has one. User mistakes (an unknown suffix, a folder that cannot be written, inputs of
    another shape than the model was compiled for, a runtime not installed) raise
    `FxCompressError`. Exports (and compiles) in one process run one at a time: torch.export
    keeps process-wide state (`fxcompress.capture.EXPORT_LOCK`).

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
        from fxcompress.hostbench import host_isa, int8_weight_bits

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
        tol = INT8_CHECK_TOLERANCE if has_quantized_activations(gm) else FLOAT_CHECK_TOLERANCE
    if fmt == ".pt2":
        return _export_pt2(gm, example_inputs, path, report, expected, tol)
    if fmt == ".onnx":
        return _export_onnx(gm, example_inputs, path, report, expected, tol, onnx_int8)
    prof = _resolve_profile(profile, report)
    preflight(path, prof)
    return _export_pte(gm, example_inputs, path, prof, expected, tol)


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
            f"default ({FLOAT_CHECK_TOLERANCE:g}, {INT8_CHECK_TOLERANCE:g} with int8 "
            "activations)")
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
    if path.is_dir():
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
            _partitioner_class(delegate)
            _check_runtime_backend(delegate)


def _report_of(gm) -> Any:
    meta = getattr(gm, "meta", None)
    return meta.get(REPORT_KEY) if isinstance(meta, dict) else None


def _report_json(report) -> str | None:
    if report is None:
        return None
    return json.dumps(report.to_dict() if hasattr(report, "to_dict") else report)


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


def _clones(inputs: tuple) -> tuple:
    # a view saves its whole storage into the file: export and run with clones
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


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
        widened = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0
                        and x.shape[0] == 1 else x for x in inputs)
        dims = tuple({0: Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                     for x in widened)
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
    a = [torch.as_tensor(t) for t in _leaves(actual)]
    e = [t for t in _leaves(expected)]
    if len(a) != len(e):
        return float("inf")
    num = den = 0.0
    for x, y in zip(a, e, strict=True):
        y = torch.as_tensor(y).detach().float()
        x = x.detach().float().reshape(y.shape) if x.numel() == y.numel() else None
        if x is None:
            return float("inf")
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
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
            os.replace(staged, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _check(err: float, tol: float, fmt: str, runtime: str) -> None:
    if not err <= tol:
        raise InternalError(f"the {fmt} file run in {runtime} disagrees with the compiled model "
                            f"(relative output error {err:.3g} > {tol:g}); nothing was written. "
                            "Please report this")


def _export_pt2(gm, inputs, path, report, expected, tol) -> ExportResult:
    dynamic = bool(getattr(report, "dynamic_batch", True))
    ep, dynamic = to_exported_program(gm, inputs, dynamic)
    if dynamic and ep.example_inputs is not None:
        # the archive stores the example inputs: a program that takes any batch needs only a
        # couple of rows, not the caller's whole batch (a test set would outweigh the weights)
        args, kwargs = ep.example_inputs
        ep.example_inputs = (tuple(x[:2].clone() if isinstance(x, torch.Tensor) and x.dim() > 0
                                   else x for x in args), kwargs)
    extra = {}
    rj = _report_json(report)
    if rj is not None:
        extra[REPORT_FILE] = rj
    with _staged(path) as tmp:
        torch.export.save(ep, tmp, extra_files=extra)
        loaded = load_program(tmp)
        with torch.no_grad():
            got = loaded.module()(*_clones(inputs))
        err = relative_error(got, expected)
        _check(err, tol, ".pt2", "torch.export")
        size = tmp.stat().st_size
    return ExportResult(path, ".pt2", size, err, "torch.export", dynamic_batch=dynamic)


# --- ExecuTorch -----------------------------------------------------------------------------
def _require(module: str, what: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise FxCompressError(f"{what} needs {module.split('.')[0]}, which cannot be imported "
                              f"here ({e}); install it: {install}") from None


def _partitioner_class(delegate: str | None):
    if delegate is None:
        return None
    if delegate not in DELEGATES:
        raise FxCompressError(f"the profile's delegate {delegate!r} is not one fxcompress can "
                              f"lower to; known delegates: {', '.join(DELEGATES)}")
    info = DELEGATES[delegate]
    mod = _require(info.module, f"lowering to the ExecuTorch {delegate} delegate", info.install)
    return getattr(mod, info.partitioner)


def _check_runtime_backend(delegate: str | None) -> None:
    """Every .pte is run-checked, so the runtime here must run the delegate's backend."""
    if delegate is None:
        return
    info = DELEGATES[delegate]
    rt = _require("executorch.runtime", "checking a .pte", "pip install 'fxcompress[executorch]'")
    registry = rt.Runtime.get().backend_registry
    if not registry.is_available(info.runtime_backend):
        raise FxCompressError(
            f"the ExecuTorch runtime here cannot run the {delegate} backend "
            f"({info.runtime_backend}), so a .pte lowered to it cannot be checked; it needs "
            f"{info.install}. Or export to .pt2 / .onnx, or pick a profile whose delegate runs "
            "here (mobile-arm: xnnpack)")


def _partitioner(delegate: str | None) -> list:
    cls = _partitioner_class(delegate)
    return [] if cls is None else [cls()]


def _lower(ep: ExportedProgram, delegate: str | None):
    exir = _require("executorch.exir", "writing a .pte", "pip install 'fxcompress[executorch]'")
    # registers the out-variants of quantized_decomposed ops that a delegate leaves behind
    _require("executorch.kernels.quantized", "writing a .pte with int8 ops",
             "pip install 'fxcompress[executorch]'")
    partitioners = _partitioner(delegate)
    try:
        return exir.to_edge_transform_and_lower(ep, partitioner=partitioners)
    except FxCompressError:
        raise
    except Exception as e:
        raise InternalError(f"ExecuTorch could not lower the model to "
                            f"{delegate or 'portable kernels'} ({type(e).__name__}: "
                            f"{str(e).strip()[:300]}); please report this") from e


def lower_to_pte(ep: ExportedProgram, delegate: str | None) -> bytes:
    """The bytes of a `.pte` ExecuTorch program for `ep`, lowered with `delegate` (a key of
    `DELEGATES`, e.g. ``"xnnpack"``; None: portable kernels only)."""
    return _to_pte(_lower(ep, delegate))


def _to_pte(edge) -> bytes:
    try:
        return bytes(edge.to_executorch().buffer)
    except Exception as e:
        raise InternalError(f"ExecuTorch could not serialize the lowered program "
                            f"({type(e).__name__}: {str(e).strip()[:300]}); please report this"
                            ) from e


def _op_name(target) -> str:
    # an edge-dialect op wraps the ATen overload, whose str is e.g. "aten.addmm.default"
    return str(getattr(target, "_op", target))


def _census(program) -> Delegation:
    """Count ops inside and outside delegated subgraphs of a lowered program."""
    if hasattr(program, "exported_program"):
        program = program.exported_program()
    graph_module = program.graph_module
    result = Delegation()

    def walk(gm: fx.GraphModule, inside: bool) -> None:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                sub = getattr(gm, node.target, None)
                original = getattr(sub, "original_module", None)
                if original is not None:  # a LoweredBackendModule: what the delegate took
                    result.partitions += 1
                    walk(original.graph_module, True)
                continue
            if node.op != "call_function":
                continue
            name = _op_name(node.target)
            if "executorch_call_delegate" in name or name.startswith("<built-in"):
                continue
            (result.delegated if inside else result.undelegated)[name] += 1

    walk(graph_module, False)
    return result


def count_delegated(ep: ExportedProgram, delegate: str | None = "xnnpack") -> Delegation:
    """Lower `ep` with `delegate` and count, by op name, the ops the delegate took and the ops
    left to portable kernels. Also accepts an already lowered program (an ExecuTorch
    `EdgeProgramManager`, or its edge `ExportedProgram`), which is then only counted."""
    if hasattr(ep, "exported_program") or _is_lowered(ep):
        return _census(ep)
    return _census(_lower(ep, delegate))


def _is_lowered(ep) -> bool:
    return isinstance(ep, ExportedProgram) and any(
        "executorch_call_delegate" in str(n.target) for n in ep.graph.nodes)


class PteProgram:
    """A `.pte` file loaded in the ExecuTorch runtime; calling it runs ``forward``.

    The runtime keeps pointers into the program it was given without owning it, so the
    program and its method are held here for as long as this object lives (a method whose
    program was garbage-collected crashes the process)."""

    def __init__(self, path: str | Path):
        rt = _require("executorch.runtime", "running a .pte",
                      "pip install 'fxcompress[executorch]'")
        self.path = Path(path)
        self._program = rt.Runtime.get().load_program(self.path)  # read from the file
        self._method = self._program.load_method("forward")

    def __call__(self, *inputs) -> list:
        """Outputs of ``forward`` on `inputs` (tensors, in the exported order)."""
        return list(self._method.execute(list(pytree.tree_leaves(_clones(inputs)))))


def _export_pte(gm, inputs, path, prof: Profile, expected, tol) -> ExportResult:
    # ExecuTorch plans memory for fixed shapes: the program is exported for the example shapes
    ep, _ = to_exported_program(gm, inputs, dynamic_batch=False)
    edge = _lower(ep, prof.delegate)
    census = _census(edge)
    data = _to_pte(edge)
    with _staged(path) as tmp:
        tmp.write_bytes(data)
        got = PteProgram(tmp)(*inputs)
        err = relative_error(got, expected)
        _check(err, tol, ".pte", "the ExecuTorch runtime")
        size = tmp.stat().st_size
    return ExportResult(path, ".pte", size, err, "executorch", delegate=prof.delegate,
                        delegated_ops=dict(census.delegated),
                        undelegated_ops=dict(census.undelegated))


# --- ONNX -----------------------------------------------------------------------------------
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


def _export_onnx(gm, inputs, path, report, expected, tol, onnx_int8: str = "portable",
                 ) -> ExportResult:
    install = "pip install 'fxcompress[onnx]'"
    _require("onnxscript", "writing an .onnx", install)
    ort = _require("onnxruntime", "checking an .onnx", install)
    dynamic = bool(getattr(report, "dynamic_batch", True))
    ep, dynamic = to_exported_program(gm, inputs, dynamic)
    try:
        # the exporter prints its progress on stdout, which belongs to the caller (--json)
        with contextlib.redirect_stdout(io.StringIO()), _quiet_logger("torch.onnx"):
            onnx_program = torch.onnx.export(ep, _clones(inputs), dynamo=True, verbose=False,
                                             custom_translation_table=_onnx_translations())
    except Exception as e:
        raise InternalError(f"the ONNX exporter failed ({type(e).__name__}: "
                            f"{str(e).strip()[:300]}); please report this") from e
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
        err = relative_error(got, expected)
        _check(err, tol, ".onnx", "ONNX Runtime")
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


def file_size(path: str | Path) -> int:
    """Bytes on disk of an exported file; an `.onnx` file's external data files included."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix.lower() == ".onnx":
        size += sum(p.stat().st_size for p in _onnx_external_files(path))
    return size


def _onnx_external_files(path: Path) -> list[Path]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return [path.parent / loc for loc in sorted(locations)]


__all__ = ["export", "preflight", "check_output_path", "ExportResult", "PteProgram",
           "Delegation", "lower_to_pte", "count_delegated", "load_program", "read_report",
           "file_size", "DELEGATES", "DelegateInfo"]
