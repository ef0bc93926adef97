"""``.pte``: ExecuTorch, lowered with the profile's delegate (`DELEGATES`: XNNPACK for
mobile-arm), or to ExecuTorch's portable kernels where the profile names none; loaded in the
ExecuTorch runtime (`PteProgram`) and run before it is moved into place. ExecuTorch plans
memory for fixed shapes, so a ``.pte`` is a program for the example inputs' shapes.

`lower_to_pte` and `count_delegated` are the lowering and the delegation census on their own,
for code that wants to know which ops a backend takes (e.g. whether int8 ops were delegated).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from fxcompress.errors import FxCompressError, upstream_failure
from fxcompress.export import (
    ExportResult,
    _clones,
    _compare,
    _require,
    _staged,
    to_exported_program,
)
from fxcompress.hardware_profiles import Profile


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


def partitioner_class(delegate: str | None):
    """The ExecuTorch partitioner class of `delegate` (a key of `DELEGATES`; None: none, for
    portable kernels). Raises `FxCompressError` for an unknown delegate or one whose package
    is not installed, naming what to install."""
    if delegate is None:
        return None
    if delegate not in DELEGATES:
        raise FxCompressError(f"the profile's delegate {delegate!r} is not one fxcompress can "
                              f"lower to; known delegates: {', '.join(DELEGATES)}")
    info = DELEGATES[delegate]
    mod = _require(info.module, f"lowering to the ExecuTorch {delegate} delegate", info.install)
    return getattr(mod, info.partitioner)


def check_runtime_backend(delegate: str | None) -> None:
    """Every .pte is run-checked, so the runtime here must run the delegate's backend: raises
    `FxCompressError` naming what to install where it cannot."""
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
    cls = partitioner_class(delegate)
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
        raise upstream_failure(f"ExecuTorch's lowering (to {delegate or 'portable kernels'})",
                               ".pte", e) from e


def lower_to_pte(ep: ExportedProgram, delegate: str | None) -> bytes:
    """The bytes of a `.pte` ExecuTorch program for `ep`, lowered with `delegate` (a key of
    `DELEGATES`, e.g. ``"xnnpack"``; None: portable kernels only)."""
    return _to_pte(_lower(ep, delegate))


def _to_pte(edge) -> bytes:
    try:
        return bytes(edge.to_executorch().buffer)
    except Exception as e:
        raise upstream_failure("ExecuTorch's serialization", ".pte", e) from e


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


def write_pte(gm: torch.nn.Module, inputs: tuple, path: Path, prof: Profile, expected,
              tol: float, program: ExportedProgram | None = None) -> ExportResult:
    """Write `gm` as a ``.pte`` for `prof`'s delegate at `path` (checked against `expected`,
    its outputs on `inputs`, within `tol`). `program`: the program compile kept, already known
    to be a static program of the inputs' shapes (None: export `gm` for them)."""
    if program is None:
        # ExecuTorch plans memory for fixed shapes: the program is exported for the example
        # shapes
        program, _ = to_exported_program(gm, inputs, dynamic_batch=False)
    edge = _lower(program, prof.delegate)
    census = _census(edge)
    data = _to_pte(edge)
    with _staged(path) as tmp:
        tmp.write_bytes(data)
        got = PteProgram(tmp)(*inputs)
        err = _compare(got, expected, tol, ".pte", "the ExecuTorch runtime")
        size = tmp.stat().st_size
    return ExportResult(path, ".pte", size, err, "executorch", delegate=prof.delegate,
                        delegated_ops=dict(census.delegated),
                        undelegated_ops=dict(census.undelegated))
