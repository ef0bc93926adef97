"""A Hugging Face checkpoint folder read lazily: ``config.json`` and ``safetensors`` weights,
one file (``model.safetensors``) or shards listed by ``model.safetensors.index.json``.

Only the shards' headers are read up front (8 bytes of length, then a JSON table of each
tensor's dtype, shape and byte range), which gives every tensor's size without reading it;
`Checkpoint.load` then reads the tensors asked for, and nothing else, through `safetensors`
(memory-mapped, copied out one tensor at a time). safetensors holds no code: a file from
someone careless or hostile can only be malformed, and every malformation found (a header
longer than its file, byte ranges outside the data, an unknown dtype, an index naming a shard
that is missing, a tensor in two shards) is an `FxCompressError` naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch

from fxcompress.errors import FxCompressError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: bytes of one element per safetensors dtype name
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
#: a safetensors header larger than this is refused (the format's own limit is 100 MB)
MAX_HEADER_BYTES = 100_000_000


def _bad(where: Path, what: str) -> FxCompressError:
    return FxCompressError(f"{str(where)!r} is not a valid safetensors checkpoint file ({what}); "
                           "write it again with safetensors.torch.save_file or "
                           "model.save_pretrained(folder, safe_serialization=True)")


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """The tensors of safetensors file `path`: name -> (dtype, shape, bytes), from its header
    only, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, "shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise _bad(path, f"its header claims {n} bytes, more than the file holds")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(path, f"its header is not JSON: {e}") from None
    if not isinstance(table, dict):
        raise _bad(path, "its header is not a JSON object")
    data_bytes = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise _bad(path, f"tensor {name!r} lacks dtype, shape or data_offsets") from None
        if dtype not in DTYPE_BYTES:
            raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _bad(path, f"tensor {name!r} has shape {shape!r}")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= data_bytes
                and hi - lo == nbytes):
            raise _bad(path, f"tensor {name!r} has byte range {lo}..{hi} for {nbytes} bytes of "
                             f"a {data_bytes}-byte data section")
        out[name] = (dtype, tuple(shape), nbytes)
    return out


class Checkpoint:
    """The checkpoint in folder `folder`: its config and a lazy view of its tensors."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise FxCompressError(f"checkpoint folder {str(folder)!r} does not exist or is not a "
                                  "folder; pass the folder save_pretrained wrote (config.json "
                                  "and *.safetensors)")
        self.folder = folder
        if not (folder / CONFIG_FILE).is_file():
            raise FxCompressError(f"{str(folder)!r} has no {CONFIG_FILE}; pass the folder "
                                  "save_pretrained wrote (config.json and *.safetensors)")
        self.shards = self._shards()
        self.tensors: dict[str, tuple[str, tuple[int, ...], int]] = {}
        self.shard_of: dict[str, Path] = {}
        for shard in self.shards:
            for name, info in read_header(shard).items():
                if name in self.shard_of:
                    raise _bad(shard, f"tensor {name!r} is also in {self.shard_of[name].name}")
                self.tensors[name] = info
                self.shard_of[name] = shard

    def _shards(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
                raise FxCompressError(f"{str(index)!r} is not a safetensors index (a JSON object "
                                      "with a weight_map); write the checkpoint again with "
                                      "save_pretrained") from None
            shards = []
            for name in names:
                p = self.folder / str(name)
                if Path(str(name)).name != name or not p.is_file():
                    raise FxCompressError(f"{str(index)!r} names shard {name!r}, which is not a "
                                          f"file in {str(self.folder)!r}; copy the whole "
                                          "checkpoint folder")
                shards.append(p)
            return shards
        if (self.folder / SINGLE_FILE).is_file():
            return [self.folder / SINGLE_FILE]
        raise FxCompressError(f"{str(self.folder)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}; "
                              "fxcompress reads safetensors checkpoints (save_pretrained(folder, "
                              "safe_serialization=True))")

    def config(self):
        """The model's `transformers` config, from ``config.json`` (no remote code)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.folder), trust_remote_code=False,
                                              local_files_only=True)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise FxCompressError(f"{str(self.folder / CONFIG_FILE)!r} is not a config "
                                  f"transformers can read ({type(e).__name__}: "
                                  f"{str(e).strip()[:200]}); write it with "
                                  "config.save_pretrained") from None

    def nbytes(self, prefix: str = "") -> int:
        """Bytes of the tensors whose names start with `prefix` (all by default)."""
        return sum(info[2] for name, info in self.tensors.items() if name.startswith(prefix))

    def load(self, prefix: str, rows: tuple[int, int] | None = None
             ) -> dict[str, torch.Tensor]:
        """The tensors whose names start with `prefix`, read from their shards, keyed by the
        rest of their names; `rows` (start, end): only those rows of each (dim 0), read alone."""
        from safetensors import SafetensorError, safe_open

        names = [n for n in self.tensors if n.startswith(prefix)]
        out: dict[str, torch.Tensor] = {}
        by_shard: dict[Path, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.shard_of[n], []).append(n)
        for shard, ns in by_shard.items():
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for n in ns:
                        # a slice gets storage of its own: a view of the shard would carry
                        # the whole shard into every file the tensor is written to
                        out[n[len(prefix):]] = f.get_tensor(n) if rows is None else \
                            f.get_slice(n)[rows[0]:rows[1]].clone()
            except (SafetensorError, OSError) as e:
                raise _bad(shard, f"{type(e).__name__}: {str(e)[:200]}") from None
        return out

    def fingerprint(self) -> str:
        """A digest of the checkpoint's headers and config (names, dtypes, shapes, sizes and
        the shard files' sizes and modification times): it changes when the checkpoint does."""
        h = hashlib.sha256((self.folder / CONFIG_FILE).read_bytes())
        for name in sorted(self.tensors):
            h.update(repr((name, self.tensors[name], self.shard_of[name].name)).encode())
        for shard in self.shards:
            st = shard.stat()
            h.update(repr((shard.name, st.st_size, st.st_mtime_ns)).encode())
        return h.hexdigest()
