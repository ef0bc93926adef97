"""Does 4-bit pay on this x86 CPU? PyTorch's own CPU kernels against fp32 and int8 (issue #20).

For linear shapes of the benchmark models (MiniLM's FFN at batch 1 = 48 tokens and batch 32 =
1,536 tokens; a 1024-wide decoder at one token and at 32 tokens), each kernel is timed
against ``F.linear`` in fp32 (MKL), interleaved in one process, medians of many runs:

- int8 dynamic: per-token symmetric int8 input, ``torch._int_mm`` (VNNI), rescale;
- int8 weight-only: ``aten._weight_int8pack_mm`` (float input, int8 weight);
- int4 weight-only: ``aten._weight_int4pack_mm_for_cpu`` (float input; group-32 uint4 weight
  packed by ``_convert_weight_to_int4pack_for_cpu``), with fp32 and bf16 inputs;
- int8 dynamic x int4: ``aten._dyn_quant_matmul_4bit`` (PyTorch's 8da4w CPU kernel).

and, in a second table, in ONNX Runtime, the ``.onnx`` files `fxcompress.export` writes for the
layer, against the fp32 layer's: int8 compiled for x86-server (static per-tensor input,
per-channel weight, Q/DQ around ``Gemm``), and int4 compiled with ``intx`` as ``MatMulNBits``
(``accuracy_level`` 4: int8 input x int4 weight) and the same file at float compute (level 0).

Writes ``benchmarks/results/int4_x86.md``; the x86-server profile takes a form only where it is
faster than fp32 here.

    .venv/bin/python benchmarks/int4_x86.py [--runs 200]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.* as a script

from benchmarks import conditions, publish  # noqa: E402
from fxcompress.host import host_isa  # noqa: E402
from fxcompress.host.timing import interleaved  # noqa: E402

OUT_MD = ROOT / "benchmarks" / "results" / "int4_x86.md"
GROUP = 32
#: (what, tokens M, in K, out N)
SHAPES = (("MiniLM FFN in, batch 1", 48, 384, 1536),
          ("MiniLM FFN out, batch 1", 48, 1536, 384),
          ("MiniLM FFN in, batch 32", 1536, 384, 1536),
          ("1024-wide decoder, 1 token", 1, 1024, 1024),
          ("4096-wide decoder, 1 token", 1, 4096, 4096),
          ("1024-wide decoder, 32 tokens", 32, 1024, 1024))


def kernels(m: int, k: int, n: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The linear y = x W^T + b of one shape, in every form, as callables."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) / 10
    # int8 per channel
    s8 = w.abs().amax(1) / 127
    q8 = torch.round(w / s8[:, None]).clamp(-127, 127).to(torch.int8)
    q8t = q8.t().contiguous().t()  # _int_mm reads it (K, N)

    def int8_dyn():
        sx = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        xq = torch.round(x / sx).clamp(-127, 127).to(torch.int8)
        return torch._int_mm(xq, q8t.t()).float() * sx * s8 + b

    # int4 group-wise, asymmetric uint4 as the CPU kernel stores it (scale, zero per group)
    grp = w.reshape(n, k // GROUP, GROUP)
    lo, hi = grp.amin(-1), grp.amax(-1)
    s4 = ((hi - lo) / 15).clamp_min(1e-12)
    q4 = torch.round((grp - lo[..., None]) / s4[..., None]).clamp(0, 15).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.reshape(n, k), 2)
    # the kernel dequantizes (q - 8) * scale + zero: zero = lo + 8 * scale
    sz = torch.stack([s4, lo + 8 * s4], -1).transpose(0, 1).contiguous()  # (K/G, N, 2)
    xb, szb = x.bfloat16(), sz.bfloat16()
    # symmetric signed int4 + 8, two per byte, bf16 scales: the form torchao hands this op
    ss = (grp.abs().amax(-1) / 7).clamp_min(1e-12)
    qs = (torch.round(grp / ss[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(n, k)
    dyn = torch.ops.aten._dyn_quant_pack_4bit_weight(
        qs[:, 1::2] << 4 | qs[:, ::2], ss.bfloat16(), b, GROUP, k, n)
    return {
        "fp32": lambda: F.linear(x, w, b),
        "int8 dynamic (_int_mm)": int8_dyn,
        "int8 weight-only": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8) + b,
        "int4 weight-only, fp32 input": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, GROUP, sz) + b,
        "int4 weight-only, bf16 input": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb, packed, GROUP, szb).float() + b,
        "int8 dyn x int4 (_dyn_quant_matmul_4bit)": lambda: torch.ops.aten._dyn_quant_matmul_4bit(
            x, dyn, GROUP, k, n),
    }


def ort_kernels(m: int, k: int, n: int) -> dict[str, Callable[[], object]]:
    """The same linear as ONNX Runtime sessions of the ``.onnx`` files `fxcompress.export`
    writes (fp32: the plain layer; int8: compiled for x86-server, Q/DQ around ``Gemm``; int4:
    compiled with ``intx``, ``MatMulNBits`` at int8 compute, and the same file switched to
    float compute), as callables. Intra-op spinning is off in every session: two spinning
    sessions timed interleaved fight for the cores."""
    import tempfile

    import onnx
    import onnxruntime as ort

    import fxcompress

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    layer = torch.nn.Linear(k, n).eval()
    layer.weight.data = torch.randn(n, k, generator=g) / k ** 0.5
    layer.bias.data = torch.randn(n, generator=g) / 10
    calib = [(torch.randn(max(m, 64), k, generator=g),) for _ in range(4)]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    feed = {}

    def session(model_bytes: bytes):
        sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        feed[sess] = {sess.get_inputs()[0].name: x.numpy()}
        return lambda: torch.from_numpy(sess.run(None, feed[sess])[0])

    with tempfile.TemporaryDirectory() as d:
        def written(module, name: str) -> onnx.ModelProto:
            fxcompress.export(module, (x,), Path(d, name))
            return onnx.load(str(Path(d, name)))

        fp32 = written(layer, "fp32.onnx")
        int8 = written(fxcompress.compile(layer, (x,), profile="x86-server", techniques=["int8"],
                                          calibration=calib, tolerance=10.0), "int8.onnx")
        int4 = written(fxcompress.compile(layer, (x,), profile="mobile-arm", techniques=["intx"],
                                          calibration=calib, tolerance=10.0, objective="size"),
                       "int4.onnx")
    int4_float = onnx.ModelProto()
    int4_float.CopyFrom(int4)
    for node in int4_float.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    return {"ORT fp32 (Gemm)": session(fp32.SerializeToString()),
            "ORT int8 as x86-server's .onnx (Q/DQ, Gemm)": session(int8.SerializeToString()),
            "ORT MatMulNBits int4, int8 compute (as written)": session(int4.SerializeToString()),
            "ORT MatMulNBits int4, float compute": session(int4_float.SerializeToString())}


def _table(build: Callable, runs: int) -> list[str]:
    """One row per shape: each form's time over the first form's (the baseline), and its
    error against it."""
    lines: list[str] = []
    for what, m, k, n in SHAPES:
        ks = build(m, k, n)
        names = list(ks)
        if not lines:
            lines = ["| shape (M x K -> N) | " + " | ".join(names[1:]) + " |",
                     "|---|" + "---|" * (len(names) - 1)]
        base = ks[names[0]]
        ref = base()
        cells = []
        for name in names[1:]:
            err = float((ks[name]() - ref).norm() / ref.norm())
            ratio = interleaved(base, ks[name], runs=runs).ratio
            cells.append(f"{ratio:.2f} ({err:.3f})")
            print(what, name, cells[-1], flush=True)
        lines.append(f"| {what} ({m} x {k} -> {n}) | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Time every kernel on every shape and write the results file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT_MD))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lines = ["# 4-bit linear kernels on this x86 CPU, against fp32 (issue #20)", "",
             f"Generated by `benchmarks/int4_x86.py` in {{secs}} s; {conditions()}; "
             f"{platform.processor() or platform.machine()}, ISA "
             f"{', '.join(sorted(f for f in host_isa() if f.startswith(('avx', 'amx'))))}; "
             f"{args.threads} threads; torch {torch.__version__}. Each cell: the kernel's "
             f"median time over fp32's, interleaved, {args.runs} runs (below 1 is "
             "faster); in parentheses, the relative error of its output against fp32.", "",
             "## PyTorch (eager kernels; fp32 = `F.linear`, MKL)", ""]
    lines += _table(kernels, args.runs)
    import onnxruntime

    lines += ["", f"## ONNX Runtime {onnxruntime.__version__} (the `.onnx` files fxcompress writes "
              "for the layer; fp32 = the plain layer's file, `Gemm`)", ""]
    lines += _table(ort_kernels, args.runs)
    lines[2] = lines[2].replace("{secs}", f"{time.perf_counter() - t0:.0f}")
    publish(Path(args.out), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
