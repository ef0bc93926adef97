"""The trained models and data sets the tests and benchmarks use (not part of the package).

Three trained models:

``digits_cnn``
    :class:`DigitsCNN`, a plain conv/BN/ReLU network (620 k parameters) for scikit-learn's
    8x8 handwritten digits; 99.3 % test accuracy. The demo's model: it and its data live in
    :mod:`fxcompress.demo.digits`, and its weights ship with fxcompress
    (``fxcompress/weights/digits_cnn.pt``); they are re-exported here.
``digits_mlp``
    :class:`DigitsMLP`, a 64-512-256-10 multilayer perceptron (167 k parameters) for the same
    data; 98.2 % test accuracy. Weights in ``benchmarks/weights/``.
``text_transformer``
    :class:`TextClassifier`, a small BERT-style encoder written out by hand (every projection
    an ``nn.Linear``, attention as explicit view/permute/matmul/softmax; 1.17 M parameters,
    two thirds of them in the token embedding) that reads a window of 64 tokens of Python's
    own documentation and says which of 11 topics it comes from (:data:`TEXT_CLASSES`);
    78.8 % test accuracy (chance: 17 % for the largest class). Weights and vocabulary in
    ``benchmarks/weights/``.

Everything is built from data that ships with Python or scikit-learn, so nothing is
downloaded. :func:`load_pretrained` trains and saves a model (deterministically, seeded) when
its weight file is missing, so a fresh checkout still works; ``benchmarks/train_models.py``
retrains all three. `accuracy` and `correct` are `fxcompress.accuracy` / `fxcompress.correct`.

The text task
-------------
Documents are the docstrings of a fixed, sorted list of standard-library modules (each
module-, class-, function- and method-level docstring is one document) and the paragraphs of
``pydoc_data.topics.topics`` (the language reference shipped with Python). Each document
belongs to one of the :data:`TEXT_CLASSES`: nine topic groups of modules (for instance the
docstrings of ``zipfile``, ``tarfile`` and ``gzip`` are ``"archives"``) and two groups of
language-reference topics (``"language_syntax"`` and ``"data_model"``). Documents whose
normalised text occurs more than once are dropped; documents sharing a run of 12 tokens (a
method restating its base's docstring, say) are clustered, and each cluster goes wholly to one
split by a CRC-32 hash of its text (70 % train, 10 % calib, 20 % test), so no test text, not
even a near-duplicate, is seen in training. Per class and split the documents' tokens are
concatenated and cut into windows of :data:`SEQ_LEN` tokens (stride 32 for train,
non-overlapping for calib and test): with Python 3.11 that is 4881 / 389 / 720 windows. The
vocabulary (every training token, 5988 words, plus ``<pad>`` and ``<unk>``) ships as
``benchmarks/weights/text_vocab.json`` so token ids stay fixed. The metric is top-1 accuracy
over the windows. Another Python version words some docstrings differently, so its windows
differ a little (Python 3.12 gives 78.2 % with the shipped weights).
"""

from __future__ import annotations

import collections
import functools
import importlib
import inspect
import json
import os
import re
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.demo.digits import (
    DIGITS_CNN_WEIGHTS,
    SPLITS,
    DigitsCNN,
    _digits_arrays,
    check_split,
    digits_data,
)
from fxcompress.metrics import accuracy, correct

__all__ = [
    "MODEL_NAMES",
    "SEQ_LEN",
    "SPLITS",
    "TEXT_CLASSES",
    "WEIGHTS_DIR",
    "DigitsCNN",
    "DigitsMLP",
    "EncoderBlock",
    "SelfAttention",
    "TextClassifier",
    "TrainResult",
    "accuracy",
    "correct",
    "digits_data",
    "load_pretrained",
    "reset_caches",
    "save_weights",
    "saved_bytes",
    "text_data",
    "text_vocab",
    "tokenize",
    "train_digits_cnn",
    "train_digits_mlp",
    "train_text_transformer",
    "weights_path",
]

#: Directory holding the benchmarks' state dicts (``<name>.pt``) and the text vocabulary; the
#: digits CNN's weights ship with fxcompress instead (``fxcompress.demo.digits``).
WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"

