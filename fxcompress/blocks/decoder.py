"""The blocks of a decoder-only language model of the Llama layout (Llama, Qwen2, and
Mistral without a sliding window shorter than the sequence): ``model.embed_tokens``, the
decoder layers ``model.layers.<i>``, the final ``model.norm`` and ``lm_head`` (or the embedding
matrix, where the config ties them).

The model is built from its config on the ``meta`` device (no memory), and each block gets its
weights alone from the checkpoint when it is made (`DecoderFamily.block`), so no more than one
block's weights are ever in memory. Each block is a module with one tensor in and one out, as
`fxcompress.compile` and `torch.export` take it:

- ``embed``: token ids (batch, seq) -> hidden states (batch, seq, hidden);
- ``layer.<i>``: hidden states -> hidden states; the rotary position embedding and the causal
  mask are computed inside (positions 0..seq-1, no padding, no cache), as the whole model
  computes them for a batch of unpadded sequences;
- ``head``: hidden states -> logits (batch, seq, vocab).

A large vocabulary's embedding and head are cut by rows into chunks, a block each
(``embed.<c>``: the rows' embeddings, zeros for other ids, summed over the chunks;
``head.<c>``: the rows' logits, concatenated; see `Stage`), each no larger than half a decoder
layer, so that the largest compile stays a layer's.

Chained, they compute what the whole model's ``forward(ids).logits`` does (checked in the tests
to float rounding), with the attention kernel ``from_pretrained`` loads by default (SDPA): the
same arithmetic as a whole-model compile of the model as users load it, down to the last bit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from fxcompress.errors import FxCompressError

#: model types whose checkpoints have the layout above
SUPPORTED = ("llama", "qwen2", "mistral")


class EmbedBlock(nn.Module):
    """Token ids -> hidden states."""

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of `ids`."""
        return self.embed(ids)


