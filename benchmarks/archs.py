"""The architecture matrix's models: tiny `transformers` architectures of every family people
ship, built from their configs with seeded random weights (coverage, not accuracy).

`ARCHS` maps a name to `(family, builder)`; `builder(seed)` returns `(model, inputs)` like
`benchmarks.zoo`: an eval-mode `nn.Module` returning one tensor (logits, or the last hidden
state of a bare encoder) and a tuple of positional inputs of batch 2, different for each seed.
Decoders are built with `use_cache=False`. Sizes are tiny (hidden 32–64, 1–2 layers) so the
whole matrix (`benchmarks/matrix.py`) runs in minutes per profile.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks.zoo import (
    BATCH,
    _hf,
    _image,
    _tokens,
    bert,
    convnext,
    distilbert,
    hf_resnet,
    mobilenet_v2,
    swin,
    vit,
)

VOCAB = 256
#: a small transformer body shared by the text configs (names differ per family)
HID, LAYERS, HEADS, FFN, POS = 64, 2, 4, 128, 64


def _audio(length: int = 1600, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, length, generator=g)


def _text(build: Callable[[], nn.Module], seed: int, key: str = "logits"):
    model = _hf(build)
    model.key = key
    return model, (_tokens(VOCAB, seed=seed),)


def albert(seed: int = 0):
    """ALBERT: one layer's weights shared by every layer, factorized embeddings."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    cfg = AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=HID,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       intermediate_size=FFN, max_position_embeddings=POS, num_labels=3,
                       attn_implementation="eager")
    return _text(lambda: AlbertForSequenceClassification(cfg), seed)


def roberta(seed: int = 0):
    """RoBERTa sequence classifier (dense + out_proj head)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=FFN,
                        max_position_embeddings=POS, num_labels=3, attn_implementation="eager")
    return _text(lambda: RobertaForSequenceClassification(cfg), seed)


def electra(seed: int = 0):
    """ELECTRA discriminator: embedding size different from the hidden size (a projection)."""
    from transformers import ElectraConfig, ElectraForSequenceClassification

    cfg = ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=HID,
                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=POS, num_labels=3,
                        attn_implementation="eager")
    return _text(lambda: ElectraForSequenceClassification(cfg), seed)


def deberta_v2(seed: int = 0):
    """DeBERTa-v2: disentangled (relative-position) attention."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    cfg = DebertaV2Config(vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, intermediate_size=FFN,
                          max_position_embeddings=POS, num_labels=3, pooler_hidden_size=HID)
    return _text(lambda: DebertaV2ForSequenceClassification(cfg), seed)


def mpnet(seed: int = 0):
    """MPNet: relative position bias in every attention."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    cfg = MPNetConfig(vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, intermediate_size=FFN,
                      max_position_embeddings=POS, num_labels=3)
    return _text(lambda: MPNetForSequenceClassification(cfg), seed)


def mobilebert(seed: int = 0):
    """MobileBERT: bottleneck blocks, stacked FFNs, NoNorm."""
    from transformers import MobileBertConfig, MobileBertForSequenceClassification

    cfg = MobileBertConfig(vocab_size=VOCAB, hidden_size=HID, embedding_size=16,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=FFN, intra_bottleneck_size=16,
                           max_position_embeddings=POS, num_labels=3, num_feedforward_networks=2)
    return _text(lambda: MobileBertForSequenceClassification(cfg), seed)


def squeezebert(seed: int = 0):
    """SqueezeBERT: the projections are grouped 1-d convolutions."""
    from transformers import SqueezeBertConfig, SqueezeBertForSequenceClassification

    cfg = SqueezeBertConfig(vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, intermediate_size=FFN,
                            max_position_embeddings=POS, num_labels=3, embedding_size=HID,
                            q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
                            intermediate_groups=2, output_groups=2)
    return _text(lambda: SqueezeBertForSequenceClassification(cfg), seed)


def gpt2(seed: int = 0):
    """GPT-2: `Conv1D` projections (addmm), LM head tied to the token embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=POS, n_embd=HID, n_layer=LAYERS,
                     n_head=HEADS, use_cache=False, attn_implementation="eager",
                     bos_token_id=0, eos_token_id=0)
    return _text(lambda: GPT2LMHeadModel(cfg), seed)


