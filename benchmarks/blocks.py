"""Block-by-block compilation (`fxcompress.blocks`) of a Llama-architecture decoder larger than
what a compile should hold: built from its config with random weights (N(0, 0.02), norms 1, as
`transformers` initialises them) written straight into `safetensors` shards one tensor at a time,
so the fp32 model is never whole in memory, even here.

Parts (each in its own child process, whose peak resident memory is its own `ru_maxrss`):

- ``large``: the ≥1 B-parameter model (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32000
  tokens) compiled for mobile-arm with int8 / int4: peak RSS against its fp32 weight bytes,
  compile time, the compressed bytes, the end-to-end error;
- ``equivalence``: a smaller model of the family compiled block by block and whole with the
  same plan (``sequential=False``): the relative difference of their logits on unseen tokens;
- ``ray``: a mid-size model's independent blocks compiled locally (2 threads) and on a local Ray
  cluster of 2 one-thread workers: times, and whether the plan and bytes are the same.

Writes `benchmarks/results/blocks.md` and `.json` (parts merge across runs).

    .venv/bin/python benchmarks/blocks.py [--parts large equivalence ray] [--folder /tmp/llama]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.* as a script

from benchmarks import code_revision, conditions, publish  # noqa: E402

OUT_MD = ROOT / "benchmarks" / "results" / "blocks.md"
OUT_JSON = ROOT / "benchmarks" / "results" / "blocks.json"
#: TinyLlama-1.1B's shape
LARGE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SMALL = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
MID = dict(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
SHARD_BYTES = 1 << 30
TOLERANCE = 0.05
#: the 1.1 B model's end-to-end tolerance. Random weights make every rewrite costly: in a random
#: Llama block (N(0, 0.02) weights, a residual stream far smaller than each block's update) one
#: int8 linear moves the block's output by 2-11 %, so 6.0 spread over 24 blocks (0.25 each) is
#: what lets the blocks take int8 / int4 on their linears. The figures of this part are memory
#: and time; accuracy claims are made on trained models elsewhere.
LARGE_TOLERANCE = 6.0
#: rounding to nearest, no AWQ search: the compile of a 2048-wide block then takes about 70 s
#: here instead of 210 s (GPTQ and the AWQ grid on every int4 candidate)
LARGE_OVERRIDES = {"*": {"*": {"intx": {"rounding": "rtn", "scaling": "none"}}}}


def write_checkpoint(folder: Path, shape: dict, seed: int = 0) -> int:
    """A Llama checkpoint of `shape` with random weights in `folder`, written tensor by tensor
    into shards of at most `SHARD_BYTES`; returns the number of parameters."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, torch_dtype="float32")
    folder.mkdir(parents=True, exist_ok=True)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    specs = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,)),
                  (p + "post_attention_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                  (p + "mlp.down_proj.weight", (h, f))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shp in specs:
        nbytes = 4 * math.prod(shp)
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (torch.ones(shp) if name.endswith("norm.weight")
                          else torch.randn(shp, generator=gen) * 0.02) for name, shp in shard}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name, _ in shard})
        del tensors
    total = sum(4 * math.prod(s) for _, s in specs)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(folder)
    return sum(math.prod(s) for _, s in specs)


def _calibration(vocab: int, batches: int, rows: int, seq: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (rows, seq), generator=g) for _ in range(batches)]


