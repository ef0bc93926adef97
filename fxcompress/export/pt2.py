"""``.pt2``: `torch.export.save` of the compiled model's program, the compile report stored in
the archive as an extra file (``fxcompress_report.json``), loaded back with `load_program` and
run before it is moved into place. Sub-8-bit group-wise codes are stored packed, two or four a
byte, and unpacked in the program (`nbits.packed_graph`)."""

from __future__ import annotations

import hashlib
import struct
import zipfile
import zlib
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
    if nbits.has_narrow_codes(gm):
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
    for node in ep.graph.nodes:  # provenance naming Python object ids: differs per process
        node.meta.pop("from_node", None)
    with _staged(path) as tmp:
        torch.export.save(ep, tmp, extra_files=extra)
        pin_serialization_id(tmp)
        loaded = load_program(tmp)
        with torch.no_grad():
            got = loaded.module()(*_clones(inputs))
        err = _compare(got, expected, tol, ".pt2", "torch.export")
        size = tmp.stat().st_size
    return ExportResult(path, ".pt2", size, err, "torch.export", dynamic_batch=dynamic)


_ID_RECORD = ".data/serialization_id"


def pin_serialization_id(path: Path) -> None:
    """Replace the random id torch's archive writer stores in `path` (``.data/serialization_id``,
    drawn anew on every save) with digits derived from the archive's other records, in place:
    the same length, its CRC-32 updated in the data descriptor and the central directory. The
    same program then gives the same bytes, as a resumed block-by-block compile must."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        target = next((i for i in infos if i.filename.endswith(_ID_RECORD)), None)
        if target is None or target.compress_type != zipfile.ZIP_STORED:
            return
        h = hashlib.sha256()
        for i in infos:
            if i is not target:
                h.update(i.filename.encode() + struct.pack("<IQ", i.CRC, i.file_size))
        digits = str(int(h.hexdigest(), 16))
        new = (digits * (1 + target.file_size // len(digits)))[:target.file_size].encode()
        crc = zlib.crc32(new)
        start_dir = z.start_dir
    with open(path, "r+b") as f:
        f.seek(target.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        data_at = target.header_offset + 30 + name_len + extra_len
        f.seek(data_at)
        f.write(new)
        if target.flag_bits & 0x08:  # a data descriptor follows: [signature] crc sizes
            sig = f.read(4)
            f.seek(data_at + len(new) + (4 if sig == b"PK\x07\x08" else 0))
        else:
            f.seek(target.header_offset + 14)
        f.write(struct.pack("<I", crc))
        f.seek(start_dir)  # the central directory: walk to the record's entry
        while True:
            entry = f.read(46)
            if len(entry) < 46 or entry[:4] != b"PK\x01\x02":
                raise OSError(f"{path}: central directory entry of {_ID_RECORD} not found")
            n, m, k = struct.unpack("<HHH", entry[28:34])
            name = f.read(n).decode("utf-8", "replace")
            if name == target.filename:
                f.seek(-(46 + n) + 16, 1)
                f.write(struct.pack("<I", crc))
                return
            f.seek(m + k, 1)
