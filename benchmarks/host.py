"""The target is not the host: int8 on x86 CPUs with and without VNNI, and compile time on a
busy host. Writes `benchmarks/results/host.md`.

1. `.onnx` files run in ONNX Runtime on an AVX2 CPU without VNNI (QEMU's user-mode emulation
   of an AMD EPYC Rome, which ONNX Runtime's CPUID probe sees as that CPU) and on this CPU,
   against the compiled model: as `fxcompress.export` writes them, and, for contrast, with
   their int8 left as u8 x s8.
2. int8 under Inductor (freezing) with oneDNN limited to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`):
   agreement with eager and latency against fp32 under Inductor, interleaved medians.
3. What the portable `.onnx` form (u8 x u8) costs against u8 x s8 on this CPU.
4. Compile time of the demo (digits CNN, mobile-arm) quiet and beside 3 CPU-bound processes.
5. A MiniLM-sized BERT (random weights, 6 layers, hidden 384) compiled for x86-server with
   int8 as if on a VNNI host and as if on an AVX2 host: the same plan and bytes.

    .venv/bin/python benchmarks/host.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* as a script

import fxcompress  # noqa: E402
from benchmarks import publish  # noqa: E402
from benchmarks.models import digits_data, load_pretrained, saved_bytes, text_data  # noqa: E402
from fxcompress import host  # noqa: E402
from fxcompress.host import interleaved  # noqa: E402

OUT = Path(__file__).parent / "results" / "host.md"
ex = sys.modules["fxcompress.export"]
QEMU_CPU = "EPYC-Rome"
BATCH = 64

ORT_CHILD = r"""
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
for path in sys.argv[2:]:
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.save(path + ".out.npy", s.run(None, {s.get_inputs()[0].name: x})[0])
"""

INDUCTOR_CHILD = r"""
import json, sys, torch
import fxcompress
from fxcompress.host import interleaved
ex = sys.modules["fxcompress.export"]
torch._inductor.config.freezing = True
x = torch.load(sys.argv[1])
base = ex.load_program(sys.argv[2]).module()
out = {}
with torch.no_grad():
    fast_base = torch.compile(base)
    fast_base(x)
    for path in sys.argv[3:]:
        gm = ex.load_program(path).module()
        ref = gm(x)
        fast = torch.compile(gm)
        got = fast(x)
        t = interleaved(lambda: fast_base(x), lambda: fast(x), runs=30)
        out[path] = {"error": float((got - ref).norm() / ref.norm()), "ratio": t.ratio}