#: Names accepted by :func:`load_pretrained`.
MODEL_NAMES: tuple[str, ...] = ("digits_cnn", "digits_mlp", "text_transformer")

#: Number of tokens per text window fed to :class:`TextClassifier`.
SEQ_LEN: int = 64

_VOCAB_FILE = "text_vocab.json"
_PAD, _UNK = "<pad>", "<unk>"
_VOCAB_MAX = 8000  # most frequent training tokens kept (plus <pad> and <unk>)
_VOCAB_MIN_COUNT = 1
_TRAIN_STRIDE = 32
_NEAR_DUP_NGRAM = 12  # documents sharing this many consecutive tokens go to the same split


# --------------------------------------------------------------------------------------------
# Digits MLP (the digits data and CNN: fxcompress.demo.digits)
# --------------------------------------------------------------------------------------------

class DigitsMLP(nn.Module):
    """Multilayer perceptron 64->512->256->10 with ReLU for ``(N, 1, 8, 8)`` digit images."""

    def __init__(self, num_classes: int = 10) -> None:
        """Build the layers; ``num_classes`` is the size of the output layer."""
        super().__init__()
        self.fc1 = nn.Linear(64, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, num_classes)
        self.dropout = 0.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten images ``(N, 1, 8, 8)`` and map them to logits ``(N, num_classes)``."""
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        if self.training:
            x = F.dropout(x, self.dropout)
        x = F.relu(self.fc2(x))
        if self.training:
            x = F.dropout(x, self.dropout)
        return self.fc3(x)




# --------------------------------------------------------------------------------------------
# Text data
# --------------------------------------------------------------------------------------------

# Topic groups of standard-library modules whose docstrings form the documents of each class.
_STDLIB_GROUPS: dict[str, tuple[str, ...]] = {
    "text_processing": tuple(
        (
            "codecs difflib gettext html html.parser locale re shlex string stringprep "
            "textwrap tokenize unicodedata"
        ).split()
    ),
    "numeric": tuple("cmath decimal fractions math numbers random statistics".split()),
    "files_os": tuple(
        "filecmp fileinput fnmatch glob io os os.path pathlib shutil stat tempfile".split()
    ),
    "networking": tuple(
        (
            "ftplib http.client http.cookies http.server imaplib ipaddress poplib selectors "
            "smtplib socket socketserver ssl urllib.parse urllib.request"
        ).split()
    ),
    "concurrency": tuple(
        (
            "asyncio.base_events asyncio.events asyncio.locks asyncio.queues asyncio.streams "
            "asyncio.tasks concurrent.futures._base concurrent.futures.thread "
            "multiprocessing.connection multiprocessing.managers multiprocessing.pool "
            "multiprocessing.process queue sched subprocess threading"
        ).split()
    ),
    "data_formats": tuple(
        (
            "base64 binascii configparser csv dbm email.message json json.decoder "
            "json.encoder mailbox mimetypes pickle plistlib shelve sqlite3 struct "
            "xml.dom.minidom xml.etree.ElementTree"
        ).split()
    ),
    "archives": tuple("bz2 gzip lzma tarfile zipfile zipimport zlib".split()),
    "testing_debugging": tuple(
        (
            "bdb cProfile doctest faulthandler logging logging.handlers pdb pstats timeit "
            "traceback unittest.case unittest.loader unittest.mock unittest.runner"
        ).split()
    ),
    "introspection": tuple(
        (
            "abc ast collections contextlib copy dataclasses dis enum functools inspect "
            "itertools operator types typing weakref"
        ).split()
    ),
}

# pydoc_data.topics keys (the language reference) split into two more classes; every key not
# listed under "data_model" is "language_syntax", except "debugger" (the pdb manual).
_TOPIC_DATA_MODEL: frozenset[str] = frozenset(
    (
        "attribute-access bltin-code-objects bltin-ellipsis-object bltin-null-object "
        "bltin-type-objects callable-types context-managers customization dict formatstrings "
        "numeric-types objects sequence-types specialattrs specialnames string-methods truth "
        "types typesfunctions typesmapping typesmethods typesmodules typesseq typesseq-mutable"
    ).split()
)
_TOPIC_GROUP_OVERRIDES: dict[str, str] = {"debugger": "testing_debugging"}

#: Class names of the text task, in label order.
TEXT_CLASSES: tuple[str, ...] = (*_STDLIB_GROUPS, "language_syntax", "data_model")

_TOKEN_RE = re.compile(r"[a-z]+|[0-9]+|([^\w\s])\1\1|[^\w\s]")
_RUN_RE = re.compile(r"([^\w\s])\1{2,}")


def tokenize(text: str) -> list[str]:
    """Split text into lower-case word, number and punctuation tokens.

    Underscores separate words; a run of three or more equal punctuation characters (a table
    border such as ``+------+``, an underline ``=====``) becomes one three-character token.
    """
    text = _RUN_RE.sub(r"\1\1\1", text.lower())
    return [m.group(0) for m in _TOKEN_RE.finditer(text)]


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _module_docstrings(modname: str) -> list[str]:
    """Own docstrings of a module, its public classes/functions and their public methods."""
    module = importlib.import_module(modname)
    docs: list[str] = []

    def add(obj: object) -> None:
        doc = getattr(obj, "__doc__", None)  # own docstring only, never an inherited one
        if isinstance(doc, str) and doc.strip():
            docs.append(inspect.cleandoc(doc))

    add(module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        origin = getattr(obj, "__module__", None)
        # Accept members defined here or in a private C accelerator (_socket, posix, ...).
        if not isinstance(origin, str) or not (
            origin == module.__name__ or origin.startswith("_") or origin in ("posix", "nt")
        ):
            continue
        if not (inspect.isclass(obj) or callable(obj)):
            continue
        add(obj)
        if inspect.isclass(obj):
            for attr, value in sorted(vars(obj).items()):
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                # a method another package patched onto the class (transformers adds
                # warning_once & co. to logging.Logger when imported) is not this module's:
                # the corpus must not depend on what was imported first
                owner = getattr(value, "__module__", None)
                if isinstance(owner, str) and owner.split(".")[0] not in \
                        sys.stdlib_module_names:
                    continue
                if callable(value) or isinstance(value, property):
                    add(value)
    return docs


@functools.lru_cache(maxsize=1)
def _text_documents() -> tuple[tuple[int, str, str], ...]:
    """All ``(label, split, text)`` documents of the text task, in a fixed order."""
    from pydoc_data.topics import topics

    raw: list[tuple[int, str]] = []
    label_of = {name: i for i, name in enumerate(TEXT_CLASSES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group, modules in _STDLIB_GROUPS.items():
            for modname in modules:
                try:
                    docs = _module_docstrings(modname)
                except Exception:  # noqa: BLE001 - an optional C extension may be missing
                    continue
                raw.extend((label_of[group], d) for d in docs)
    for key in sorted(topics):
        if key in _TOPIC_GROUP_OVERRIDES:
            group = _TOPIC_GROUP_OVERRIDES[key]
        else:
            group = "data_model" if key in _TOPIC_DATA_MODEL else "language_syntax"
        for para in re.split(r"\n\s*\n", topics[key]):
            if para.strip():
                raw.append((label_of[group], para.strip()))

    # Drop every text that occurs more than once (shared or inherited docs, topics quoted in
    # other topics), so a document can neither carry two labels nor sit in two splits.
    counts = collections.Counter(_normalise(text) for _, text in raw)
    unique = [(label, text) for label, text in raw if counts[_normalise(text)] == 1]
    # Near-duplicates (an overriding method restating its base's docstring, a paragraph
    # reworded in two topics) must not straddle splits either: documents sharing any run of
    # _NEAR_DUP_NGRAM tokens are joined into one cluster, and whole clusters are assigned.
    root = _near_duplicate_clusters([tokenize(text) for _, text in unique])
    docs_out: list[tuple[int, str, str]] = []
    for i, (label, text) in enumerate(unique):
        rep = _normalise(unique[root[i]][1])
        bucket = zlib.crc32(rep.encode("utf-8")) % 100
        split = "train" if bucket < 70 else ("calib" if bucket < 80 else "test")
        docs_out.append((label, split, text))
    return tuple(docs_out)


def _near_duplicate_clusters(token_lists: list[list[str]]) -> list[int]:
    """For each document, the index of the first document of its near-duplicate cluster."""
    parent = list(range(len(token_lists)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[str, int] = {}
    n = _NEAR_DUP_NGRAM
    for doc, tokens in enumerate(token_lists):
        for start in range(len(tokens) - n + 1):
            gram = tokens[start : start + n]
            if len(set(gram)) < 4:  # table borders and the like link unrelated documents
                continue
            other = first_seen.setdefault(" ".join(gram), doc)
            a, b = find(other), find(doc)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(token_lists))]


def _build_vocab() -> list[str]:
    counts: collections.Counter[str] = collections.Counter()
    for _, split, text in _text_documents():
        if split == "train":
            counts.update(tokenize(text))
    words = [w for w, c in counts.items() if c >= _VOCAB_MIN_COUNT]
    words.sort(key=lambda w: (-counts[w], w))
    return [_PAD, _UNK, *words[:_VOCAB_MAX]]


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` atomically: ``write`` fills a temporary file that then replaces it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=1)
def _cached_vocab() -> tuple[str, ...]:
    path = WEIGHTS_DIR / _VOCAB_FILE
    if path.exists():
        with path.open(encoding="utf-8") as fh:
            return tuple(json.load(fh)["tokens"])
    vocab = _build_vocab()
    payload = json.dumps({"tokens": vocab}, ensure_ascii=False, indent=0)
    try:
        _atomic_write_bytes(path, lambda p: p.write_text(payload + "\n", encoding="utf-8"))
    except OSError:  # read-only install: the vocabulary is cheap to rebuild
        pass
    return tuple(vocab)


def text_vocab() -> dict[str, int]:
    """Word -> id map of the text task (``<pad>`` is 0, ``<unk>`` is 1).

    Read from ``benchmarks/weights/text_vocab.json`` (kept beside the weights, so ids match
    them even if a different Python version words its docstrings differently); when that file
    is missing it is rebuilt deterministically from the training split and saved.
    """
    return {w: i for i, w in enumerate(_cached_vocab())}


@functools.lru_cache(maxsize=len(SPLITS))
def _text_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    vocab = text_vocab()
    unk = vocab[_UNK]
    stride = _TRAIN_STRIDE if split == "train" else SEQ_LEN
    streams: dict[int, list[int]] = collections.defaultdict(list)
    for label, doc_split, text in _text_documents():
        if doc_split == split:
            streams[label].extend(vocab.get(t, unk) for t in tokenize(text))
    windows: list[list[int]] = []
    labels: list[int] = []
    for label in sorted(streams):
        ids = streams[label]
        for start in range(0, max(len(ids) - SEQ_LEN, 0) + 1, stride):
            window = ids[start : start + SEQ_LEN]
            if len(window) < SEQ_LEN // 4:
                continue
            windows.append(window + [vocab[_PAD]] * (SEQ_LEN - len(window)))
            labels.append(label)
    return np.asarray(windows, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def reset_caches() -> None:
    """Forget the cached data sets and vocabulary (after the vocabulary file was changed)."""
    for fn in (_digits_arrays, _text_documents, _cached_vocab, _text_arrays):
        fn.cache_clear()


def text_data(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(token_ids, labels)`` of one split of the text-topic task.

    ``token_ids`` is int64 ``(N, SEQ_LEN)`` (ids from :func:`text_vocab`, 0 = padding) and
    ``labels`` int64 ``(N,)`` indexing :data:`TEXT_CLASSES`. Documents (stdlib docstrings and
    language-reference paragraphs) are assigned wholly to one split by a hash of their text,
    so the splits share no text; ``"train"`` windows overlap (stride 32), ``"calib"`` and
    ``"test"`` windows do not. Fresh tensors are returned on every call.

    Raises:
        ValueError: if ``split`` is not one of ``"train"``, ``"calib"``, ``"test"``.
    """
    check_split(split)
    ids, labels = _text_arrays(split)
    return torch.from_numpy(ids.copy()), torch.from_numpy(labels.copy())


