"""int8 and binary where they land: x86 latency under Inductor, serialized sizes, the mobile-arm
.pte (XNNPACK delegation, size, ExecuTorch runtime speed) and binary accuracy on digits.

Run: .venv/bin/python benchmarks/quant.py   (writes benchmarks/results/quant.md)

Timings are medians of interleaved runs in one process (the machine is shared, so ratios, not
absolute times, are what to read). Digits models are trained here on scikit-learn's digits
(a few seconds) so accuracy is measured on real data.
"""

from __future__ import annotations

import copy
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* as a script

import fxcompress  # noqa: E402
from benchmarks import conditions  # noqa: E402
from fxcompress.capture import capture  # noqa: E402
from fxcompress.export import count_delegated, lower_to_pte  # noqa: E402
from fxcompress.graph import find_layers  # noqa: E402
from fxcompress.hardware_profiles import load_profile  # noqa: E402
from fxcompress.passes.binary import BinaryConfig, binary_pass  # noqa: E402
from fxcompress.passes.int8 import Int8Config, int8_pass  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quant.md"
RUNS = int(os.environ.get("QUANT_RUNS", "7"))
lines: list[str] = []


def out(s: str = "") -> None:
    print(s, flush=True)
    lines.append(s)


def saved_size(gm, args) -> int:
    """Bytes of torch.export.save of `gm` exported on clones of `args`."""
    buf = io.BytesIO()
    ep = torch.export.export(gm, tuple(a.clone() for a in args), strict=False)
    torch.export.save(ep, buf)
    return buf.getbuffer().nbytes


def rel_err(y, y0) -> float:
    return float((y - y0).norm() / y0.norm())


def interleaved(fns: dict, args, runs: int = RUNS) -> dict[str, float]:
    """Median seconds per callable, run round-robin (order rotated every round)."""
    times = {k: [] for k in fns}
    keys = list(fns)
    with torch.inference_mode():
        for k in keys:
            fns[k](*args)
        for r in range(runs):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                t0 = time.perf_counter()
                fns[k](*args)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def apply(gm, pass_fn, config):
    gm = copy.deepcopy(gm)
    res = pass_fn(gm, config)
    res.graph_module.graph.lint()
    res.graph_module.recompile()
    return res.graph_module


# --- x86-server: a BERT encoder, batch 32 x 128 -------------------------------------------------
def _first_call(fn, args) -> float:
    """Seconds of the first call (for torch.compile: the compilation). Under inference mode, as
    `interleaved` times it: a call in another grad mode would compile again, then under
    whatever Inductor config is current."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn(*args)
    return time.perf_counter() - t0


class _Wrapped(torch.nn.Module):
    """`inner` behind a forward of its own, so torch.compile compiles it anew."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def bench_x86() -> None:
    """int8 through fxcompress.compile on x86-server, timed under the profile's runtime
    (Inductor with freezing) against the best fp32 runtime, eager figures alongside."""
    import torch._inductor.config as inductor_config
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    width = int(os.environ.get("QUANT_X86_WIDTH", "256"))
    cfg = BertConfig(vocab_size=8000, hidden_size=width, num_hidden_layers=6,
                     num_attention_heads=width // 64, intermediate_size=4 * width,
                     max_position_embeddings=128)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(cfg, add_pooling_layer=False)

        def forward(self, ids):
            return self.bert(input_ids=ids).last_hidden_state

    model = Encoder().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8000, (32, 128), generator=g)
    calib = [(torch.randint(0, 8000, (8, 128), generator=g),) for _ in range(4)]
    prof = load_profile("x86-server")
    t0 = time.perf_counter()
    q = fxcompress.compile(model, (ids[:2],), profile="x86-server", techniques=["int8"],
                           calibration=calib, tolerance=0.02)
    t_fx = time.perf_counter() - t0
    rep = q.meta["fxcompress_report"]
    n_int8 = sum(lay.applied.startswith("int8") for lay in rep.layers)
    fp32_c = torch.compile(model)
    t_fc = _first_call(fp32_c, (ids,))
    # the profile's runtime: Inductor with freezing, which folds the int8 Q/DQ linears into
    # oneDNN int8 GEMMs. The flag is read when a graph compiles (the first call); a wrapper
    # (new code) compiles afresh rather than reusing the compilation above.
    inductor_config.freezing = True
    fp32_f = torch.compile(_Wrapped(model))
    t_ff = _first_call(fp32_f, (ids,))
    q_f = torch.compile(q)
    t_qf = _first_call(q_f, (ids,))
    inductor_config.freezing = False
    with torch.inference_mode():
        y0 = model(ids)
        q_eager_err = rel_err(q(ids), y0)
        err_f = rel_err(q_f(ids), y0)
    t = interleaved({"fp32 eager": model, "fp32 torch.compile": fp32_c,
                     "fp32 torch.compile (freezing)": fp32_f, "int8 eager": q,
                     "int8 torch.compile (freezing)": q_f}, (ids,))
    best = min(v for k, v in t.items() if k.startswith("fp32"))
    out(f"## x86-server: int8 BERT encoder (6 layers, d={width}, ff={4 * width}), "
        "batch 32 x 128")
    out()
    out(f"`fxcompress.compile(profile='x86-server', techniques=['int8'], tolerance=0.02)` on "
        f"4 x 8 x 128 calibration tokens ({t_fx:.0f} s): {n_int8} layers int8 (representation "
        f"`{prof.int8_representation}`, `{prof.int8_activations}` activations as "
        f"`{prof.int8_activation_dtype}`). The runtime is `torch.compile` with "
        "`torch._inductor.config.freezing = True`, which folds each dequantize -> linear -> "
        "quantize into `onednn.qlinear_pointwise`. Medians of "
        f"{RUNS} interleaved runs; first calls (compilation): fp32 {t_fc:.0f} s, fp32 with "
        f"freezing {t_ff:.0f} s, int8 with freezing {t_qf:.0f} s.")
    out()
    out("| variant | median ms | / best fp32 | rel. output error |")
    out("|---|---|---|---|")
    for k, v in t.items():
        e = "0" if k.startswith("fp32") else f"{q_eager_err if 'eager' in k else err_f:.4f}"
        out(f"| {k} | {v * 1e3:.1f} | {v / best:.2f}x | {e} |")
    out()
    gm = capture(model, (ids[:2],)).graph_module
    layers = find_layers(gm)
    q_lin = apply(gm, int8_pass, Int8Config(frozenset(lay.name for lay in layers
                                                      if lay.op == "linear"), "dequant"))
    q_all = apply(gm, int8_pass, Int8Config(frozenset(lay.name for lay in layers
                                                      if lay.op in ("linear", "embedding")),
                                            "dequant"))
    sb, sq = saved_size(gm, (ids[:2],)), saved_size(q, (ids[:2],))
    sl, sa = saved_size(q_lin, (ids[:2],)), saved_size(q_all, (ids[:2],))
    out("Serialized (`torch.export.save`) size of the same encoder:")
    out()
    out("| model | bytes | / fp32 |")
    out("|---|---|---|")
    out(f"| fp32 | {sb} | 1.00 |")
    out(f"| int8 linears only | {sl} | {sl / sb:.3f} |")
    out(f"| int8 linears + embeddings | {sa} | {sa / sb:.3f} |")
    out(f"| the timed x86-server model (the planner's choice) | {sq} | {sq / sb:.3f} |")
    out()