print(json.dumps(out))
"""

DEMO_CHILD = r"""
import json, time, torch
import fxcompress
from fxcompress.demo.digits import digits_data, load_digits_cnn
model = load_digits_cnn()
x_cal, _ = digits_data("calib")
cal = [(x_cal[i:i + 64],) for i in range(0, len(x_cal), 64)]
t0, c0 = time.perf_counter(), time.process_time()
small = fxcompress.compile(model, (x_cal[:32],), profile="mobile-arm", calibration=cal,
                           tolerance=0.02)
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                  "notes": small.meta["fxcompress_report"].notes}))
"""


def _models():
    x_cal, _ = digits_data("calib")
    x_test, _ = digits_data("test")
    t_cal, _ = text_data("calib")
    t_test, _ = text_data("test")
    return {
        "digits CNN": (load_pretrained("digits_cnn"), x_cal, x_test[:BATCH]),
        "text transformer": (load_pretrained("text_transformer"), t_cal, t_test[:BATCH]),
    }


def _compile(model, x_cal, profile, **kw):
    cal = [(x_cal[i:i + 64],) for i in range(0, len(x_cal), 64)]
    return fxcompress.compile(model, (x_cal[:32],), profile=profile, calibration=cal,
                              tolerance=0.02, **kw)


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def onnx_section(models, d: Path) -> list[str]:
    qemu = shutil.which("qemu-x86_64")
    rows = ["| model | profile | .onnx form | bytes | error on this CPU | error on EPYC-Rome "
            "(AVX2, no VNNI) |", "|---|---|---|---|---|---|"]
    cases = [("digits CNN", "x86-server"), ("text transformer", "x86-server"),
             ("digits CNN", "mobile-arm"), ("text transformer", "mobile-arm"),
             ("digits CNN", "x86-avx2"), ("text transformer", "x86-avx2")]
    files = []
    for name, prof in cases:
        model, x_cal, x = models[name]
        gm = _compile(model, x_cal, prof)
        with torch.no_grad():
            expected = gm(x).numpy()
        stem = f"{name.split()[0]}-{prof}"
        res = fxcompress.export(gm, (x,), d / f"{stem}.onnx")
        files.append((name, prof, "as written", res.path, expected, res.size_bytes))
        try:
            raw = fxcompress.export(gm, (x,), d / f"{stem}-u8s8.onnx", onnx_int8="u8s8")
            files.append((name, prof, "u8 x s8 (onnx_int8='u8s8')", raw.path, expected,
                          raw.size_bytes))
        except fxcompress.FxCompressError as e:
            files.append((name, prof, f"u8 x s8: refused here ({str(e)[:60]})", None, expected,
                          0))
    x_by_model = {n: m[2].numpy() for n, m in models.items()}
    emulated = {}
    for name in models:
        paths = [str(f[3]) for f in files if f[0] == name and f[3] is not None]
        np.save(d / "x.npy", x_by_model[name])
        subprocess.run([sys.executable, "-c", ORT_CHILD, str(d / "x.npy"), *paths], check=True)
        native = {p: np.load(p + ".out.npy") for p in paths}
        for p in paths:
            os.remove(p + ".out.npy")
        if qemu:
            subprocess.run([qemu, "-cpu", QEMU_CPU, sys.executable, "-c", ORT_CHILD,
                            str(d / "x.npy"), *paths], check=True, capture_output=True)
            emulated.update({p: (native[p], np.load(p + ".out.npy")) for p in paths})
        else:
            emulated.update({p: (native[p], None) for p in paths})
    for name, prof, form, path, expected, size in files:
        if path is None:
            rows.append(f"| {name} | {prof} | {form} | | | |")
            continue
        here, there = emulated[str(path)]
        e_there = "qemu not installed" if there is None else f"{_rel(there, expected):.4f}"
        rows.append(f"| {name} | {prof} | {form} | {size:,} | {_rel(here, expected):.4f} | "
                    f"{e_there} |")
    return rows


def ort_cost_section(d: Path) -> list[str]:
    import onnxruntime as ort

    rows = ["| file | u8 x u8 (written) / u8 x s8 latency, batch 64, this CPU |", "|---|---|"]
    for written in sorted(d.glob("*-x86-server.onnx")) + sorted(d.glob("*-mobile-arm.onnx")):
        raw = written.with_name(written.stem + "-u8s8.onnx")
        if not raw.exists():
            continue
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        # two sessions' spinning thread pools fight for the cores when timed interleaved
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        a = ort.InferenceSession(str(raw), opts, providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(written), opts, providers=["CPUExecutionProvider"])
        x = np.load(d / ("x-" + written.stem.split("-")[0] + ".npy"))
        feed = {a.get_inputs()[0].name: x}
        t = interleaved(lambda a=a, f=feed: a.run(None, f), lambda b=b, f=feed: b.run(None, f),
                        runs=50)
        rows.append(f"| {written.name} | {t.ratio:.2f}× |")
    return rows


def inductor_section(models, d: Path) -> list[str]:
    rows = ["| model | profile | int8 / fp32 under Inductor (oneDNN at AVX2) | error vs eager |",
            "|---|---|---|---|"]
    for name, (model, x_cal, x) in models.items():
        paths = []
        base = d / f"ind-{name.split()[0]}-fp32.pt2"
        fxcompress.export(model, (x,), base, profile="x86-avx2")
        for prof in ("x86-avx2", "x86-server"):
            gm = _compile(model, x_cal, prof, techniques=["int8"])
            p = d / f"ind-{name.split()[0]}-{prof}.pt2"
            fxcompress.export(gm, (x,), p)
            paths.append(str(p))
        torch.save(x, d / "x.pt")
        env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
        out = subprocess.run([sys.executable, "-c", INDUCTOR_CHILD, str(d / "x.pt"), str(base),
                              *paths], capture_output=True, text=True, env=env, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        for prof, p in zip(("x86-avx2", "x86-server"), paths, strict=True):
            rows.append(f"| {name} | {prof} | {res[p]['ratio']:.2f}× | {res[p]['error']:.4f} |")
    return rows


def compile_time_section() -> list[str]:
    rows = ["| host | threads | wall s | CPU s |", "|---|---|---|---|"]

    def child(env_extra):
        out = subprocess.run([sys.executable, "-c", DEMO_CHILD], capture_output=True, text=True,
                             env=dict(os.environ, **env_extra), check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    r = child({})
    rows.append(f"| quiet | auto ({torch.get_num_threads()}) | {r['wall']:.1f} | {r['cpu']:.1f} |")
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        time.sleep(2)
        r = child({})
        n = next((s.split()[2] for s in r["notes"] if s.startswith("compiled with")), "all")
        rows.append(f"| 3 CPU-bound neighbours | auto ({n}) | {r['wall']:.1f} | {r['cpu']:.1f} |")
        r = child({"FXCOMPRESS_THREADS": str(torch.get_num_threads())})
        rows.append(f"| 3 CPU-bound neighbours | forced {torch.get_num_threads()} (as before) | "
                    f"{r['wall']:.1f} | {r['cpu']:.1f} |")
        r = child({"FXCOMPRESS_THREADS": str(torch.get_num_threads()),
                   "OMP_WAIT_POLICY": "PASSIVE"})
        rows.append(f"| 3 CPU-bound neighbours | forced {torch.get_num_threads()}, "
                    f"OMP_WAIT_POLICY=PASSIVE | {r['wall']:.1f} | {r['cpu']:.1f} |")
    finally:
        for b in burners:
            b.kill()
            b.wait()
    return rows


def bert_section() -> list[str]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, vocab_size=30522)
    model = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randint(0, 30522, (8, 64), generator=g),) for _ in range(4)]

    def size(m, x):
        return saved_bytes(m, (x,), dynamic=False)

    rows = ["| compiled on (host ISA as seen) | profile | .pt2 bytes / fp32 | layers int8 | "
            "note |", "|---|---|---|---|---|"]
    before = size(model, cal[0][0])
    for isa in ("avx2,fma,avx512f,avx512bw,avx512_vnni", "avx2,fma"):
        os.environ["FXCOMPRESS_HOST_ISA"] = isa
        for prof in ("x86-server", "x86-host"):
            gm = fxcompress.compile(model, cal[0], profile=prof, calibration=cal,
                                    tolerance=0.05, techniques=["int8"])
            rep = gm.meta["fxcompress_report"]
            n = sum("int8" in lay.applied for lay in rep.layers)
            note = next((s for s in rep.notes if "x86-avx2" in s or "describes this host" in s),
                        "")
            rows.append(f"| {isa} | {prof} | {size(gm, cal[0][0]) / before:.3f} | "
                        f"{n}/{len(rep.layers)} | {note[:90]}… |" if note else
                        f"| {isa} | {prof} | {size(gm, cal[0][0]) / before:.3f} | "
                        f"{n}/{len(rep.layers)} | |")
    del os.environ["FXCOMPRESS_HOST_ISA"]
    return rows


def _previous(section: int) -> list[str]:
    """The rows of `section` as the last run wrote them (for --sections)."""
    if not OUT.exists():
        return ["(not run yet)"]
    parts = OUT.read_text().split("\n## ")
    body = next((p for p in parts if p.startswith(f"{section}.")), "")
    return [line for line in body.splitlines() if line.startswith("|")] or ["(not run yet)"]


def main() -> None:
    """Run the sections asked for (all by default) and write the table; a section not run
    keeps the rows of the last run."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    todo = set(ap.parse_args().sections)
    load = os.getloadavg()[0]
    models = _models()
    onnx_rows, cost_rows, ind_rows = _previous(1), _previous(3), _previous(2)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for n, (_, _, x) in models.items():
            np.save(d / f"x-{n.split()[0]}.npy", x.numpy())
        if todo & {1, 3}:
            onnx_rows = onnx_section(models, d)
            cost_rows = ort_cost_section(d)
        if 2 in todo:
            ind_rows = inductor_section(models, d)
    time_rows = compile_time_section() if 4 in todo else _previous(4)
    bert_rows = bert_section() if 5 in todo else _previous(5)
    flags = " ".join(host.host_isa())
    publish(OUT, [
        "# The target is not the host",
        "",
        "Generated by `benchmarks/host.py`; do not edit by hand. This CPU's int8-relevant "
        f"flags: `{flags}`; torch {torch.__version__}, {torch.get_num_threads()} threads, load "
        f"average {load:.2f} at the start of the last run (of sections "
        f"{', '.join(map(str, sorted(todo)))}; 2 cores; timings taken with nothing else running "
        "except where the section says otherwise).",
        "",
        "## 1. `.onnx` files on an x86 CPU without VNNI",
        "",
        "Each model compiled with `tolerance=0.02` on its calibration split, written by "
        "`fxcompress.export`, run in ONNX Runtime on this CPU and under QEMU's emulation of "
        f"an AMD {QEMU_CPU} (AVX2, FMA, no AVX-512, no VNNI); error = relative output error "
        f"against the compiled model on {BATCH} test inputs (the export check's limit is "
        f"{ex.INT8_CHECK_TOLERANCE}). The u8 x s8 rows are the same models with the int8 left "
        "as u8 x s8 (`fxcompress.export(..., onnx_int8=\"u8s8\")`, an opt-in for CPUs with "
        "VNNI / AMX; the default writes full-range weights as u8 x u8).",
        "",
        *onnx_rows,
        "",
        "## 2. int8 under Inductor with oneDNN at AVX2",
        "",
        "`techniques=[\"int8\"]`, batch 64, `torch.compile` with freezing in a process with "
        "`ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's kernels for a CPU without VNNI, on this CPU); "
        "ratio = int8 latency / fp32 latency, both under Inductor, 30 interleaved runs.",
        "",
        *ind_rows,
        "",
        "## 3. What the portable `.onnx` form costs on this CPU",
        "",
        "u8 x u8 as written / the same file with u8 x s8 int8, ONNX Runtime (intra-op "
        "spinning off in both sessions: left on, two sessions timed interleaved fight for the "
        "cores and the ratio swung from 0.6x to 1.9x between runs), 50 interleaved runs:",
        "",
        *cost_rows,
        "",
        "## 4. Compile time on a busy host",
        "",
        "The demo compile (trained digits CNN, mobile-arm, tolerance 0.02) in a fresh process, "
        "quiet and beside 3 processes spinning on the 2 cores.",
        "",
        *time_rows,
        "",
        "## 5. A named target gives the same plan on any host",
        "",
        "A MiniLM-sized BERT (random weights; 6 layers, hidden 384, vocabulary 30522) compiled "
        "with `techniques=[\"int8\"]`, tolerance 0.05, with the host's ISA as fxcompress sees "
        "it set by `FXCOMPRESS_HOST_ISA`. x86-server is the AVX-512 VNNI target wherever it is "
        "compiled; x86-host is the machine at hand.",
        "",
        *bert_rows,
    ])


if __name__ == "__main__":
    main()