# --------------------------------------------------------------------------------------------
# Text model
# --------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention written out like Hugging Face BERT (q/k/v/out ``nn.Linear``)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        """Build the four projections; ``d_model`` must be divisible by ``num_heads``."""
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (N, S, D) -> (N, H, S, Dh)
        return x.view(x.size(0), x.size(1), self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` ``(N, S, D)``; ``mask_bias`` ``(N, 1, 1, S)`` is added to scores."""
        q = self._heads(self.query(x))
        k = self._heads(self.key(x))
        v = self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / (self.head_dim**0.5)
        probs = torch.softmax(scores + mask_bias, dim=-1)
        if self.training:
            probs = F.dropout(probs, 0.1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        ctx = ctx.view(ctx.size(0), ctx.size(1), -1)
        return self.out(ctx)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))`` (GELU)."""

    def __init__(self, d_model: int, num_heads: int, ffn_mult: int = 4, dropout: float = 0.1):
        """Build two norms, attention and the ``d_model -> ffn_mult*d_model -> d_model`` FFN."""
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, num_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn_in = nn.Linear(d_model, ffn_mult * d_model)
        self.ffn_out = nn.Linear(ffn_mult * d_model, d_model)
        self.dropout = dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout) if self.training else x

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` ``(N, S, D)``."""
        x = x + self._drop(self.attn(self.norm1(x), mask_bias))
        return x + self._drop(self.ffn_out(F.gelu(self.ffn_in(self.norm2(x)))))


class TextClassifier(nn.Module):
    """Small BERT-style encoder classifying ``(N, SEQ_LEN)`` int64 token ids into topics.

    Token embedding plus learned positional embedding, LayerNorm, ``num_layers`` pre-LN blocks
    (explicit attention, GELU FFN), mean-pooling over non-padding tokens (id 0 is padding) and
    a linear head. The only input is the token-id tensor, so the model exports
    with ``torch.export.export(model, (ids,), strict=False)`` and a dynamic batch dimension.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = len(TEXT_CLASSES),
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 2,
        max_len: int = SEQ_LEN,
        dropout: float = 0.1,
    ) -> None:
        """Build embeddings, ``num_layers`` encoder blocks and the classifier head."""
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.register_buffer("position_ids", torch.arange(max_len)[None, :], persistent=False)
        self.embed_norm = nn.LayerNorm(d_model)
        self.blocks = nn.ModuleList(
            EncoderBlock(d_model, num_heads, dropout=dropout) for _ in range(num_layers)
        )
        self.classifier = nn.Linear(d_model, num_classes)
        self.dropout = dropout

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Map token ids ``(N, S)`` int64, ``S <= max_len``, to logits ``(N, num_classes)``."""
        seq_len = ids.size(1)
        x = self.token_embedding(ids) + self.position_embedding(self.position_ids[:, :seq_len])
        x = self.embed_norm(x)
        if self.training:
            x = F.dropout(x, self.dropout)
        keep = (ids != 0).to(x.dtype)  # (N, S): 1 for real tokens, 0 for padding
        mask_bias = ((1.0 - keep) * torch.finfo(x.dtype).min)[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask_bias)
        pooled = (x * keep[:, :, None]).sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.classifier(pooled)


# --------------------------------------------------------------------------------------------
# Training, evaluation, loading
# --------------------------------------------------------------------------------------------



class TrainResult(NamedTuple):
    """A freshly trained model (in eval mode) and the wall-clock seconds training took."""

    model: nn.Module
    seconds: float



def _fit(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    warmup_frac: float = 0.0,
    label_smoothing: float = 0.0,
) -> float:
    """Seeded AdamW training with a warm-up + cosine schedule; returns the seconds taken."""
    gen = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "bn" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
    )
    steps_per_epoch = (len(labels) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_frac * total))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + float(np.cos(np.pi * (step - warmup) / max(1, total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(labels), batch_size):
            idx = perm[i : i + batch_size]
            x = inputs[idx]
            if augment is not None:
                x = augment(x, gen)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - start


def _shift_digits(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Augment digit images with random shifts of up to one pixel (zero fill)."""
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + 8, dx : dx + 8]


