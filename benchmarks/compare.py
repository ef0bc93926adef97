"""fxcompress against what a user would pick instead, measured side by side in one run.

For each real trained model (the digits CNN on scikit-learn's digits, the transformer on
Python's documentation text) every row is built and measured in this one process:

- fp32 eager, the baseline (and its XNNPACK ``.pte`` / ``torch.compile`` build as the
  baseline of the lowered-runtime column);
- torchao ``quantize_`` with ``Int8DynamicActivationInt8WeightConfig``, eager and under
  ``torch.compile``;
- the standard mobile path: torchao PT2E with ExecuTorch's ``XNNPACKQuantizer`` to a ``.pte``;
- Torch-Pruning's L1 group pruner (``MagnitudePruner``, ``GroupMagnitudeImportance(p=1)``) at
  the largest ratio whose calibration accuracy stays within the same budget fxcompress gets,
  no fine-tuning;
- ``fxcompress.compile`` for each profile (``techniques=None``: whatever the installed code
  and the profile support), ``.pte`` for profiles whose export format is ``.pte``; and the
  same with ``recover=`` (distillation from the original on the training inputs, no labels),
  unless ``--no-recover``; for the profiles in ``ONNX_PROFILES``, also the same model written
  as ``.onnx`` by ``fxcompress.export`` and run in ONNX Runtime, against the fp32 ``.onnx``.

Columns: test accuracy, serialized size (bytes of the ``torch.export.save`` ``.pt2`` for
eager rows, of the ``.pte`` / ``.onnx`` for ExecuTorch / ONNX Runtime rows), eager latency
ratio vs fp32 eager, lowered runtime latency ratio vs fp32 in the same runtime
(ExecuTorch+XNNPACK for ``.pte`` rows, ONNX Runtime for ``.onnx`` rows, Inductor for
``torch.compile`` rows), compile time. Ratios are interleaved medians
(`fxcompress.host.interleaved`), batch 64. ``.pte`` accuracy is measured by running the
file in ``executorch.runtime``.

Writes ``BENCHMARKS.md`` at the repository root and ``benchmarks/results/compare.png``.

    .venv/bin/python benchmarks/compare.py [--models digits_cnn text_transformer] [--runs 30]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* as a script

import fxcompress  # noqa: E402
from benchmarks.models import accuracy, correct, digits_data, load_pretrained, text_data  # noqa: E402
from fxcompress.export import lower_to_pte  # noqa: E402
from fxcompress.hardware_profiles import load_profile  # noqa: E402
from fxcompress.host import interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT_MD = ROOT / "BENCHMARKS.md"
OUT_PNG = ROOT / "benchmarks" / "results" / "compare.png"
OUT_JSON = ROOT / "benchmarks" / "results" / "compare.json"
BATCH = 64
PROFILES = ("x86-server", "mobile-arm", "apple-ane", "mcu-int8", "nvidia-gpu", "fpga-binary")
#: profiles that also get a "+ recover" row
RECOVER_PROFILES = ("x86-server", "mobile-arm", "apple-ane", "mcu-int8")
#: the format column of a profile's own file where its writer is not the format's default one
WRITER_FORMATS = {"tensorrt": ".onnx (TensorRT)", "qonnx": ".onnx (QONNX)",
                  "coreml": ".mlpackage", "cortex-m": ".pte (Cortex-M)"}
#: profiles whose targets also run the `.onnx` file in ONNX Runtime: an extra row each
ONNX_PROFILES = ("x86-server",)
#: Accuracy budget (percentage points on the calibration split) given to every lossy method
#: that searches for its own setting: fxcompress's `evaluate` tolerance and the pruning ratio.
#: 0: the same accuracy as the original, which is what the int8 peers keep.
ACC_BUDGET = 0.0
MODELS: dict[str, Callable] = {"digits_cnn": digits_data, "text_transformer": text_data}


@dataclass
class Row:
    """One measured method on one model."""

    model: str
    method: str
    fmt: str = ".pt2"
    accuracy: float | None = None
    size: int | None = None
    eager_ratio: float | None = None
    lowered_ratio: float | None = None
    runtime: str = ""
    compile_s: float | None = None
    note: str = ""
    peer: bool = True
    extra: dict = field(default_factory=dict)


# --- measurement helpers --------------------------------------------------------------------
def pt2_bytes(model: torch.nn.Module, example: tuple) -> int:
    """Bytes of `torch.export.save` of `model` (dynamic batch where it exports so)."""
    args = tuple(x.clone() for x in example)
    try:
        dyn = tuple({0: torch.export.Dim.AUTO} for _ in args)
        ep = torch.export.export(model, args, dynamic_shapes=dyn, strict=False)
    except Exception:  # noqa: BLE001 - some peers' models only export with a static batch
        ep = torch.export.export(model, args, strict=False)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getbuffer().nbytes


class Pte:
    """A `.pte` program loaded in the ExecuTorch runtime, called like a module on batches of
    exactly `BATCH` rows (ExecuTorch plans memory for the exported shapes)."""

    def __init__(self, data: bytes) -> None:
        """Load `data` (the bytes of a .pte file)."""
        from executorch.runtime import Runtime

        self.size = len(data)
        self._program = Runtime.get().load_program(data)
        self._method = self._program.load_method("forward")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run the program on one batch."""
        return self._method.execute([x])[0]


