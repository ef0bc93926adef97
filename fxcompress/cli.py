"""The `fxcompress` command line.

    fxcompress compile MODEL.pt2 --profile P [--calibration FILE] [--tolerance T]
                       [--techniques svd,int8] [--holdout H] [--overrides JSON]
                       -o OUT.{pt2,pte,onnx}
    fxcompress profiles
    fxcompress report OUT.pt2
    fxcompress demo [...]
    fxcompress sweep [MODEL.pt2] --profile P [--tolerances 0.005,0.01,0.02] [--plot OUT.png]

MODEL is a program saved with `torch.export.save`; it and the calibration file are loaded
safely (tensors only, nothing unpickled). `--json` prints machine-readable results on standard
output; progress goes to standard error. Exit codes: 0 done, 2 a mistake in what was given
(the message says what to fix; nothing is written), 1 a bug of ours.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
DEFAULT_SWEEP = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
CALIBRATION_BATCH = 64  # rows per calibration batch when the file holds one big tensor


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as `FxCompressError`, so `--json` sees them too."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        from fxcompress.errors import FxCompressError

        raise FxCompressError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="fxcompress", description="Hardware-aware model compression for PyTorch.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("compile", help="compress a saved program for a target and export it")
    c.add_argument("model", metavar="MODEL.pt2", help="a program saved with torch.export.save")
    c.add_argument("--profile", "-p", default="mobile-arm",
                   help="a built-in profile name (see `fxcompress profiles`) or a .toml path")
    c.add_argument("--calibration", "-c", metavar="FILE",
                   help="torch.save'd tensors: a tensor (split into batches of 64), a tuple of "
                        "tensors (one per input), or a list of batches")
    c.add_argument("--tolerance", "-t", type=float, default=None,
                   help="largest relative output error allowed (default 0.01)")
    c.add_argument("--techniques", nargs="+", metavar="T",
                   help="a subset of svd tucker prune share int8 binary (comma or space "
                        "separated); default: every technique the profile runs")
    c.add_argument("--overrides", metavar="JSON",
                   help="per-layer settings as a JSON object or a .json file, e.g. "
                        "'{\"fc1\": {\"skip\": true}, \"op:conv2d\": {\"techniques\": "
                        "[\"int8\"]}}'")
    c.add_argument("--holdout", type=float, default=None,
                   help="share of calibration batches held out to judge plans on (default "
                        "0.25; 0: judge on the data the rewrites were fitted to)")
    c.add_argument("--objective", choices=["latency", "size"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--output", "-o", required=True, metavar="OUT",
                   help="OUT.pt2, OUT.pte or OUT.onnx: the suffix picks the format")
    c.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("profiles", help="list the built-in hardware profiles")
    p.add_argument("--json", action="store_true")

    r = sub.add_parser("report", help="print the report stored in a .pt2 or .onnx file")
    r.add_argument("file", metavar="OUT")
    r.add_argument("--json", action="store_true")

    sub.add_parser("demo", help="compile the trained digits CNN and measure it", add_help=False)

    s = sub.add_parser("sweep", help="size and estimated latency against error, across "
                                     "tolerances: a table and a PNG plot")
    s.add_argument("model", metavar="MODEL.pt2", nargs="?",
                   help="a saved program (default: the trained digits CNN, whose test "
                        "accuracy is reported too)")
    s.add_argument("--profile", "-p", default="mobile-arm")
    s.add_argument("--calibration", "-c", metavar="FILE")
    s.add_argument("--tolerances", default=",".join(f"{t:g}" for t in DEFAULT_SWEEP),
                   help="comma-separated tolerances (default %(default)s)")
    s.add_argument("--techniques", nargs="+", metavar="T")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--plot", metavar="OUT.png", default="sweep.png",
                   help="where to write the plot (default %(default)s; 'none' for no plot)")
    s.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    from fxcompress.errors import FxCompressError

    try:
        if argv[:1] == ["demo"]:  # the demo parses its own options; its errors are said below
            from fxcompress.demo import main as demo_main

            return int(demo_main(argv[1:]) or 0)
        args = _parser().parse_args(argv)
        if args.command is None:
            _parser().print_help(sys.stderr)
            return EXIT_USAGE
        result = COMMANDS[args.command](args)
    except FxCompressError as e:
        return _fail(str(e), EXIT_USAGE, want_json)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", 130, want_json)
    except Exception as e:  # our bug: say so, with the type, and keep the traceback
        import traceback

        traceback.print_exc(file=sys.stderr)
        return _fail(f"internal error ({type(e).__name__}: {e}); please report this",
                     EXIT_INTERNAL, want_json)
    if want_json:
        print(json.dumps(result, indent=2, default=str))
    return EXIT_OK


def _fail(message: str, code: int, want_json: bool) -> int:
    print(f"fxcompress: error: {message}", file=sys.stderr)
    if want_json:
        print(json.dumps({"error": message, "exit_code": code}))
    return code


def _say(args, line: str) -> None:
    """A progress line on standard error (standard output is kept for results)."""
    print(line, file=sys.stderr, flush=True)


def _out(args, text: str) -> None:
    if not args.json:
        print(text)


# --- loading user files ---------------------------------------------------------------------
def _load_model(path: str):
    from fxcompress.export import load_program

    return load_program(path)


def _load_calibration(path: str, n_inputs: int, batch: int, static: bool = True
                      ) -> list[tuple]:
    """Calibration batches from a `torch.save` file, loaded with `weights_only=True`. A tensor
    (or a tuple of tensors, one per input) is cut into batches of `batch` rows (the last one
    shorter, unless the program's batch is `static`); a list is taken as the batches
    themselves."""
    import pickle

    import torch

    from fxcompress.errors import FxCompressError

    p = Path(path)
    if not p.is_file():
        raise FxCompressError(f"calibration file {path!r} does not exist; check the path")
    try:
        data = torch.load(p, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise FxCompressError(
            f"calibration file {path!r} holds objects other than tensors, which fxcompress "
            "does not unpickle; save only tensors: torch.save(x, path) or "
            "torch.save([(x1,), (x2,)], path)") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise FxCompressError(
            f"calibration file {path!r} is not a torch.save file ({type(e).__name__}); save "
            "the batches with torch.save(x, path)") from None
    if _plain_tensor(data):
        if n_inputs != 1:
            raise FxCompressError(f"calibration file {path!r} holds one tensor but the model "
                                  f"takes {n_inputs} inputs; save a tuple with one tensor per "
                                  "input")
        if data.dim() == 0:
            raise FxCompressError(f"calibration file {path!r} holds a scalar; save a batch of "
                                  "inputs (dim 0 is the batch)")
        data = (data,)
    if isinstance(data, tuple) and data and all(_plain_tensor(t) for t in data):
        n = {int(t.shape[0]) if t.dim() > 0 else -1 for t in data}
        if len(n) != 1 or -1 in n:
            raise FxCompressError(f"calibration file {path!r} holds a tuple of tensors whose "
                                  f"batch sizes differ ({sorted(n)}); one tensor per input, "
                                  "all with the same number of rows")
        rows = n.pop()
        if static and rows < batch:
            raise FxCompressError(f"calibration file {path!r} holds {rows} rows, but the saved "
                                  f"program takes batches of exactly {batch}; save at least "
                                  f"{batch} rows")
        # a static-batch program takes only full batches: an incomplete last one is dropped
        end = rows - batch + 1 if static else rows
        return [tuple(t[i:i + batch] for t in data) for i in range(0, end, batch)]
    if isinstance(data, list) and data:
        batches = []
        for i, item in enumerate(data):
            parts = tuple(item) if isinstance(item, tuple | list) else (item,)
            if not parts or not all(_plain_tensor(t) for t in parts):
                got = ", ".join(type(t).__name__ for t in parts) or "nothing"
                raise FxCompressError(
                    f"calibration file {path!r}: batch {i} holds {got}; each batch must be a "
                    "tensor or a tuple of dense tensors (one per input): torch.save([(x1,), "
                    "(x2,)], path)")
            batches.append(parts)
        return batches
    raise FxCompressError(f"calibration file {path!r} holds {type(data).__name__}"
                          f"{' (empty)' if isinstance(data, list) else ''}; save a dense tensor, a "
                          "tuple of tensors (one per input), or a non-empty list of batches")


def _load_overrides(text: str) -> dict:
    """`--overrides`: a JSON object, inline or in a .json file (read as data only)."""
    from fxcompress.errors import FxCompressError

    source = "--overrides"
    if not text.lstrip().startswith("{"):
        p = Path(text)
        if not p.is_file():
            raise FxCompressError(f"--overrides {text!r} is neither a JSON object nor an "
                                  "existing .json file; e.g. --overrides '{\"fc1\": "
                                  "{\"skip\": true}}'")
        text, source = p.read_text(encoding="utf-8", errors="replace"), f"--overrides file {p}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FxCompressError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}, "
                              f"column {e.colno}); e.g. '{{\"fc1\": {{\"skip\": true}}}}'"
                              ) from None
    if not isinstance(data, dict):
        raise FxCompressError(f"{source} must be a JSON object from layer pattern to settings, "
                              f"not {type(data).__name__}")
    return data


def _plain_tensor(t) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_quantized


def _example_inputs(ep, calibration: list[tuple] | None, model_path: str) -> tuple:
    from fxcompress.errors import FxCompressError

    if ep.example_inputs is not None:
        args, _ = ep.example_inputs
        if args:
            return tuple(args)
    if calibration:
        first = calibration[0]
        return tuple(first) if isinstance(first, tuple | list) else (first,)
    raise FxCompressError(f"{model_path!r} carries no example inputs; pass --calibration FILE "
                          "(its first batch is used as the example) or save the program with "
                          "torch.export.export(model, (x,)) so it keeps them")


def _techniques(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [t for v in values for t in v.split(",") if t]


def _prepare(args) -> tuple[Any, tuple, list[tuple] | None]:
    """The saved program, its example inputs and the calibration batches (checked)."""
    from fxcompress.calibration import check_calibration

    ep = _load_model(args.model)
    calibration = None
    if args.calibration:
        n_inputs, static_batch = _input_signature(ep)
        calibration = _load_calibration(args.calibration, n_inputs,
                                        static_batch or CALIBRATION_BATCH,
                                        static=static_batch is not None)
    example = _example_inputs(ep, calibration, args.model)
    if calibration is not None:
        calibration = check_calibration(calibration, example)
        _check_runs(ep, calibration[0], args.calibration)
    return ep, example, calibration


def _input_signature(ep) -> tuple[int, int | None]:
    """Number of user inputs of a saved program, and its batch size when that is fixed."""
    import torch

    n, static = 0, None
    placeholders = [p for p in ep.graph.nodes if p.op == "placeholder"]  # in spec order
    for spec, node in zip(ep.graph_signature.input_specs, placeholders, strict=True):
        if spec.kind.name != "USER_INPUT":
            continue
        n += 1
        val = node.meta.get("val")
        if static is None and isinstance(val, torch.Tensor) and val.dim() > 0 and \
                isinstance(val.shape[0], int):
            static = int(val.shape[0])
    return n, static


def _check_runs(ep, batch: tuple, path: str) -> None:
    """The first calibration batch must run through the program (shapes the saved program
    accepts); said as the user's mistake rather than a stack trace."""
    import torch

    from fxcompress.errors import FxCompressError

    try:
        with torch.no_grad():
            ep.module()(*batch)
    except Exception as e:
        head = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise FxCompressError(f"the calibration batches in {path!r} do not fit the model "
                              f"({head}); save batches shaped like the model's inputs") from None


# --- commands -------------------------------------------------------------------------------
def cmd_compile(args) -> dict[str, Any]:
    """`fxcompress compile`: load, compress, export (checked), print the report."""
    import fxcompress
    from fxcompress.api import _check_tolerance
    from fxcompress.export import export, preflight

    out = Path(args.output)
    if args.tolerance is not None:
        _check_tolerance(args.tolerance, None)
    profile = fxcompress.load_profile(args.profile)
    preflight(out, profile)  # an unusable output fails before minutes of compiling
    ep, example, calibration = _prepare(args)
    _say(args, f"compiling {args.model} for {profile.name} ...")
    kwargs = {} if args.tolerance is None else {"tolerance": args.tolerance}
    if args.holdout is not None:
        kwargs["holdout"] = args.holdout
    if args.overrides is not None:
        kwargs["overrides"] = _load_overrides(args.overrides)
    small = fxcompress.compile(ep, example, profile=profile, calibration=calibration,
                               techniques=_techniques(args.techniques), objective=args.objective,
                               seed=args.seed, progress=lambda s: _say(args, f"  {s}"),
                               **kwargs)
    report = small.meta["fxcompress_report"]
    _say(args, f"writing {out} (checked in its runtime) ...")
    # written from the program compile exported where it fits (fxcompress.export, "Export once")
    written = export(small, example, out, profile=profile)
    _out(args, str(report))
    _out(args, f"\nwrote {written.path}: {written.size_bytes:,} B ({written.format}, checked in "
               f"{written.runtime}, relative output error {written.check_error:.2g})")
    return {"output": written.to_dict(), "report": report.to_dict()}


def cmd_profiles(args) -> list[dict[str, Any]]:
    """`fxcompress profiles`: the built-in targets."""
    import fxcompress

    rows = []
    for name in fxcompress.list_profiles():
        prof = fxcompress.load_profile(name)
        rows.append(dict(prof.to_dict(), description=prof.description,
                         export_format=prof.export_format, delegate=prof.delegate))
    if not args.json:
        w = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"{r['name']:<{w}}  {r['export_format']:<5}  {r['runtime']:<20}  "
                  f"{','.join(r['techniques'])}")
            print(f"{'':<{w}}  {r['description']}")
    return rows


