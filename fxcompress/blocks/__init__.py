"""Block-by-block compilation of a model whose weights need not fit in memory:
`compile_blocks(checkpoint_folder, out_folder, calibration=..., profile=...)`.

A decoder language model saved as a Hugging Face ``safetensors`` checkpoint (`checkpoint`,
read lazily) is cut into its blocks (`decoder`: the embedding, each decoder layer, the final
norm with the LM head; a vocabulary larger than half a decoder layer's weights is cut by rows,
the embedding and the head a block per chunk, so the largest compile is one layer's). Each
block in turn:

1. gets its weights alone from the shards (the fp32 model is never whole in memory);
2. is compiled by `fxcompress.compile` for the profile, calibrated on the outputs of the blocks
   already compressed (sequential, so each block's rewrites, GPTQ's error compensation among
   them, see the inputs it will get; the compile's tolerance is judged on those inputs);
3. runs its calibration batches: the compressed block gives the next block's calibration
   inputs, the fp32 block the reference stream the end-to-end error is measured against;
4. is written as a `.pt2` (`fxcompress.export`: packed low-bit codes, checked, atomic), then
   its streams and the run's state, each written to a temporary name and renamed; and freed.

The result is a folder: ``<block>.pt2`` per block (``embed.pt2`` or ``embed.<c>.pt2``,
``layer.<i>.pt2``, ``head.pt2`` or ``head.<c>.pt2``), ``manifest.json`` (the blocks in order,
each file's bytes and SHA-256, the stage it belongs to and how a stage's chunks join) and
``report.json`` (every block's compile report and the end-to-end figures). `load_blocks` loads
it as one module (token ids -> logits) and checks every file against the manifest. One program
per block, not one program with external weights: each ``.pt2`` is what `torch.export.load`
and ExecuTorch's lowering take as is.

The tolerance is a budget spread over the stages (a block, or the chunks of the embedding or
the head): each of the n stages gets tolerance / n as its own relative output error (on its
output, the residual stream; each chunk of a stage gets the stage's share, which bounds the
stage's, since the chunks' squared errors and output energies add). Relative errors of blocks in
sequence add to first order (the next block sees its input off by that much, and residual
blocks pass it on with gain close to 1), so their sum bounds the end-to-end error to first
order; the end-to-end relative error of the logits against the fp32 stream is measured on the
calibration data at the end and reported, with a note where it exceeds the tolerance.

A run is resumable: the work folder (``<out>/.work``) holds the state (which blocks are done,
with their files' digests) and the two streams entering the next block. A run killed at any
point restarts at the first block not recorded as done, and, with the same inputs, seed and
thread count (recorded in the state and reused), writes the same bytes as a run never
interrupted. Before any work the memory and disk the run needs are estimated from the
checkpoint's headers and the calibration data and refused with `FxCompressError` when they
exceed what the machine has (`MEMORY_FACTOR`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import gc
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxcompress.blocks.checkpoint import Checkpoint
from fxcompress.blocks.decoder import DecoderFamily, Stage
from fxcompress.blocks.executor import LocalExecutor, make_executor
from fxcompress.errors import FxCompressError
from fxcompress.export import error_sums, ratio_of
from fxcompress.report import REPORT_KEY

MANIFEST = "manifest.json"
REPORT = "report.json"
WORK = ".work"
FORMAT = "fxcompress-blocks/1"
#: peak memory of one block's compile above the process's, as a multiple of the block's fp32
#: weight bytes (the block's own weights; the input covariances, one per distinct layer input,
#: kept in float32: the down projection's alone is 0.7x the whole block's weights; the codes of
#: the candidates; the values live while candidates are measured; the built graph and its
#: exported programs): measured on a 1.1 B Llama's decoder block (176 MB) at 5.1x with int8 /
#: intx (+0.89 GB) and 9.3x with every mobile-arm technique (+1.64 GB: pruned, factored and
#: palettized candidates keep float weights and Hessians), rounded up
MEMORY_FACTOR = 10.0


@dataclass
class BlockRecord:
    """One compiled block as written."""

    name: str  # "embed", "layer.<i>", "head"
    file: str  # its .pt2, relative to the output folder
    bytes: int  # bytes of the file
    sha256: str  # digest of the file
    fp32_bytes: int  # bytes of its weights in the checkpoint
    error: float  # the block's measured relative output error (its compile's report)
    applied: dict[str, int]  # techniques applied -> layers
    seconds: float  # compile and write time
    check_error: float = 0.0  # the .pt2 run in torch.export against the compiled block

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return dict(self.__dict__)


@dataclass
class BlocksResult:
    """What `compile_blocks` wrote."""

    folder: Path
    blocks: list[BlockRecord]
    error: float  # end-to-end relative error of the logits vs the fp32 stream (calibration)
    tolerance: float
    fp32_bytes: int  # the checkpoint's weight bytes
    bytes: int  # the blocks' files
    seconds: float  # wall time of this call (a resumed run counts only what it did)
    resumed_at: int  # blocks already done when this call started (0: a fresh run)
    executor: str = "local"  # where independent blocks ran: "local" or "ray"
    threads: int = 1  # threads of each block's compile (an input, like the seed)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {"folder": str(self.folder), "blocks": [b.to_dict() for b in self.blocks],
                "error": self.error, "tolerance": self.tolerance,
                "fp32_bytes": self.fp32_bytes, "bytes": self.bytes, "seconds": self.seconds,
                "resumed_at": self.resumed_at, "executor": self.executor,
                "threads": self.threads, "notes": list(self.notes)}


# --- small helpers ----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_json(path: Path, data: Any) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=1, sort_keys=True)))


def _save_stream(path: Path, comp: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {f"c{i}": t.contiguous() for i, t in enumerate(comp)}
    tensors.update({f"r{i}": t.contiguous() for i, t in enumerate(ref)})
    _write_atomic(path, lambda p: save_file(tensors, str(p)))


def _load_stream(path: Path, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return [t[f"c{i}"] for i in range(n)], [t[f"r{i}"] for i in range(n) if f"r{i}" in t]


def _glibc(call: Callable) -> None:
    """`call(libc)` where the C library is glibc's; nothing elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        call(ctypes.CDLL("libc.so.6"))


