"""The main job on an embedded default: the digits CNN, trained here on scikit-learn's digits,
compiled for a target and measured (`make demo`, `fxcompress demo`).

Prints the report, test accuracy before and after, serialized size before and after (bytes of
`torch.export.save` files), and the eager latency ratio (interleaved medians).
"""

from __future__ import annotations

import argparse
import io
import time

import torch

import fxcompress
from fxcompress.timing import interleaved


def saved_bytes(model: torch.nn.Module, example: tuple, dynamic: bool = True) -> int:
    """Bytes of `torch.export.save` of `model` exported on clones of `example`."""
    args = tuple(x.clone() for x in example)
    dyn = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic else None
    ep = torch.export.export(model, args, dynamic_shapes=dyn, strict=False)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getbuffer().nbytes


def run(profile: str = "mobile-arm", tolerance: float = 0.02, model_name: str = "digits_cnn",
        techniques: list[str] | None = None, seed: int = 0, runs: int = 50) -> dict:
    """Compile the trained digits model for `profile` and measure it; returns the figures."""
    from fxcompress.models import accuracy, digits_data, load_pretrained

    model = load_pretrained(model_name)
    x_cal, _ = digits_data("calib")
    x_test, y_test = digits_data("test")
    example = (x_cal[:32],)
    calibration = [(x_cal[i:i + 64],) for i in range(0, len(x_cal), 64)]
    t0 = time.perf_counter()
    small = fxcompress.compile(model, example, profile=profile, calibration=calibration,
                               tolerance=tolerance, techniques=techniques, seed=seed)
    compile_s = time.perf_counter() - t0
    batch = x_test[:64]
    timing = interleaved(lambda: model(batch), lambda: small(batch), runs=runs)
    return {
        "model": model_name, "profile": profile, "tolerance": tolerance,
        "report": small.meta["fxcompress_report"],
        "accuracy_before": accuracy(model, x_test, y_test),
        "accuracy_after": accuracy(small, x_test, y_test),
        "bytes_before": saved_bytes(model, example),
        "bytes_after": saved_bytes(small, example),
        "latency_ratio": timing.ratio, "compile_seconds": compile_s, "compiled": small,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: `fxcompress demo [--profile P] [--tolerance T]`."""
    ap = argparse.ArgumentParser(prog="fxcompress demo", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="mobile-arm")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--model", default="digits_cnn", choices=["digits_cnn", "digits_mlp"])
    args = ap.parse_args(argv)
    r = run(args.profile, args.tolerance, args.model)
    print(r["report"])
    print()
    print(f"model            {r['model']} (trained on scikit-learn digits), profile "
          f"{r['profile']}, tolerance {r['tolerance']:g}")
    print(f"test accuracy    {r['accuracy_before']:.2f}% → {r['accuracy_after']:.2f}%")
    print(f"serialized size  {r['bytes_before']:,} B → {r['bytes_after']:,} B "
          f"({r['bytes_after'] / r['bytes_before']:.3f}×, torch.export.save)")
    print(f"eager latency    {r['latency_ratio']:.3f}× of the original (batch 64, interleaved "
          "medians)")
    print(f"compile time     {r['compile_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
