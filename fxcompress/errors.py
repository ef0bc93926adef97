"""The two exception types of fxcompress.

`FxCompressError` is the user's mistake: an unknown profile, a malformed profile file, a model
that cannot be captured, calibration inputs that do not match, a tolerance out of range, a
technique the target cannot run. Its message says what was wrong and what to do.

`ExportError` (a `FxCompressError`) is a target's exporter or runtime refusing a program: an
upstream limitation for that architecture (the same happens to the uncompressed model) unless
the check its message gives says otherwise.

`InternalError` is our bug: a pass that broke the graph, an invariant that did not hold. Its
message names the failing pass and the passes that ran before it.
"""

from __future__ import annotations


class FxCompressError(ValueError):
    """A mistake in what the user passed in; the message names the fix."""


class InternalError(RuntimeError):
    """A bug in fxcompress; please report it with the message."""


class ExportError(FxCompressError):
    """A target's own exporter or lowering (torch.onnx, ExecuTorch) refused the program."""


def upstream_failure(tool: str, fmt: str, e: Exception) -> ExportError:
    """The `ExportError` for `tool` failing to write a `fmt` file, with the check that tells
    an upstream limitation from an fxcompress bug, and what to do meanwhile."""
    head = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    check = ("torch.onnx.export(torch.export.export(model, inputs), dynamo=True)" if fmt == ".onnx"
             else "executorch.exir.to_edge_transform_and_lower(torch.export.export(model, "
             "inputs), partitioner=[XnnpackPartitioner()])")
    return ExportError(
        f"{tool} could not write this program as {fmt} ({type(e).__name__}: {head[:300]}). "
        f"{tool} does not support every architecture: run {check} on your original model; if "
        f"that fails too, it is {tool}'s limitation (this model cannot go to {fmt} until it "
        "supports it): ship the .pt2 (fxcompress.export(model, inputs, 'model.pt2')) or use a "
        "profile with another format; if only the compiled model fails, please report it to "
        "fxcompress with this message")