def gpt_neo(seed: int = 0):
    """GPT-Neo: alternating global / local attention."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(vocab_size=VOCAB, max_position_embeddings=POS, hidden_size=HID,
                       num_layers=LAYERS, num_heads=HEADS, attention_types=[[["global", "local"],
                                                                             1]],
                       window_size=8, intermediate_size=FFN, use_cache=False)
    return _text(lambda: GPTNeoForCausalLM(cfg), seed)


def opt(seed: int = 0):
    """OPT decoder (learned positions with an offset)."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, ffn_dim=FFN, max_position_embeddings=POS,
                    word_embed_proj_dim=HID, use_cache=False)
    return _text(lambda: OPTForCausalLM(cfg), seed)


def bloom(seed: int = 0):
    """BLOOM: ALiBi positions, fused query-key-value projection."""
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=HID, n_layer=LAYERS, n_head=HEADS,
                      use_cache=False)
    return _text(lambda: BloomForCausalLM(cfg), seed)


def _llama_like(config_cls, model_cls, seed: int, **extra):
    cfg = config_cls(vocab_size=VOCAB, hidden_size=HID, intermediate_size=FFN,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     num_key_value_heads=2, max_position_embeddings=POS, use_cache=False,
                     **extra)
    return _text(lambda: model_cls(cfg), seed)


def llama(seed: int = 0):
    """Llama: RMSNorm, rotary positions, SwiGLU, grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _llama_like(LlamaConfig, LlamaForCausalLM, seed)


def mistral(seed: int = 0):
    """Mistral: Llama-like with sliding-window attention."""
    from transformers import MistralConfig, MistralForCausalLM

    return _llama_like(MistralConfig, MistralForCausalLM, seed, sliding_window=8)


def qwen2(seed: int = 0):
    """Qwen2: Llama-like with biases on the query-key-value projections."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _llama_like(Qwen2Config, Qwen2ForCausalLM, seed)


def gemma(seed: int = 0):
    """Gemma: GeGLU MLP, embedding scaled by sqrt(hidden), tied LM head."""
    from transformers import GemmaConfig, GemmaForCausalLM

    return _llama_like(GemmaConfig, GemmaForCausalLM, seed, head_dim=HID // HEADS)


def phi(seed: int = 0):
    """Phi: parallel attention and MLP, partial rotary."""
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=HID, intermediate_size=FFN,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    max_position_embeddings=POS, use_cache=False)
    return _text(lambda: PhiForCausalLM(cfg), seed)


def falcon(seed: int = 0):
    """Falcon: multi-query attention, parallel attention / MLP."""
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, use_cache=False)
    return _text(lambda: FalconForCausalLM(cfg), seed)


def codegen(seed: int = 0):
    """CodeGen: fused qkv projection split in a model-parallel layout, rotary."""
    from transformers import CodeGenConfig, CodeGenForCausalLM

    cfg = CodeGenConfig(vocab_size=VOCAB, n_positions=POS, n_ctx=POS, n_embd=HID,
                        n_layer=LAYERS, n_head=HEADS, rotary_dim=4, use_cache=False)
    return _text(lambda: CodeGenForCausalLM(cfg), seed)


def t5_encoder(seed: int = 0):
    """T5's encoder: RMS-style layer norm, relative position buckets, no biases."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=VOCAB, d_model=HID, d_kv=16, d_ff=FFN, num_layers=LAYERS,
                   num_heads=HEADS, use_cache=False)
    return _text(lambda: T5EncoderModel(cfg), seed, key="last_hidden_state")


def bart(seed: int = 0):
    """BART encoder–decoder (decoder inputs shifted from the inputs): its last hidden state."""
    from transformers import BartConfig, BartModel

    cfg = BartConfig(vocab_size=VOCAB, d_model=HID, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                     encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_position_embeddings=POS,
                     use_cache=False)
    return _text(lambda: BartModel(cfg), seed, key="last_hidden_state")


def _vision(build: Callable[[], nn.Module], seed: int, size: int = 32, torch_init: bool = False):
    return _hf(build, torch_init), (_image(size=size, seed=seed),)


def deit(seed: int = 0):
    """DeiT with its distillation token (classifier + distillation head averaged)."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    cfg = DeiTConfig(image_size=16, patch_size=4, hidden_size=HID, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=FFN, num_labels=5)
    return _vision(lambda: DeiTForImageClassificationWithTeacher(cfg), seed, 16)


def regnet(seed: int = 0):
    """RegNet: grouped 3x3 convs, squeeze-and-excitation."""
    from transformers import RegNetConfig, RegNetForImageClassification

    cfg = RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8,
                       layer_type="y", num_labels=5)
    return _vision(lambda: RegNetForImageClassification(cfg), seed, torch_init=True)