class Onnx:
    """An `.onnx` file in an ONNX Runtime CPU session (as many intra-op threads as torch
    uses, their spinning off), called like a module on batches. Two sessions timed
    interleaved in one process each keep their thread pool spinning between runs by default,
    and the pools then fight for the cores: the same pair of files measured 0.61x to 1.9x
    apart from run to run that way, 1.03-1.04x with spinning off."""

    def __init__(self, path: Path, size: int) -> None:
        """Open the file at `path`, `size` bytes on disk with its external data."""
        import onnxruntime as ort

        self.size = size
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), opts,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run the session on one batch."""
        return torch.from_numpy(self._session.run(None, {self._input: x.numpy()})[0])


def onnx_file(model: torch.nn.Module, batch: torch.Tensor, profile: str) -> Onnx:
    """`model` written by `fxcompress.export` as `.onnx` and opened in ONNX Runtime (which
    reads the file, and its external data, when the session is created)."""
    with tempfile.TemporaryDirectory() as d:
        res = fxcompress.export(model, (batch.clone(),), Path(d, "m.onnx"), profile=profile)
        return Onnx(res.path, res.size_bytes)


def fixed_batch_accuracy(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                         y: torch.Tensor) -> float:
    """Top-1 accuracy (percent) of a runner of batches of exactly `BATCH` rows (a `.pte`
    plans memory for the exported shape): the last batch is zero-padded."""
    correct = 0
    for s in range(0, len(y), BATCH):
        xb = x[s:s + BATCH]
        n = len(xb)
        if n < BATCH:
            xb = torch.cat([xb, torch.zeros((BATCH - n, *xb.shape[1:]), dtype=xb.dtype)])
        pred = run(xb.contiguous())[:n].argmax(-1)
        correct += int((pred == y[s:s + BATCH]).sum())
    return 100.0 * correct / len(y)


def fp32_pte(model: torch.nn.Module, batch: torch.Tensor) -> bytes:
    """The fp32 model lowered to XNNPACK: the baseline of the `.pte` column."""
    ep = torch.export.export(model, (batch.clone(),), strict=False)
    return lower_to_pte(ep, "xnnpack")


# --- peers ----------------------------------------------------------------------------------
def torchao_int8(model: torch.nn.Module) -> torch.nn.Module:
    """torchao's int8 dynamic-activation, int8-weight quantization of a copy of `model`."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    m = copy.deepcopy(model).eval()
    quantize_(m, Int8DynamicActivationInt8WeightConfig())
    return m


