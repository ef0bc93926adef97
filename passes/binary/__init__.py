"""binary: sign(W)·α weights, 8 per byte, unpacked in the graph; binary activations where the
target runs XNOR-popcount.

Each output channel n of a `linear` or `conv2d` weight is stored as its signs (one bit per
weight: 1 for W >= 0, 0 otherwise) and one fp32 scale α_n = mean |W_n|, the scale that
minimizes ||W_n - α_n sign(W_n)|| (XNOR-Net). The bits are packed 8 per byte into a `uint8`
buffer (bit j of byte b is weight 8b + j of the channel's flattened row), so the serialized
program holds 1/32 of the weight bytes; the graph unpacks them with shifts and masks.

Where the profile runs binary activations (`binary_activations`), the layer's input is
binarized too, to two levels μ ± β with μ and β = mean |x - μ| fixed per tensor from
calibration: x_b = μ + β·sign(x - μ). A per-tensor affine decode keeps the product
XNOR-popcount compatible (β and μ fold into the output scale and bias).

The first and last layers are kept at higher precision by default (binarizing the raw input or
the logits costs most of the accuracy, as in BNN, XNOR-Net and FINN); the planner offers binary
only on targets that run it, or when the user asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from fxcompress.candidates import Candidate
from fxcompress.graph import LAYER_META, add_buffer, drop_unused_attrs, get_attr, op_type
from fxcompress.passes_infra import PassResult
from fxcompress.rewrite import call
from fxcompress.technique import (
    TRAIN_BASE_WEIGHT,
    ProposeContext,
    Technique,
    checked_field,
    register,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class BinarySettings:
    """binary's settings; `compile(overrides={"*": {"binary": {...}}})` changes them."""

    #: binarize neither the first nor the last layer (see the module docstring)
    keep_first_last: bool = True

    def __post_init__(self):
        checked_field(self.keep_first_last, "keep_first_last", bool, lambda v: True,
                      "True or False")


@dataclass(frozen=True)
class BinaryPart:
    """What the binary pass needs beyond the weight it reads from the graph: the layer's
    binary-activation levels (mu, beta), or None to keep its input in full precision."""

    levels: tuple[float, float] | None = None


def binarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs as bool, True for w >= 0; α per output channel = mean |w| of the channel)."""
    w = w.detach().float()
    alpha = w.reshape(w.shape[0], -1).abs().mean(1)
    return w >= 0, alpha


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (N, ...) into uint8 (N, ceil(L / 8)), L the per-row element count;
    bit j of byte b holds element 8b + j."""
    rows = bits.reshape(bits.shape[0], -1).to(torch.uint8)
    n, length = rows.shape
    pad = (-length) % 8
    if pad:
        rows = torch.cat([rows, torch.zeros(n, pad, dtype=torch.uint8)], 1)
    rows = rows.view(n, -1, 8)
    shifts = torch.arange(8, dtype=torch.uint8)
    return (rows << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`: the bool tensor of `shape`."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    length = 1
    for d in shape[1:]:
        length *= d
    return bits.reshape(shape[0], -1)[:, :length].reshape(shape).bool()


def binary_weight(w: torch.Tensor) -> torch.Tensor:
    """α·sign(w) per output channel: the effective weight a binary layer computes with."""
    signs, alpha = binarize(w)
    return (signs.float() * 2 - 1) * alpha.view([-1] + [1] * (w.dim() - 1))


def activation_levels(stats) -> tuple[float, float]:
    """(μ, β) of the binary activation x_b = μ + β·sign(x - μ), from calibration samples."""
    if not stats.samples:
        return 0.0, max(stats.absmax, 1e-8)
    x = torch.cat(stats.samples).reshape(-1).double()
    mu = float(x.mean())
    return mu, max(float((x - mu).abs().mean()), 1e-8)


@dataclass(frozen=True)
class BinaryActivation:
    """The input binarization x -> μ + β·sign(x - μ) (sign(0) = +1), as plain data (a
    candidate's steps pickle)."""

    mu: float
    beta: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Binarize `x`."""
        return (x >= self.mu).to(x.dtype) * (2 * self.beta) + (self.mu - self.beta)


def binary_activation(mu: float, beta: float) -> BinaryActivation:
    """The input binarization x -> μ + β·sign(x - μ) (sign(0) = +1)."""
    return BinaryActivation(float(mu), float(beta))


def packed_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of the packed signs and α scales of a weight of `shape`."""
    length = 1
    for d in shape[1:]:
        length *= d
    return shape[0] * ((length + 7) // 8) + 4 * shape[0]


def propose(layer, base: Candidate, ctx: ProposeContext):
    """The layer with binary weights (and activations where the target runs them)."""
    p = ctx.profile
    if not p.supports(layer.op, "binary"):
        return [], f"binary: {p.name} does not run binary {layer.op}"
    if ctx.knobs("binary").keep_first_last and ctx.layer_index in (0, ctx.layer_count - 1):
        return [], "binary: first and last layers are kept at higher precision"
    if len(base.steps) != 1:
        return [], "binary: applies to a layer as it is, not to a rewritten chain"
    step = base.steps[0]
    levels = activation_levels(ctx.stats) if p.binary_activations else None
    new = replace(step, weight=binary_weight(step.dense()), fmt="binary",
                  weight_bytes=packed_bytes(tuple(step.weight.shape)),
                  input_quant=binary_activation(*levels) if levels else None)
    params = {"bits": 1, "activations": "binary" if levels else "fp"}
    return [Candidate("binary", layer, params, (new,),
                      parts={"binary": BinaryPart(levels)})], None


@dataclass(frozen=True)
class BinaryConfig:
    """Which layers get binary weights; for each, its binary-activation levels (μ, β), or None
    to keep its input in full precision."""

    layers: Mapping[str, tuple[float, float] | None] = field(default_factory=dict)


def make_config(chosen: list[Candidate]) -> BinaryConfig:
    """The pass config for the chosen binary candidates."""
    return BinaryConfig({c.layer.name: c.part("binary").levels for c in chosen})


def binary_pass(gm: fx.GraphModule, config: BinaryConfig) -> PassResult:
    """Replace each configured layer's weight by packed signs and α, unpacked in the graph;
    binarize its input where the config gives activation levels."""
    modified = False
    g = gm.graph
    for node in list(g.nodes):
        layer = node.meta.get(LAYER_META)
        op = op_type(node)
        if layer not in config.layers or op not in ("linear", "conv2d"):
            continue
        w_node = node.args[1]
        if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
            continue  # already rewritten
        weight = get_attr(gm, w_node.target)
        if not weight.is_floating_point():
            continue
        signs, alpha = binarize(weight)
        shape = tuple(weight.shape)
        length = signs[0].numel()
        pn = add_buffer(gm, f"{layer}.binary_signs", pack_bits(signs), node)
        an = add_buffer(gm, f"{layer}.binary_alpha", alpha.view(-1, 1), node)
        sh = add_buffer(gm, f"{layer}.binary_shifts", torch.arange(8, dtype=torch.uint8), node)
        with g.inserting_before(node):
            u = call(g, aten.unsqueeze.default, (pn, -1), layer=layer)
            b = call(g, aten.bitwise_right_shift.Tensor, (u, sh), layer=layer)
            b = call(g, aten.bitwise_and.Scalar, (b, 1), layer=layer)
            b = call(g, aten.reshape.default, (b, [shape[0], -1]), layer=layer)
            if b.meta["val"].shape[1] != length:
                b = call(g, aten.slice.Tensor, (b, 1, 0, length), layer=layer)
            f = call(g, aten._to_copy.default, (b,), {"dtype": torch.float32}, layer=layer)
            f = call(g, aten.sub.Tensor, (call(g, aten.mul.Tensor, (f, 2.0), layer=layer), 1.0),
                     layer=layer)
            f = call(g, aten.mul.Tensor, (f, an), layer=layer)
            w = call(g, aten.reshape.default, (f, list(shape)), layer=layer)
            x = node.args[0]
            levels = config.layers[layer]
            if levels is not None:
                mu, beta = levels
                ge = call(g, aten.ge.Scalar, (x, mu), layer=layer)
                xf = call(g, aten._to_copy.default, (ge,), {"dtype": torch.float32},
                          layer=layer)
                xf = call(g, aten.mul.Tensor, (xf, 2.0 * beta), layer=layer)
                x = call(g, aten.add.Tensor, (xf, mu - beta), layer=layer)
        args = list(node.args)
        args[0], args[1] = x, w
        node.args = tuple(args)
        modified = True
    if modified:
        drop_unused_attrs(gm)
    return PassResult(gm, modified)


# --- recovery: the straight-through forms ---------------------------------------------------
def sign_ste(u: torch.Tensor) -> torch.Tensor:
    """sign(u) (sign(0) = +1) in the forward; in the backward the hardtanh straight-through
    estimator of BinaryConnect / BNN: gradient 1 where |u| <= 1, 0 outside (an element far past
    its threshold gets no push that could not change its sign anyway)."""
    c = u.clamp(-1.0, 1.0)
    return c + (torch.where(u >= 0, 1.0, -1.0) - c).detach()


#: Half-width of the binary weights' straight-through window, in units of the channel's scale
#: alpha = mean |W|: latent weights beyond it get no gradient (hardtanh STE). On the digits
#: CNN (fpga-binary, 300 steps on the train split) the weights' STE barely matters (98.4-99.1 %
#: test with window 1, 2, none, or a plain identity STE); what recovery needs there is the
#: trained binary activation levels with their clipped STE (59.6 % with them fixed).
BINARY_WINDOW = 2.0


def fake_binary(w: torch.Tensor) -> torch.Tensor:
    """sign(W) * mean|W| per output channel, sign(0) = +1, as the pass stores it; alpha is
    differentiable (its gradient trains the channel's scale through the latent magnitudes)."""
    dims = list(range(1, w.dim()))
    alpha = w.abs().mean(dim=dims, keepdim=True) if dims else w.abs()
    a = alpha.detach().clamp_min(1e-12) * BINARY_WINDOW
    return sign_ste(w / a) * alpha


def learned_levels(mu: torch.Tensor, beta: torch.Tensor):
    """x -> mu + beta * sign(x - mu), as the pass builds it, with the hardtanh straight-through
    window |x - mu| <= beta for x and gradients into both levels (LSQ-style learned
    activation quantizer)."""

    def fq(x: torch.Tensor) -> torch.Tensor:
        b = beta.clamp_min(1e-6)
        return mu + b * sign_ste((x - mu) / b)

    return fq


def _with_levels(c: Candidate, mu: float, beta: float) -> Candidate:
    step = replace(c.steps[0], input_quant=binary_activation(mu, beta))
    return replace(c, steps=(step, *c.steps[1:]), parts={**c.parts,
                                                         "binary": BinaryPart((mu, beta))})


TECHNIQUE = register(Technique(
    "binary", order=95, propose=propose, make_config=make_config, apply=binary_pass,
    trainable=replace(TRAIN_BASE_WEIGHT, input_levels=lambda c: c.part("binary").levels,
                      learned_levels=learned_levels, with_input_levels=_with_levels),
    formats={"binary": lambda c: fake_binary}, final=True, fmt="binary",
    settings=BinarySettings()))
