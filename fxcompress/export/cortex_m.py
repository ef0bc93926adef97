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
`CortexMPassManager` for the target CPU (`TARGET_CPU`), `to_executorch`. Three steps before it
are fxcompress's own, because the compiled graph is not the one ExecuTorch's Cortex-M
quantizer would have made (`cmsis_form`, `annotate_int8_layers`):

- the compiled graph keeps a float bias beside each int8 layer, while CMSIS-NN adds an int32
  bias in the accumulator's scale: each such bias is stored as int32 at scale s_in x s_w[c]
  behind a ``dequantize_per_channel``, the form torchao's ``convert_pt2e`` gives;
- its linears have per-channel int8 weights, and ``cortex_m::quantized_linear`` is CMSIS-NN's
  per-tensor ``arm_fully_connected_s8`` (one requantization multiplier): each becomes a 1x1
  ``cortex_m::quantized_conv2d`` over its rows, which takes one multiplier per channel and
  runs as CMSIS-NN's 1x1 convolution, the same integer arithmetic (two small NHWC copies of
  the row vector around it);
- the backend's passes only fold the Q/DQ of nodes its quantizer marked
  (``ArmAnnotationInfo``): the static int8 layers are marked, and so is a ReLU right behind
  one when its quantize has its zero point at its minimum, which ExecuTorch's
  ``ActivationFusionPass`` then folds into the layer's output clamp: the layer requantizes
  once, to the ReLU's scale, where the compiled graph rounds at the layer's scale first (at
  most a step apart; the check measures it). Nothing else is marked, so a float batch norm
  or max-pool between int8 layers stays float, on portable kernels, with the
  ``cortex_m::dequantize_per_tensor`` / ``quantize_per_tensor`` around it.

