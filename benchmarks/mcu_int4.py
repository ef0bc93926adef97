"""4-bit weights on a microcontroller (issue #20, mcu-int8): what packing them costs in RAM.

ExecuTorch's Cortex-M kernels (CMSIS-NN) read int8 weights only, so mcu-int8's 4-bit codes
(`[int8] packed_bits`) are stored two per byte in the ``.pte`` (flash) and unpacked to int8 by
portable kernels right before their layer, into the planned arena (RAM). Each row is the shipped
digits CNN compiled for mcu-int8 and written as a Cortex-M ``.pte``; the flash (constant data),
the arena and the kernel calls are read from the written file (`cortex_m.read_plan`), never
estimated. The ``.pte`` is checked on the ``cortex_m`` reference kernels (ExecuTorch's runtime
here has no CMSIS-NN); accuracy is the compiled model's on the digits test split, which no
compile saw.

Rows:

- int8 only, every layer at 8 bits, mcu-int8's budgets lifted so that it builds (int8 alone
  does not fit the flash), then compared with them;
- every layer at 4 bits with the budgets lifted: each layer unpacked whole, the largest
  layer's weight in RAM at once;
- every layer at 4 bits on the stock profile: a layer whose unpacking would not fit the RAM
  budget is built in slices of output channels, one slice unpacked at a time;
- the planner's own choice on the stock profile at two tolerances.

    .venv/bin/python benchmarks/mcu_int4.py
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.* as a script

import fxcompress  # noqa: E402
from benchmarks import code_revision, conditions, publish  # noqa: E402
from fxcompress.demo.digits import digits_data, load_digits_cnn  # noqa: E402

OUT_MD = ROOT / "benchmarks" / "results" / "mcu_int4.md"
LAYERS = ("conv1", "conv2", "conv3", "fc1", "fc2")


def _row(name: str, model, profile, tolerance: float, overrides, data) -> dict:
    x_cal, batches, x_test, y_test = data
    t0 = time.time()
    try:
        gm = fxcompress.compile(model, (x_cal[:1],), profile=profile, calibration=batches,
                                tolerance=tolerance, overrides=overrides)
    except fxcompress.FxCompressError as e:
        return {"row": name, "refused": str(e)}
    secs = time.time() - t0
    rep = gm.meta["fxcompress_report"]
    with torch.no_grad():
        acc = float((gm(x_test).argmax(1) == y_test).float().mean())
    with tempfile.TemporaryDirectory() as d:
        res = fxcompress.export(gm, (x_cal[:1],), Path(d) / "model.pte")
    det = res.details
    return {"row": name, "bits": {lay.name: lay.params.get("bits") for lay in rep.layers
                                  if lay.name in LAYERS and lay.applied != "none"},
            "slices": {lay.name: lay.params["slices"] for lay in rep.layers
                       if lay.params.get("slices")},
            "applied": sorted({lay.applied.split("(")[0] for lay in rep.layers
                               if lay.applied != "none"}),
            "pte_bytes": res.size_bytes, "flash": det["constant_data_bytes"],
            "arena": det["activation_bytes"], "int4_layers": det["int4_packed_layers"],
            "unpack_ops": sum(v for k, v in det["portable_ops"].items()
                              if "bitwise" in k or "div" in k or "cat" in k or "sub" in k
                              or "_to_dim_order_copy" in k),
            "accuracy": acc, "error": rep.error, "check": res.check_error,
            "compile_s": secs}


def main() -> int:
    """Measure the rows and write `OUT_MD`."""
    torch.manual_seed(0)
    t0 = time.time()
    x_cal, _ = digits_data("calib")
    x_test, y_test = digits_data("test")
    batches = [(x_cal[i:i + 64],) for i in range(0, len(x_cal), 64)]
    data = (x_cal, batches, x_test, y_test)
    model = load_digits_cnn()
    with torch.no_grad():
        acc_fp32 = float((model(x_test).argmax(1) == y_test).float().mean())
    stock = fxcompress.load_profile("mcu-int8")
    lifted = dataclasses.replace(stock, weight_budget_bytes=None, activation_budget_bytes=None)
    int8_only = {"*": {"bits": 8, "techniques": ["int8"]}}
    all4 = {"*": {"bits": 4, "techniques": ["int8"]}}
    rows = [_row("int8, 8 bits everywhere (budgets lifted)", model, lifted, 0.5, int8_only,
                 data),
            _row("int8, 4 bits everywhere, unpacked whole (budgets lifted)", model, lifted,
                 0.5, all4, data),
            _row("int8, 4 bits everywhere, stock budgets (unpacked in slices where needed)",
                 model, stock, 0.5, all4, data)]
    for tol in (0.05, 0.2):
        rows.append(_row(f"planner, stock mcu-int8, tolerance {tol}", model, stock, tol, None,
                         data))
    render(rows, stock, acc_fp32, time.time() - t0)
    return 0


def render(rows: list[dict], stock, acc_fp32: float, secs: float) -> None:
    """Write the table."""
    wb, ab = stock.weight_budget_bytes, stock.activation_budget_bytes
    lines = [
        "# 4-bit weights on mcu-int8: flash saved, RAM spent (Cortex-M .pte)", "",
        f"Generated by `benchmarks/mcu_int4.py` in {secs / 60:.1f} min at {code_revision()}; "
        f"{conditions()}. The digits CNN (fp32 test accuracy {acc_fp32:.2%}) compiled for "
        "mcu-int8 and written as a Cortex-M `.pte` (ExecuTorch 1.5.1's Cortex-M flow, "
        "CMSIS-NN ops). \"flash\": the file's constant data; \"arena\": its planned "
        "activation memory (RAM), both read from the written file. mcu-int8's budgets: "
        f"flash {wb:,} B, RAM {ab:,} B. 4-bit codes are stored two per byte and unpacked to "
        "int8 by portable kernels before their layer (the Cortex-M kernels read int8 only). "
        "\"check\": the `.pte`'s program on the cortex_m reference kernels against the compiled "
        "model; \"accuracy\": the compiled model on the test split; \"error\": the compile's "
        "relative output error on its held-out calibration batch.", "",
        "| row | 4-bit layers | flash | fits flash | arena | fits RAM | unpack kernels "
        "| accuracy | error | check | .pte bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['row']} | refused: {r['refused']} |  |  |  |  |  |  |  |  |  |")
            continue
        four = ", ".join(k + (f" ({r['slices'][k]} slices)" if k in r["slices"] else "")
                         for k, v in r["bits"].items() if v == 4) or "none"
        lines.append(
            f"| {r['row']} | {four} | {r['flash']:,} | {'yes' if r['flash'] <= wb else 'no'} "
            f"| {r['arena']:,} | {'yes' if r['arena'] <= ab else 'no'} | {r['unpack_ops']} "
            f"| {r['accuracy']:.2%} | {r['error']:.4f} | {r['check']:.1e} "
            f"| {r['pte_bytes']:,} |")
    lines += ["", "Techniques applied per row: " + "; ".join(
        f"{r['row']}: {', '.join(r['applied'])}" for r in rows if "applied" in r) + "."]
    publish(OUT_MD, lines)


if __name__ == "__main__":
    raise SystemExit(main())
