"""Checks of the `nvidia-gpu` profile on a real GPU (run on a machine with CUDA).

1. The profile's numbers against the device: fp32 / fp16 / int8 matmul throughput, 2:4
   semi-structured sparse fp16 matmul against dense (does the sparsity pattern the profile
   marks "compute" really speed compute up?), memory bandwidth, and per-kernel overhead.
2. Compiled models on the device: each model is compiled for `nvidia-gpu` (on the host CPU),
   then the original and the compiled graph are timed on the GPU under fp16 autocast, eager
   and under `torch.compile`, interleaved, medians, as ratios.

Writes `benchmarks/results/gpu.md` (or `--out`).

    python benchmarks/gpu_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.export.passes import move_to_device_pass

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* as a script

from fxcompress.hardware_profiles import load_profile  # noqa: E402


def cuda_median(fn, runs: int = 20, warmup: int = 3) -> float:
    """Median seconds of `fn` on the GPU, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def interleaved_cuda(a, b, runs: int = 30) -> tuple[float, float]:
    """Medians of two GPU callables timed alternately."""
    ta, tb = [], []
    for _ in range(3):
        a(), b()
    for i in range(runs):
        for fn, acc in (((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def measure_device() -> dict[str, float]:
    """Measured peaks in GOP/s, bandwidth GB/s, overhead µs, and the 2:4 sparse speed-up."""
    dev = "cuda"
    out = {}
    n = 8192
    with torch.inference_mode():
        torch.backends.cuda.matmul.allow_tf32 = False
        a = torch.randn(4096, 4096, device=dev)
        out["fp32"] = 2 * 4096**3 / cuda_median(lambda: a @ a) / 1e9
        h = torch.randn(n, n, device=dev, dtype=torch.float16)
        out["fp16"] = 2 * n**3 / cuda_median(lambda: h @ h) / 1e9
        i8 = torch.randint(-127, 127, (n, n), device=dev, dtype=torch.int8)
        out["int8"] = 2 * n**3 / cuda_median(lambda: torch._int_mm(i8, i8)) / 1e9
        try:
            from torch.sparse import to_sparse_semi_structured

            mask = torch.tensor([1, 1, 0, 0], device=dev, dtype=torch.float16).repeat(n, n // 4)
            w = h * mask
            ws = to_sparse_semi_structured(w)
            x = torch.randn(n, n, device=dev, dtype=torch.float16)
            dense = cuda_median(lambda: torch.mm(w, x))
            sparse = cuda_median(lambda: torch.mm(ws, x))
            out["sparse24_speedup"] = dense / sparse
        except Exception as e:  # the device or build may lack the sparse kernels
            out["sparse24_error"] = f"{type(e).__name__}: {str(e)[:80]}"
        big = torch.empty(512 * 1024 * 1024, device=dev, dtype=torch.uint8)
        dst = torch.empty_like(big)
        out["bandwidth_gbs"] = 2 * big.numel() / cuda_median(lambda: dst.copy_(big)) / 1e9
        tiny = torch.ones(4, device=dev)
        k = 1000

        def many():
            for _ in range(k):
                torch.add(tiny, tiny)

        out["op_overhead_us"] = cuda_median(many, runs=5) / k * 1e6
    return out


def model_rows() -> list[dict]:
    """Compile models for nvidia-gpu and time them on the GPU."""
    import fxcompress

    rows = []
    models = []
    try:
        from benchmarks.models import load_pretrained, text_data

        ids, _ = text_data("calib")
        models.append(("text_transformer (trained)", load_pretrained("text_transformer"),
                       ids[:32], [(ids[i:i + 64],) for i in range(0, min(len(ids), 256), 64)]))
    except Exception as e:
        rows.append({"model": "text_transformer", "error": f"{type(e).__name__}: {e}"})
    try:
        import transformers

        cfg = transformers.BertConfig(num_hidden_layers=4)
        torch.manual_seed(0)
        bert = transformers.BertModel(cfg).eval()
        x = torch.randint(0, cfg.vocab_size, (8, 128))
        models.append(("BERT-base config, 4 layers (random)", bert, x,
                       [(torch.randint(0, cfg.vocab_size, (8, 128)),) for _ in range(2)]))
    except Exception as e:
        rows.append({"model": "bert", "error": f"{type(e).__name__}: {e}"})
    for name, model, example, calib in models:
        t0 = time.perf_counter()
        small = fxcompress.compile(model, (example,), profile="nvidia-gpu", calibration=calib,
                                   tolerance=0.02, time_budget=240)
        compile_s = time.perf_counter() - t0
        rep = small.meta["fxcompress_report"]
        xb = torch.cat([example] * 4).cuda()
        row = {"model": name, "applied": sorted({lay.applied.split("(")[0] for lay in rep.layers
                                                 if lay.applied != "none"}),
               "error": rep.error, "compile_s": compile_s,
               "est_ratio": rep.latency_after_us / rep.latency_before_us,
               "batch": tuple(xb.shape)}
        # export bakes device=cpu into factory ops: move the program, not just its tensors
        ep = torch.export.export(small, (example,), strict=False,
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))
        moved = move_to_device_pass(ep, "cuda").module()
        row.update(_time_on_gpu(model.cuda(), moved, xb))
        rows.append(row)
    return rows


def _time_on_gpu(orig, comp, xb) -> dict:
    """Eager and torch.compile ratios (compiled / original) under fp16 autocast."""
    out = {}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        a, b = interleaved_cuda(lambda: orig(xb), lambda: comp(xb))
        out["eager_ratio"] = b / a
        try:
            co, cc = torch.compile(orig), torch.compile(comp)
            a, b = interleaved_cuda(lambda: co(xb), lambda: cc(xb))
            out["compiled_ratio"] = b / a
        except Exception as e:
            out["compiled_ratio"] = f"{type(e).__name__}"
    return out


def main() -> None:
    """Run the checks and write the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--skip-models", action="store_true", help="only check the device numbers")
    args = ap.parse_args()
    prof = load_profile("nvidia-gpu")
    dev = measure_device()
    lines = ["# nvidia-gpu profile, checked on a real GPU", "",
             "Generated by `benchmarks/gpu_check.py` on "
             f"{torch.cuda.get_device_name()} (torch {torch.__version__}, "
             f"{platform.machine()}); do not edit by hand.", "",
             "| quantity | profile | measured | measured / profile |", "|---|---|---|---|"]
    for key, ref in (("fp32", prof.peak_gops["fp32"]), ("fp16", prof.peak_gops["fp16"]),
                     ("int8", prof.peak_gops["int8"]), ("bandwidth_gbs", prof.bandwidth_gbs),
                     ("op_overhead_us", prof.op_overhead_us)):
        unit = {"bandwidth_gbs": "GB/s", "op_overhead_us": "µs"}.get(key, "GOP/s")
        lines.append(f"| {key} ({unit}) | {ref:,.1f} | {dev[key]:,.1f} | {dev[key] / ref:.2f} |")
    sp = dev.get("sparse24_speedup")
    lines.append(f"| 2:4 sparse fp16 matmul speed-up over dense | 2 (datasheet) | "
                 f"{sp:.2f}× |  |" if sp else f"| 2:4 sparse | | {dev.get('sparse24_error')} | |")
    lines += ["", "## Compiled for nvidia-gpu, timed on the GPU (fp16 autocast)", "",
              "| model | applied | error | est. latency | eager ratio | torch.compile ratio "
              "| compile |", "|---|---|---|---|---|---|---|"]
    for r in ([] if args.skip_models else model_rows()):
        if "eager_ratio" not in r:
            lines.append(f"| {r['model']} | failed: {r.get('error')} | | | | | |")
            continue
        cr = r["compiled_ratio"]
        cr = f"{cr:.2f}×" if isinstance(cr, float) else cr
        lines.append(f"| {r['model']} (batch {r['batch']}) | {', '.join(r['applied']) or 'none'}"
                     f" | {r['error']:.4f} | {r['est_ratio']:.2f}× | {r['eager_ratio']:.2f}× "
                     f"| {cr} | {r['compile_s']:.0f} s |")
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