def train_digits_cnn(epochs: int = 40, seed: int = 0) -> TrainResult:
    """Train a :class:`DigitsCNN` on the ``"train"`` digits split (seeded, deterministic)."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    x, y = digits_data("train")
    seconds = _fit(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=64,
        lr=2e-3,
        weight_decay=1e-4,
        seed=seed,
        augment=_shift_digits,
    )
    return TrainResult(model, seconds)


def train_digits_mlp(epochs: int = 60, seed: int = 0) -> TrainResult:
    """Train a :class:`DigitsMLP` on the ``"train"`` digits split (seeded, deterministic)."""
    torch.manual_seed(seed)
    model = DigitsMLP()
    x, y = digits_data("train")
    seconds = _fit(model, x, y, epochs=epochs, batch_size=64, lr=1e-3, weight_decay=1e-4, seed=seed)
    return TrainResult(model, seconds)


def _token_dropout(ids: torch.Tensor, gen: torch.Generator, p: float = 0.1) -> torch.Tensor:
    """Augment token windows by replacing a fraction ``p`` of real tokens with ``<unk>``."""
    drop = (torch.rand(ids.shape, generator=gen) < p) & (ids != 0)
    return ids.masked_fill(drop, 1)


def _new_text_model() -> TextClassifier:
    return TextClassifier(vocab_size=len(text_vocab()))


def train_text_transformer(epochs: int = 6, seed: int = 0) -> TrainResult:
    """Train a :class:`TextClassifier` on the ``"train"`` text split (seeded, deterministic).

    AdamW (lr 5e-3, weight decay 0.1, 10 % warm-up then cosine), batch 32, label smoothing
    0.1, and 40 % of the tokens of each training window replaced by ``<unk>``.
    """
    torch.manual_seed(seed)
    model = _new_text_model()
    x, y = text_data("train")
    seconds = _fit(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=32,
        lr=5e-3,
        weight_decay=0.1,
        seed=seed,
        augment=functools.partial(_token_dropout, p=0.4),
        warmup_frac=0.1,
        label_smoothing=0.1,
    )
    return TrainResult(model, seconds)


_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "digits_mlp": DigitsMLP,
    "text_transformer": _new_text_model,
}
_TRAINERS: dict[str, Callable[[], TrainResult]] = {
    "digits_cnn": train_digits_cnn,
    "digits_mlp": train_digits_mlp,
    "text_transformer": train_text_transformer,
}


def weights_path(name: str) -> Path:
    """Path of the state dict of model ``name``: ``WEIGHTS_DIR / f"{name}.pt"``, except the
    digits CNN's, which ships with fxcompress (``fxcompress/weights/digits_cnn.pt``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names are {', '.join(MODEL_NAMES)}")
    if name == "digits_cnn":
        return DIGITS_CNN_WEIGHTS
    return WEIGHTS_DIR / f"{name}.pt"


