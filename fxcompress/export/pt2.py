"""``.pt2``: `torch.export.save` of the compiled model's program, the compile report stored in
the archive as an extra file (``fxcompress_report.json``), loaded back with `load_program` and
run before it is moved into place. Sub-8-bit group-wise codes are stored packed, two or four a
byte, and unpacked in the program (`nbits.packed_graph`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import ExportedProgram

from fxcompress.export import (
    ExportResult,
    _batch_is_dynamic,
    _clones,
    _compare,
    _report_json,
    _staged,
    _widen,
    _with_example_inputs,
    nbits,
    to_exported_program,
)
from fxcompress.loading import REPORT_FILE, load_program


def write_pt2(gm: torch.nn.Module, inputs: tuple, path: Path, report, expected, tol: float,
              program: ExportedProgram | None = None) -> ExportResult:
    """Write `gm` as a ``.pt2`` at `path` (checked against `expected`, its outputs on `inputs`,
    within `tol`). `program`: the program compile kept, already known to be the one
    `to_exported_program` would make here (None: export `gm`). Group-wise low-bit codes are
    written packed at their width (`nbits.packed_graph`), so that program is exported afresh."""
    if nbits.has_intx(gm):
        packed = nbits.packed_graph(gm)
        if packed is not gm:
            gm, program = packed, None
    if program is None:
        dynamic = bool(getattr(report, "dynamic_batch", True))
        ep, dynamic = to_exported_program(gm, inputs, dynamic)
    else:  # the example inputs to_exported_program would have exported with
        dynamic = _batch_is_dynamic(program)
        ep = _with_example_inputs(program, _widen(_clones(inputs)) if dynamic
                                  else _clones(inputs))
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
        err = _compare(got, expected, tol, ".pt2", "torch.export")
        size = tmp.stat().st_size
    return ExportResult(path, ".pt2", size, err, "torch.export", dynamic_batch=dynamic)