def _in_child(fn, *args) -> dict:
    """`fn(*args)` in a fresh child process (spawned: nothing inherited); its result plus the
    child's peak RSS."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, args))
    p.start()
    out = q.get()
    p.join()
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


def _child(q, fn, args) -> None:
    try:
        res = fn(*args)
        res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        q.put(res)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        import traceback

        traceback.print_exc()
        q.put({"error": f"{type(e).__name__}: {e}"})


def _compile(folder: str, out: str, tokens: dict, kw: dict) -> dict:
    from fxcompress.blocks import compile_blocks

    cal = _calibration(**tokens)
    t0 = time.perf_counter()
    lines = []
    res = compile_blocks(folder, out, calibration=cal, progress=lambda s: (print(s, flush=True),
                                                                         lines.append(s)), **kw)
    return {"seconds": time.perf_counter() - t0, "result": res.to_dict(), "progress": lines}


def part_large(base: Path) -> dict:
    """The ≥1 B model for mobile-arm."""
    folder = base / "llama-1b"
    if not (folder / "config.json").exists():
        t0 = time.perf_counter()
        n = write_checkpoint(folder, LARGE)
        print(f"checkpoint written: {n:,} parameters in {time.perf_counter() - t0:.0f} s")
    from fxcompress.blocks.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    out = base / "llama-1b.out"
    shutil.rmtree(out, ignore_errors=True)
    tokens = dict(vocab=LARGE["vocab_size"], batches=4, rows=4, seq=64, seed=1)
    run = _in_child(_compile, str(folder), str(out), tokens,
                    dict(profile="mobile-arm", tolerance=LARGE_TOLERANCE,
                         techniques=["intx", "int8"], overrides=LARGE_OVERRIDES))
    r = run["result"]
    return {"parameters": sum(math.prod(i[1]) for i in ckpt.tensors.values()),
            "fp32_bytes": ckpt.nbytes(), "shards": len(ckpt.shards),
            "bytes": r["bytes"], "error": r["error"], "seconds": run["seconds"],
            "peak_rss": run["peak_rss"], "blocks": r["blocks"], "tokens": tokens,
            "threads": r["threads"]}


def _equivalence(folder: str, out: str, tokens: dict, sequential: bool,
                 techniques: list[str]) -> dict:
    from transformers import LlamaForCausalLM

    import fxcompress
    from fxcompress.blocks import compile_blocks, load_blocks

    cal = _calibration(**tokens)
    kw = dict(profile="mobile-arm", tolerance=TOLERANCE, techniques=["intx", "int8"])
    kw["techniques"] = techniques
    res = compile_blocks(folder, out, calibration=cal, sequential=sequential, **kw)
    # the attention the blocks run (DecoderFamily: "sdpa"): eager attention rounds differently;
    # an ulp of difference in an activation flips int8 roundings of the static ranges after it
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids).logits

    # the same plan: each layer of the whole model restricted to what its block applied
    # (left alone where it applied nothing), at a tolerance that does not bind
    reports = json.loads((Path(out) / "report.json").read_text())["block_reports"]
    overrides, blocks_plan = {}, []
    for block, rep in reports.items():
        for la in rep["layers"]:
            if block == "embed":
                name = "m.model.embed_tokens"
            elif block == "head":
                name = f"m.{la['name']}"
            else:
                name = f"m.model.layers.{block.split('.')[1]}.{la['name'].split('.', 1)[1]}"
            tech = la["applied"].split("(")[0]
            overrides[name] = {"skip": True} if tech == "none" else \
                {"techniques": tech.split("+")}
            blocks_plan.append(la["applied"])
    whole = fxcompress.compile(Logits(model), (cal[0],), calibration=[(c,) for c in cal],
                               profile="mobile-arm", tolerance=1.0,
                               techniques=kw["techniques"], overrides=overrides)
    unseen = _calibration(tokens["vocab"], 2, 4, tokens["seq"], seed=99)
    chained = load_blocks(out)
    num = den = 0.0
    with torch.no_grad():
        for ids in unseen:
            a, b = chained(ids), whole(ids)
            num += float((a - b).double().pow(2).sum())
            den += float(b.double().pow(2).sum())
    applied_blocks = sorted(blocks_plan)
    applied_whole = sorted(la.applied for la in whole.meta["fxcompress_report"].layers)
    return {"relative_difference": math.sqrt(num / den), "same_plan":
            applied_blocks == applied_whole, "layers": len(applied_whole),
            "rewritten": sum(a != "none" for a in applied_whole),
            "block_error": res.error}


def part_equivalence(base: Path) -> dict:
    """Block by block vs whole, same plan, on a smaller model of the family."""
    folder = base / "llama-small"
    if not (folder / "config.json").exists():
        write_checkpoint(folder, SMALL)
    out = base / "llama-small.out"
    tokens = dict(vocab=SMALL["vocab_size"], batches=4, rows=4, seq=32, seed=1)
    rows = []
    for techniques in (["intx", "int8"], ["intx"], ["int8"]):
        for sequential in (False, True):
            shutil.rmtree(out, ignore_errors=True)
            r = _in_child(_equivalence, str(folder), str(out), tokens, sequential, techniques)
            rows.append(dict(r, sequential=sequential, techniques=techniques))
            print(rows[-1], flush=True)
    return {"rows": rows}


def part_ray(base: Path) -> dict:
    """Local (2 threads) vs Ray (2 one-thread workers), independent blocks."""
    folder = base / "llama-mid"
    if not (folder / "config.json").exists():
        write_checkpoint(folder, MID)
    tokens = dict(vocab=MID["vocab_size"], batches=4, rows=4, seq=64, seed=1)
    kw = dict(profile="mobile-arm", tolerance=LARGE_TOLERANCE, techniques=["intx", "int8"],
              overrides=LARGE_OVERRIDES, sequential=False)  # as the 1.1 B model's compile
    runs = {}
    for name, threads, extra in (("local-2threads", "2", {}), ("local-1thread", "1", {}),
                                 ("ray-2workers", "1", {"executor": "ray"})):
        out = base / f"llama-mid.{name}"
        shutil.rmtree(out, ignore_errors=True)
        os.environ["FXCOMPRESS_THREADS"] = threads
        runs[name] = _in_child(_compile, str(folder), str(out), tokens, kw | extra)
        runs[name]["files"] = {p.name: p.read_bytes() for p in sorted(out.glob("*.pt2"))}
    os.environ.pop("FXCOMPRESS_THREADS", None)
    same = {n: runs[n]["files"] == runs["ray-2workers"]["files"] for n in runs}
    return {n: {"seconds": r["seconds"], "bytes": r["result"]["bytes"],
                "error": r["result"]["error"], "same_bytes_as_ray": same[n],
                "peak_rss": r["peak_rss"],
                "layer_seconds": [b["seconds"] for b in r["result"]["blocks"]
                                  if b["name"].startswith("layer.")]}
            for n, r in runs.items()}


#: Llama-2/3-70B's shape: hidden 8192, FFN 28672, 80 layers, 64 heads, 8 key-value heads
B70 = dict(hidden=8192, ffn=28672, kv=1024, layers=80, vocab=128256)


def _layer_params(hidden: int, ffn: int, kv: int) -> int:
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn


def estimate_70b(data: dict) -> list[str]:
    """The expected time of a 70 B compile on N machines, from the measured per-block times
    (see docs/blocks.md for the model): a block's compile time t = c * params^a, a and c fitted
    to the decoder blocks of the two models measured (the 1.1 B one and the Ray part's), its
    peak memory MEMORY_FACTOR x its fp32 bytes."""
    from fxcompress.blocks import MEMORY_FACTOR

    lg, ry = data.get("large"), data.get("ray")
    if not lg or not ry or "local-1thread" not in ry:
        return []
    big = [b["seconds"] for b in lg["blocks"] if b["name"].startswith("layer.")]
    t_big = sorted(big)[len(big) // 2]
    p_big = _layer_params(LARGE["hidden_size"], LARGE["intermediate_size"],
                          LARGE["num_key_value_heads"] * LARGE["hidden_size"]
                          // LARGE["num_attention_heads"])
    mid = ry["local-1thread"].get("layer_seconds")
    if not mid:
        return []
    t_mid = sorted(mid)[len(mid) // 2]
    p_mid = _layer_params(MID["hidden_size"], MID["intermediate_size"],
                          MID["num_key_value_heads"] * MID["hidden_size"]
                          // MID["num_attention_heads"])
    # the 1.1 B blocks ran with lg["threads"] threads, the mid ones with 1: per-thread cost
    a = math.log(t_big * lg["threads"] / t_mid) / math.log(p_big / p_mid)
    p70 = _layer_params(B70["hidden"], B70["ffn"], B70["kv"])
    t70 = t_big * (p70 / p_big) ** a  # seconds per block at lg["threads"] threads
    block_bytes = 4 * p70
    lines = ["## A 70 B model on N machines, estimated", "",
             f"From the blocks measured above: the median decoder block of the 1.1 B model took "
             f"{t_big:.0f} s ({p_big / 1e6:.1f} M parameters, {lg['threads']} threads), the "
             f"mid-size model's {t_mid:.1f} s ({p_mid / 1e6:.2f} M, 1 thread); so a block's "
             f"time grows as parameters^{a:.2f} per thread. A Llama-70B block "
             f"({p70 / 1e6:.0f} M parameters, {block_bytes / 2**30:.1f} GiB fp32, about "
             f"{MEMORY_FACTOR * block_bytes / 2**30:.0f} GiB while it compiles) then takes "
             f"about {t70 / 3600:.1f} h at {lg['threads']} threads. Machines of 32 cores and "
             "256 GiB; the model's method in docs/blocks.md.", "",
             "| machines | workers each | sequential=True (a chain) | sequential=False "
             "(independent blocks) |", "|---|---|---|---|"]
    for n in (1, 2, 4, 8, 16):
        workers = min(32 // lg["threads"], int(256 * 2**30 // (MEMORY_FACTOR * block_bytes)))
        chain = B70["layers"] * t70  # a chain gains nothing from more machines
        slots = n * workers
        rounds = math.ceil(B70["layers"] / slots)
        lines.append(f"| {n} | {workers} | {chain / 3600:.0f} h | {rounds * t70 / 3600:.1f} h |")
    lines.append("")
    return lines


def write_markdown(data: dict) -> None:
    """blocks.md from the parts measured."""
    lines = ["# Block-by-block compilation", "",
             "Generated by `benchmarks/blocks.py`; do not edit by hand. Random-weight Llama "
             "checkpoints written as safetensors shards (see the script). Peak RSS: the "
             "compiling child process's own `ru_maxrss` (libraries, data and all).", ""]
    lg = data.get("large")
    if lg:
        lines += ["## A 1.1 B-parameter Llama for mobile-arm", "",
                  f"Run at {lg['commit']}, {lg['conditions']}.", "",
                  "| parameters | fp32 weights | shards | compiled bytes | / fp32 | peak RSS | "
                  "peak RSS / fp32 weights | compile | end-to-end error (calibration) |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| {lg['parameters']:,} | {lg['fp32_bytes']:,} | {lg['shards']} | "
                  f"{lg['bytes']:,} | {lg['bytes'] / lg['fp32_bytes']:.3f} | "
                  f"{lg['peak_rss']:,} | {lg['peak_rss'] / lg['fp32_bytes']:.3f} | "
                  f"{lg['seconds'] / 60:.1f} min | {lg['error']:.4f} |", "",
                  f"Calibration: {lg['tokens']['batches']} batches of {lg['tokens']['rows']} x "
                  f"{lg['tokens']['seq']} random tokens; tolerance {LARGE_TOLERANCE} spread over "
                  f"the blocks (see the script: random weights), int8 / int4 rounded to nearest; "
                  f"{lg['threads']} thread(s). Per block:", "",
                  "| block | fp32 bytes | compiled bytes | error | applied | seconds |",
                  "|---|---|---|---|---|---|"]
        for b in lg["blocks"]:
            applied = ", ".join(f"{k} x{v}" for k, v in sorted(b["applied"].items())) or "none"
            lines.append(f"| {b['name']} | {b['fp32_bytes']:,} | {b['bytes']:,} | "
                         f"{b['error']:.4g} | {applied} | {b['seconds']:.0f} |")
        lines.append("")
    eq = data.get("equivalence")
    if eq:
        lines += ["## Block by block vs whole, the same plan", "",
                  f"Run at {eq['commit']}. A {SMALL['num_hidden_layers']}-layer Llama "
                  f"(hidden {SMALL['hidden_size']}) compiled block by block for mobile-arm "
                  f"(tolerance {TOLERANCE}), then the whole model with `fxcompress.compile`, "
                  "each of its layers restricted to the technique its block applied (or left "
                  "alone) at a tolerance that does not bind: the same plan. sequential=False "
                  "fits each block on the original model's activations, True on the "
                  "compressed blocks' outputs.", "",
                  "| techniques | sequential | layers | same plan | layers rewritten | "
                  "relative difference of logits (unseen tokens) |",
                  "|---|---|---|---|---|---|"]
        for r in eq["rows"]:
            lines.append(f"| {', '.join(r['techniques'])} | {r['sequential']} | {r['layers']} "
                         f"| {r['same_plan']} | {r['rewritten']} | "
                         f"{r['relative_difference']:.2e} |")
        lines.append("")
    ry = data.get("ray")
    if ry:
        lines += ["## Local vs Ray", "",
                  f"Run at {ry['commit']}, {ry['conditions']}. A {MID['num_hidden_layers']}-"
                  f"layer Llama (hidden {MID['hidden_size']}), independent blocks "
                  "(`sequential=False`), mobile-arm, the 1.1 B model's settings; each run in "
                  "its own process, Ray's start-up included.", "",
                  "| executor | wall time | bytes | same bytes as Ray |", "|---|---|---|---|"]
        for n, r in ry.items():
            if isinstance(r, dict):
                lines.append(f"| {n} | {r['seconds']:.1f} s | {r['bytes']:,} | "
                             f"{r['same_bytes_as_ray']} |")
        lines.append("")
    lines += estimate_70b(data)
    publish(OUT_MD, lines)


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for and merge them into the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="*", default=["equivalence", "ray", "large"])
    ap.add_argument("--folder", default="/tmp/fxcompress-blocks-bench")
    args = ap.parse_args(argv)
    base = Path(args.folder)
    base.mkdir(parents=True, exist_ok=True)
    data = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    parts = {"large": part_large, "equivalence": part_equivalence, "ray": part_ray}
    for name in args.parts:
        load = conditions()
        res = parts[name](base)
        res["commit"], res["conditions"] = code_revision(), load
        data[name] = res
        OUT_JSON.write_text(json.dumps(data, indent=1, default=str) + "\n")
    write_markdown(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
