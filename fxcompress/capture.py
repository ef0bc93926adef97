"""Capture: any accepted model becomes one ATen-level FX `GraphModule` (DESIGN §3).

`torch.export` (non-strict) of an `nn.Module` gives an `ExportedProgram`; `ep.module()` is the IR
every pass rewrites. An `ExportedProgram` is used as it is; a `torch.fx.GraphModule` from
`symbolic_trace` is an `nn.Module`, so exporting it normalizes it into the same IR. Dim 0 of every
tensor input is captured as dynamic unless the user passes `dynamic_shapes`; where the model
cannot be captured with a dynamic batch it is captured static and the reason is kept.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram

from fxcompress.errors import FxCompressError


@dataclass
class Captured:
    """The captured graph and what the capture learned on the way."""

    graph_module: fx.GraphModule
    example_inputs: tuple
    dynamic_shapes: object  # what was handed to torch.export (None: static)
    dynamic_batch: bool  # whether dim 0 is dynamic in the captured graph
    note: str  # why the batch is static, when it is


def _batch_dims(inputs: tuple) -> tuple:
    return tuple({0: Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                 for x in inputs)


def _widen_batch(inputs: tuple) -> tuple:
    """Inputs whose batch is 1 repeated to 2: export specializes a dimension of size 1, so a
    batch of 1 could never be captured as dynamic."""
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0
                 and x.shape[0] == 1 else x for x in inputs)


def _export(model: nn.Module, inputs: tuple, dynamic_shapes) -> ExportedProgram:
    return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)


def inference_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """`ep.module()` makes `eval()` and `train()` raise NotImplementedError; user code calls
    `model.eval()` all the time. The captured graph is already in inference form (batch norm
    uses running statistics, dropout is gone), so `eval()` is a no-op, and `train()` says why
    it cannot switch and what to use instead."""

    def _eval(self):
        return self

    def _train(self, mode: bool = True):
        if mode:
            raise FxCompressError(
                "a compiled fxcompress graph is captured for inference: train() cannot switch "
                "batch norm or dropout back to training behaviour; fine-tune the original "
                "model before compiling, or pass recover= to fxcompress.compile")
        return self

    nn.Module.train(gm, False)  # report eval mode, so code that saves and restores it works
    gm.eval = types.MethodType(_eval, gm)
    gm.train = types.MethodType(_train, gm)
    return gm


def _describe_failure(e: Exception) -> str:
    text = str(e).strip().splitlines()
    head = next((line for line in text if line.strip()), type(e).__name__)
    return f"{type(e).__name__}: {head[:300]}"


def check_inputs(example_inputs) -> tuple:
    """`example_inputs` as a tuple, or the user error saying what to pass."""
    if example_inputs is None:
        raise FxCompressError("example_inputs is required for an nn.Module; pass a tuple of "
                              "positional inputs, e.g. compile(model, (x,))")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise FxCompressError(f"example_inputs must be a tuple of inputs, not "
                              f"{type(example_inputs).__name__}; wrap it: (x,)")
    return example_inputs


def capture(model, example_inputs=None, dynamic_shapes=None) -> Captured:
    """Capture `model` (an `nn.Module`, `ExportedProgram` or `GraphModule`) as the ATen-level
    IR. The model is deep-copied first, so nothing the passes do reaches the user's model."""
    if isinstance(model, ExportedProgram):
        ep = copy.deepcopy(model)
        if example_inputs is None:
            args = ep.example_inputs[0] if ep.example_inputs else None
            if args is None:
                raise FxCompressError("this ExportedProgram carries no example inputs; pass "
                                      "example_inputs=(x,)")
            example_inputs = tuple(args)
        example_inputs = check_inputs(example_inputs)
        gm = ep.module()
        dynamic = any(not isinstance(s, int) for s in _input_batch_sizes(ep))
        return Captured(inference_graph(gm), example_inputs, None, dynamic,
                        "" if dynamic else "the ExportedProgram was captured with a static batch")
    if not isinstance(model, nn.Module):
        raise FxCompressError(f"model must be an nn.Module, a torch.export.ExportedProgram or a "
                              f"torch.fx.GraphModule, not {type(model).__name__}")
    example_inputs = check_inputs(example_inputs)
    model = copy.deepcopy(model).eval()
    if isinstance(model, fx.GraphModule):
        _check_not_aten(model)
    if dynamic_shapes is not None:
        try:
            ep = _export(model, example_inputs, dynamic_shapes)
        except Exception as e:
            raise FxCompressError(
                f"torch.export could not capture the model with the dynamic_shapes given "
                f"({_describe_failure(e)}); fix dynamic_shapes or leave it None") from e
        return Captured(inference_graph(ep.module()), example_inputs, dynamic_shapes, True, "")
    widened = _widen_batch(example_inputs)
    try:
        ep = _export(model, widened, _batch_dims(widened))
        dynamic = any(not isinstance(s, int) for s in _input_batch_sizes(ep))
        note = "" if dynamic else "the model fixes its batch size (export specialized dim 0)"
        return Captured(inference_graph(ep.module()), example_inputs,
                        _batch_dims(widened) if dynamic else None,
                        dynamic, note)
    except Exception as dyn_error:
        try:
            ep = _export(model, example_inputs, None)
        except Exception as e:
            raise FxCompressError(
                f"torch.export could not capture the model ({_describe_failure(e)}). Make the "
                "failing construct traceable (data-dependent Python control flow, unsupported "
                "ops, non-tensor outputs), or pass an ExportedProgram you exported yourself"
            ) from e
        return Captured(inference_graph(ep.module()), example_inputs, None, False,
                        f"captured with a static batch: {_describe_failure(dyn_error)}")


def _input_batch_sizes(ep: ExportedProgram) -> list:
    """Dim 0 of each tensor input: an int where export specialized it, else its symbol."""
    free = {str(sym) for sym in ep.range_constraints}
    sizes = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name != "USER_INPUT":
            continue
        node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0:
            d = val.shape[0]
            dynamic = isinstance(d, torch.SymInt) and str(d.node.expr) in free
            sizes.append(d if dynamic else int(d))
    return sizes


def _check_not_aten(gm: fx.GraphModule) -> None:
    """A GraphModule from symbolic_trace runs as an nn.Module, so export normalizes it; nothing
    to check beyond that it is runnable."""
    if not hasattr(gm, "forward"):
        raise FxCompressError("the GraphModule has no forward; recompile it (gm.recompile())")
