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

Chained, they compute what the whole model's ``forward(ids).logits`` does (checked in the tests
to float rounding), with the attention kernel ``from_pretrained`` loads by default (SDPA): the
same arithmetic as a whole-model compile of the model as users load it, down to the last bit.
"""

from __future__ import annotations

import copy

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


class DecoderFamily:
    """The blocks of the model in `checkpoint` (a `Checkpoint`), made one at a time."""

    def __init__(self, checkpoint) -> None:
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
        names = ["embed"] + [f"layer.{i}" for i in range(self.n_layers)] + ["head"]
        self.names: tuple[str, ...] = tuple(names)
        self._check_tensors()

    def parts(self, name: str) -> list[tuple[str, nn.Module, str]]:
        """(attribute, meta module of the skeleton, checkpoint prefix) of each part of block
        `name`."""
        inner = self.skeleton.model
        if name == "embed":
            return [("embed", inner.embed_tokens, "model.embed_tokens.")]
        if name == "head":
            head = "model.embed_tokens." if self.tied else "lm_head."
            return [("norm", inner.norm, "model.norm."),
                    ("lm_head", self.skeleton.lm_head, head)]
        i = int(name.split(".")[1])
        return [("layer", inner.layers[i], f"model.layers.{i}.")]

    def _check_tensors(self) -> None:
        for name in self.names:
            for _, module, prefix in self.parts(name):
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
        """Bytes of block `name`'s weights in the checkpoint."""
        return sum(self.checkpoint.nbytes(prefix) for _, _, prefix in self.parts(name))

    def _materialise(self, module: nn.Module, prefix: str) -> nn.Module:
        module = copy.deepcopy(module)  # of a meta module: no memory
        want = set(module.state_dict())
        tensors = {k: v.float() for k, v in self.checkpoint.load(prefix).items() if k in want}
        module.load_state_dict(tensors, strict=True, assign=True)
        return module.eval()

    def block(self, name: str) -> nn.Module:
        """Block `name` (one of `names`) with its weights read from the checkpoint, in fp32."""
        parts = {attr: self._materialise(m, prefix) for attr, m, prefix in self.parts(name)}
        if name == "embed":
            return EmbedBlock(parts["embed"])
        if name == "head":
            return HeadBlock(parts["norm"], parts["lm_head"]).eval()
        rotary = type(self.skeleton.model.rotary_emb)(config=self.config)  # buffers on the CPU
        return DecoderBlock(parts["layer"], rotary).eval()