def cmd_report(args) -> dict[str, Any]:
    """`fxcompress report FILE`: the report stored in a .pt2 or .onnx file."""
    from fxcompress.errors import FxCompressError
    from fxcompress.export import read_report
    from fxcompress.report import Report

    data = read_report(args.file)  # JSON only: an object, or an FxCompressError
    if data is None:
        raise FxCompressError(f"{args.file!r} carries no fxcompress report; it was not written "
                              "by fxcompress compile / fxcompress.export of a compiled model")
    try:
        text = str(Report.from_dict(data))
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise FxCompressError(f"the report stored in {args.file!r} is not one fxcompress wrote "
                              f"({type(e).__name__}: {str(e)[:100]}); re-export the model with "
                              "fxcompress to store a fresh report") from None
    _out(args, text)
    return data


def cmd_sweep(args) -> dict[str, Any]:
    """`fxcompress sweep`: compile at each tolerance; table and plot of size and estimated
    latency against the measured error."""
    import fxcompress
    from fxcompress.api import _check_tolerance
    from fxcompress.errors import FxCompressError

    try:
        tolerances = sorted({float(t) for t in args.tolerances.split(",") if t.strip()})
    except ValueError:
        raise FxCompressError(f"--tolerances {args.tolerances!r} is not a comma-separated list "
                              "of numbers, e.g. 0.005,0.01,0.02") from None
    if not tolerances:
        raise FxCompressError("--tolerances is empty; give e.g. 0.005,0.01,0.02")
    for t in tolerances:
        _check_tolerance(t, None)
    plot = None if args.plot.lower() == "none" else Path(args.plot)
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise FxCompressError(f"--plot {args.plot!r} must name a .png file (or 'none')")
        from fxcompress.export import check_output_path

        check_output_path(plot)  # folder exists and is writable: before minutes of compiling
        _require_matplotlib()
    profile = fxcompress.load_profile(args.profile)
    evaluate: Callable | None = None
    if args.model is None:
        model, example, calibration, evaluate, label = _demo_model()
    else:
        model, example, calibration = _prepare(args)
        label = args.model
    _say(args, f"sweep over {len(tolerances)} tolerances: one capture and calibration, each "
               "plan built once ...")
    models = fxcompress.sweep(model, example, tolerances=tolerances, profile=profile,
                              calibration=calibration, techniques=_techniques(args.techniques),
                              seed=args.seed)
    rows = []
    for tol, small in zip(tolerances, models, strict=True):
        rep = small.meta["fxcompress_report"]
        row = {"tolerance": tol, "error": rep.error,
               "bytes": rep.serialized_bytes_after, "bytes_before": rep.serialized_bytes_before,
               "latency_us": rep.latency_after_us, "latency_before_us": rep.latency_before_us,
               "rewrites": sum(lay.applied != "none" for lay in rep.layers)}
        if evaluate is not None:
            row["accuracy"] = evaluate(small)
        rows.append(row)
        _say(args, f"  tolerance {tol:g}: error {rep.error:.4f}, "
                   f"{rep.serialized_bytes_after:,} B, {rep.latency_after_us:.1f} µs")
    table = _sweep_table(rows, label, profile.name)
    _out(args, table)
    if plot is not None:
        _plot_sweep(rows, plot, f"{label} on {profile.name}")
        _out(args, f"\nplot written to {plot}")
    return {"model": label, "profile": profile.name, "rows": rows,
            "plot": None if plot is None else str(plot)}


