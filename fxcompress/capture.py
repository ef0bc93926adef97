"""Capture: any accepted model becomes one ATen-level FX `GraphModule`.

`torch.export` (non-strict) of an `nn.Module` gives an `ExportedProgram`; `ep.module()` is the IR
every pass rewrites. An `ExportedProgram` is used as it is; a `torch.fx.GraphModule` from
`symbolic_trace` is an `nn.Module`, so exporting it normalizes it into the same IR. Dim 0 of every
tensor input is captured as dynamic unless the user passes `dynamic_shapes`; where the model
cannot be captured with a dynamic batch it is captured static and the reason is kept.

Before anything is traced, the model is checked for what fxcompress cannot compress (a model
already quantized by torch.ao, weights that are not float32, a forward that takes keyword-only
inputs); right after capture, its weights are checked for NaN and infinity. Each is refused
with an `FxCompressError` naming the fix, instead of failing somewhere deep in the planner.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram

from fxcompress.calibration import check_example_finite
from fxcompress.errors import FxCompressError
from fxcompress.graph import drop_unused_attrs, linear_from_matmul

#: `torch.export` keeps process-wide state (the tracing mode stack, the symbolic-shape
#: environment), so two captures in two threads corrupt each other. Every compile and every
#: export holds this lock: in one process they run one at a time. Reentrant, so a compile
#: that captures or exports inside it (or an `evaluate=` that exports) does not deadlock.
EXPORT_LOCK = threading.RLock()
_HANDED_OVER = threading.local()


@contextlib.contextmanager
def handed_over() -> Iterator[None]:
    """Within it, this thread's captures take the module they are given as their own instead
    of deep-copying it: its parameter tensors become the captured graph's, and a pass may
    rewrite them. For a caller that made the module for the compile and reads nothing of it
    afterwards (`fxcompress.blocks`: one block's weights, which a copy would double)."""
    before = getattr(_HANDED_OVER, "on", False)
    _HANDED_OVER.on = True
    try:
        yield
    finally:
        _HANDED_OVER.on = before


@dataclass
class Captured:
    """The captured graph and what the capture learned on the way."""

    graph_module: fx.GraphModule
    example_inputs: tuple
    dynamic_shapes: object  # what was handed to torch.export (None: static)
    dynamic_batch: bool  # whether dim 0 is dynamic in the captured graph
    note: str  # why the batch is static, when it is


def batch_dims(inputs: tuple) -> tuple:
    """`dynamic_shapes` making dim 0 of every tensor input (of at least one dimension)
    `Dim.AUTO`, nothing else dynamic: how capture, compile and export ask for a dynamic
    batch."""
    return tuple({0: Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                 for x in inputs)


def clones(inputs: tuple) -> tuple:
    """`inputs` with every tensor cloned: a view saves its whole storage into an exported
    file, so programs are exported and run with clones."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def widen_batch(inputs: tuple) -> tuple:
    """Inputs whose batch is 1 repeated to 2: export specializes a dimension of size 1, so a
    batch of 1 could never be captured as dynamic."""
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0
                 and x.shape[0] == 1 else x for x in inputs)


def _export(model: nn.Module, inputs: tuple, dynamic_shapes) -> ExportedProgram:
    return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)


def _export_twice(model: nn.Module, inputs: tuple, dynamic_shapes) -> ExportedProgram:
    """`_export`, tried a second time (after a garbage collection) where the first try
    fails. A dynamic-batch capture that failed would fall back to a static batch, a different
    compiled model: seen twice in ~15 captures of a decoder block while a profiler's sampling
    thread held references into the exporting thread ("fake tensor in the exported program
    constant's list"), never without it. A failure that is the model's own fails twice and
    falls back as before."""
    try:
        return _export(model, inputs, dynamic_shapes)
    except FxCompressError:
        raise
    except Exception:  # noqa: BLE001 - one more try; its failure is the one reported
        import gc

        gc.collect()
        return _export(model, inputs, dynamic_shapes)


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
    check_example_finite(example_inputs)
    return example_inputs


def capture(model, example_inputs=None, dynamic_shapes=None) -> Captured:
    """Capture `model` (an `nn.Module`, `ExportedProgram` or `GraphModule`) as the ATen-level
    IR. Nothing the passes do reaches the user's model: it is deep-copied first or, where it
    cannot be (it holds a lock, a file, a socket), captured as it is and the captured program
    deep-copied (see `_inference_model`)."""
    with EXPORT_LOCK:
        cap = _capture(model, example_inputs, dynamic_shapes)
    # what nothing reads goes now, not with the first rewrite: the original's program, which
    # sizes and plans are compared with, is then the same graph the rewrites start from
    drop_unused_attrs(cap.graph_module)
    linear_from_matmul(cap.graph_module)
    cap.graph_module.recompile()
    check_weights_finite(cap.graph_module)
    return cap


def _capture(model, example_inputs, dynamic_shapes) -> Captured:
    if isinstance(model, ExportedProgram):
        check_model(model)
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
        # a dynamic batch stays dynamic in every later export (sizes, the kept program)
        return Captured(inference_graph(gm), example_inputs,
                        batch_dims(example_inputs) if dynamic else None, dynamic,
                        "" if dynamic else "the ExportedProgram was captured with a static batch")
    if not isinstance(model, nn.Module):
        raise FxCompressError(f"model must be an nn.Module, a torch.export.ExportedProgram or a "
                              f"torch.fx.GraphModule, not {type(model).__name__}")
    example_inputs = check_inputs(example_inputs)
    check_model(model)
    _check_signature(model, example_inputs)
    if isinstance(model, fx.GraphModule):
        _check_not_aten(model)
    with _inference_model(model) as (model, shared):
        own = _own_copy if shared else (lambda ep: ep)
        if dynamic_shapes is not None:
            try:
                ep = own(_export(model, example_inputs, dynamic_shapes))
            except Exception as e:
                raise FxCompressError(
                    f"torch.export could not capture the model with the dynamic_shapes given "
                    f"({_describe_failure(e)}); fix dynamic_shapes or leave it None") from e
            return Captured(inference_graph(ep.module()), example_inputs, dynamic_shapes, True,
                            "")
        widened = widen_batch(example_inputs)
        try:
            ep = own(_export_twice(model, widened, batch_dims(widened)))
            dynamic = any(not isinstance(s, int) for s in _input_batch_sizes(ep))
            note = "" if dynamic else "the model fixes its batch size (export specialized dim 0)"
            return Captured(inference_graph(ep.module()), example_inputs,
                            batch_dims(widened) if dynamic else None,
                            dynamic, note)
        except Exception as dyn_error:
            if isinstance(dyn_error, FxCompressError):
                raise
            try:
                ep = own(_export(model, example_inputs, None))
            except Exception as e:
                raise FxCompressError(
                    f"torch.export could not capture the model ({_describe_failure(e)}). Make "
                    "the failing construct traceable (data-dependent Python control flow, "
                    "unsupported ops, non-tensor outputs), or pass an ExportedProgram you "
                    "exported yourself") from e
            return Captured(inference_graph(ep.module()), example_inputs, None, False,
                            f"captured with a static batch: {_describe_failure(dyn_error)}")


def _own_copy(ep: ExportedProgram) -> ExportedProgram:
    """A program captured from the user's own model, with weights of its own."""
    try:
        return copy.deepcopy(ep)
    except Exception as e:
        raise FxCompressError(
            f"the model cannot be copied ({_describe_failure(e)}), and neither can the program "
            "torch.export captured from it, so compressing it would change your model; move "
            "what cannot be copied (a lock, a file, a socket) out of the module, or pass an "
            "ExportedProgram you exported yourself") from e


@contextlib.contextmanager
def _inference_model(model: nn.Module) -> Iterator[tuple[nn.Module, bool]]:
    """The model in eval mode to capture, and whether it is the user's own object (`shared`).

    Normally a deep copy: capture runs `forward` in Python, so whatever it does to Python
    state (a call counter, a cache) happens to the copy. A model that cannot be deep-copied (it
    holds a `threading.Lock`, an open file, a socket, a non-leaf tensor) is captured as it is,
    with every submodule switched to eval mode for the capture and switched back afterwards;
    the program torch.export returns then shares the model's parameter tensors, so the caller
    deep-copies the program before any pass may rewrite a weight in place. Within
    `handed_over()` the model is the caller's to give: captured as it is, not copied."""
    if getattr(_HANDED_OVER, "on", False):
        yield model.eval(), False
        return
    try:
        copied = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - any failure to copy: capture the original instead
        copied = None
    if copied is not None:
        yield copied.eval(), False
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model, True
    finally:
        for m, training in modes:
            m.training = training


def _input_batch_sizes(ep: ExportedProgram) -> list:
    """Dim 0 of each tensor input: an int where export specialized it, else its symbol."""
    free = {str(sym) for sym in ep.range_constraints}
    sizes = []
    # placeholders follow the input specs in order; matching by name fails after a deepcopy,
    # which renames a placeholder called "input" to "input_1" but not its spec
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    for spec, node in zip(ep.graph_signature.input_specs, placeholders, strict=True):
        if spec.kind.name != "USER_INPUT":
            continue
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


# --- what fxcompress cannot compress, said before tracing ------------------------------------
def _quantized_module(m: nn.Module) -> bool:
    """A torch.ao quantized module (converted: `quantize_dynamic`, `convert`, `convert_fx`),
    or an observer / fake-quantize module (a model `prepare`d for quantization)."""
    path = type(m).__module__
    if not path.startswith("torch."):
        return False
    parts = path.split(".")
    return "quantized" in parts or path.startswith(("torch.ao.quantization.observer",
                                                    "torch.ao.quantization.fake_quantize"))


_QUANTIZED_FIX = ("fxcompress quantizes for the target itself (technique int8) and needs the "
                  "float model: pass the model as it was before quantize_dynamic / prepare / "
                  "convert")


def check_model(model) -> None:
    """Refuse, with the fix, a model fxcompress cannot compress: one already quantized by
    torch.ao, or one whose floating-point weights are not float32 (a `.half()`,
    `.bfloat16()` or `.double()` model: the planner's factorizations and int8 kernels work in
    float32, and casting an int8 plan back to fp16 does not run)."""
    if isinstance(model, ExportedProgram):
        named = [*model.named_parameters(), *model.named_buffers()]
        for name, value in model.constants.items():
            if isinstance(value, torch.ScriptObject):
                raise FxCompressError(
                    f"the ExportedProgram holds a packed torch.ao object ({name!r}): it was "
                    f"exported from a quantized model; {_QUANTIZED_FIX}, and export that")
        ops = {str(n.target) for n in model.graph.nodes if n.op == "call_function"}
        q_ops = sorted(op for op in ops if op.startswith("quantized."))
        if q_ops:
            raise FxCompressError(
                f"the ExportedProgram runs torch.ao quantized ops ({', '.join(q_ops[:3])}): it "
                f"was exported from a quantized model; {_QUANTIZED_FIX}, and export that")
    else:
        for name, m in model.named_modules():
            if _quantized_module(m):
                what = f"module {name!r}" if name else "the model"
                kind = type(m).__module__ + "." + type(m).__qualname__
                raise FxCompressError(f"the model is already quantized by torch.ao ({what} is "
                                      f"{kind}); {_QUANTIZED_FIX}")
        named = [*model.named_parameters(), *model.named_buffers()]
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_quantized:
            raise FxCompressError(f"the model holds a quantized tensor ({name!r}, {t.dtype}): "
                                  f"it is already quantized by torch.ao; {_QUANTIZED_FIX}")
    for name, t in model.named_parameters():
        if t.is_floating_point() and t.dtype != torch.float32:
            dtype = str(t.dtype).removeprefix("torch.")
            raise FxCompressError(
                f"the model's weights are {dtype} (parameter {name!r}); fxcompress compiles "
                "float32 models: compile model.float() with float32 example inputs. The plan "
                "already accounts for the target's precision (its profile's compute_dtype, "
                "e.g. fp16 on nvidia-gpu)")


def check_weights_finite(gm: nn.Module) -> None:
    """Every floating-point parameter must be finite, and no buffer may hold NaN: a
    factorization, a quantization grid or an error measured on NaN or infinity means nothing.
    Infinity is allowed in buffers: a causal mask of -inf registered as a buffer is common."""
    groups = (("weight", gm.named_parameters(), True), ("buffer", gm.named_buffers(), False))
    for kind, named, infinite_too in groups:
        for name, t in named:
            if not (t.is_floating_point() or t.is_complex()):
                continue
            ok = torch.isfinite(t).all() if infinite_too else ~torch.isnan(t).any()
            if bool(ok):
                continue
            nan = int(torch.isnan(t).sum())
            what = f"{nan} NaN" if nan else f"{int(torch.isinf(t).sum())} infinite"
            raise FxCompressError(
                f"{kind} {name!r} holds {what} values; compressing it cannot preserve anything: "
                "fix the training run or load the right checkpoint")


def _check_signature(model: nn.Module, example_inputs: tuple) -> None:
    """`forward` must accept the example inputs positionally: compile (like torch.export with
    args) passes them that way. Said here, before tracing, because torch.export's own failure
    reads like a tracing problem."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C forward: let capture decide
        return
    try:
        sig.bind(*example_inputs)
        return
    except TypeError as e:
        problem = str(e)
    kw_only = [p.name for p in sig.parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
    positional = [p.name for p in sig.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if kw_only:
        names = ", ".join(kw_only)
        call = ", ".join(f"{n}={n}" for n in kw_only)
        raise FxCompressError(
            f"the model's forward takes keyword-only input(s) ({names}), but compile passes "
            "example_inputs positionally (it takes no keyword inputs); wrap the model in a "
            "module whose forward takes them in order, and compile the wrapper: class "
            f"Positional(nn.Module) with __init__(self, m) setting self.m = m and "
            f"forward(self, {names}) returning self.m({call}); then "
            f"compile(Positional(model), ({names},))")
    raise FxCompressError(
        f"the model's forward takes ({', '.join(positional)}) but example_inputs holds "
        f"{len(example_inputs)} input(s) ({problem}); pass one example per positional input "
        "of forward, in order, as a tuple")