def save_weights(name: str, model: nn.Module) -> Path:
    """Atomically write ``model``'s state dict as the weights of ``name`` (at
    :func:`weights_path`)."""
    path = weights_path(name)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(path, lambda p: torch.save(state, p))
    return path


def load_pretrained(name: str) -> nn.Module:
    """Return pretrained model ``name`` (one of :data:`MODEL_NAMES`) in eval mode.

    Weights come from :func:`weights_path` (``benchmarks/weights/<name>.pt``; the digits
    CNN's from ``fxcompress/weights/``). If that file is missing the model is
    trained (seeded) and the file written atomically, so a fresh checkout still works.

    Raises:
        ValueError: for an unknown ``name``.
    """
    path = weights_path(name)
    if not path.exists():
        model = _TRAINERS[name]().model
        save_weights(name, model)
        return model.eval()
    model = _BUILDERS[name]()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def saved_bytes(model: nn.Module, example: tuple, dynamic: bool = True) -> int:
    """Bytes of `torch.export.save` of `model` exported on clones of `example` (dim 0 of every
    input dynamic unless `dynamic` is False)."""
    args = tuple(x.clone() for x in example)
    dyn = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic else None
    from fxcompress.api import serialized_size

    return serialized_size(torch.export.export(model, args, dynamic_shapes=dyn, strict=False))