def _demo_model():
    from fxcompress.demo.digits import digits_data, load_digits_cnn
    from fxcompress.metrics import accuracy

    model = load_digits_cnn()
    x_cal, _ = digits_data("calib")
    x_test, y_test = digits_data("test")
    calibration = [(x_cal[i:i + CALIBRATION_BATCH],)
                   for i in range(0, len(x_cal), CALIBRATION_BATCH)]
    base = accuracy(model, x_test, y_test)
    return (model, (x_cal[:32],), calibration,
            lambda m: accuracy(m, x_test, y_test),
            f"digits_cnn (test accuracy {base:.2f}% in fp32)")


def _sweep_table(rows: list[dict], label: str, profile: str) -> str:
    head = ["tolerance", "error", "size B", "size ×", "est. µs", "latency ×", "rewrites"]
    if any("accuracy" in r for r in rows):
        head.append("accuracy %")
    body = []
    for r in rows:
        line = [f"{r['tolerance']:g}", f"{r['error']:.5f}", f"{r['bytes']:,}",
                f"{r['bytes'] / max(r['bytes_before'], 1):.3f}", f"{r['latency_us']:.1f}",
                f"{r['latency_us'] / max(r['latency_before_us'], 1e-9):.3f}",
                str(r["rewrites"])]
        if "accuracy" in r:
            line.append(f"{r['accuracy']:.2f}")
        body.append(line)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
    first = rows[0]
    out = [f"sweep: {label} on {profile} (fp32: {first['bytes_before']:,} B serialized, "
           f"{first['latency_before_us']:.1f} µs estimated)", fmt(head),
           fmt(["-" * w for w in widths])]
    return "\n".join(out + [fmt(b) for b in body])