After the Cortex-M passes, every layer weight whose codes fit 4 bits (mcu-int8's `[int8]
packed_bits`) is stored packed two per byte and unpacked to int8 by portable kernels right
before its CMSIS-NN call (`pack_int4_weights`): the kernels read int8 only. The packed codes
are flash; the unpacked weight is planned into the arena, one slice at a time for a layer the
int8 pass built in slices of output channels.

How it is checked: ExecuTorch's runtime on x86 (the pybindings) registers no ``cortex_m``
kernel (they are CMSIS-NN built for the device; ExecuTorch's own tests run them on the
Corstone FVP). Where the runtime here registers every operator the file calls, the file is run
there; otherwise the program the file was serialized from (the edge program after the Cortex-M
passes, before ``to_executorch`` turns its ops into out-variants, which only the device
implements) runs in Python with the ``cortex_m`` ops' reference implementations
(``executorch/backends/cortex_m/ops/operators.py``: integer accumulation and CMSIS-NN's
fixed-point requantization; the way ExecuTorch's own ``CortexMTester.test_dialect`` checks
them). `ExportResult.runtime` says which. Either way the written file is read back and
measured (`read_plan`): the planned arena (``non_const_buffer_sizes``), the constant (weight)
bytes, the ``cortex_m`` ops and those left to portable kernels, compared with the profile's
budgets in `ExportResult.details`; and every ``cortex_m`` convolution's input and output must
be NHWC in the file, as the kernels check on the device (else nothing is written). A program over
a budget is still written, with ``fits: False`` in the details: the budgets are the
profile's reading of one board, and the measured figures are what a user needs to pick a larger
one; the planner already refuses plans whose weights exceed the weight budget.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.passes.shape_prop import ShapeProp

from fxcompress.errors import FxCompressError, InternalError, upstream_failure
from fxcompress.export import (
    ExportResult,
    _clones,
    _compare,
    _require,
    _staged,
    has_quantized_activations,
    nbits,
    to_exported_program,
)
from fxcompress.graph import CONV_OPS, LINEAR_OPS, add_buffer, drop_unused_attrs
from fxcompress.hardware_profiles import Profile

#: The CPU the program is lowered for (`CortexMTargetConfig.from_target_string`): mcu-int8's
#: board is a Cortex-M7 (DSP extension, no MVE), so CMSIS-NN's DSP kernels and their scratch
#: sizes.
TARGET_CPU = "cortex-m7"
#: What makes the Cortex-M flow importable where it is not: ExecuTorch's Cortex-M passes import
#: its Arm backend, which imports ``tosa_serializer`` (executorch's ``ethos-u`` extra pins it).
#: Without its dependencies: it pins numpy<2.2 and exact flatbuffers / jsonschema / ml-dtypes,
#: which would move torch's; the part imported here works with the ones torch brings.
INSTALL = "pip install --no-deps tosa-tools==2026.5.0"
#: `ExportResult.runtime` of a check run in Python on the cortex_m reference kernels.
REFERENCE_RUNTIME = "cortex_m reference kernels (python)"
#: The dim order of an NHWC (channels_last) 4-D tensor, which CMSIS-NN's convolutions read.
NHWC = [0, 2, 3, 1]

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


_Q = _qd.quantize_per_tensor.default
_DQ = _qd.dequantize_per_tensor.default
_DQC = _qd.dequantize_per_channel.default
_aten = torch.ops.aten


def _is(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _only_user(node: fx.Node | None) -> fx.Node | None:
    users = list(node.users) if node is not None else []
    return users[0] if len(users) == 1 else None


def _layer_output(node: fx.Node) -> fx.Node | None:
    """The output ``quantize_per_tensor`` of `node` where it is a static int8 convolution or
    linear (input through ``dequantize_per_tensor``, weight through a dequantize, bias absent
    or through a dequantize, its one user a quantize); else None. Works on a compiled graph
    and on the exported program of one alike."""
    if node.op != "call_function" or node.target not in (*CONV_OPS, *LINEAR_OPS):
        return None
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not (_is(x, _DQ) and _is(w, _DQ, _DQC)):
        return None
    if bias is not None and not (_is(bias, _DQ, _DQC) or
                                 (isinstance(bias, fx.Node) and bias.op == "get_attr")):
        return None
    q = _only_user(node)
    return q if _is(q, _Q) else None


def _fused_relu(q: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(relu, its quantize)`` where the int8 layer whose output quantize is `q` is followed
    by a ReLU that CMSIS-NN applies as the layer's output clamp (``q -> dequantize -> relu ->
    quantize``, that quantize's zero point its minimum, so 0 is the lowest value it holds:
    what ExecuTorch's ``ActivationFusionPass`` accepts); else None."""
    dq = _only_user(q)
    relu = _only_user(dq) if _is(dq, _DQ) else None
    q2 = _only_user(relu) if _is(relu, _aten.relu.default) else None
    if _is(q2, _Q) and len(q2.args) >= 4 and q2.args[2] == q2.args[3]:
        return relu, q2
    return None


def cmsis_form(gm: fx.GraphModule, example_inputs: tuple) -> tuple[fx.GraphModule, dict]:
    """A copy of `gm` whose static int8 layers have the form CMSIS-NN's kernels compute, and
    what was changed (counts by kind). `gm` is left as it is.

    - Each layer's float bias is stored as int32 at scale s_in x s_w[c] behind a
      ``dequantize_per_channel`` (CMSIS-NN adds it in the int32 accumulator; the form
      torchao's ``convert_pt2e`` gives), within half a step of the float bias.
    - Each linear with per-channel int8 weights becomes a 1x1 convolution over its rows
      (``[rows, K] -> [rows, K, 1, 1]`` in channels_last, which is the same bytes): ExecuTorch's
      ``cortex_m::quantized_linear`` takes one requantization multiplier per layer (it is
      CMSIS-NN's per-tensor ``arm_fully_connected_s8``), while ``cortex_m::quantized_conv2d``
      takes one per output channel and CMSIS-NN runs a 1x1 convolution as the per-channel
      matrix product it is (``arm_convolve_1x1_s8_fast``). The int8 weights and scales are
      the same numbers, so the arithmetic is the compiled model's."""
    gm = copy.deepcopy(gm)
    ShapeProp(gm).propagate(*_clones(example_inputs))
    stats = {"int32_biases": 0, "linears_as_1x1_conv": 0}
    for node in list(gm.graph.nodes):
        if _layer_output(node) is None:
            continue
        stats["int32_biases"] += _int32_bias(gm, node)
        if node.target in LINEAR_OPS and _is(node.args[1], _DQC):
            _linear_as_conv(gm, node)
            stats["linears_as_1x1_conv"] += 1
    if any(stats.values()):
        drop_unused_attrs(gm)  # the float biases and 2-D weights replaced above
        gm.recompile()
    return gm, stats


def _int32_bias(gm: fx.GraphModule, node: fx.Node) -> int:
    """Store the float bias of int8 layer `node` as int32 (see `cmsis_form`); 1 if it did."""
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not (_is(w, _DQC) and isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return 0
    b = _attr(gm, bias.target)
    s_w = _attr(gm, w.args[1].target)
    scale = (float(x.args[1]) * s_w.double()).to(torch.float32)
    q = torch.round(b.double() / scale.double()).clamp(_INT32.min, _INT32.max)
    qn = add_buffer(gm, f"{bias.target}.int32", q.to(torch.int32), node)
    sn = add_buffer(gm, f"{bias.target}.int32_scale", scale, node)
    zn = add_buffer(gm, f"{bias.target}.int32_zero_point",
                    torch.zeros(scale.numel(), dtype=torch.int64), node)
    with gm.graph.inserting_before(node):
        dq = gm.graph.call_function(_DQC, (qn, sn, zn, 0, _INT32.min, _INT32.max, torch.int32))
    node.args = (*node.args[:2], dq, *node.args[3:])
    return 1


def _linear_as_conv(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace int8 linear `node` by a 1x1 convolution over its rows (see `cmsis_form`)."""
    g = gm.graph
    x_dq, w_dq = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    w = _attr(gm, w_dq.args[0].target)
    out_ch, k = w.shape
    lead = list(x_dq.meta["tensor_meta"].shape[:-1])
    rows = math.prod(lead)
    w4 = add_buffer(gm, f"{w_dq.args[0].target}_1x1", w.reshape(out_ch, k, 1, 1), node)
    with g.inserting_before(node):
        x4 = g.call_function(_aten.reshape.default, (x_dq.args[0], [rows, k, 1, 1]))
        x4 = g.call_function(_aten.clone.default, (x4,),
                             {"memory_format": torch.channels_last})
        conv = g.call_function(_aten.conv2d.default, (
            g.call_function(_DQ, (x4, *x_dq.args[1:])),
            g.call_function(_DQC, (w4, *w_dq.args[1:])), bias))
    q = _only_user(node)
    q.replace_input_with(node, conv)
    g.erase_node(node)
    # back to the linear's shape after the layer's quantize, or after the ReLU CMSIS-NN fuses
    # into it, so that the fusion sees the ReLU right behind the convolution
    end = (_fused_relu(q) or (None, q))[1]
    with g.inserting_after(end):
        flat = g.call_function(_aten.clone.default, (end,),
                               {"memory_format": torch.contiguous_format})
    with g.inserting_after(flat):
        y = g.call_function(_aten.reshape.default, (flat, [*lead, out_ch]))
    end.replace_all_uses_with(y, delete_user_cb=lambda user: user is not flat)


def annotate_int8_layers(ep: ExportedProgram) -> int:
    """Mark the static int8 layers of `ep` (and the ReLUs fused into them) as quantized, as
    ExecuTorch's Arm / Cortex-M quantizer does (``ArmAnnotationInfo``): only marked nodes take
    their Q/DQ parameters in ``FoldAndAnnotateQParamsPass`` and become ``cortex_m`` ops; the
    rest (a float batch norm, a max-pool of float values) stays on portable kernels. Returns
    how many layers were marked."""
    info = importlib.import_module("executorch.backends.arm.common.annotation_meta")
    mark = info.ArmAnnotationInfo(quantized=True)
    key = info.ArmAnnotationInfo.CUSTOM_META_KEY
    layers = 0
    for node in ep.graph.nodes:
        q = _layer_output(node)
        if q is None:
            continue
        fused = _fused_relu(q)
        for n in (node, *(fused[:1] if fused else ())):
            n.meta.setdefault("custom", {})[key] = dict(mark)
        layers += 1
    return layers


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def channels_last(inputs: tuple) -> tuple:
    """`inputs` with every 4-D tensor of more than one channel in channels_last memory
    format: the CMSIS-NN kernels read NHWC, and the program takes its inputs in the layout it
    was exported with. One channel is NHWC in either layout, and is left contiguous: its
    channels_last strides read as dim_order (0, 2, 1, 3) in ExecuTorch, which no kernel
    accepts."""
    return tuple(t.to(memory_format=torch.channels_last)
                 if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] > 1 else t
                 for t in inputs)


def lower_cortex_m(ep: ExportedProgram, cpu: str = TARGET_CPU) -> tuple[Any, dict[str, int]]:
    """The ExecuTorch `EdgeProgramManager` of `ep` after the Cortex-M passes for `cpu`
    (``"cortex-m7"``, ...): int8 layers as ``cortex_m::`` ops, the rest in the edge dialect,
    4-bit codes packed (`pack_int4_weights`); and what `pack_int4_weights` packed."""
    flow = _flow()
    exir = _require("executorch.exir", "writing a Cortex-M .pte",
                    "pip install 'fxcompress[executorch]'")
    try:
        target = flow["target"].CortexMTargetConfig.from_target_string(cpu)
        annotate_int8_layers(ep)
        edge = exir.to_edge_transform_and_lower(
            ep, compile_config=flow["config"].cortex_m_edge_compile_config())
        manager = flow["passes"].CortexMPassManager(edge.exported_program(),
                                                    target_config=target)
        # the flow ExecuTorch's Arm compiler uses: the passes rewrite the edge program in place
        # of a partitioner, and the manager's program replaces the forward method
        program = manager.transform()
        packed = pack_int4_weights(program)
        edge._edge_programs["forward"] = _drop_unread_constants(program)
    except FxCompressError:
        raise
    except Exception as e:
        raise upstream_failure("ExecuTorch's Cortex-M lowering", ".pte", e) from e
    return edge, packed


#: the ``cortex_m`` ops whose second argument is an int8 weight the kernel reads as raw bytes
_WEIGHT_OPS = ("quantized_conv2d", "quantized_conv2d_nhwc", "quantized_depthwise_conv2d",
               "quantized_depthwise_conv2d_nhwc", "quantized_linear",
               "quantized_transpose_conv2d", "quantized_transpose_conv2d_nhwc")


def pack_int4_weights(ep: ExportedProgram) -> dict[str, int]:
    """Store every ``cortex_m`` layer weight whose int8 codes all lie in [-8, 7] (an int8
    layer compiled with 4-bit codes, `[int8] packed_bits`) packed two per byte
    (`nbits.pack_codes`), unpacked to the int8 tensor the kernel reads by portable kernels
    right before the layer (`nbits.unpack_codes`): CMSIS-NN's kernels as ExecuTorch wraps
    them read int8 weights only. The packed codes are constant data (flash); the unpacked
    weight and the unpacking's intermediates are planned into the arena (RAM). `ep` (an edge
    program after the Cortex-M passes) is changed in place; the int8 weights it no longer
    reads are left for `_drop_unread_constants`. Returns the layers packed and their codes."""
    ops_mod = importlib.import_module("executorch.exir.dialects._ops").ops
    utils = importlib.import_module("executorch.backends.transforms.utils")
    edge = ops_mod.edge
    targets = {getattr(edge.cortex_m, name).default for name in _WEIGHT_OPS
               if hasattr(edge.cortex_m, name)}
    ops = {"and": edge.aten.bitwise_and.Scalar, "high": edge.aten.div.Scalar_mode,
           "cat": edge.aten.cat.default,
           "slice": edge.aten.slice_copy.Tensor, "sub": edge.aten.sub.Scalar,
           "view": edge.aten.view_copy.default}
    to_int8 = edge.dim_order_ops._to_dim_order_copy.default
    g = ep.graph
    stats = {"int4_packed_layers": 0, "int4_codes": 0}

    def made(target, args, kwargs=None):
        node = g.call_function(target, args, kwargs or {})
        node.meta["val"] = target(*fx.node.map_arg(args, lambda a: a.meta["val"]),
                                  **(kwargs or {}))
        return node

    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        w = node.args[1]
        t = utils.get_param_tensor(ep, w) if isinstance(w, fx.Node) \
            and w.op == "placeholder" else None
        if t is None or t.dtype != torch.int8 or t.numel() < 2 \
                or int(t.min()) < -8 or int(t.max()) > 7:
            continue
        with g.inserting_after(w):
            packed = utils.create_constant_placeholder(
                ep, g, f"{w.name}_int4", InputKind.PARAMETER, nbits.pack_codes(t.contiguous()))
        with g.inserting_before(node):
            q = nbits.unpack_codes(lambda k, a, kw=None: made(ops[k], a, kw), packed,
                                   tuple(t.shape),
                                   lambda u: made(to_int8, (u,), {"dtype": torch.int8}))
        node.replace_input_with(w, q)
        stats["int4_packed_layers"] += 1
        stats["int4_codes"] += t.numel()
    if stats["int4_packed_layers"]:
        ep.graph_module.recompile()
    return stats


def _drop_unread_constants(ep: ExportedProgram) -> ExportedProgram:
    """`ep` without the constants no node reads any more: the OIHW weights the Cortex-M passes
    replaced by NHWC copies, the scales they turned into requantization multipliers. Else
    the file would carry both (ExecuTorch's ``remove_unused_parameters_pass`` removes only
    parameters, and the compiled model's int8 weights are buffers)."""
    kinds = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    signature = copy.deepcopy(ep.graph_signature)
    for spec in list(signature.input_specs):
        node = nodes.get(spec.arg.name)
        if spec.kind not in kinds or node is None or node.users or spec.target in mutated:
            continue
        signature.input_specs.remove(spec)
        ep.state_dict.pop(spec.target, None)
        ep.constants.pop(spec.target, None)
        ep.graph.erase_node(node)
    ep._graph_signature = signature
    ep.graph_module.recompile()
    return ep


def _run_reference(edge, inputs: tuple):
    """Outputs of `edge`'s forward program (after the Cortex-M passes, before serialization)
    on `inputs`, the ``cortex_m`` ops run by their reference implementations."""
    # registers the reference (CompositeExplicitAutograd) kernels of the cortex_m ops
    importlib.import_module("executorch.backends.cortex_m.ops.operators")
    try:
        with torch.no_grad():
            return edge.exported_program().module()(*_clones(inputs))
    except Exception as e:
        raise upstream_failure("the cortex_m reference kernels", ".pte", e) from e


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
    # convolution tensors whose layout CMSIS-NN's kernels refuse (see `read_plan`)
    layout_errors: list[str] = field(default_factory=list)

    def count(self, namespace: str) -> dict[str, int]:
        """The kernel calls of ops in `namespace` (e.g. ``"cortex_m"``), by op."""
        return {k: v for k, v in self.ops.items() if k.startswith(namespace + "::")}

    def others(self, namespace: str) -> dict[str, int]:
        """The kernel calls of ops outside `namespace`, by op."""
        return {k: v for k, v in self.ops.items() if not k.startswith(namespace + "::")}


def read_plan(data: bytes) -> PlannedProgram:
    """Memory plan, constant bytes and kernel calls of the ``forward`` method of the
    serialized ExecuTorch program `data` (the bytes of a ``.pte``), and the layouts its
    kernels refuse: a 4-D tensor neither in the default dim order nor NHWC (0, 2, 3, 1), as
    every kernel checks, or one a ``cortex_m`` convolution reads or writes that is not NHWC
    though it has more than one channel (``quantized_conv2d_out`` checks it; one channel is
    NHWC whatever the order says)."""
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
    layout_errors: list[str] = []
    for chain in plan.chains:
        for ins in chain.instructions:
            if not isinstance(ins.instr_args, schema.KernelCall):
                continue
            op = plan.operators[ins.instr_args.op_index]
            ops[f"{op.name}.{op.overload}" if op.overload else op.name] += 1
            layout_errors += _layout_errors(op.name, [plan.values[i].val
                                                      for i in ins.instr_args.args], schema)
    return PlannedProgram(
        activation_bytes=int(sum(plan.non_const_buffer_sizes)),
        weight_bytes=sum(constants.values()),
        constant_data_bytes=sum(len(b.storage) for b in program.constant_buffer),
        ops=ops, layout_errors=layout_errors)


def _layout_errors(op: str, args: list, schema) -> list[str]:
    """What the kernel of `op` refuses among its serialized `args`: a 4-D tensor neither in
    the default dim order nor NHWC (except a constant a ``cortex_m`` kernel reads as raw
    bytes, e.g. its OHWI weights), and for a ``cortex_m`` convolution an input or output of
    more than one channel that is not NHWC."""
    errors = []
    tensors = [(i, t) for i, t in enumerate(args)
               if isinstance(t, schema.Tensor) and len(t.sizes) == 4]
    for i, t in tensors:
        order = list(t.dim_order)
        constant = t.data_buffer_idx > 0
        if order not in ([0, 1, 2, 3], NHWC) and not (constant and op.startswith("cortex_m::")):
            errors.append(f"{op} reads a tensor {list(t.sizes)} with dim_order {order}, "
                          "neither the default nor NHWC")
        in_out = i == 0 or i == len(args) - 1  # the input first, the out tensor last
        if ("conv" in op and op.startswith("cortex_m::") and in_out and int(t.sizes[1]) > 1
                and order != NHWC):
            errors.append(f"{op} reads or writes {list(t.sizes)} with dim_order {order}, "
                          f"not NHWC {NHWC}")
    return errors


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
    not used: the graph is put in CMSIS-NN's form first (`cmsis_form`) and exported afresh.
    `ExportResult.details` holds the planned activation arena and weight bytes read from the
    file, `prof`'s budgets and whether they fit, the ``cortex_m`` ops against those left to
    portable kernels, and how many int8 layers there were and what `cmsis_form` changed."""
    del report, program  # the program is exported afresh from the graph in CMSIS-NN's form
    _flow()
    inputs = channels_last(_clones(example_inputs))
    graph, changes = (cmsis_form(gm, inputs) if isinstance(gm, fx.GraphModule)
                      else (gm, {"int32_biases": 0, "linears_as_1x1_conv": 0}))
    ep, _ = to_exported_program(graph, inputs, dynamic_batch=False)
    layers = sum(_layer_output(n) is not None for n in ep.graph.nodes)
    edge, packed = lower_cortex_m(ep)
    # the program after the Cortex-M passes, run with the cortex_m ops' reference kernels
    # before serialization turns them into out-variants, which have no kernel but the device's
    reference = _run_reference(edge, inputs)
    data = _serialize(edge)
    with _staged(path) as tmp:
        tmp.write_bytes(data)
        planned = read_plan(tmp.read_bytes())
        if planned.layout_errors:
            raise InternalError("the Cortex-M program would be refused by CMSIS-NN on the "
                                "device: " + "; ".join(planned.layout_errors))
        if _registered_here(planned.ops):
            from fxcompress.export.pte import PteProgram

            got, runtime = PteProgram(tmp)(*inputs), "executorch"
        else:
            got, runtime = reference, REFERENCE_RUNTIME
        err = _compare(got, expected, tol, ".pte", runtime)
        size = tmp.stat().st_size
    kernels = planned.count("cortex_m")
    portable = planned.others("cortex_m")
    details = {
        "target_cpu": TARGET_CPU,
        "input_layout": "channels_last (NHWC) for 4-D inputs of more than one channel",
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
        "int8_layers": layers,
        **changes,
        **packed,
        "int8_activations": has_quantized_activations(gm),
    }
    details["fits"] = details["activation_fits"] is not False \
        and details["weight_fits"] is not False
    return ExportResult(path, ".pte", size, err, runtime, details=details)
