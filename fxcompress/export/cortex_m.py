"""``.pte`` for Cortex-M microcontrollers: the ``cortex-m`` writer (mcu-int8).

The format is the file ExecuTorch's Cortex-M backend gives a Cortex-M user: an ExecuTorch
program, not delegated, whose int8 convolutions and linears are ``cortex_m::`` ops (CMSIS-NN
kernels: ``quantized_conv2d``, ``quantized_linear``, ...), whose int8 quantize / dequantize are
``cortex_m::quantize_per_tensor`` / ``dequantize_per_tensor``, and in which whatever the backend
does not take (a float batch norm between two int8 layers, a max-pool of float values) stays
on ExecuTorch's portable kernels. Memory is planned for the example shapes: one arena for the
activations and the CMSIS-NN scratch buffers, the weights as constant data in the file.

The lowering is ExecuTorch's own Cortex-M flow (``_to_edge_cortex_m`` in
``executorch/backends/arm/scripts/aot_arm_compiler.py``): 4-D inputs in channels_last (the
CMSIS-NN kernels are NHWC), `to_edge_transform_and_lower` with `cortex_m_edge_compile_config`,
`CortexMPassManager` for the target CPU (`TARGET_CPU`), `to_executorch`. One step before it is
fxcompress's own: the compiled graph keeps a float bias beside each int8 layer, while CMSIS-NN
adds an int32 bias in the accumulator's scale; each such bias is stored as int32 at scale
s_in x s_w[c] behind a ``dequantize_per_channel``, the form torchao's ``convert_pt2e`` gives and
the backend's passes fold (`int32_biases`).

How it is checked: ExecuTorch's runtime on x86 (the pybindings) registers no ``cortex_m``
kernel (they are CMSIS-NN built for the device; ExecuTorch's own tests run them on the
Corstone FVP). Where the runtime here registers every operator the file calls, the file is run
there; otherwise the program the file was serialized from (the edge program after the Cortex-M
passes) runs in Python with the ``cortex_m`` ops' reference implementations
(``executorch/backends/cortex_m/ops/operators.py``: integer accumulation and CMSIS-NN's
fixed-point requantization). `ExportResult.runtime` says which. Either way the written file is
read back and its memory plan and ops are measured from it (`read_plan`): the planned arena
(``non_const_buffer_sizes``), the constant (weight) bytes, the ``cortex_m`` ops and those left to
portable kernels, compared with the profile's budgets in `ExportResult.details`. A program over
a budget is still written, with ``fits: False`` in the details: the budgets are the
profile's reading of one board, and the measured figures are what a user needs to pick a larger
one; the planner already refuses plans whose weights exceed the weight budget.
"""

from __future__ import annotations

import copy
import importlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram

from fxcompress.errors import FxCompressError, upstream_failure
from fxcompress.export import (
    ExportResult,
    _clones,
    _compare,
    _require,
    _staged,
    has_quantized_activations,
    to_exported_program,
)
from fxcompress.graph import CONV_OPS, LINEAR_OPS, add_buffer
from fxcompress.hardware_profiles import Profile

#: The CPU the program is lowered for (`CortexMTargetConfig.from_target_string`): mcu-int8's
#: board is a Cortex-M7 (DSP extension, no MVE), so CMSIS-NN's DSP kernels and their scratch
#: sizes.
TARGET_CPU = "cortex-m7"
#: What makes the Cortex-M flow importable where it is not: ExecuTorch's Cortex-M passes import
#: its Arm backend, which imports ``tosa_serializer`` (executorch's ``ethos-u`` extra pins it).
INSTALL = "pip install tosa-tools==2026.5.0"
#: `ExportResult.runtime` of a check run in Python on the cortex_m reference kernels.
REFERENCE_RUNTIME = "cortex_m reference kernels (python)"

_qd = torch.ops.quantized_decomposed
_INT32 = torch.iinfo(torch.int32)


def _flow() -> dict[str, Any]:
    """ExecuTorch's Cortex-M flow, imported; `FxCompressError` with the fix where it cannot be."""
    _require("executorch.exir", "writing a Cortex-M .pte", "pip install 'fxcompress[executorch]'")
    names = {"config": "executorch.backends.cortex_m.edge_compile_config",
             "passes": "executorch.backends.cortex_m.passes.cortex_m_pass_manager",
             "target": "executorch.backends.cortex_m.target_config"}
    try:
        return {k: importlib.import_module(m) for k, m in names.items()}
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise FxCompressError(
            f"writing a Cortex-M .pte needs ExecuTorch's Cortex-M backend, which cannot be "
            f"imported here (it needs {missing!r}); install it: {INSTALL}. Or write the "
            "program as .pt2 (fxcompress.export(model, inputs, 'model.pt2'))") from None


def preflight() -> None:
    """Raise `FxCompressError` naming what to install where the Cortex-M flow cannot run."""
    _flow()