def efficientnet(seed: int = 0):
    """EfficientNet: MBConv with depthwise convs, squeeze-and-excitation, swish."""
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    cfg = EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                             hidden_dim=320, num_labels=5)
    return _vision(lambda: EfficientNetForImageClassification(cfg), seed, torch_init=True)


def mobilevit(seed: int = 0):
    """MobileViT: convolutions with unfold / fold into transformer patches."""
    from transformers import MobileViTConfig, MobileViTForImageClassification

    cfg = MobileViTConfig(image_size=32, patch_size=2, hidden_sizes=[16, 24, 32],
                          neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48], num_attention_heads=2,
                          num_labels=5)
    return _vision(lambda: MobileViTForImageClassification(cfg), seed, torch_init=True)


def dinov2(seed: int = 0):
    """DINOv2 ViT: layer scale, interpolated position embeddings."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    cfg = Dinov2Config(image_size=16, patch_size=4, hidden_size=HID, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, mlp_ratio=2, num_labels=5)
    return _vision(lambda: Dinov2ForImageClassification(cfg), seed, 16)


def segformer(seed: int = 0):
    """SegFormer (MiT) classifier: overlapping patch embeddings, efficient attention with a
    spatial-reduction conv, Mix-FFN with a depthwise conv."""
    from transformers import SegformerConfig, SegformerForImageClassification

    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                          hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                          strides=[4, 2], mlp_ratios=[2, 2], num_labels=5)
    return _vision(lambda: SegformerForImageClassification(cfg), seed)


def wav2vec2(seed: int = 0):
    """wav2vec 2.0: 1-d conv feature encoder, positional conv (weight norm), transformer."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    cfg = Wav2Vec2Config(hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         intermediate_size=FFN, conv_dim=(16, 16, 16), conv_stride=(5, 4, 4),
                         conv_kernel=(10, 4, 4), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=4, classifier_proj_size=16,
                         num_labels=3, do_stable_layer_norm=True, feat_extract_norm="layer")
    return _hf(lambda: Wav2Vec2ForSequenceClassification(cfg)), (_audio(seed=seed),)


def whisper_encoder(seed: int = 0):
    """Whisper's encoder (audio classification head): 1-d conv stem on log-mel features."""
    from transformers import WhisperConfig, WhisperForAudioClassification

    cfg = WhisperConfig(num_mel_bins=16, d_model=HID, encoder_layers=LAYERS,
                        encoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                        max_source_positions=16, classifier_proj_size=16, num_labels=3)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(BATCH, 16, 32, generator=g)
    return _hf(lambda: WhisperForAudioClassification(cfg)), (feats,)


#: name -> (family, builder)
ARCHS: dict[str, tuple[str, Callable[..., tuple[nn.Module, tuple]]]] = {
    "bert": ("text encoder", bert),
    "albert": ("text encoder", albert),
    "distilbert": ("text encoder", distilbert),
    "roberta": ("text encoder", roberta),
    "electra": ("text encoder", electra),
    "deberta_v2": ("text encoder", deberta_v2),
    "mpnet": ("text encoder", mpnet),
    "mobilebert": ("text encoder", mobilebert),
    "squeezebert": ("text encoder", squeezebert),
    "gpt2": ("decoder", gpt2),
    "gpt_neo": ("decoder", gpt_neo),
    "opt": ("decoder", opt),
    "bloom": ("decoder", bloom),
    "llama": ("decoder", llama),
    "mistral": ("decoder", mistral),
    "qwen2": ("decoder", qwen2),
    "gemma": ("decoder", gemma),
    "phi": ("decoder", phi),
    "falcon": ("decoder", falcon),
    "codegen": ("decoder", codegen),
    "t5_encoder": ("encoder-decoder", t5_encoder),
    "bart": ("encoder-decoder", bart),
    "vit": ("vision transformer", vit),
    "deit": ("vision transformer", deit),
    "swin": ("vision transformer", swin),
    "dinov2": ("vision transformer", dinov2),
    "segformer": ("vision transformer", segformer),
    "mobilevit": ("vision hybrid", mobilevit),
    "resnet": ("vision CNN", hf_resnet),
    "mobilenet_v2": ("vision CNN", mobilenet_v2),
    "convnext": ("vision CNN", convnext),
    "regnet": ("vision CNN", regnet),
    "efficientnet": ("vision CNN", efficientnet),
    "wav2vec2": ("audio encoder", wav2vec2),
    "whisper_encoder": ("audio encoder", whisper_encoder),
}