def pt2e_xnnpack(model: torch.nn.Module, batch: torch.Tensor, calib: list) -> bytes:
    """The standard ExecuTorch mobile path: PT2E static int8 with XNNPACKQuantizer
    (symmetric, per-channel weights), calibrated, lowered to XNNPACK; returns .pte bytes."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    m = torch.export.export(copy.deepcopy(model).eval(), (batch.clone(),), strict=False).module()
    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    m = prepare_pt2e(m, q)
    with torch.no_grad():
        for (xb,) in calib:
            if len(xb) == len(batch):  # the captured graph keeps the example's batch size
                m(xb)
    m = convert_pt2e(m)
    ep = torch.export.export(m, (batch.clone(),), strict=False)
    return lower_to_pte(ep, "xnnpack")


def tp_prune(model: torch.nn.Module, example: torch.Tensor, ratio: float) -> torch.nn.Module:
    """A copy of `model` pruned by Torch-Pruning's L1 group magnitude pruner at `ratio` (the
    classifier's outputs kept), without fine-tuning."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    if ratio <= 0:
        return m
    last = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
    ignored = [last]
    # the hand-written attention reshapes q/k/v by a fixed head_dim: keep their output width
    # (the residual width may still be pruned, it is consistent through every block)
    for mod in m.modules():
        if hasattr(mod, "head_dim") and hasattr(mod, "query"):
            ignored += [mod.query, mod.key, mod.value]
    pruner = tp.pruner.MagnitudePruner(
        m, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return m.eval()


def tp_search(model: torch.nn.Module, example: torch.Tensor, x_cal: torch.Tensor,
              y_cal: torch.Tensor, budget: float,
              ratios: tuple[float, ...] = (0.01, 0.02, 0.03, 0.04) + tuple(
                  i / 20 for i in range(1, 19))
              ) -> tuple[float, torch.nn.Module]:
    """The largest ratio in `ratios` (tried in increasing order, stopping at the first that
    fails) whose calibration accuracy is within `budget` points of the unpruned model's;
    ratio 0 (the model itself) when none is."""
    base = accuracy(model, x_cal, y_cal)
    best = (0.0, copy.deepcopy(model).eval())
    for r in ratios:
        try:
            m = tp_prune(model, example, r)
            ok = accuracy(m, x_cal, y_cal) >= base - budget
        except Exception:  # noqa: BLE001 - a ratio the pruner cannot realise ends the search
            break
        if not ok:
            break
        best = (r, m)
    return best


# --- the run --------------------------------------------------------------------------------
def recovery(name: str) -> fxcompress.Recover:
    """The `recover=` of the "+ recover" rows: label-free distillation from the original model
    on the inputs of the training split (the data a team that trained the model has; labels
    are not used), judged, like every plan, by calibration-split accuracy, which it never
    trains on."""
    x_train, _ = MODELS[name]("train")
    return fxcompress.Recover(steps=200, lr=5e-4, data=[(x_train,)], stages=3,
                              train_others=True, others_lr=1e-4)


def bench_model(name: str, runs: int, profiles: tuple[str, ...], inductor: bool,
                log: Callable[[str], None],
                on_row: Callable[[list[Row]], None] = lambda rows: None,
                recover: bool = True) -> list[Row]:
    """Build and measure every row for one model; `on_row` gets the rows so far after each.
    With `recover`, each profile also gets a row compiled with `recover=recovery(name)`."""
    data = MODELS[name]
    model = load_pretrained(name).eval()
    x_cal, y_cal = data("calib")
    x_test, y_test = data("test")
    batch = x_test[:BATCH].contiguous()
    example = (x_cal[:32],)
    calib = [(x_cal[i:i + BATCH],) for i in range(0, len(x_cal), BATCH)]
    fp32 = lambda: model(batch)
    rows: list[Row] = []

    def guarded(method: str, fn: Callable[[], Row | list[Row]]) -> None:
        t0 = time.perf_counter()
        try:
            new = fn()
        except Exception as e:  # noqa: BLE001 - a failed row is reported, the run goes on
            traceback.print_exc()
            new = Row(name, method, note=f"failed: {type(e).__name__}: {str(e)[:120]}")
        for row in new if isinstance(new, list) else [new]:
            rows.append(row)
            log(f"{name:16s} {row.method:34s} acc={row.accuracy} size={row.size} "
                f"eager={row.eager_ratio} lowered={row.lowered_ratio} "
                f"({time.perf_counter() - t0:.0f} s) {row.note}")
        on_row(rows)

    base_pte = Pte(fp32_pte(model, batch))
    base_compiled = None
    if inductor:
        base_compiled = torch.compile(model)
        with torch.no_grad():
            base_compiled(batch)

    def pte_ratio(p: Pte) -> float:
        return interleaved(lambda: base_pte(batch), lambda: p(batch), runs=runs).ratio

    base_onnx = onnx_file(model, batch, ONNX_PROFILES[0]) if any(
        p in ONNX_PROFILES for p in profiles) else None

    def fp32_onnx_row() -> Row:
        return Row(name, "fp32 → .onnx", fmt=".onnx",
                   accuracy=fixed_batch_accuracy(base_onnx, x_test, y_test), size=base_onnx.size,
                   lowered_ratio=1.0, runtime="onnxruntime", compile_s=0.0)

    def onnx_row(method: str, g: torch.nn.Module, profile: str, compile_s: float,
                 note: str) -> Row:
        t0 = time.perf_counter()
        f = onnx_file(g, batch, profile)
        return Row(name, f"{method} → .onnx", fmt=".onnx",
                   accuracy=fixed_batch_accuracy(f, x_test, y_test), size=f.size,
                   lowered_ratio=interleaved(lambda: base_onnx(batch), lambda: f(batch),
                                             runs=runs).ratio,
                   runtime="onnxruntime", compile_s=compile_s + time.perf_counter() - t0,
                   peer=False, note=note)

    writer_base: dict[str, tuple[Any, Any]] = {}  # writer -> (ExportResult, ORT session)

    def write_file(m: torch.nn.Module, prof, d: str):
        res = fxcompress.export(m, (batch.clone(),), Path(d, "m" + prof.export_format),
                                profile=prof.name)
        # ONNX Runtime runs the TensorRT file here (on the CPU, not the target's engine)
        return res, Onnx(res.path, res.size_bytes) if prof.writer == "tensorrt" else None

    def fp32_writer_row(profile: str) -> Row:
        prof = load_profile(profile)
        with tempfile.TemporaryDirectory() as d:
            res, session = write_file(model, prof, d)
            writer_base[prof.writer] = (res, session)
            return Row(name, f"fp32 → {WRITER_FORMATS[prof.writer]}",
                       fmt=WRITER_FORMATS[prof.writer], size=res.size_bytes,
                       accuracy=None if session is None
                       else fixed_batch_accuracy(session, x_test, y_test),
                       lowered_ratio=None if session is None else 1.0,
                       runtime=session and "onnxruntime (CPU)", compile_s=0.0,
                       note=f"check {res.check_error:.1e} in {res.runtime}")

    def writer_row(method: str, g: torch.nn.Module, prof, compile_s: float, note: str) -> Row:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            res, session = write_file(g, prof, d)
            row = Row(name, f"{method} → {WRITER_FORMATS[prof.writer]}",
                      fmt=WRITER_FORMATS[prof.writer], size=res.size_bytes,
                      compile_s=compile_s + time.perf_counter() - t0, peer=False,
                      note=f"{note}; check {res.check_error:.1e} in {res.runtime}")
            if session is not None and writer_base.get(prof.writer, (0, None))[1] is not None:
                base = writer_base[prof.writer][1]
                row.accuracy = fixed_batch_accuracy(session, x_test, y_test)
                row.runtime = "onnxruntime (CPU)"
                row.lowered_ratio = interleaved(lambda: base(batch), lambda: session(batch),
                                                runs=runs).ratio
        return row

    def fp32_row() -> Row:
        return Row(name, "fp32 eager (baseline)", accuracy=accuracy(model, x_test, y_test),
                   size=pt2_bytes(model, example), eager_ratio=1.0, compile_s=0.0, peer=True,
                   extra={"pte_size": base_pte.size})

    def fp32_pte_row() -> Row:
        return Row(name, "fp32 → XNNPACK .pte", fmt=".pte",
                   accuracy=fixed_batch_accuracy(base_pte, x_test, y_test), size=base_pte.size,
                   lowered_ratio=1.0, runtime="executorch", compile_s=0.0)

    def ao_row() -> Row:
        t0 = time.perf_counter()
        m = torchao_int8(model)
        t = time.perf_counter() - t0
        return Row(name, "torchao int8 dyn (eager)", accuracy=accuracy(m, x_test, y_test),
                   size=pt2_bytes(m, example),
                   eager_ratio=interleaved(fp32, lambda: m(batch), runs=runs).ratio,
                   compile_s=t)

    def ao_compiled_row() -> Row:
        t0 = time.perf_counter()
        m = torchao_int8(model)
        c = torch.compile(m)
        with torch.no_grad():
            c(batch)
        t = time.perf_counter() - t0
        return Row(name, "torchao int8 dyn + torch.compile", accuracy=accuracy(c, x_test, y_test),
                   size=pt2_bytes(m, example), runtime="inductor",
                   lowered_ratio=interleaved(lambda: base_compiled(batch), lambda: c(batch),
                                             runs=runs).ratio, compile_s=t)

    def pt2e_row() -> Row:
        t0 = time.perf_counter()
        p = Pte(pt2e_xnnpack(model, batch, calib))
        t = time.perf_counter() - t0
        return Row(name, "PT2E XNNPACKQuantizer → .pte", fmt=".pte",
                   accuracy=fixed_batch_accuracy(p, x_test, y_test), size=p.size,
                   lowered_ratio=pte_ratio(p), runtime="executorch", compile_s=t)

    def tp_row() -> Row:
        t0 = time.perf_counter()
        ratio, m = tp_search(model, example[0], x_cal, y_cal, ACC_BUDGET)
        t = time.perf_counter() - t0
        p = Pte(fp32_pte(m, batch))
        return Row(name, f"Torch-Pruning L1 group (ratio {ratio:.2f})",
                   accuracy=accuracy(m, x_test, y_test), size=pt2_bytes(m, example),
                   eager_ratio=interleaved(fp32, lambda: m(batch), runs=runs).ratio,
                   lowered_ratio=pte_ratio(p), runtime="executorch", compile_s=t,
                   extra={"pte_size": p.size})

    def fx_row(profile: str, recover: bool = False) -> Callable[[], list[Row]]:
        def build() -> list[Row]:
            prof = load_profile(profile)
            evaluate = lambda g: correct(g, x_cal, y_cal)  # per example: a bounded drop
            t0 = time.perf_counter()
            g = fxcompress.compile(model, example, profile=profile, calibration=calib,
                                   evaluate=evaluate, tolerance=ACC_BUDGET, techniques=None,
                                   recover=recovery(name) if recover else None, seed=0)
            t = time.perf_counter() - t0
            rep = g.meta["fxcompress_report"]
            applied = sorted({la.applied.split("(")[0] for la in rep.layers
                              if la.applied != "none"})
            method = f"fxcompress {profile}" + (" + recover" if recover else "")
            row = Row(name, method, accuracy=accuracy(g, x_test, y_test),
                      size=pt2_bytes(g, example),
                      eager_ratio=interleaved(fp32, lambda: g(batch), runs=runs).ratio,
                      compile_s=t, peer=False, note=", ".join(applied) or "nothing applied")
            if prof.writer in WRITER_FORMATS:
                return [row, writer_row(method, g, prof, t, row.note)]
            if prof.export_format == ".pte":
                with tempfile.TemporaryDirectory() as d:
                    t0 = time.perf_counter()
                    fxcompress.export(g, (batch,), os.path.join(d, "m.pte"), profile=profile)
                    row.compile_s += time.perf_counter() - t0
                    p = Pte(Path(d, "m.pte").read_bytes())
                row.fmt, row.size, row.runtime = ".pte", p.size, "executorch"
                row.accuracy = fixed_batch_accuracy(p, x_test, y_test)
                row.lowered_ratio = pte_ratio(p)
            elif inductor and prof.runtime == "inductor":
                # the profile's runtime: Inductor with freezing, which folds int8 Q/DQ linears
                # into oneDNN int8 GEMMs; the flag is read when the graph compiles (first call,
                # in the grad mode `interleaved` times it in, so it is not compiled again)
                inductor_config.freezing = True
                try:
                    c = torch.compile(g)
                    with torch.inference_mode():
                        c(batch)
                finally:
                    inductor_config.freezing = False
                row.runtime = "inductor"
                row.lowered_ratio = interleaved(lambda: base_compiled(batch), lambda: c(batch),
                                                runs=runs).ratio
            if profile not in ONNX_PROFILES:
                return [row]
            return [row, onnx_row(method, g, profile, t, row.note)]
        return build

    guarded("fp32 eager (baseline)", fp32_row)
    guarded("fp32 → XNNPACK .pte", fp32_pte_row)
    if base_onnx is not None:
        guarded("fp32 → .onnx", fp32_onnx_row)
    for p in profiles:
        if load_profile(p).writer in WRITER_FORMATS:
            guarded(f"fp32 → {p}'s file", lambda p=p: fp32_writer_row(p))
    guarded("torchao int8 dyn (eager)", ao_row)
    if inductor:
        guarded("torchao int8 dyn + torch.compile", ao_compiled_row)
    guarded("PT2E XNNPACKQuantizer → .pte", pt2e_row)
    guarded("Torch-Pruning L1 group", tp_row)
    for p in profiles:
        guarded(f"fxcompress {p}", fx_row(p))
    if recover:
        for p in [p for p in profiles if p in RECOVER_PROFILES]:
            guarded(f"fxcompress {p} + recover", fx_row(p, recover=True))
    return rows


# --- output ---------------------------------------------------------------------------------
def _f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def verdicts(rows: list[Row]) -> list[str]:
    """For each fxcompress row: is it smaller than every peer at equal or better accuracy,
    and faster than every peer on its own path (eager for .pt2 rows, the .pte runtime for
    .pte rows)? One line per fxcompress row, saying by how much where it is not."""
    out = []
    for r in rows:
        if r.peer or r.size is None or r.accuracy is None:  # a file no runtime here runs
            continue
        peers = [p for p in rows if p.peer and p.model == r.model and p.size is not None
                 and p.accuracy is not None and not p.method.startswith("fp32")]
        better_acc = [p for p in peers if p.accuracy >= r.accuracy]
        bigger = [p for p in peers if p.size < r.size]
        msg = [f"**{r.model} / {r.method}** ({r.accuracy:.2f} %, {r.size:,} B):"]
        if not bigger:
            msg.append("smaller than every peer row;")
        else:
            msg.append("larger than " + ", ".join(
                f"{p.method} ({p.size:,} B, {p.accuracy:.2f} %, ×{r.size / p.size:.2f})"
                for p in bigger) + ";")
        if better_acc:
            msg.append("peers with equal or better accuracy: " + ", ".join(
                f"{p.method} ({p.accuracy:.2f} %)" for p in better_acc) + ";")
        # its own path: the .pte runtime for .pte rows, Inductor for rows whose profile runs
        # there, eager for every .pt2 row
        paths = []
        if r.fmt == ".pte":
            paths.append(("the .pte runtime", "lowered_ratio", "executorch"))
        elif r.fmt == ".onnx":
            paths.append(("ONNX Runtime", "lowered_ratio", "onnxruntime"))
        elif r.runtime == "inductor":
            paths.append(("Inductor", "lowered_ratio", "inductor"))
        if r.fmt == ".pt2":
            paths.append(("eager", "eager_ratio", None))
        for path, key, runtime in paths:
            same = [p for p in peers if getattr(p, key) is not None
                    and (runtime is None or p.runtime == runtime)]
            mine = getattr(r, key)
            if mine is None or not same:
                continue
            faster = [p for p in same if getattr(p, key) < mine]
            if not faster:
                msg.append(f"fastest on {path} ({mine:.2f}×);")
            else:
                msg.append(f"on {path} ({mine:.2f}×) slower than " + ", ".join(
                    f"{p.method} ({getattr(p, key):.2f}×)" for p in faster) + ";")
        out.append(" ".join(msg))
    return out


#: The 1-minute load average when this script started, quoted in the table's header.
START_LOAD = os.getloadavg()[0]


#: A section another script maintains in BENCHMARKS.md, markers included.
_MARKED = re.compile(r"<!-- ([\w.-]+):begin -->.*?<!-- \1:end -->", re.S)


def write_markdown(rows: list[Row], runs: int, seconds: float, path: Path = OUT_MD,
                   plot: str | None = "benchmarks/results/compare.png",
                   complete: bool = True) -> str:
    """Render the table (and the verdict lines) and write it atomically to `path`."""
    lines = [
        "# fxcompress against the alternatives",
        "",
        "Generated by `benchmarks/compare.py` (`make bench`); do not edit by hand. Every row was "
        f"built and measured in one run ({seconds / 60:.1f} min) on {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, load average {START_LOAD:.2f} when it started "
        "(run alone: timings beside other CPU-bound jobs are not comparable). Accuracy: top-1 "
        "on the test split (digits: scikit-learn digits; text: windows of Python's documentation), "
        ".pte rows run in `executorch.runtime`, .onnx rows (written by `fxcompress.export`) in "
        "ONNX Runtime's CPU provider. Size: bytes of the `torch.export.save` `.pt2` "
        "(eager rows), of the `.pte` (ExecuTorch rows) or of the `.onnx` (ONNX Runtime rows); "
        "size / fp32 is against the fp32 model's file of the same format. Eager: latency / "
        "fp32 eager. Lowered: latency / fp32 in the same runtime (ExecuTorch + XNNPACK `.pte`, "
        "ONNX Runtime `.onnx`, or Inductor via `torch.compile`; fxcompress rows of Inductor "
        "profiles compile with "
        "`torch._inductor.config.freezing = True`, their runtime). Ratios: interleaved "
        f"medians of {runs} runs, batch {BATCH}, below 1 is faster. Methods that choose their "
        "own setting get the same budget: "
        f"at most {ACC_BUDGET:g} points of calibration-split accuracy lost (fxcompress: "
        "`evaluate=` returning per-example correctness, with that tolerance on the 95% upper "
        "bound of a paired bootstrap of the drop; Torch-Pruning: the largest ratio within it, "
        "tried from 0.01 in steps of 0.01 to 0.05 then 0.05, no fine-tuning). \"+ recover\" rows: "
        "the same compile with `recover=`, label-free distillation from the original model on "
        "the training split's inputs (200 steps per stage, up to 3 stages extending the plan); "
        "no peer row is fine-tuned. Compile: wall time to produce the row's model or file. "
        "Rows \"→ .onnx (TensorRT)\", \"→ .onnx (QONNX)\", \"→ .mlpackage\", \"→ .pte "
        "(Cortex-M)\": the profile's own file, written by its writer (size / fp32 against the "
        "same writer's file of the fp32 model); the TensorRT file runs here in ONNX Runtime's "
        "CPU provider (fp16 on a CPU: not the target's engine), the others have no runtime "
        "here: the note gives the check `fxcompress.export` ran on one batch and what ran it "
        "(qonnx's executor, coremltools, ExecuTorch's reference kernels for CMSIS-NN), and "
        "they have no accuracy or latency; benchmarks/results/formats.md has them all.",
        "",
        *([] if complete else ["**Partial run**: it was interrupted; only the rows below "
                               "were measured.", ""]),
        "| model | method | format | test acc. | size (B) | size / fp32 | eager | lowered "
        "| runtime | compile | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # each file against the fp32 model's file of the same format
    base = {(r.model, r.fmt): r.size for r in rows if r.method.startswith("fp32") and r.size}
    for r in rows:
        ref = base.get((r.model, r.fmt))
        rel = r.size / ref if r.size and ref else None
        lines.append(
            f"| {r.model} | {r.method} | {r.fmt} | {_f(r.accuracy, '.2f')} "
            f"| {_f(r.size, ',')} | {_f(rel, '.3f')} | {_f(r.eager_ratio, '.2f')} "
            f"| {_f(r.lowered_ratio, '.2f')} | {r.runtime or '—'} "
            f"| {_f(r.compile_s, '.1f')}{' s' if r.compile_s is not None else ''} "
            f"| {r.note} |")
    lines += ["", "## Verdicts (computed from the table)", ""]
    lines += [f"- {v}" for v in verdicts(rows)] or ["- no fxcompress row was measured"]
    if plot:
        lines += ["", f"![size vs accuracy]({plot})"]
    text = "\n".join(lines) + "\n"
    # sections other scripts keep in the file (`<!-- name:begin -->` ... `<!-- name:end -->`,
    # e.g. benchmarks/pretrained.py's) survive the rewrite, at the end
    kept = [m.group(0) for m in _MARKED.finditer(path.read_text())] if path.exists() else []
    if kept:
        text += "\n" + "\n\n".join(kept) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


def write_plot(rows: list[Row], path: Path = OUT_PNG) -> None:
    """Size vs test accuracy, one panel per model; fxcompress rows highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        for r in rows:
            if r.model != name or r.size is None or r.accuracy is None:
                continue
            color = "tab:red" if not r.peer else "tab:blue"
            marker = {".pte": "s", ".onnx": "^"}.get(r.fmt, "o")
            ax.scatter(r.size / 1024, r.accuracy, c=color, marker=marker)
            ax.annotate(r.method, (r.size / 1024, r.accuracy), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("serialized size (KiB; circles .pt2, squares .pte, triangles .onnx)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}: red fxcompress, blue alternatives")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def save_json(rows: list[Row], runs: int, seconds: float, complete: bool) -> None:
    """The raw rows, written after every row (an interrupted run keeps what it measured) and
    at the end, so a change to the table's layout never needs a re-measurement."""
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT_JSON.with_name(f".{OUT_JSON.name}.tmp")
    tmp.write_text(json.dumps({"runs": runs, "seconds": seconds, "complete": complete,
                               "rows": [asdict(r) for r in rows]}, indent=1))
    os.replace(tmp, OUT_JSON)


def main(argv: list[str] | None = None) -> int:
    """Run every row for every model and write BENCHMARKS.md and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--profiles", nargs="*", default=list(PROFILES))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--no-inductor", action="store_true",
                    help="skip the torch.compile rows (they dominate the run time)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-recover", action="store_true",
                    help="skip the fxcompress rows compiled with recover= (distillation)")
    ap.add_argument("--from-json", action="store_true",
                    help=f"only rewrite the table and plot from {OUT_JSON.name}")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(OUT_JSON.read_text())
        rows = [Row(**r) for r in saved["rows"]]
        write_plot(rows)
        print(write_markdown(rows, saved["runs"], saved["seconds"],
                             complete=saved.get("complete", True)))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)
    rows: list[Row] = []
    for name in args.models:
        done = list(rows)
        rows += bench_model(name, args.runs, tuple(args.profiles), not args.no_inductor, log,
                            lambda new, done=done: save_json(done + new, args.runs,
                                                             time.perf_counter() - t0, False),
                            recover=not args.no_recover)
    seconds = time.perf_counter() - t0
    save_json(rows, args.runs, seconds, complete=True)
    write_plot(rows)
    print(write_markdown(rows, args.runs, seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