def _release_memory() -> None:
    """Collect garbage and hand the freed heap back to the system (glibc's `malloc_trim`):
    what one block's compile freed is then free for the next, instead of staying in the
    process as fragments."""
    gc.collect()
    _glibc(lambda libc: libc.malloc_trim(0))


#: allocations of at least this many bytes are mapped from the system on their own while
#: blocks compile (glibc's M_MMAP_THRESHOLD), so what a block frees goes back at once instead
#: of staying as heap fragments under the next block's peak: measured on a 1.1 B Llama's
#: decoder block, 115 MB less at its peak, no slower
MMAP_THRESHOLD = 4 << 20


def _map_large_allocations() -> None:
    """Set glibc's mmap threshold to `MMAP_THRESHOLD` (process-wide, for the rest of the
    process: a fixed threshold instead of glibc's adaptive one); nothing elsewhere."""
    _glibc(lambda libc: libc.mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def _calibration(calibration, vocab: int) -> list[torch.Tensor]:
    if calibration is None:
        raise FxCompressError("compile_blocks needs calibration: a list of token-id tensors of "
                              "shape (batch, seq), e.g. [tokenizer(texts).input_ids]")
    out = []
    for i, b in enumerate(calibration):
        x = b[0] if isinstance(b, tuple | list) and len(b) == 1 else b
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (
                torch.int64, torch.int32) or x.numel() == 0:
            raise FxCompressError(f"calibration batch {i} is not a non-empty 2-D tensor of "
                                  "token ids (int64, shape (batch, seq)); pass token ids")
        if int(x.min()) < 0 or int(x.max()) >= vocab:
            raise FxCompressError(f"calibration batch {i} has token ids outside the model's "
                                  f"vocabulary (0..{vocab - 1}); tokenize with its tokenizer")
        out.append(x.to(torch.int64))
    if not out:
        raise FxCompressError("calibration is empty; pass at least one batch of token ids")
    return out


def _block_overrides(overrides: Mapping[str, Mapping] | None, name: str) -> dict | None:
    """The `compile(overrides=...)` of block `name`: the entries of `overrides` whose block
    pattern (fnmatch over block names) matches, later keys winning."""
    if overrides is None:
        return None
    merged: dict = {}
    for pattern, value in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            merged.update(value)
    return merged or None


def _applied(report) -> dict[str, int]:
    counts: dict[str, int] = {}
    for la in report.layers:
        if la.applied != "none":
            key = la.applied.split("(")[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


# --- the run ----------------------------------------------------------------------------------
def compile_blocks(checkpoint: str | Path, out: str | Path, *, calibration: Iterable,
                   profile: str = "mobile-arm", tolerance: float = 0.05,
                   techniques: Iterable[str] | None = None,
                   overrides: Mapping[str, Mapping] | None = None, seed: int = 0,
                   sequential: bool = True, progress: Callable[[str], None] | None = None,
                   memory_limit: int | None = None, executor: str = "local",
                   address: str | None = None, vocab_chunks: int | None = None
                   ) -> BlocksResult:
    """Compile the decoder model saved in `checkpoint` (a folder of ``config.json`` and
    ``safetensors`` shards) block by block for `profile` into the folder `out`.

    `calibration`: batches of token ids (int64 tensors of shape (batch, seq)); every block is
    calibrated on them as they come out of the blocks before it, compressed. `tolerance`: the
    end-to-end relative output error (logits) allowed, spread evenly over the blocks.
    `techniques`, `seed`: as for `fxcompress.compile`. `overrides`: ``{block pattern:
    compile-overrides}``, e.g. ``{"layer.*": {"*": {"intx": {"rounding": "rtn"}}}}``, where a
    block pattern (fnmatch) matches ``embed``, ``layer.<i>`` or ``head``. `sequential`
    (default): each block is fitted on the outputs of the compressed blocks before it; False:
    on the original model's activations, as `fxcompress.compile` of the whole model fits every
    layer (the same plan then gives the same model), and the blocks are independent.
    `vocab_chunks`: blocks the embedding and the LM head are each cut into, by rows of the
    vocabulary (``embed.<c>``, ``head.<c>``; see `decoder.DecoderFamily`); None (default): as
    many as keep each no larger than half a decoder layer, whose compile then bounds the
    memory.
    `executor`: ``"local"`` (default) or ``"ray"``, which compiles independent blocks
    (``sequential=False``) as Ray tasks on a cluster started on this machine, or on the one at
    `address` / ``FXCOMPRESS_RAY_ADDRESS`` (`fxcompress.blocks.executor`); a Ray run uses one
    thread per task unless ``FXCOMPRESS_THREADS`` says otherwise, and gives the same plan and
    bytes as a local run with that many threads. `progress` gets one line per block with an
    estimate of the time left. `memory_limit`: bytes the run may use (default: the machine's
    available memory).

    Resumes a run killed in `out` (same arguments); refuses a folder holding another run's
    work. Sets glibc's mmap threshold for the process (`MMAP_THRESHOLD`), so that what one
    block frees is not held under the next one's peak. Returns a `BlocksResult`; the folder
    loads with `load_blocks`."""
    t_start = time.perf_counter()
    _map_large_allocations()
    tol = float(tolerance)
    if not (math.isfinite(tol) and tol > 0):
        raise FxCompressError(f"tolerance {tolerance!r} must be a finite number > 0 (the "
                              "end-to-end relative output error allowed), e.g. 0.05")
    ckpt = Checkpoint(checkpoint)
    family = DecoderFamily(ckpt, vocab_chunks)
    batches = _calibration(calibration, int(family.config.vocab_size))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / WORK
    work.mkdir(exist_ok=True)
    if executor == "ray" and sequential:
        raise FxCompressError("executor='ray' spreads independent blocks over workers, and with "
                              "sequential=True each block waits for the one before it; pass "
                              "sequential=False (each block fitted on the original model's "
                              "activations) or keep executor='local'")
    threads = int(os.environ.get("FXCOMPRESS_THREADS") or 0) or (
        1 if executor == "ray" else torch.get_num_threads())

    key = hashlib.sha256(json.dumps({
        "format": FORMAT, "checkpoint": ckpt.fingerprint(), "profile": str(profile),
        "tolerance": tol, "techniques": None if techniques is None else sorted(techniques),
        "overrides": overrides, "seed": seed, "sequential": bool(sequential),
        "vocab_chunks": family.chunks},
        sort_keys=True, default=str).encode())
    for b in batches:
        key.update(repr(tuple(b.shape)).encode())
        key.update(b.numpy().tobytes())
    fingerprint = key.hexdigest()
    state_path = work / "state.json"
    state = {"fingerprint": fingerprint, "threads": threads, "done": []}
    if state_path.exists():
        try:
            old = json.loads(state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        if old.get("fingerprint") != fingerprint:
            raise FxCompressError(f"{str(out)!r} holds the work of a compile with other inputs "
                                  "(checkpoint, calibration, profile, tolerance, techniques, "
                                  "overrides or seed); write to an empty folder, or delete "
                                  f"{str(work)!r} to start over there")
        state = old
        threads = int(state["threads"])
    done = [BlockRecord(**r) for r in state["done"]]
    for rec in done:  # what the state says was written must still be there, unchanged
        p = out / rec.file
        if not p.is_file() or _sha256(p) != rec.sha256:
            raise FxCompressError(f"{str(p)!r} was changed or removed since it was written; "
                                  f"delete {str(work)!r} to compile from the start")
    pool = make_executor(executor, address, threads) if not sequential else LocalExecutor()
    try:
        _check_resources(family, batches, out, len(done), memory_limit, pool.workers)
        return _finish(family, ckpt, batches, out, done, state, progress, t_start, pool,
                       sequential, tol, Job(str(ckpt.folder), str(out), profile,
                                            tol / len(family.stages), techniques, overrides,
                                            seed, threads, family.chunks))
    finally:
        pool.close()


def _finish(family: DecoderFamily, ckpt: Checkpoint, batches: list[torch.Tensor], out: Path,
            done: list[BlockRecord], state: dict, progress, t_start: float, pool,
            sequential: bool, tol: float, job: Job) -> BlocksResult:
    names = family.names
    say = progress or (lambda line: None)
    started = len(done)
    prev_env = os.environ.get("FXCOMPRESS_THREADS")
    os.environ["FXCOMPRESS_THREADS"] = str(job.threads)
    try:
        run = _run_chain if sequential else _run_independent
        error = run(family, batches, out, done, state, say, t_start, pool, job)
    finally:
        if prev_env is None:
            os.environ.pop("FXCOMPRESS_THREADS", None)
        else:
            os.environ["FXCOMPRESS_THREADS"] = prev_env
    done.sort(key=lambda r: names.index(r.name))
    result = BlocksResult(out, done, error, tol, ckpt.nbytes(), sum(r.bytes for r in done),
                          time.perf_counter() - t_start, started, pool.name, job.threads)
    if error > tol:
        result.notes.append(
            f"the end-to-end error on the calibration data, {error:.4g}, exceeds the tolerance "
            f"{tol:g}: the blocks' errors compounded beyond their first-order sum; compile "
            "again with a smaller tolerance")
    stage_of = {b: st for st in family.stages for b in st.blocks}
    manifest = {"format": FORMAT, "model_type": family.config.model_type,
                "vocab_size": int(family.config.vocab_size),
                "blocks": [{"name": r.name, "file": r.file, "bytes": r.bytes,
                            "sha256": r.sha256, "stage": stage_of[r.name].name,
                            "combine": stage_of[r.name].combine} for r in done]}
    from fxcompress.loading import read_report

    reports = {r.name: read_report(out / r.file) for r in done}  # each .pt2 carries its own
    _write_json(out / REPORT, result.to_dict() | {"folder": None, "seconds": None,
                                                  "block_reports": reports})
    _write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return result


@dataclass(frozen=True)
class Job:
    """What every block's compile shares (plain data: it travels to Ray workers)."""

    checkpoint: str
    out: str
    profile: Any
    tolerance: float  # per block
    techniques: Any
    overrides: Any  # the compile_blocks overrides, by block pattern
    seed: int
    threads: int
    vocab_chunks: int = 1


def _record_done(rec: BlockRecord, done: list[BlockRecord], state: dict, work: Path,
                 say: Callable[[str], None], total: int, started: int, t_start: float) -> None:
    done.append(rec)
    state["done"] = [r.to_dict() for r in done]
    _write_json(work / "state.json", state)
    finished = len(done) - started
    left = (time.perf_counter() - t_start) / finished * (total - len(done))
    say(f"block {len(done)}/{total} {rec.name}: {rec.seconds:.1f} s, error {rec.error:.4g}, "
        f"{rec.bytes:,} B of {rec.fp32_bytes:,} fp32; about {left:.0f} s left")


def _run_chain(family: DecoderFamily, batches: list[torch.Tensor], out: Path,
               done: list[BlockRecord], state: dict, say, t_start: float, executor, job: Job):
    """Sequential: block i is fitted on the compressed outputs of blocks < i, so the blocks
    run one after another (in this process, whatever the executor). The chunks of a stage
    (`decoder.Stage`) all read the stage's input; each chunk's outputs are kept in the work
    folder until the stage's are written."""
    work = out / WORK
    stages = family.stages
    n = len(batches)
    started = len(done)
    finished = {r.name for r in done}
    first = next((i for i, st in enumerate(stages) if not set(st.blocks) <= finished),
                 len(stages))
    # a stage whose chunks were all done before its output was written is joined again
    while first > 0 and not (work / f"stream.{first}.safetensors").exists():
        first -= 1
    if first:
        comp, ref = _load_stream(work / f"stream.{first}.safetensors", n)
    else:
        comp, ref = list(batches), list(batches)
    sums = (0.0, 0.0)  # the last stage's squared error and output energy
    for i in range(first, len(stages)):
        stage = stages[i]
        chunked = len(stage.blocks) > 1
        last = i + 1 == len(stages)
        outs_c, outs_r = [], []
        for name in stage.blocks:
            part = work / f"out.{name}.safetensors"
            if name in finished:  # a chunk compiled before the restart
                c, r = _load_stream(part, n)
            else:
                t0 = time.perf_counter()
                block = family.block(name)
                with torch.no_grad():  # first: the compile takes the block's tensors as its own
                    r = [block(x) for x in ref]
                rec, g = _compile_block(block, name, comp, job, family.weight_bytes(name))
                del block
                with torch.no_grad():
                    c = [g(x) for x in comp]
                del g
                rec.seconds = time.perf_counter() - t0
                if chunked or last:  # kept until the stage's output (or the run) is done
                    _save_stream(part, c, r)
                else:
                    _save_stream(work / f"stream.{i + 1}.safetensors", c, r)
                _record_done(rec, done, state, work, say, len(family.names), started, t_start)
            if last:  # the logits: only their error is needed, chunk by chunk
                sums = error_sums(c, r, sums)
            else:
                outs_c.append(c)
                outs_r.append(r)
            del c, r
            _release_memory()
        if not last:
            comp = [stage.join(list(xs)) for xs in zip(*outs_c, strict=True)]
            ref = [stage.join(list(xs)) for xs in zip(*outs_r, strict=True)]
        del outs_c, outs_r
        if last:  # its files stay until the run's are written (`_finish` removes them)
            break
        if chunked:
            _save_stream(work / f"stream.{i + 1}.safetensors", comp, ref)
        for name in stage.blocks:  # the next stage's input is written: these are not needed
            with contextlib.suppress(FileNotFoundError):
                (work / f"out.{name}.safetensors").unlink()
        with contextlib.suppress(FileNotFoundError):
            (work / f"stream.{i}.safetensors").unlink()
        _release_memory()
    return ratio_of(sums)


def _run_independent(family: DecoderFamily, batches: list[torch.Tensor], out: Path,
                     done: list[BlockRecord], state: dict, say, t_start: float, executor,
                     job: Job):
    """Each block fitted on the original model's activations: one fp32 pass writes every
    stage's input stream, then the blocks compile independently (on the executor's workers,
    in any order), then the compressed chain runs once for the end-to-end error."""
    work = out / WORK
    stages = family.stages
    n = len(batches)
    ref = list(batches)
    for i, stage in enumerate(stages):  # the fp32 pass, one block in memory at a time
        path = work / f"fp32.{i}.safetensors"
        if not path.exists():
            _save_stream(path, ref, [])
        if i + 1 == len(stages):  # the logits: compared chunk by chunk at the end
            break
        if (work / f"fp32.{i + 1}.safetensors").exists():
            ref = _load_stream(work / f"fp32.{i + 1}.safetensors", n)[0]
            continue
        outs = []
        for name in stage.blocks:
            block = family.block(name)
            with torch.no_grad():
                outs.append([block(x) for x in ref])
            del block
        ref = [stage.join(list(xs)) for xs in zip(*outs, strict=True)]
        del outs
    names_done = {r.name for r in done}
    start = len(done)
    tasks = [(job, name, family.weight_bytes(name), str(work / f"fp32.{i}.safetensors"), n)
             for i, stage in enumerate(stages) for name in stage.blocks
             if name not in names_done]
    for rec in executor.map_unordered(_block_task, tasks):
        _record_done(BlockRecord(**rec), done, state, work, say, len(family.names), start,
                     t_start)
    from fxcompress.loading import load_program

    comp = list(batches)
    for stage in stages[:-1]:  # the compressed chain, from the files written
        outs = []
        for name in stage.blocks:
            module = load_program(out / f"{name}.pt2").module()
            with torch.no_grad():
                outs.append([module(x) for x in comp])
            del module
        comp = [stage.join(list(xs)) for xs in zip(*outs, strict=True)]
        del outs
    ref = _load_stream(work / f"fp32.{len(stages) - 1}.safetensors", n)[0]
    sums = (0.0, 0.0)
    for name in stages[-1].blocks:  # the logits, chunk by chunk: compressed vs fp32
        module = load_program(out / f"{name}.pt2").module()
        block = family.block(name)
        with torch.no_grad():
            sums = error_sums([module(x) for x in comp], [block(x) for x in ref], sums)
        del module, block
    return ratio_of(sums)


def _block_task(job: Job, name: str, fp32_bytes: int, stream: str, n: int) -> dict:
    """Compile block `name` on the fp32 stream saved at `stream` and write it: the unit of
    work of `_run_independent`, run in this process or on a Ray worker."""
    os.environ["FXCOMPRESS_THREADS"] = str(job.threads)
    _map_large_allocations()  # a Ray worker is a process of its own
    t0 = time.perf_counter()
    family = DecoderFamily(Checkpoint(job.checkpoint), job.vocab_chunks)
    block = family.block(name)
    inputs = _load_stream(Path(stream), n)[0]
    rec, _ = _compile_block(block, name, inputs, job, fp32_bytes)
    del block, inputs
    _release_memory()
    rec.seconds = time.perf_counter() - t0
    return rec.to_dict()


def _compile_block(block: torch.nn.Module, name: str, fit: list[torch.Tensor], job: Job,
                   fp32_bytes: int) -> tuple[BlockRecord, torch.nn.Module]:
    """`block` compiled on inputs `fit` and written as ``<name>.pt2``."""
    import fxcompress
    from fxcompress.capture import handed_over

    example = (fit[0],)
    with handed_over():  # the block was made for this compile: no copy of its weights
        g = fxcompress.compile(block, example, profile=job.profile,
                               calibration=[(x,) for x in fit], tolerance=job.tolerance,
                               techniques=job.techniques,
                               overrides=_block_overrides(job.overrides, name), seed=job.seed)
    report = g.meta[REPORT_KEY]
    path = Path(job.out) / f"{name}.pt2"
    # the file carries the report without its wall times (report.json has them): the same
    # inputs write the same bytes, resumed or not
    g.meta[REPORT_KEY] = dataclasses.replace(report, compile_seconds=0.0, phase_seconds={})
    written = fxcompress.export(g, example, path)
    g.meta[REPORT_KEY] = report
    rec = BlockRecord(name, path.name, path.stat().st_size, _sha256(path), fp32_bytes,
                      float(report.error), _applied(report), 0.0, written.check_error)
    return rec, g


def _check_resources(family: DecoderFamily, batches: list[torch.Tensor], out: Path,
                     start: int, memory_limit: int | None, workers: int = 1) -> None:
    """Refuse, before any work, a run that cannot fit in memory or on disk."""
    hidden = int(family.config.hidden_size)
    vocab = int(family.config.vocab_size)
    tokens = sum(b.numel() for b in batches)
    stream = 2 * tokens * hidden * 4  # the compressed and the fp32 stream, fp32
    logits = 2 * tokens * vocab * 4  # the head's outputs, both streams
    largest = max(family.weight_bytes(n) for n in family.names[start:])
    need = int(workers * MEMORY_FACTOR * largest + 3 * stream + logits)
    have = _available_memory() if memory_limit is None else int(memory_limit)
    if need > have:
        raise FxCompressError(
            f"compiling this checkpoint block by block needs about {need / 2**30:.2f} GiB of "
            f"memory (its largest block's weights, {largest / 2**30:.2f} GiB, x{MEMORY_FACTOR:g} "
            f"while it compiles, on {workers} worker(s) of this machine, plus the calibration "
            "streams), and "
            f"{have / 2**30:.2f} GiB is available; use fewer or shorter calibration batches, "
            "or a machine with more memory")
    rest = sum(family.weight_bytes(n) for n in family.names[start:])
    disk = rest + 2 * stream
    free = shutil.disk_usage(out).free
    if disk > free:
        raise FxCompressError(
            f"the output folder {str(out)!r} needs up to {disk / 2**30:.2f} GiB (the blocks "
            f"left, as large as their fp32 weights if nothing compresses, and the streams) and "
            f"its disk has {free / 2**30:.2f} GiB free; free space or write elsewhere")


# --- loading ----------------------------------------------------------------------------------
class BlocksModel(torch.nn.Module):
    """The compiled blocks of a `compile_blocks` folder chained: token ids -> logits. The
    blocks of one stage (the row chunks of the embedding or the LM head) read the same input
    and their outputs are summed or concatenated (`decoder.Stage`)."""

    def __init__(self, blocks: list[torch.nn.Module], names: list[str],
                 stages: list[Stage] | None = None) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.names = list(names)
        self.stages = stages or [Stage(n, (n,)) for n in self.names]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits for token ids `ids` (batch, seq)."""
        h = ids
        it = iter(self.blocks)
        for stage in self.stages:
            h = stage.join([next(it)(h) for _ in stage.blocks])
        return h


def load_blocks(folder: str | Path) -> BlocksModel:
    """The model `compile_blocks` wrote to `folder`, every file checked against the manifest
    (bytes and SHA-256) and loaded with `fxcompress.loading.load_program` (tensors and the
    graph only, nothing unpickled)."""
    from fxcompress.loading import load_program

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = manifest["blocks"] if manifest["format"] == FORMAT else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError(MANIFEST)
        stages: list[Stage] = []
        for e in entries:  # consecutive entries of one stage form it
            stage, combine = str(e.get("stage", e["name"])), e.get("combine")
            if combine not in (None, "sum", "cat"):
                raise TypeError(MANIFEST)
            if stages and stages[-1].name == stage and stages[-1].combine == combine \
                    and combine is not None:
                stages[-1] = Stage(stage, (*stages[-1].blocks, str(e["name"])), combine)
            else:
                stages.append(Stage(stage, (str(e["name"]),), combine))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise FxCompressError(f"{str(folder)!r} has no complete {MANIFEST} of compile_blocks "
                              "output; pass the folder a finished compile_blocks wrote, or "
                              "run compile_blocks again to finish it") from None
    blocks, names = [], []
    for e in entries:
        p = folder / str(e.get("file", ""))
        if Path(str(e.get("file", ""))).name != e.get("file") or not p.is_file() \
                or p.stat().st_size != e.get("bytes") or _sha256(p) != e.get("sha256"):
            raise FxCompressError(f"{str(p)!r} is missing or differs from what {MANIFEST} "
                                  "records; copy the whole folder again, or compile again")
        blocks.append(load_program(p).module())
        names.append(str(e["name"]))
    return BlocksModel(blocks, names, stages)
