"""Benchmark of `fxcompress.export`: the trained digits CNN, compiled for mobile-arm, written as
.pt2 / .pte / .onnx and run in each file's own runtime.

For each format: bytes on disk of the fp32 model's file and of the compiled model's file (an
.onnx file's external data included), the agreement of the file's predictions with the compiled
model's (eager PyTorch) on every test digit, the file's test accuracy, and, for .pte and .onnx,
the runtime latency of the compiled file against the fp32 file (one process, interleaved,
medians). Writes `benchmarks/results/export.md`.

    .venv/bin/python benchmarks/export.py [--tolerance 0.02] [--runs 200] [--budget 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* as a script

import fxcompress  # noqa: E402
from benchmarks import conditions  # noqa: E402
from benchmarks.models import accuracy, digits_data, load_pretrained  # noqa: E402

ex = sys.modules["fxcompress.export"]
OUT = Path(__file__).parent / "results" / "export.md"
PROFILE = "mobile-arm"


def _runner(path: Path):
    """A callable running the file in its own runtime on a batch: returns logits (torch)."""
    if path.suffix == ".pt2":
        module = ex.load_program(path).module()
        return lambda x: module(x)
    if path.suffix == ".pte":
        program = ex.PteProgram(path)
        return lambda x: program(x)[0]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _interleaved(a, b, x, runs: int, budget_s: float) -> tuple[float, float, int]:
    """Medians of `a(x)` and `b(x)` timed alternately: `runs` pairs, or fewer (at least 3)
    when they would take longer than `budget_s` seconds."""
    ta, tb = [], []
    a(x), b(x)  # warm-up
    start = time.perf_counter()
    for i in range(runs):
        for fn, acc in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            fn(x)
            acc.append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return statistics.median(ta), statistics.median(tb), len(ta)


def main() -> None:
    """Run the benchmark and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--budget", type=float, default=30.0,
                    help="seconds of timing per format at most (at least 3 runs)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_pretrained("digits_cnn")
    x_cal, _ = digits_data("calib")
    x_test, y_test = digits_data("test")
    calibration = [(x_cal[i:i + 64],) for i in range(0, len(x_cal), 64)]
    t0 = time.perf_counter()
    small = fxcompress.compile(model, (x_cal[:32],), profile=PROFILE, calibration=calibration,
                               tolerance=args.tolerance)
    compile_s = time.perf_counter() - t0
    report = small.meta["fxcompress_report"]
    with torch.no_grad():
        ref = small(x_test).argmax(1)
    acc_fp32 = accuracy(model, x_test, y_test)
    acc_eager = accuracy(small, x_test, y_test)
    # the whole test set is one batch: a .pte program is planned for fixed shapes
    example = (x_test.clone(),)
    rows = []
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        for fmt in (".pt2", ".pte", ".onnx"):
            t = time.perf_counter()
            base = fxcompress.export(model, example, Path(d) / f"fp32{fmt}", profile=PROFILE)
            comp = fxcompress.export(small, example, Path(d) / f"compiled{fmt}",
                                     profile=PROFILE)
            export_s = time.perf_counter() - t
            run_base, run_comp = _runner(base.path), _runner(comp.path)
            pred = run_comp(x_test.clone()).argmax(1)
            agree = float((pred == ref).float().mean() * 100)
            acc_file = float((pred == y_test).float().mean() * 100)
            speed = ""
            if fmt != ".pt2":
                tb, tc, n = _interleaved(run_base, run_comp, x_test.clone(), args.runs,
                                         args.budget)
                speed = f"{tc / tb:.3f}× ({tb * 1e3:.1f} → {tc * 1e3:.1f} ms, {n} runs)"
            delegated = ""
            if fmt == ".pte":
                q = sum(n for k, n in comp.delegated_ops.items() if "quantized" in k)
                delegated = (f"{sum(comp.delegated_ops.values())} ops delegated to "
                             f"{comp.delegate} ({q} quantized), "
                             f"{sum(comp.undelegated_ops.values())} left portable")
            rows.append((fmt, base.size_bytes, comp.size_bytes, agree, acc_file, speed,
                         comp.check_error, export_s, delegated))
            print(rows[-1], flush=True)
    applied = sorted({lay.applied.split("(")[0] for lay in report.layers
                      if lay.applied != "none"})
    lines = [
        "# Export: the digits CNN compiled for mobile-arm, in each deployment format",
        "",
        f"Generated by `benchmarks/export.py` (tolerance {args.tolerance:g}, profile {PROFILE};"
        f" rewrites applied: {', '.join(applied) or 'none'}; compile {compile_s:.1f} s; "
        f"{conditions()}).",
        f"Test digits: {len(y_test)}. Test accuracy: fp32 {acc_fp32:.2f}%, compiled (eager "
        f"PyTorch) {acc_eager:.2f}%. Agreement: the file's top-1 prediction equals the compiled "
        "model's (eager) on that share of the test digits. Sizes are bytes on disk. Latency: "
        f"the compiled file against the fp32 file in the same runtime, batch {len(y_test)}, "
        f"interleaved, medians of up to {args.runs} runs within {args.budget:g} s (below 1 is "
        "faster).",
        "",
        "| format | runtime | fp32 bytes | compiled bytes | size × | agreement | accuracy | "
        "runtime latency × | check error | export s |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    runtimes = {".pt2": "torch.export.load", ".pte": "ExecuTorch + XNNPACK",
                ".onnx": "ONNX Runtime (CPU)"}
    for fmt, b, c, agree, acc, speed, err, secs, _ in rows:
        lines.append(f"| {fmt} | {runtimes[fmt]} | {b:,} | {c:,} | {c / b:.3f} | "
                     f"{agree:.2f}% | {acc:.2f}% | {speed or '—'} | {err:.1e} | {secs:.1f} |")
    notes = [r[8] for r in rows if r[8]]
    if notes:
        lines += ["", f".pte delegation: {notes[0]}."]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
