"""The main job on an embedded default: the digits CNN, trained here on scikit-learn's digits,
compiled for a target and measured (`make demo`, `fxcompress demo`).

Prints the report, test accuracy before and after, serialized size before and after (bytes of
`torch.export.save` files, as the report measured them), and the eager latency ratio
(interleaved medians). For a target that runs a `.pte` (its profile's `export_format`), the
original and the compressed model are also written as `.pte` files for the profile's
ExecuTorch delegate, and their sizes and latency ratio (interleaved medians, in the ExecuTorch
runtime) are printed: that is the figure of what the target runs; eager PyTorch is then for
reference only.

The model and its data are in `fxcompress.demo.digits`. Needs scikit-learn (the data) and, for
the `.pte` figures, ExecuTorch: ``pip install 'fxcompress[demo]'``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import fxcompress
from fxcompress.errors import FxCompressError
from fxcompress.hardware_profiles import Profile
from fxcompress.host import interleaved

DEMO_INSTALL = "pip install 'fxcompress[demo]'"
_DELEGATE_NAMES = {"xnnpack": "XNNPACK", "coreml": "Core ML", "mps": "MPS", "vulkan": "Vulkan",
                   "qnn": "QNN"}


def require_demo_dependencies() -> None:
    """Raise `FxCompressError` naming the extra to install when scikit-learn (the demo's data,
    `load_digits`) cannot be imported."""
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise FxCompressError(f"fxcompress demo needs scikit-learn (its data is scikit-learn's "
                              f"digits), which cannot be imported here ({e}); install the "
                              f"demo's extra: {DEMO_INSTALL}") from None


def pte_unavailable(profile: Profile) -> str | None:
    """Why this machine cannot write and time `.pte` files for `profile` (None: it can)."""
    try:
        import executorch  # noqa: F401
        import executorch.exir  # noqa: F401
        import executorch.runtime  # noqa: F401
    except ImportError:
        return f"the ExecuTorch runtime is not installed: {DEMO_INSTALL}"
    from fxcompress.export import preflight

    try:  # the profile's delegate must lower here and its backend run here
        preflight(Path(tempfile.gettempdir()) / "fxcompress-demo.pte", profile)
    except FxCompressError as e:
        return str(e)
    from fxcompress.export import writer_for

    if writer_for(".pte", profile) == "cortex-m":  # CMSIS-NN kernels exist only on the device
        from fxcompress.export import cortex_m

        return cortex_m.runtime_note()
    return None


def runtime_label(profile: Profile) -> str:
    """E.g. "ExecuTorch + XNNPACK"."""
    if profile.writer == "cortex-m":
        return "ExecuTorch Cortex-M (CMSIS-NN)"
    if profile.delegate is None:
        return "ExecuTorch portable kernels"
    return f"ExecuTorch + {_DELEGATE_NAMES.get(profile.delegate, profile.delegate)}"


def stderr_progress(start: float | None = None) -> Callable[[str], None]:
    """A `progress` callback: each line on standard error, prefixed with the seconds elapsed
    since `start` (default: now), flushed."""
    t0 = time.perf_counter() if start is None else start

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - t0:5.1f} s] {line}", file=sys.stderr, flush=True)

    return say


def time_pte(original: torch.nn.Module, compressed: torch.nn.Module, batch: torch.Tensor,
             profile: Profile, runs: int, log: Callable[[str], None]) -> dict:
    """Write both models as `.pte` for `profile` into a temporary folder, load them in the
    ExecuTorch runtime and time them interleaved on `batch`; sizes and the latency ratio.

    `fxcompress.export` lowers the compressed model from the program compile kept where it is
    a program of `batch`'s shape (a `.pte` is static); at another batch size it exports it
    for that shape."""
    with tempfile.TemporaryDirectory(prefix="fxcompress-demo-") as tmp:
        paths = Path(tmp) / "original.pte", Path(tmp) / "compressed.pte"
        written = []
        for label, model, path in zip(("original", "compressed"), (original, compressed), paths,
                                      strict=True):
            log(f"writing the {label} model as .pte ({runtime_label(profile)}, batch "
                f"{batch.shape[0]}; checked in the runtime)")
            with warnings.catch_warnings():  # torch's pytree deprecations, raised in lowering
                warnings.simplefilter("ignore", FutureWarning)
                written.append(fxcompress.export(model, (batch,), path, profile=profile))
        log(f"timing both .pte files in the ExecuTorch runtime ({runs} interleaved runs)")
        timing = _time_files(paths, batch, runs)  # the programs are released before the files
    return {"pte_latency_ratio": timing.ratio, "pte_bytes_before": written[0].size_bytes,
            "pte_bytes_after": written[1].size_bytes}


def _time_files(paths: tuple[Path, Path], batch: torch.Tensor, runs: int):
    from fxcompress.export import PteProgram

    before, after = PteProgram(paths[0]), PteProgram(paths[1])
    return interleaved(lambda: before(batch), lambda: after(batch), runs=runs)


def run(profile: str | Profile = "mobile-arm", tolerance: float = 0.02,
        model_name: str = "digits_cnn", techniques: list[str] | None = None, seed: int = 0,
        runs: int = 50, progress: Callable[[str], None] | None = None,
        pte: bool = True, model: torch.nn.Module | None = None) -> dict:
    """Compile the trained digits model for `profile` and measure it; returns the figures.

    The model is the shipped digits CNN (`model_name` ``"digits_cnn"``), or `model`, any
    classifier of ``(N, 1, 8, 8)`` digit images, named `model_name` in the figures.
    `progress` receives one line per step (compile's planner steps included). The serialized
    sizes are those the report measured. For a profile whose `export_format` is ``.pte`` the
    `.pte` keys hold the sizes and latency ratio of the original and compressed `.pte` files,
    or None with `pte_note` saying why they could not be measured here; for other profiles,
    or with `pte=False`, they are None."""
    require_demo_dependencies()
    from fxcompress.demo.digits import digits_data, load_digits_cnn
    from fxcompress.metrics import accuracy

    if model is None and model_name != "digits_cnn":
        raise FxCompressError(f"the demo ships one model, digits_cnn, not {model_name!r}; pass "
                              "model= to compile another classifier of the digits")

    log = progress or (lambda s: None)
    prof = fxcompress.load_profile(profile)
    is_pte = pte and prof.export_format == ".pte"
    pte_note = pte_unavailable(prof) if is_pte else None  # said before minutes of compiling
    if pte_note is not None:
        log(f"the .pte will not be timed: {pte_note}")
    log(f"loading {model_name} and the digits data")
    if model is None:
        model = load_digits_cnn()
    x_cal, _ = digits_data("calib")
    x_test, y_test = digits_data("test")
    example = (x_cal[:32],)
    calibration = [(x_cal[i:i + 64],) for i in range(0, len(x_cal), 64)]
    log(f"compiling for {prof.name} (tolerance {tolerance:g})")
    t0 = time.perf_counter()
    small = fxcompress.compile(model, example, profile=prof, calibration=calibration,
                               tolerance=tolerance, techniques=techniques, seed=seed,
                               progress=log)
    compile_s = time.perf_counter() - t0
    report = small.meta["fxcompress_report"]
    batch = x_test[:64]
    log(f"timing eager PyTorch ({runs} interleaved runs)")
    timing = interleaved(lambda: model(batch), lambda: small(batch), runs=runs)
    pte_figures = {"pte_latency_ratio": None, "pte_bytes_before": None, "pte_bytes_after": None}
    if is_pte and pte_note is None:
        pte_figures = time_pte(model, small, batch, prof, runs, log)
    return {
        "model": model_name, "profile": prof.name, "tolerance": tolerance,
        "report": report,
        "accuracy_before": accuracy(model, x_test, y_test),
        "accuracy_after": accuracy(small, x_test, y_test),
        "bytes_before": report.serialized_bytes_before,
        "bytes_after": report.serialized_bytes_after,
        "latency_ratio": timing.ratio, "compile_seconds": compile_s, "compiled": small,
        "runtime": prof.runtime, "export_format": prof.export_format, "delegate": prof.delegate,
        "batch": int(batch.shape[0]), **pte_figures, "pte_note": pte_note,
    }


def figures(r: dict, prof: Profile) -> list[str]:
    """The lines printed under the report."""
    lines = [
        f"model            {r['model']} (trained on scikit-learn digits), profile "
        f"{r['profile']}, tolerance {r['tolerance']:g}",
        f"test accuracy    {r['accuracy_before']:.2f}% → {r['accuracy_after']:.2f}%",
        f"serialized size  {r['bytes_before']:,} B → {r['bytes_after']:,} B "
        f"({r['bytes_after'] / r['bytes_before']:.3f}×, torch.export.save)",
    ]
    measured = r.get("pte_latency_ratio") is not None
    if measured:
        lines.append(f".pte size        {r['pte_bytes_before']:,} B → {r['pte_bytes_after']:,} B "
                     f"({r['pte_bytes_after'] / r['pte_bytes_before']:.3f}×, "
                     f"{runtime_label(prof)})")
    lines.append(f"eager latency    {r['latency_ratio']:.3f}× of the original (batch "
                 f"{r['batch']}, interleaved medians)")
    if prof.export_format == ".pte":
        if measured:
            lines.append(f".pte latency     {r['pte_latency_ratio']:.3f}× of the original .pte "
                         f"({runtime_label(prof)}, batch {r['batch']}, interleaved medians)")
            lines.append(f"target figure    {prof.name} runs the .pte ({prof.runtime}): the "
                         ".pte figure is the target's; eager is for reference")
        else:
            lines.append(f".pte latency     not measured: {r['pte_note'] or 'not requested'}")
            lines.append(f"target figure    {prof.name} runs the .pte ({prof.runtime}), not "
                         "timed here; eager is for reference only")
    else:
        lines.append(f"target figure    {prof.name} runs its {prof.export_format} under "
                     f"{prof.runtime}; eager PyTorch on this host is for reference only")
    lines.append(f"compile time     {r['compile_seconds']:.1f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: `fxcompress demo [--profile P] [--tolerance T]`."""
    ap = argparse.ArgumentParser(prog="fxcompress demo", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="mobile-arm")
    ap.add_argument("--tolerance", type=float, default=0.02)
    args = ap.parse_args(argv)
    require_demo_dependencies()  # at once, before loading anything
    prof = fxcompress.load_profile(args.profile)
    r = run(prof, args.tolerance, progress=stderr_progress())
    print(r["report"])
    print()
    print("\n".join(figures(r, prof)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