# --- digits models (trained here on scikit-learn digits) ---------------------------------------
def digits():
    """(train x, train y, calibration x, test x, test y) of the project's digits split."""
    from benchmarks.models import digits_data

    xtr, ytr = digits_data("train")
    xca, _ = digits_data("calib")
    xte, yte = digits_data("test")
    return xtr, ytr, xca, xte, yte


class SmallCNN(torch.nn.Module):
    """A digits CNN without batch norm (trained here in seconds) for the .pte comparison."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.dw = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.f1 = torch.nn.Linear(64 * 4 * 4, 256)
        self.f2 = torch.nn.Linear(256, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.nn.functional.max_pool2d(torch.relu(self.dw(x)), 2)
        return self.f2(torch.relu(self.f1(x.flatten(1))))


def train(model, x, y, epochs=30):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(epochs):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return model.eval()


def acc(fn, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((fn(x).argmax(-1) == y).float().mean())


# --- mobile-arm: the .pte -------------------------------------------------------------------
def bench_mobile(cnn, xtr, xte, yte) -> None:
    calib = [(xtr[i:i + 100],) for i in range(0, min(400, len(xtr)), 100)]
    small = fxcompress.compile(cnn, (xte[:64],), profile="mobile-arm", techniques=["int8"],
                               calibration=calib, tolerance=0.02)
    rep = small.meta["fxcompress_report"]
    x = xte[:64].clone()
    ep32 = torch.export.export(cnn, (x,), strict=False)
    ep8 = torch.export.export(small, (x,), strict=False)
    pte32, pte8 = lower_to_pte(ep32, "xnnpack"), lower_to_pte(ep8, "xnnpack")
    d8 = count_delegated(ep8, "xnnpack")
    from executorch.runtime import Runtime

    rt = Runtime.get()
    m32 = rt.load_program(pte32).load_method("forward")
    m8 = rt.load_program(pte8).load_method("forward")
    t = interleaved({"fp32 .pte": lambda a: m32.execute([a]), "int8 .pte": lambda a: m8.execute(
        [a])}, (x,), runs=max(RUNS * 5, 30))

    def pte_acc(m):
        right = 0
        for i in range(0, len(yte) - 63, 64):
            right += int((m.execute([xte[i:i + 64].clone()])[0].argmax(-1) ==
                          yte[i:i + 64]).sum())
        return 100.0 * right / ((len(yte) // 64) * 64)

    out("## mobile-arm: digits CNN lowered to .pte with the XNNPACK delegate")
    out()
    out(f"`fxcompress.compile(profile='mobile-arm', techniques=['int8'], tolerance=0.02)`: "
        f"{sum(lay.applied != 'none' for lay in rep.layers)} of {len(rep.layers)} layers int8 "
        f"(static activations, Q/DQ), planner-measured error {rep.error:.4f}.")
    out()
    out("| .pte | bytes | / fp32 | median ms (batch 64) | accuracy % |")
    out("|---|---|---|---|---|")
    out(f"| fp32 | {len(pte32)} | 1.00 | {t['fp32 .pte'] * 1e3:.3f} | {pte_acc(m32):.2f} |")
    out(f"| int8 | {len(pte8)} | {len(pte8) / len(pte32):.3f} | {t['int8 .pte'] * 1e3:.3f} | "
        f"{pte_acc(m8):.2f} |")
    out()
    out(f"Delegated to XNNPACK in the int8 .pte: {d8.count('convolution')} convolutions, "
        f"{d8.count('linear') + d8.count('addmm') + d8.count('mm.')} linears, "
        f"{d8.count('dequantize_per_channel')} dequantize_per_channel, "
        f"{d8.count('quantize_per_tensor')} quantize_per_tensor; left outside the delegate: "
        f"{dict(d8.undelegated) or 'nothing'} ({d8.partitions} partitions). "
        f"int8 .pte runs at {t['int8 .pte'] / t['fp32 .pte']:.2f}x the fp32 .pte's time in "
        "the ExecuTorch runtime here.")
    out()


# --- binary -------------------------------------------------------------------------------
def bench_binary(mlp, cnn, xtr, xte, yte) -> None:
    out("## binary")
    out()
    torch.manual_seed(0)
    big = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 10)).eval()
    x = torch.randn(2, 784)
    rows = []
    for name, model, inp in (("MLP 784-1024-1024-10", big, x),
                             ("digits MLP 64-512-256-10", mlp, xte[:2])):
        gm = capture(model, (inp,)).graph_module
        names = {lay.name: None for lay in find_layers(gm)}
        b = apply(gm, binary_pass, BinaryConfig(names))
        s0, s1 = saved_size(gm, (inp,)), saved_size(b, (inp,))
        rows.append(f"| {name}, every layer binary | {s0} | {s1} | {s1 / s0:.3f} |")
    out("| model | fp32 bytes | binary bytes | ratio |")
    out("|---|---|---|---|")
    for r in rows:
        out(r)
    out()
    out("Accuracy on the digits test split (binarized without retraining; `first/last kept` is "
        "the default; activations binarized to μ ± β from calibration where noted):")
    out()
    out("| model | variant | accuracy % |")
    out("|---|---|---|")
    calib_x = xtr[:256]
    for name, model in (("digits MLP", mlp), ("digits CNN", cnn)):
        gm = capture(model, (calib_x,)).graph_module
        layers = find_layers(gm)
        out(f"| {name} | fp32 | {acc(gm, xte, yte):.2f} |")
        middle = [lay.name for lay in layers[1:-1]]
        variants = {"binary weights, first/last kept": {n: None for n in middle},
                    "binary weights, every layer": {lay.name: None for lay in layers}}
        fpga = fxcompress.compile(model, (calib_x,), profile="fpga-binary",
                                  techniques=["binary"], tolerance=0.99, objective="size")
        for v, cfg in variants.items():
            out(f"| {name} | {v} | {acc(apply(gm, binary_pass, BinaryConfig(cfg)), xte, yte):.2f}"
                " |")
        chosen = [lay.name for lay in fpga.meta["fxcompress_report"].layers
                  if lay.applied.startswith("binary")]
        out(f"| {name} | fpga-binary planner (binary weights + activations on {chosen}) | "
            f"{acc(fpga, xte, yte):.2f} |")
    out()


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    which = set(sys.argv[1:]) or {"x86", "mobile", "binary"}
    out("# int8 and binary: measured")
    out()
    out(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {conditions()}; "
        "generated by `benchmarks/quant.py`.")
    out()
    from benchmarks.models import accuracy, load_pretrained

    xtr, ytr, xca, xte, yte = digits()
    mlp, cnn = load_pretrained("digits_mlp"), load_pretrained("digits_cnn")
    # seeded before it is built: its initial weights must not depend on what drew from the
    # generator before (torch.compile in the x86 section does, a varying number of times)
    torch.manual_seed(0)
    small_cnn = train(SmallCNN(), xtr, ytr, epochs=8)
    out(f"Digits (benchmarks.models splits, {len(yte)} test images): pretrained digits_mlp "
        f"{accuracy(mlp, xte, yte):.2f} %, digits_cnn {accuracy(cnn, xte, yte):.2f} %; the "
        f"batch-norm-free CNN trained here for the .pte: {acc(small_cnn, xte, yte):.2f} %.")
    out()
    if "x86" in which:
        bench_x86()
    if "mobile" in which:
        bench_mobile(small_cnn, xca, xte, yte)
    if "binary" in which:
        bench_binary(mlp, cnn, xca, xte, yte)
    # a partial run (some sections named on the command line) keeps the full table intact
    path = RESULTS if len(which) == 3 else RESULTS.with_name(
        f"quant-{'-'.join(sorted(which))}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