def _require_matplotlib():
    from fxcompress.errors import FxCompressError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FxCompressError("the sweep plot needs matplotlib: pip install matplotlib (or "
                              "'fxcompress[test]'), or pass --plot none") from None


def _plot_sweep(rows: list[dict], path: Path, title: str) -> None:
    """Size and estimated latency (relative to fp32) against the measured error, written
    atomically as a PNG."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    err = [max(r["error"], 1e-6) for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.plot(err, [r["bytes"] / max(r["bytes_before"], 1) for r in rows], "o-",
            label="serialized size")
    ax.plot(err, [r["latency_us"] / max(r["latency_before_us"], 1e-9) for r in rows], "s-",
            label="estimated latency")
    # tolerances that led to the same plan share a point: one label lists them all
    labels: dict[tuple[float, float], list[str]] = {}
    for r, e in zip(rows, err, strict=True):
        point = (e, r["bytes"] / max(r["bytes_before"], 1))
        labels.setdefault(point, []).append(f"{r['tolerance']:g}")
    for point, tols in labels.items():
        ax.annotate("tol " + ", ".join(tols), point, textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    if len({round(math.log10(e), 3) for e in err}) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("measured relative output error (calibration)")
    ax.set_ylabel("relative to fp32")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    from fxcompress.errors import FxCompressError

    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
        os.close(fd)
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except OSError as e:
        raise FxCompressError(f"could not write the plot {str(path)!r} ({e.strerror or e}); "
                              "check that its folder is writable and has free space, or pass "
                              "--plot elsewhere") from e
    finally:
        plt.close(fig)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "compile": cmd_compile, "profiles": cmd_profiles, "report": cmd_report, "sweep": cmd_sweep,
}


if __name__ == "__main__":
    raise SystemExit(main())