class EmbedChunk(nn.Module):
    """Token ids -> the embeddings of the ids in rows ``start .. start + rows - 1`` of the table
    (`embed` holds those rows), zeros for every other id: the outputs of the chunks of a table
    sum to its embedding, exactly (each token takes its row from one chunk, zeros from the
    rest)."""

    def __init__(self, embed: nn.Embedding, start: int) -> None:
        super().__init__()
        self.embed = embed
        self.start = int(start)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of the ids this chunk holds, zeros for the others."""
        rows = self.embed.num_embeddings
        local = ids - self.start
        inside = (local >= 0) & (local < rows)
        e = self.embed(local.clamp(0, rows - 1))
        return e * inside.unsqueeze(-1).to(e.dtype)


class DecoderBlock(nn.Module):
    """One decoder layer with its positions and causal mask made inside."""

    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The layer's output for hidden states `h` of unpadded sequences."""
        t = h.shape[1]
        pos = torch.arange(t, device=h.device).unsqueeze(0)
        cos, sin = self.rotary(h, pos)
        i = torch.arange(t, device=h.device)
        mask = torch.zeros(t, t, dtype=h.dtype, device=h.device).masked_fill(
            i.view(1, t) > i.view(t, 1), torch.finfo(h.dtype).min)
        out = self.layer(h, attention_mask=mask.view(1, 1, t, t), position_ids=pos,
                         position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out


class HeadBlock(nn.Module):
    """Hidden states -> logits."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The logits of the last hidden states `h`."""
        return self.lm_head(self.norm(h))


@dataclass(frozen=True)
class Stage:
    """Blocks that read the same input: one block, or the row chunks of the embedding (their
    outputs summed) or of the LM head (their logits concatenated)."""

    name: str  # "embed", "layer.<i>", "head"
    blocks: tuple[str, ...]  # the block names, in order
    combine: str | None = None  # None (one block), "sum" or "cat" (along the last dim)

    def join(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The stage's output from its blocks' `outputs` (one per block, in order)."""
        if self.combine is None:
            return outputs[0]
        if self.combine == "cat":
            return torch.cat(outputs, dim=-1)
        total = outputs[0]
        for o in outputs[1:]:
            total = total + o
        return total


def row_ranges(rows: int, chunks: int) -> list[tuple[int, int]]:
    """`rows` cut into `chunks` consecutive ranges (start, end) of nearly equal size."""
    bounds = [rows * i // chunks for i in range(chunks + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class DecoderFamily:
    """The blocks of the model in `checkpoint` (a `Checkpoint`), made one at a time.

    `vocab_chunks`: the embedding and the LM head are each cut into that many row ranges, one
    block each (``embed.<c>``, ``head.<c>``), so that no block's compile holds the whole
    vocabulary-sized matrix; None (default): as many as make each chunk no larger than half a
    decoder layer (1 where the table is that small: the blocks are then ``embed`` and
    ``head``)."""

    def __init__(self, checkpoint, vocab_chunks: int | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self.checkpoint = checkpoint
        config = checkpoint.config()
        kind = getattr(config, "model_type", None)
        if kind not in SUPPORTED:
            raise FxCompressError(f"block-by-block compilation reads decoder models of the Llama "
                                  f"layout ({', '.join(SUPPORTED)}); this checkpoint's "
                                  f"model_type is {kind!r}: compile it whole with "
                                  "fxcompress.compile, or convert it to one of those")
        window = getattr(config, "sliding_window", None)
        if kind == "mistral" and window is not None:
            raise FxCompressError(f"this Mistral config has a sliding window ({window}); the "
                                  "blocks compute full causal attention: set sliding_window to "
                                  "null in config.json if the sequences are no longer than it")
        config._attn_implementation = "sdpa"  # as from_pretrained loads it by default
        config.use_cache = False
        self.config = config
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config)
        self.n_layers = int(config.num_hidden_layers)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.vocab = int(config.vocab_size)
        self._check_tensors()
        if vocab_chunks is None:
            table = checkpoint.nbytes("model.embed_tokens.")
            layer = max((checkpoint.nbytes(f"model.layers.{i}.") for i in range(self.n_layers)),
                        default=0)
            # at most half a layer each: a head chunk's compile also holds its logits (the
            # calibration references, each candidate's outputs)
            vocab_chunks = max(1, math.ceil(2 * table / layer)) if layer else 1
        if not isinstance(vocab_chunks, int) or isinstance(vocab_chunks, bool) \
                or not 1 <= vocab_chunks <= self.vocab:
            raise FxCompressError(f"vocab_chunks must be an integer from 1 to the vocabulary "
                                  f"size {self.vocab}, not {vocab_chunks!r}; e.g. 2, or None "
                                  "for chunks no larger than half a decoder layer")
        self.chunks = vocab_chunks
        self.ranges = row_ranges(self.vocab, self.chunks)

        def chunked(stem: str, combine: str) -> Stage:
            if self.chunks == 1:
                return Stage(stem, (stem,))
            return Stage(stem, tuple(f"{stem}.{c}" for c in range(self.chunks)), combine)

        self.stages: tuple[Stage, ...] = (
            chunked("embed", "sum"),
            *(Stage(f"layer.{i}", (f"layer.{i}",)) for i in range(self.n_layers)),
            chunked("head", "cat"))
        self.names: tuple[str, ...] = tuple(b for st in self.stages for b in st.blocks)

    def _rows(self, name: str) -> tuple[int, int] | None:
        """The vocabulary rows of an embedding / head chunk `name` (None: all of them)."""
        stem, _, c = name.partition(".")
        return self.ranges[int(c)] if stem in ("embed", "head") and c else None

    def parts(self, name: str) -> list[tuple[str, nn.Module, str, tuple[int, int] | None]]:
        """(attribute, meta module of the skeleton, checkpoint prefix, vocabulary rows or
        None) of each part of block `name`."""
        inner = self.skeleton.model
        rows = self._rows(name)
        if name.startswith("embed"):
            return [("embed", inner.embed_tokens, "model.embed_tokens.", rows)]
        if name.startswith("head"):
            head = "model.embed_tokens." if self.tied else "lm_head."
            return [("norm", inner.norm, "model.norm.", None),
                    ("lm_head", self.skeleton.lm_head, head, rows)]
        i = int(name.split(".")[1])
        return [("layer", inner.layers[i], f"model.layers.{i}.", None)]

    def _check_tensors(self) -> None:
        for name in ("embed", *(f"layer.{i}" for i in range(self.n_layers)), "head"):
            for _, module, prefix, _ in self.parts(name):
                want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
                have = {k[len(prefix):]: info[1] for k, info in self.checkpoint.tensors.items()
                        if k.startswith(prefix)}
                missing = sorted(set(want) - set(have))
                wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
                if missing or wrong:
                    what = (f"missing {prefix}{missing[0]}" if missing else
                            f"{prefix}{wrong[0]} has shape {have[wrong[0]]}, the config says "
                            f"{want[wrong[0]]}")
                    raise FxCompressError(f"the checkpoint does not match its config.json "
                                          f"({what}); pass a checkpoint folder written whole by "
                                          "save_pretrained")

    def weight_bytes(self, name: str) -> int:
        """Bytes of block `name`'s weights in the checkpoint (a chunk: its rows')."""
        total = 0
        for _, _, prefix, rows in self.parts(name):
            full = self.checkpoint.nbytes(prefix)
            total += full if rows is None else full // self.vocab * (rows[1] - rows[0])
        return total

    def _materialise(self, module: nn.Module, prefix: str,
                     rows: tuple[int, int] | None) -> nn.Module:
        if rows is not None:  # a chunk of the vocabulary: the module for those rows alone
            n, hidden = rows[1] - rows[0], int(self.config.hidden_size)
            with torch.device("meta"):
                module = nn.Embedding(n, hidden) if isinstance(module, nn.Embedding) else \
                    nn.Linear(hidden, n, bias=False)
        module = copy.deepcopy(module)  # of a meta module: no memory
        want = set(module.state_dict())
        tensors = {k: v.float() for k, v in self.checkpoint.load(prefix, rows).items()
                   if k in want}
        module.load_state_dict(tensors, strict=True, assign=True)
        return module.eval()

    def block(self, name: str) -> nn.Module:
        """Block `name` (one of `names`) with its weights read from the checkpoint, in fp32."""
        parts = {attr: self._materialise(m, prefix, rows)
                 for attr, m, prefix, rows in self.parts(name)}
        if name.startswith("embed"):
            rows = self._rows(name)
            return EmbedBlock(parts["embed"]) if rows is None else \
                EmbedChunk(parts["embed"], rows[0]).eval()
        if name.startswith("head"):
            return HeadBlock(parts["norm"], parts["lm_head"]).eval()
        rotary = type(self.skeleton.model.rotary_emb)(config=self.config)  # buffers on the CPU
        return DecoderBlock(parts["layer"], rotary).eval()
