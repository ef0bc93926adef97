"""``docs_lm``: a small decoder-only (GPT-style) language model of Python's documentation.

The model
---------
:class:`DocsLM` is a causal transformer written with plain ops, so every projection is an
``nn.Linear`` that a compressor can see: token plus learned position embeddings, four pre-LN
blocks (causal self-attention as q/k/v/out ``nn.Linear``, ``matmul``, a causal mask kept as a
registered boolean buffer, ``masked_fill`` and ``softmax``; an MLP of two ``nn.Linear`` with
GELU), a final LayerNorm and an untied LM head. Width 256, 4 heads, context
:data:`CONTEXT` = 64 tokens, about 5.2 M parameters. ``forward(ids)`` maps int64 token ids
``(N, S)``, ``S <= CONTEXT``, to next-token logits ``(N, S, vocab)``.

The data
--------
The documents of the text task of :mod:`benchmarks.models` (docstrings of a fixed list of
standard-library modules and the paragraphs of ``pydoc_data.topics``), with the same
document-level split (near-duplicates clustered, clusters assigned by a hash of their text:
70 % train, 10 % calib, 20 % test), tokenized by :func:`benchmarks.models.tokenize` (lower-case
words, numbers and punctuation). A split's documents are concatenated in their fixed order,
each followed by ``<eod>``. The vocabulary is ``<unk>``, ``<eod>`` and every word seen at
least twice in the training split (at most :data:`VOCAB_MAX` words), shipped as
``benchmarks/weights/docs_lm_vocab.json`` so the ids stay fixed. Training windows are
``CONTEXT + 1`` tokens at stride 32 over the training stream; evaluation windows are
non-overlapping (each token of the split is predicted once, from the tokens before it in its
window). Perplexity is ``exp`` of the mean next-token negative log-likelihood over all
predicted tokens. The ``"test"`` split is never trained on.

Weights: ``benchmarks/weights/docs_lm.pt`` (fp32 state dict), written by
``benchmarks/train_models.py --only docs_lm``; :func:`load_docs_lm` trains and writes them
(seeded) when the file is missing.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.models import (
    WEIGHTS_DIR,
    SelfAttention,
    TrainResult,
    _atomic_write_bytes,
    _text_documents,
    check_split,
    tokenize,
)

__all__ = [
    "CONTEXT",
    "VOCAB_MAX",
    "CausalSelfAttention",
    "DecoderBlock",
    "DocsLM",
    "lm_data",
    "lm_vocab",
    "load_docs_lm",
    "perplexity",
    "reset_caches",
    "save_docs_lm",
    "train_docs_lm",
    "weights_path",
    "window_nll",
]

#: Tokens of context the model reads (and predicts) per window.
CONTEXT: int = 64
#: Most words kept in the vocabulary (besides ``<unk>`` and ``<eod>``).
VOCAB_MAX: int = 4094
_MIN_COUNT = 2  # words seen once in training are <unk>: the model learns to predict <unk>
_UNK, _EOD = "<unk>", "<eod>"
_VOCAB_FILE = "docs_lm_vocab.json"
_TRAIN_STRIDE = 32


def weights_path() -> Path:
    """Path of the shipped state dict: ``benchmarks/weights/docs_lm.pt``."""
    return WEIGHTS_DIR / "docs_lm.pt"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _build_vocab() -> list[str]:
    counts: collections.Counter[str] = collections.Counter()
    for _, split, text in _text_documents():
        if split == "train":
            counts.update(tokenize(text))
    words = sorted((w for w, c in counts.items() if c >= _MIN_COUNT),
                   key=lambda w: (-counts[w], w))
    return [_UNK, _EOD, *words[:VOCAB_MAX]]


@functools.lru_cache(maxsize=1)
def _cached_vocab() -> tuple[str, ...]:
    path = WEIGHTS_DIR / _VOCAB_FILE
    if path.exists():
        return tuple(json.loads(path.read_text(encoding="utf-8"))["tokens"])
    vocab = _build_vocab()
    payload = json.dumps({"tokens": vocab}, ensure_ascii=False, indent=0) + "\n"
    try:
        _atomic_write_bytes(path, lambda p: p.write_text(payload, encoding="utf-8"))
    except OSError:  # read-only checkout: the vocabulary is cheap to rebuild
        pass
    return tuple(vocab)


def lm_vocab() -> dict[str, int]:
    """Word -> id map of the language model (``<unk>`` is 0, ``<eod>`` is 1), read from
    ``benchmarks/weights/docs_lm_vocab.json`` (rebuilt from the training split and written
    when missing)."""
    return {w: i for i, w in enumerate(_cached_vocab())}


@functools.lru_cache(maxsize=3)
def _stream(split: str) -> np.ndarray:
    vocab = lm_vocab()
    unk, eod = vocab[_UNK], vocab[_EOD]
    ids: list[int] = []
    for _, doc_split, text in _text_documents():
        if doc_split == split:
            ids.extend(vocab.get(t, unk) for t in tokenize(text))
            ids.append(eod)
    return np.asarray(ids, dtype=np.int64)


def reset_caches() -> None:
    """Forget the cached vocabulary and token streams (after the vocabulary file changed)."""
    _cached_vocab.cache_clear()
    _stream.cache_clear()


def lm_data(split: str, stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of one split: int64 ``(N, CONTEXT)`` each, ``targets`` the
    inputs shifted by one token. Windows start every `stride` tokens (default: 32 for
    ``"train"``, ``CONTEXT`` for ``"calib"`` and ``"test"``, so every token of those splits is
    predicted exactly once); the last, partial window is dropped. Fresh tensors each call.

    Raises:
        ValueError: if ``split`` is not one of ``"train"``, ``"calib"``, ``"test"``.
    """
    check_split(split)
    stream = _stream(split)
    step = stride or (_TRAIN_STRIDE if split == "train" else CONTEXT)
    starts = range(0, len(stream) - CONTEXT - 1 + 1, step)
    windows = np.stack([stream[s:s + CONTEXT + 1] for s in starts])
    w = torch.from_numpy(windows.copy())
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(SelfAttention):
    """`benchmarks.models.SelfAttention` (q/k/v/out ``nn.Linear``, explicit matmul / softmax)
    made causal: the mask a registered boolean buffer."""

    def __init__(self, d_model: int, num_heads: int, context: int) -> None:
        """The projections and the ``(context, context)`` lower-triangular mask."""
        super().__init__(d_model, num_heads)
        self.register_buffer("causal", torch.ones(context, context, dtype=torch.bool).tril(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` ``(N, S, D)``, each position to itself and the ones before it."""
        seq = x.size(1)
        q = self._heads(self.query(x))
        k = self._heads(self.key(x))
        v = self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / (self.head_dim ** 0.5)
        scores = scores.masked_fill(~self.causal[:seq, :seq], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if self.training:
            probs = F.dropout(probs, 0.1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return self.out(ctx.view(ctx.size(0), seq, -1))


class DecoderBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + fc_out(gelu(fc_in(ln2(x))))``."""

    def __init__(self, d_model: int, num_heads: int, context: int, dropout: float = 0.1) -> None:
        """Build two norms, causal attention and the ``d -> 4d -> d`` MLP."""
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, context)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc_in = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)
        self.dropout = dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout) if self.training else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` ``(N, S, D)``."""
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.fc_out(F.gelu(self.fc_in(self.norm2(x)))))


class DocsLM(nn.Module):
    """Decoder-only language model: ``(N, S)`` int64 token ids -> ``(N, S, vocab)`` logits of
    the next token at each position (``S <= context``). Untied input embedding and LM head."""

    def __init__(self, vocab_size: int, d_model: int = 256, num_heads: int = 4,
                 num_layers: int = 4, context: int = CONTEXT, dropout: float = 0.1) -> None:
        """Build the embeddings, ``num_layers`` decoder blocks, final norm and LM head."""
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(context, d_model)
        self.register_buffer("position_ids", torch.arange(context)[None, :], persistent=False)
        self.blocks = nn.ModuleList(
            DecoderBlock(d_model, num_heads, context, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size)
        self.dropout = dropout

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(N, S, vocab)`` for token ids ``(N, S)``."""
        seq = ids.size(1)
        x = self.token_embedding(ids) + self.position_embedding(self.position_ids[:, :seq])
        if self.training:
            x = F.dropout(x, self.dropout)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def window_nll(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               y: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of each window: float ``(N,)``.
    `model` is any callable from ids to logits (a module, a GraphModule, a ``.pte`` runner)."""
    out = []
    for s in range(0, len(x), batch):
        logits = model(x[s:s + batch]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), y[s:s + batch], reduction="none")
        out.append(nll.mean(dim=1))
    return torch.cat(out)


def perplexity(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               y: torch.Tensor, batch: int = 64) -> float:
    """``exp`` of the mean next-token NLL over every predicted token of the windows (all
    windows have ``CONTEXT`` tokens, so the mean of the per-window means)."""
    return math.exp(float(window_nll(model, x, y, batch).double().mean()))


# --------------------------------------------------------------------------------------------
# Training, saving, loading
# --------------------------------------------------------------------------------------------


def train_docs_lm(steps: int = 560, seed: int = 0, batch_size: int = 32, lr: float = 2e-3,
                  log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a :class:`DocsLM` on the ``"train"`` windows (seeded, deterministic algorithms):
    AdamW (weight decay 0.1 on matrices), 5 % linear warm-up then cosine decay, gradient norm
    clipped at 1, dropout 0.1, `steps` steps of `batch_size` windows drawn epoch by epoch
    from a seeded permutation. `log` gets a line every 40 steps."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = lm_data("train")
    model = DocsLM(len(lm_vocab()))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    model.train()
    try:
        order = torch.empty(0, dtype=torch.int64)
        for step in range(steps):
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(x), generator=gen)])
            idx, order = order[:batch_size], order[batch_size:]
            logits = model(x[idx])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[idx].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if log is not None and (step % 40 == 0 or step == steps - 1):
                log(f"step {step}: train loss {loss.item():.3f} "
                    f"({time.perf_counter() - start:.0f} s)")
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    model.eval()
    return TrainResult(model, time.perf_counter() - start)


def save_docs_lm(model: nn.Module) -> Path:
    """Atomically write `model`'s state dict to :func:`weights_path`; returns the path."""
    path = weights_path()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(path, lambda p: torch.save(state, p))
    return path


def load_docs_lm() -> DocsLM:
    """The shipped :class:`DocsLM` in eval mode (trained, seeded, and written first when
    ``benchmarks/weights/docs_lm.pt`` is missing)."""
    path = weights_path()
    if not path.exists():
        model = train_docs_lm().model
        save_docs_lm(model)
        return model.eval()
    model = DocsLM(len(lm_vocab()))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
