"""``.pt2``: `torch.export.save` of the compiled model's program, the compile report stored in
the archive as an extra file (``fxcompress_report.json``), loaded back with `load_program` and
run before it is moved into place. Sub-8-bit group-wise codes are stored packed, two or four a
byte, and unpacked in the program (`nbits.packed_graph`).

`save_program` writes every ``.pt2`` fxcompress makes, and `fxcompress.api.serialized_size`
counts the same file: node metadata naming the host or the process left out (`HOST_META`), and
torch's archive recompressed record by record (`compact_archive`: deflated where that pays,
otherwise stored at torch's alignment), with its random id pinned. `torch.export.load` reads
the result like any saved program."""

from __future__ import annotations

import hashlib
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

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
    with _staged(path) as tmp:
        save_program(ep, tmp, extra_files=extra)
        loaded = load_program(tmp)
        with torch.no_grad():
            got = loaded.module()(*_clones(inputs))
        err = _compare(got, expected, tol, ".pt2", "torch.export")
        size = tmp.stat().st_size
    return ExportResult(path, ".pt2", size, err, "torch.export", dynamic_batch=dynamic)


_ID_RECORD = ".data/serialization_id"
#: a record is stored deflated where that takes at most this share of its bytes: the program's
#: JSON (about a tenth), and codes whose values are unevenly spread (palette indices, gaps
#: between kept weights); float weights deflate to about 0.93 and stay stored
DEFLATE_SHARE = 0.9
#: bytes of a record's start that are compressed to decide how it is stored
SAMPLE_BYTES = 1 << 20
#: stored records start at multiples of this, where torch's archive writer puts them
ALIGNMENT = 64
#: node metadata not written: source lines naming the host's paths (the file would differ with
#: where Python is installed) and provenance naming Python object ids (different per process)
HOST_META = ("stack_trace", "from_node")
_PAD_ID = 0x4246  # the extra-field id torch's writer pads records with ("FB")
_ZIP64_EXTRA = 20  # bytes zipfile adds to a local header for a record over 4 GiB


def save_program(ep: ExportedProgram, dest: Path, extra_files: dict | None = None) -> None:
    """`torch.export.save(ep)` to `dest` as fxcompress writes every ``.pt2``: without
    `HOST_META`, and compacted (`compact_archive`). `ep` is left as it was."""
    dest = Path(dest)
    stripped = []
    for gm in ep.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            for node in gm.graph.nodes:
                meta = {k: node.meta.pop(k) for k in HOST_META if k in node.meta}
                if meta:
                    stripped.append((node, meta))
    raw_dir = Path(tempfile.mkdtemp(prefix=".raw-", dir=dest.parent))
    try:
        raw = raw_dir / dest.name  # the archive's root folder is named after the file
        torch.export.save(ep, raw, extra_files=extra_files)
        with open(dest, "wb") as out:
            compact_archive(raw, out)
    finally:
        for node, meta in stripped:
            node.meta.update(meta)
        shutil.rmtree(raw_dir, ignore_errors=True)


def compact_archive(src: Path, out: BinaryIO) -> None:
    """Copy the archive torch wrote at `src` into `out` (a new, seekable file), record by
    record in the same order and with the same names: each record deflated where that takes at
    most `DEFLATE_SHARE` of its bytes (judged on its first `SAMPLE_BYTES`; with deflate's
    default strategy or with Huffman codes alone, whichever is smaller), the others stored
    at `ALIGNMENT` as torch places them; fixed dates; and the random id torch's writer draws
    on every save (``.data/serialization_id``) replaced by digits derived from the other
    records, so that the same program gives the same bytes (a resumed block-by-block compile
    relies on it). `torch.export.load` reads deflated records (zip's standard compression)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", allowZip64=True) as zo:
        infos = zin.infolist()
        for info in infos:
            new = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            new.create_system = 3
            new.file_size = info.file_size
            zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own test
            if info.filename.endswith(_ID_RECORD):
                _align(new, out.tell(), zip64)
                with zo.open(new, "w", force_zip64=zip64) as g:
                    g.write(_pinned_id(infos, info))
                continue
            with zin.open(info) as f:
                strategy = _strategy(f.read(SAMPLE_BYTES))
            if strategy is not None:
                new.compress_type = zipfile.ZIP_DEFLATED
                new._compresslevel = 9  # (3.13 names it compress_level, keeping this alias)
            else:
                _align(new, out.tell(), zip64)
            with zin.open(info) as f, zo.open(new, "w", force_zip64=zip64) as g:
                if strategy is not None:  # zipfile's own compressor has no strategy argument
                    g._compressor = _compressor(strategy)
                shutil.copyfileobj(f, g, SAMPLE_BYTES)


def _compressor(strategy: int):
    """A zip record's raw deflate stream at level 9 with `strategy`."""
    return zlib.compressobj(9, zlib.DEFLATED, -15, 8, strategy)


def _deflate(data: bytes, strategy: int) -> bytes:
    """`data` deflated as `compact_archive` writes a record with `strategy`."""
    co = _compressor(strategy)
    return co.compress(data) + co.flush()


def _strategy(head: bytes) -> int | None:
    """How a record starting with `head` (its first `SAMPLE_BYTES`) is deflated: the smaller
    of deflate's default (string matching, for text) and Huffman codes alone (for byte codes
    whose values are unevenly used but unordered, where short matches cost more than the
    literals they replace: a half a bit a byte on palette indices); None (stored) where
    neither takes at most `DEFLATE_SHARE` of its bytes."""
    if not head:
        return None
    size, strategy = min((len(_deflate(head, st)), st)
                         for st in (zlib.Z_DEFAULT_STRATEGY, zlib.Z_HUFFMAN_ONLY))
    return strategy if size <= DEFLATE_SHARE * len(head) else None


def record_bytes(data: bytes) -> int:
    """The bytes a record holding `data` takes in the archive `compact_archive` writes (its
    data only, not its header): deflated where that rule deflates it, else as it is."""
    strategy = _strategy(data[:SAMPLE_BYTES])
    return len(data) if strategy is None else len(_deflate(data, strategy))


def _align(info: zipfile.ZipInfo, offset: int, zip64: bool) -> None:
    """Pad `info`'s extra field so that its data, whose local header starts at `offset`,
    starts at a multiple of `ALIGNMENT`."""
    header = 30 + len(info.filename.encode("utf-8")) + 4 + (_ZIP64_EXTRA if zip64 else 0)
    pad = -(offset + header) % ALIGNMENT
    info.extra = struct.pack("<HH", _PAD_ID, pad) + bytes(pad)


def _pinned_id(infos: list[zipfile.ZipInfo], target: zipfile.ZipInfo) -> bytes:
    """Digits as long as torch's random serialization id, derived from the names, CRCs and
    sizes of the archive's other records."""
    h = hashlib.sha256()
    for i in infos:
        if i is not target:
            h.update(i.filename.encode() + struct.pack("<IQ", i.CRC, i.file_size))
    digits = str(int(h.hexdigest(), 16))
    return (digits * (1 + target.file_size // len(digits)))[:target.file_size].encode()
