"""The model zoo the tests and the benchmarks share: tiny models of every architecture family
fxcompress must handle.

`ZOO` maps a name to a builder returning `(model, example_inputs)`: an `nn.Module` in eval mode
with seeded random weights and a tuple of positional inputs (batch 2). Transformer models are
built from `transformers` configs with few layers and small hidden sizes, so a test over the
whole zoo stays fast. `calibration(name, n)` gives `n` further input tuples of the same kind.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

BATCH = 2


class ResidualCNN(nn.Module):
    """conv-bn-relu stem, two residual blocks (one with a projection shortcut), pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24),
                                nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1, bias=False),
                                nn.BatchNorm2d(16))
        self.b2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
                                nn.BatchNorm2d(32), nn.ReLU(),
                                nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.proj = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(self.proj(x) + self.b2(x))
        return self.head(x.mean((2, 3)))


class DepthwiseSeparableCNN(nn.Module):
    """MobileNet-style: depthwise 3x3 + pointwise 1x1 blocks, with a flatten -> linear head."""

    def __init__(self):
        super().__init__()

        def dw_sep(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.ReLU6(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU6())

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.blocks = nn.Sequential(dw_sep(16, 32, 1), dw_sep(32, 48, 2))
        self.grouped = nn.Conv2d(48, 48, 3, padding=1, groups=4)
        self.head = nn.Linear(48 * 4 * 4, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.relu(self.grouped(x))
        return self.head(torch.flatten(x, 1))


class ConcatCNN(nn.Module):
    """Inception-style: parallel branches concatenated on channels, a split, group norm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Sequential(nn.Conv2d(16, 12, 1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1))
        self.gn = nn.GroupNorm(4, 24)
        self.mix = nn.Conv2d(24, 32, 1)
        self.left = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.cat([self.a(x), self.b(x)], dim=1)  # 8 + 16 channels
        y = torch.relu(self.gn(y))
        z = self.mix(y)
        u, v = torch.split(z, [16, 16], dim=1)
        z = torch.cat([torch.relu(self.left(u)), v], dim=1)
        return self.head(nn.functional.adaptive_avg_pool2d(z, 1).flatten(1))


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return build().eval()


def _image(channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, channels, size, size, generator=g)


def _tokens(vocab: int, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (BATCH, length), generator=g)


def residual_cnn(seed: int = 0):
    """CNN with residual adds and batch norms."""
    return _seeded(ResidualCNN), (_image(seed=seed),)


def depthwise_cnn(seed: int = 0):
    """Depthwise-separable CNN with a grouped conv and flatten -> linear."""
    return _seeded(DepthwiseSeparableCNN), (_image(seed=seed),)


def concat_cnn(seed: int = 0):
    """CNN with concat, split and group norm."""
    return _seeded(ConcatCNN), (_image(seed=seed),)


class _LogitsOnly(nn.Module):
    """A `transformers` model returning only its logits tensor (a plain output for export)."""

    def __init__(self, model: nn.Module, key: str = "logits"):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x):
        return self.model(x, return_dict=True)[self.key]


def _hf(build, torch_init: bool = False):
    import transformers  # noqa: F401  (imported lazily: only the transformer builders need it)

    torch.manual_seed(0)
    model = build()
    if torch_init:
        # transformers initializes CNN weights with std 0.02, which makes the activations of
        # a deep random CNN vanish (1e-27): PyTorch's default init keeps them O(1)
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.reset_parameters()
    model.eval()
    return _LogitsOnly(model).eval()


def bert(seed: int = 0):
    """BERT sequence classifier: 2 layers, hidden 32, 4 heads."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                     attn_implementation="eager")
    return _hf(lambda: BertForSequenceClassification(cfg)), (_tokens(100, seed=seed),)


def distilbert(seed: int = 0):
    """DistilBERT sequence classifier: 2 layers, dim 32, 4 heads."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                           max_position_embeddings=32, num_labels=3,
                           attn_implementation="eager")
    return _hf(lambda: DistilBertForSequenceClassification(cfg)), (_tokens(100, seed=seed),)


def vit(seed: int = 0):
    """ViT image classifier: 16x16 images, 4x4 patches, 2 layers, hidden 32, 4 heads."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    num_labels=5, attn_implementation="eager")
    return _hf(lambda: ViTForImageClassification(cfg)), (_image(seed=seed),)


def hf_resnet(seed: int = 0):
    """transformers ResNet: bottleneck blocks, 2 stages."""
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                       layer_type="bottleneck", num_labels=5)
    return _hf(lambda: ResNetForImageClassification(cfg), True), (_image(size=32, seed=seed),)


def mobilenet_v2(seed: int = 0):
    """transformers MobileNetV2: inverted residuals with depthwise convs."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(num_channels=3, image_size=16, depth_multiplier=0.25,
                            num_labels=5, tf_padding=False)
    return _hf(lambda: MobileNetV2ForImageClassification(cfg), True), (_image(size=16, seed=seed),)


def convnext(seed: int = 0):
    """transformers ConvNeXt: depthwise 7x7, channels-last layer norm, linear FFN, layer
    scale."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5,
                         patch_size=2, num_stages=2)
    return _hf(lambda: ConvNextForImageClassification(cfg)), (_image(size=16, seed=seed),)


def swin(seed: int = 0):
    """transformers Swin: shifted windows (window partition reshapes), 2 stages."""
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1],
                     num_heads=[2, 4], window_size=4, mlp_ratio=2.0, num_labels=5)
    return _hf(lambda: SwinForImageClassification(cfg)), (_image(size=16, seed=seed),)


ZOO: dict[str, Callable[..., tuple[nn.Module, tuple]]] = {
    "residual_cnn": residual_cnn,
    "depthwise_cnn": depthwise_cnn,
    "concat_cnn": concat_cnn,
    "bert": bert,
    "distilbert": distilbert,
    "vit": vit,
    "resnet": hf_resnet,
    "mobilenet_v2": mobilenet_v2,
    "convnext": convnext,
    "swin": swin,
}


def calibration(name: str, n: int = 2) -> list[tuple]:
    """`n` input tuples for zoo model `name`, different from its example inputs."""
    return [ZOO[name](seed=i + 1)[1] for i in range(n)]