def runtime_note() -> str | None:
    """Why a Cortex-M ``.pte`` cannot be written or run (timed) on this host, or None where it
    can: the Cortex-M flow must import, and ExecuTorch's runtime here must register the
    ``cortex_m`` kernels (the x86 pybindings do not: they are CMSIS-NN for the device)."""
    try:
        _flow()
    except FxCompressError as e:
        return str(e)
    try:
        rt = importlib.import_module("executorch.runtime")
    except ImportError as e:
        return f"the ExecuTorch runtime cannot be imported here ({e})"
    if not any(op.startswith("cortex_m::")
               for op in rt.Runtime.get().operator_registry.operator_names):
        return ("ExecuTorch's runtime here has no cortex_m (CMSIS-NN) kernels: a Cortex-M "
                ".pte runs on the device (or the Corstone FVP), and is checked here on the "
                "cortex_m reference kernels, not timed")
    return None


def int32_biases(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` in which the float bias of every static int8 layer (a conv / linear whose
    input comes through ``dequantize_per_tensor`` and whose weight through
    ``dequantize_per_channel``) is stored as int32 at scale s_in x s_w[c] and dequantized per
    channel, as CMSIS-NN adds it in the accumulator; and how many biases were converted. `gm`
    is left as it is."""
    gm = copy.deepcopy(gm)
    converted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (*CONV_OPS, *LINEAR_OPS):
            continue
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if not (isinstance(x, fx.Node) and x.target == _qd.dequantize_per_tensor.default
                and isinstance(w, fx.Node) and w.target == _qd.dequantize_per_channel.default
                and isinstance(bias, fx.Node) and bias.op == "get_attr"):
            continue
        b = _attr(gm, bias.target)
        s_w = _attr(gm, w.args[1].target)
        scale = (float(x.args[1]) * s_w.double()).to(torch.float32)
        q = torch.round(b.double() / scale.double()).clamp(_INT32.min, _INT32.max)
        qn = add_buffer(gm, f"{bias.target}.int32", q.to(torch.int32), node)
        sn = add_buffer(gm, f"{bias.target}.int32_scale", scale, node)
        zn = add_buffer(gm, f"{bias.target}.int32_zero_point",
                        torch.zeros(scale.numel(), dtype=torch.int64), node)
        with gm.graph.inserting_before(node):
            dq = gm.graph.call_function(_qd.dequantize_per_channel.default,
                                        (qn, sn, zn, 0, _INT32.min, _INT32.max, torch.int32))
        node.args = (*node.args[:2], dq, *node.args[3:])
        converted += 1
    if converted:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm, converted


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def channels_last(inputs: tuple) -> tuple:
    """`inputs` with every 4-D tensor in channels_last memory format: the CMSIS-NN kernels
    read NHWC, and the program takes its inputs in the layout it was exported with."""
    return tuple(t.to(memory_format=torch.channels_last)
                 if isinstance(t, torch.Tensor) and t.dim() == 4 else t for t in inputs)


def lower_cortex_m(ep: ExportedProgram, cpu: str = TARGET_CPU):
    """The ExecuTorch `EdgeProgramManager` of `ep` after the Cortex-M passes for `cpu`
    (``"cortex-m7"``, ...): int8 layers as ``cortex_m::`` ops, the rest in the edge dialect."""
    flow = _flow()
    exir = _require("executorch.exir", "writing a Cortex-M .pte",
                    "pip install 'fxcompress[executorch]'")
    try:
        target = flow["target"].CortexMTargetConfig.from_target_string(cpu)
        edge = exir.to_edge_transform_and_lower(
            ep, compile_config=flow["config"].cortex_m_edge_compile_config())
        manager = flow["passes"].CortexMPassManager(edge.exported_program(),
                                                    target_config=target)
        # the flow ExecuTorch's Arm compiler uses: the passes rewrite the edge program in place
        # of a partitioner, and the manager's program replaces the forward method
        edge._edge_programs["forward"] = manager.transform()
    except FxCompressError:
        raise
    except Exception as e:
        raise upstream_failure("ExecuTorch's Cortex-M lowering", ".pte", e) from e
    return edge


def _serialize(edge) -> bytes:
    exir = importlib.import_module("executorch.exir")
    try:
        config = exir.ExecutorchBackendConfig(extract_delegate_segments=False)
        return bytes(edge.to_executorch(config).buffer)
    except Exception as e:
        raise upstream_failure("ExecuTorch's serialization (Cortex-M)", ".pte", e) from e


@dataclass
class PlannedProgram:
    """What a serialized ExecuTorch program holds, read from its bytes (`read_plan`)."""

    activation_bytes: int  # the planned arena: sum of the plan's non_const_buffer_sizes
    weight_bytes: int  # bytes of the distinct constant tensors the program reads
    constant_data_bytes: int  # the file's constant data, alignment padding included
    ops: Counter = field(default_factory=Counter)  # kernel calls by "namespace::op.overload"

    def count(self, namespace: str) -> dict[str, int]:
        """The kernel calls of ops in `namespace` (e.g. ``"cortex_m"``), by op."""
        return {k: v for k, v in self.ops.items() if k.startswith(namespace + "::")}

    def others(self, namespace: str) -> dict[str, int]:
        """The kernel calls of ops outside `namespace`, by op."""
        return {k: v for k, v in self.ops.items() if not k.startswith(namespace + "::")}


def read_plan(data: bytes) -> PlannedProgram:
    """Memory plan, constant bytes and kernel calls of the ``forward`` method of the
    serialized ExecuTorch program `data` (the bytes of a ``.pte``)."""
    ser = importlib.import_module("executorch.exir._serialize._program")
    schema = importlib.import_module("executorch.exir.schema")
    program = ser.deserialize_pte_binary(data).program
    plan = next(p for p in program.execution_plan if p.name == "forward")
    scalar_type_enum = importlib.import_module("executorch.exir.tensor").scalar_type_enum
    sizes = {scalar_type_enum(d): d.itemsize
             for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
                       torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)}
    constants: dict[int, int] = {}
    for value in plan.values:
        t = value.val
        if isinstance(t, schema.Tensor) and t.data_buffer_idx > 0:
            numel = 1
            for s in t.sizes:
                numel *= int(s)
            constants[t.data_buffer_idx] = max(constants.get(t.data_buffer_idx, 0),
                                               numel * sizes[t.scalar_type])
    ops: Counter = Counter()
    for chain in plan.chains:
        for ins in chain.instructions:
            if isinstance(ins.instr_args, schema.KernelCall):
                op = plan.operators[ins.instr_args.op_index]
                ops[f"{op.name}.{op.overload}" if op.overload else op.name] += 1
    return PlannedProgram(
        activation_bytes=int(sum(plan.non_const_buffer_sizes)),
        weight_bytes=sum(constants.values()),
        constant_data_bytes=sum(len(b.storage) for b in program.constant_buffer),
        ops=ops)


def _registered_here(ops: Counter) -> bool:
    """Whether ExecuTorch's runtime here registers every operator in `ops`."""
    rt = _require("executorch.runtime", "checking a .pte", "pip install 'fxcompress[executorch]'")
    names = set(rt.Runtime.get().operator_registry.operator_names)
    return all(op in names for op in ops)


def _fits(measured: int, budget: int | None) -> bool | None:
    return None if budget is None else measured <= budget


def write_cortex_m(gm: torch.nn.Module, example_inputs: tuple, path: Path, report,
                   expected, tol: float, prof: Profile,
                   program: ExportedProgram | None = None) -> ExportResult:
    """Write `gm` as a Cortex-M ``.pte`` (ExecuTorch's Cortex-M / CMSIS-NN flow, for
    `TARGET_CPU`) at `path`, checked against `expected` (its outputs on `example_inputs`)
    within `tol`. A model without int8 layers (the original, for a baseline) is written too,
    all on portable kernels (``cortex_m_ops`` empty). `program` (the program compile kept) is
    not used: the layers' biases are rewritten to int32 first and the program is exported
    afresh. `ExportResult.details` holds
    the planned activation arena and weight bytes read from the file, `prof`'s budgets and
    whether they fit, and the ``cortex_m`` ops against those left to portable kernels."""
    del report, program  # the program is exported afresh from the int32-bias graph
    _flow()
    inputs = channels_last(_clones(example_inputs))
    graph, biases = int32_biases(gm) if isinstance(gm, fx.GraphModule) else (gm, 0)
    ep, _ = to_exported_program(graph, inputs, dynamic_batch=False)
    edge = lower_cortex_m(ep)
    data = _serialize(edge)
    with _staged(path) as tmp:
        tmp.write_bytes(data)
        planned = read_plan(tmp.read_bytes())
        if _registered_here(planned.ops):
            from fxcompress.export.pte import PteProgram

            got, runtime = PteProgram(tmp)(*inputs), "executorch"
        else:
            with torch.no_grad():
                got = edge.exported_program().module()(*_clones(inputs))
            runtime = REFERENCE_RUNTIME
        err = _compare(got, expected, tol, ".pte", runtime)
        size = tmp.stat().st_size
    kernels = planned.count("cortex_m")
    portable = planned.others("cortex_m")
    details = {
        "target_cpu": TARGET_CPU,
        "input_layout": "channels_last (NHWC) for 4-D inputs",
        "check": ("the .pte in ExecuTorch's runtime here" if runtime == "executorch" else
                  "ExecuTorch's runtime here has no cortex_m kernels: the edge program the "
                  "file was serialized from, run with the cortex_m reference kernels"),
        "activation_bytes": planned.activation_bytes,
        "weight_bytes": planned.weight_bytes,
        "constant_data_bytes": planned.constant_data_bytes,
        "activation_budget_bytes": prof.activation_budget_bytes,
        "weight_budget_bytes": prof.weight_budget_bytes,
        "activation_fits": _fits(planned.activation_bytes, prof.activation_budget_bytes),
        "weight_fits": _fits(planned.constant_data_bytes, prof.weight_budget_bytes),
        "cortex_m_ops": kernels,
        "portable_ops": portable,
        "int32_biases": biases,
        "int8_activations": has_quantized_activations(gm),
    }
    details["fits"] = details["activation_fits"] is not False \
        and details["weight_fits"] is not False
    return ExportResult(path, ".pte", size, err, runtime, details=details)
