"""Accuracy recovery: fine-tune the compressed model against the original as teacher.

Post-training rewrites lose accuracy; the field's answer is to train the compressed model a
little: knowledge distillation from the original (soft targets with a temperature, labels mixed
in when given: L = alpha * L_hard + (1 - alpha) * L_soft), quantization-aware fine-tuning
through a straight-through estimator, and iterative schedules that compress a step further and
recover between steps.

How it fits the planner. The plan is `{layer name: Candidate}`, each a chain of `Step`s. The
student is the original graph run through an `OverrideInterpreter` whose layers compute their
steps from trainable *latent* tensors, so the student computes exactly what the built graph
will. The trainable form of each rewrite (`TECHNIQUES`):

- SVD and Tucker factors train directly (new factors in the payload);
- int8 and binary weights train a latent full-precision weight through a straight-through
  estimator (`FORMATS`; binary: sign with the hardtanh window of BinaryConnect / BNN, the
  per-channel scale differentiable), written back to the base graph's weight, which their
  passes re-encode; static int8 activations keep their calibrated quantizers (STE), and binary
  activation levels (mu, beta) train as learned quantizer parameters (LSQ-style) and are
  stored in the candidate's payload, which is what the pass builds;
- shared weights train their palettes with the indices fixed (centroid fine-tuning); on a
  member of a pruned group the palette is the one the share pass clusters from the kept
  entries, written back keyed to that sliced weight, so the pass stores it as trained;
- a pruned group's consumers train their kept columns (initialized by the pass's re-fit), and
  are then stored as trained: the re-fit is dropped from the pass config for them.

The plan is then built by the normal passes, so the stored form and exportability are exactly
those of a plan without recovery. A technique without an adapter is not trained (its layer
stays as the planner made it, with a note): new techniques plug in by registering here.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from fxcompress.calibration import Calibration, OverrideInterpreter, float_leaves
from fxcompress.candidates import Candidate
from fxcompress.errors import FxCompressError
from fxcompress.graph import get_attr, input_arg_index
from fxcompress.progress import Progress


@dataclass(frozen=True, eq=False)
class Recover:
    """Settings of accuracy recovery (`fxcompress.compile(..., recover=Recover(...))`)."""

    steps: int = 200  # optimizer steps per recovery (per stage of an iterative schedule)
    lr: float = 1e-3  # Adam learning rate of the latent weights
    data: Any = None  # iterable of input tuples to train on; None: the calibration data
    labels: Any = None  # int64 class labels, one per example of `data`, concatenated; optional
    alpha: float = 0.5  # weight of the hard-label loss when labels are given
    temperature: float = 2.0  # softmax temperature of the soft targets
    batch_size: int = 64  # examples per optimizer step
    features: bool = False  # also match each compressed layer's output to the teacher's
    feature_weight: float = 1.0  # weight of the feature-matching loss
    train_unchanged: bool = True  # also fine-tune layers the plan leaves uncompressed
    train_others: bool = False  # also fine-tune the other parameters (norm affines)
    others_lr: float | None = None  # their Adam learning rate; None: `lr`
    stages: int = 3  # iterative schedule: attempts to extend the plan past the one-shot one
    time_budget: float | None = None  # seconds for all of recovery; stops training when spent
    # "kl": soft targets with the temperature (outputs are logits); "mse": relative output
    # error (any output); "auto": "kl" when compile() has evaluate= (a task score), else "mse",
    # the measure the tolerance is then stated in
    soft_loss: str = "auto"

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FxCompressError(f"Recover({name}={v!r}): {name} must be an integer >= 1")

        positive_int("steps")
        positive_int("batch_size")
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 0:
            raise FxCompressError(f"Recover(stages={self.stages!r}): stages must be an integer "
                                  ">= 0 (0: recover the planner's plan without extending it)")
        if self.others_lr is not None and (
                isinstance(self.others_lr, bool) or not isinstance(self.others_lr, int | float)
                or not (self.others_lr > 0 and math.isfinite(self.others_lr))):
            raise FxCompressError(f"Recover(others_lr={self.others_lr!r}): others_lr must be a "
                                  "positive number, or None to use lr")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (
                    v > 0 and math.isfinite(v)):
                raise FxCompressError(f"Recover({name}={v!r}): {name} must be a positive number")
        for name in ("alpha",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                raise FxCompressError(f"Recover({name}={v!r}): {name} must be in [0, 1]")
        if isinstance(self.feature_weight, bool) or not isinstance(
                self.feature_weight, int | float) or not self.feature_weight >= 0:
            raise FxCompressError(f"Recover(feature_weight={self.feature_weight!r}) must be a "
                                  "number >= 0")
        if self.time_budget is not None and (
                isinstance(self.time_budget, bool)
                or not isinstance(self.time_budget, int | float) or not self.time_budget > 0):
            raise FxCompressError(f"Recover(time_budget={self.time_budget!r}): the time budget "
                                  "is a number of seconds > 0, or None")
        if self.soft_loss not in ("auto", "kl", "mse"):
            raise FxCompressError(f"Recover(soft_loss={self.soft_loss!r}): use 'kl' for "
                                  "classifier logits or 'mse' for any output")
        if self.data is not None and isinstance(self.data, torch.Tensor):
            raise FxCompressError("Recover(data=...) is an iterable of input tuples like the "
                                  "calibration data, not a tensor; pass e.g. [(x,)]")
        if self.labels is not None:
            if not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1 \
                    or self.labels.dtype != torch.int64:
                raise FxCompressError("Recover(labels=...) must be a 1-D int64 tensor of class "
                                      "labels, one per example of the data, in order")


# --------------------------------------------------------------------------------------------
# Registries: how each format trains, and how each technique's trained latents are written back
# --------------------------------------------------------------------------------------------


def straight_through(fn: Callable[[torch.Tensor], torch.Tensor]):
    """`fn` in the forward, identity in the backward (the straight-through estimator)."""

    def ste(x: torch.Tensor) -> torch.Tensor:
        return x + (fn(x) - x).detach()

    return ste


def _int8_fake(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    # per output channel, symmetric, as passes/int8.py stores it (q in [-qmax, qmax])
    from fxcompress.passes.int8 import dequantize_per_channel, quantize_per_channel

    return dequantize_per_channel(*quantize_per_channel(w, 0, qmax), 0).to(w.dtype)


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


def _binary_fake(w: torch.Tensor) -> torch.Tensor:
    # sign(W) * mean|W| per output channel, sign(0) = +1, as passes/binary.py stores it; alpha
    # is differentiable (its gradient trains the channel's scale through the latent magnitudes)
    dims = list(range(1, w.dim()))
    alpha = w.abs().mean(dim=dims, keepdim=True) if dims else w.abs()
    a = alpha.detach().clamp_min(1e-12) * BINARY_WINDOW
    return sign_ste(w / a) * alpha


#: step format -> latent weight to effective weight, differentiable (straight-through).
FORMATS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fp32": lambda w: w,
    "fp16": straight_through(lambda w: w.half().float()),
    "int8": straight_through(_int8_fake),
    "binary": _binary_fake,
}


@dataclass(frozen=True)
class TrainableTechnique:
    """How one technique's candidates train: `init(candidate, base_weight)` gives the latent
    tensor of every step (or None to defer to the technique below it in a stack);
    `write(candidate, latents, graph)` returns the candidate rebuilt from the trained latents,
    writing into the student's copy of the base graph where that technique's pass reads its
    weight from there; `weight(candidate, step, latent)`, where given, is the step's effective
    weight from its latent (else the step format's quantizer, `FORMATS`)."""

    init: Callable[[Candidate, torch.Tensor], list[torch.Tensor] | None]
    write: Callable[[Candidate, list[torch.Tensor], fx.GraphModule], Candidate]
    weight: Callable[[Candidate, int, torch.Tensor], torch.Tensor] | None = None


def _svd_init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor]:
    v, u = c.payload["svd"]
    return [v.reshape(c.steps[0].weight.shape).clone(), u.reshape(c.steps[1].weight.shape).clone()]


def _svd_write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule) -> Candidate:
    v, u = latents[0], latents[1]
    return replace(c, payload=dict(c.payload, svd=(v.reshape(v.shape[0], -1).contiguous(),
                                                   u.reshape(u.shape[0], -1).contiguous())))


def _reencoded_init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor] | None:
    # a one-step chain whose pass re-encodes the base graph's weight: train that weight itself
    # (a binary step's weight is alpha * sign: its magnitudes are in the original weight only)
    return [base_w.clone()] if len(c.steps) == 1 else None


def _reencoded_write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule) -> Candidate:
    if len(c.steps) == 1:
        with torch.no_grad():
            get_attr(gm, c.layer.weight_target).copy_(latents[0])
    return c  # stacked: the pass encodes the (already written) factors of the chain


def _tucker_init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor]:
    return [s.weight.detach().clone() for s in c.steps]  # first / core / last, as present


def _tucker_write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule) -> Candidate:
    f = c.payload["tucker"]
    it = iter(t.contiguous() for t in latents)
    first = next(it) if f.first is not None else None
    core = next(it)
    last = next(it) if f.last is not None else None
    return replace(c, payload=dict(c.payload, tucker=replace(f, first=first, core=core,
                                                             last=last)))


# Shared weights train their palettes (centroid fine-tuning): each step's latent is its lookup
# table (groups x 2^bits), the indices stay fixed, and the gathered weight's gradient sums into
# the entries it was gathered from. Only the codebooks' public palette and indices are used.
def _share_init(c: Candidate, base_w: torch.Tensor) -> list[torch.Tensor]:
    return [cb.lut.detach().float().clone() for _, cb in c.payload["share"].codebooks]


def _lut_int8(lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int8 entries, one scale per table, as passes/share.py's cluster(lut_int8=True) stores them
    scale = (lut.detach().abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(lut / scale).clamp(-127, 127), scale


def _share_lut(cb, lut: torch.Tensor) -> torch.Tensor:
    if cb.lut_q is None:
        return lut
    return straight_through(lambda t: _lut_int8(t)[0] * _lut_int8(t)[1])(lut)


def _share_weight(c: Candidate, i: int, lut: torch.Tensor) -> torch.Tensor:
    cb = c.payload["share"].codebooks[i][1]
    return torch.gather(_share_lut(cb, lut), 1, cb.indices.long()).reshape(cb.shape)


def _share_write(c: Candidate, latents: list[torch.Tensor], gm: fx.GraphModule) -> Candidate:
    spec = c.payload["share"]
    books = []
    for (src, cb), lut in zip(spec.codebooks, latents, strict=True):
        if cb.lut_q is not None:
            q, scale = _lut_int8(lut)
            cb = replace(cb, lut=(q * scale).to(cb.lut.dtype), lut_q=q.to(torch.int8),
                         lut_scale=scale.float())
        else:
            cb = replace(cb, lut=lut.to(cb.lut.dtype).contiguous())
        books.append((src, cb))  # same source weight: the pass reuses this codebook
    return replace(c, payload=dict(c.payload, share=replace(spec, codebooks=tuple(books))))


def _share_on_kept(c: Candidate, kept: torch.Tensor, full: torch.Tensor) -> Candidate:
    """The palette of a pruned group's member as the passes build it (prune slices the weight,
    a consumer's re-fit first; share clusters what is left afresh), its indices widened back to
    the full shape: removed entries pick entry 0, and are zero columns of a consumer (its mask)
    or rows whose outputs only such columns read. `c` is a plain "share" candidate (one
    palette, of the layer's weight)."""
    from fxcompress.passes.share import _codebook_for

    spec = c.payload["share"]
    sliced = full[kept].reshape(_kept_shape(kept))
    cb = _codebook_for(sliced, spec)  # a trained one (`_share_sliced`) where it is this weight
    idx = torch.zeros(full.shape, dtype=cb.indices.dtype)
    idx[kept] = cb.indices.reshape(-1)
    wide = replace(cb, shape=tuple(full.shape), indices=idx.reshape(cb.groups, -1))
    return replace(c, payload=dict(c.payload, share=replace(spec, codebooks=((full, wide),))))


def _kept_shape(kept: torch.Tensor) -> tuple[int, ...]:
    # the shape of a tensor sliced by a product of per-axis masks
    return tuple(int(kept.movedim(a, 0).reshape(kept.shape[a], -1).any(1).sum())
                 for a in range(kept.dim()))


def _share_sliced(c: Candidate, kept: torch.Tensor, gm: fx.GraphModule) -> Candidate:
    """Undo `_share_on_kept` on the trained candidate: the codebook of the kept entries, keyed
    by the weight the prune pass will slice out of `gm` (written there), so the share pass
    stores this trained palette rather than clustering again."""
    spec = c.payload["share"]
    (_, wide), = spec.codebooks
    idx = wide.indices.reshape(wide.shape)[kept].reshape(wide.groups, -1)
    cb = replace(wide, shape=_kept_shape(kept), indices=idx.contiguous())
    src = cb.decode()
    with torch.no_grad():
        w = get_attr(gm, c.layer.weight_target)
        w.zero_()
        w[kept] = src.reshape(-1).to(w.dtype)
    return replace(c, payload=dict(c.payload, share=replace(spec, codebooks=((src, cb),))))


#: technique name -> its trainable form. A candidate trains when every technique of its stack
#: ("svd+int8") is here and every step's weight has a differentiable form. The latents belong
#: to the outermost technique of the stack that claims them (int8 defers on a chain, so the
#: factors of "svd+int8" train; share claims its palettes, so "svd+share" trains those).
TECHNIQUES: dict[str, TrainableTechnique] = {
    "svd": TrainableTechnique(_svd_init, _svd_write),
    "tucker": TrainableTechnique(_tucker_init, _tucker_write),
    "int8": TrainableTechnique(_reencoded_init, _reencoded_write),
    "binary": TrainableTechnique(_reencoded_init, _reencoded_write),
    "share": TrainableTechnique(_share_init, _share_write, _share_weight),
}


def _static_outputs(c: Candidate) -> tuple | None:
    """The per-step output quantization (affine qparams or None) of an int8 chain with static
    activations, as passes/int8.py simulates and builds it; None for any other candidate."""
    act = c.payload.get("int8_act")
    if not c.payload.get("int8") or act is None:
        return None
    from fxcompress.passes.int8 import step_mode

    rep, kind = c.payload["int8_representation"], c.payload["int8_activations"]
    modes = [step_mode(s.op, s.groups, rep, kind) for s in c.steps]
    if len(act) != len(c.steps):
        return None
    return tuple(a[1] if m == "qdq_static" else None for a, m in zip(act, modes, strict=True))


def _owner(c: Candidate) -> str | None:
    """The technique of `c`'s stack whose latents train (see TECHNIQUES)."""
    techs = [t for t in c.technique.split("+") if t != "none"]
    for t in reversed(techs):
        if TECHNIQUES[t].init(c, c.steps[0].weight) is not None:
            return t
    return None


def trainable(c: Candidate) -> str | None:
    """None if candidate `c` can be fine-tuned, else why not."""
    techs = [t for t in c.technique.split("+") if t != "none"]
    for t in techs:
        if t not in TECHNIQUES:
            return f"no trainable form of {t!r} yet"
    if c.overrides is not None and _static_outputs(c) is None:
        return "custom simulation"
    owner = _owner(c) if techs else None
    if owner is None or TECHNIQUES[owner].weight is None:
        for s in c.steps:
            if s.fmt not in FORMATS:
                return f"no straight-through quantizer for format {s.fmt!r} yet"
    return None


# --------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    cand: Candidate
    owner: str | None  # the technique whose latents these are (None: the layer as it is)
    latents: list[torch.nn.Parameter]
    bias: torch.nn.Parameter | None  # the base graph's bias, trained, used by `bias_step`
    bias_step: int
    mask: torch.Tensor | None = None  # a pruned group's consumer: its kept input columns
    levels: tuple[torch.nn.Parameter, torch.nn.Parameter] | None = None  # binary act (mu, beta)
    out_q: tuple | None = None  # int8 static: per step, the output's affine qparams or None
    kept: torch.Tensor | None = None  # a palette re-clustered on the entries pruning keeps

    def _gathered(self) -> bool:
        # the owner computes the weight from latents of another shape (a palette)
        return self.owner is not None and TECHNIQUES[self.owner].weight is not None

    def latent(self, i: int) -> torch.Tensor:
        """Latent `i`; a pruned consumer's removed input columns held at zero where the latent
        is the input side of its weight (the first step; not a palette, which is shared by
        kept and removed columns and masked once gathered, in `weight`)."""
        p = self.latents[i]
        if self.mask is None or i != 0 or self._gathered():
            return p
        return p * self.mask

    def weight(self, i: int) -> torch.Tensor:
        """The effective weight of step `i`, differentiable in its latent."""
        if self._gathered():
            w = TECHNIQUES[self.owner].weight(self.cand, i, self.latent(i))
            return w if self.mask is None or i != 0 else w * self.mask
        fmt = self.cand.steps[i].fmt
        qmax = self.cand.payload.get("int8_weight_qmax", 127)
        if fmt == "int8" and qmax != 127:  # a 7-bit target (x86 without VNNI)
            return straight_through(lambda w: _int8_fake(w, qmax))(self.latent(i))
        return FORMATS[fmt](self.latent(i))


def _pass_gradient(simulation: Callable, target: Callable) -> Callable:
    """A layer that is not trained still passes gradients to the layers before it: forward
    as its simulation (which may round through integer types), backward as the original op."""

    def run(args, kwargs):
        y = simulation(args, kwargs)
        if not torch.is_grad_enabled():
            return y
        return straight_through(lambda _: y)(target(*args, **kwargs))

    return run


def _binary_levels(mu: torch.Tensor, beta: torch.Tensor):
    """x -> mu + beta * sign(x - mu), as passes/binary.py builds it, with the hardtanh
    straight-through window |x - mu| <= beta for x and gradients into both levels (LSQ-style
    learned activation quantizer)."""

    def fq(x: torch.Tensor) -> torch.Tensor:
        b = beta.clamp_min(1e-6)
        return mu + b * sign_ste((x - mu) / b)

    return fq


class Student:
    """The original graph with every trainable layer computing its (candidate's) steps from
    latent weights. `gm` is the student's own copy of the base graph, whose weights and biases
    are trained and written in place."""

    def __init__(self, gm: fx.GraphModule, options, choice: dict[str, Candidate],
                 train_unchanged: bool, train_others: bool = False):
        self.gm = copy.deepcopy(gm)
        for p in self.gm.parameters():
            p.requires_grad_(False)
        self.entries: dict[str, _Entry] = {}
        self.frozen: dict[str, str] = {}  # layer -> why not trained
        self.fixed: dict[str, Callable] = {}  # overrides of untrainable chosen candidates
        self.pruned = {n: c for n, c in choice.items() if "prune" in c.payload}
        consumers, keeps = self._pruned_layout()
        targets = {n.name: n.target for n in self.gm.graph.nodes}
        layer_nodes = set()
        for o in options:
            lay = o.layer
            if lay.node in layer_nodes:
                continue  # an entry spanning layers (a pruned group): trained via its layers
            layer_nodes.add(lay.node)
            cand = choice.get(lay.name)
            if cand is None and not train_unchanged and lay.name not in consumers:
                continue
            c = cand or o.base
            why = trainable(c)
            if why is None and lay.shared_with:
                why = "weight shared with other layers"
            if why is not None:
                self.frozen[lay.name] = why
                if cand is not None:
                    self.fixed.update({n: _pass_gradient(fn, targets[n])
                                       for n, fn in cand.simulation().items()})
                continue
            base_w = get_attr(self.gm, lay.weight_target).detach()
            mask = None
            if lay.name in consumers:
                keep, base_w = consumers[lay.name]
                mask = keep.to(base_w.dtype).view([1, -1] + [1] * (base_w.dim() - 2))
            owner = _owner(c) if c.technique != "none" else None
            kept = keeps.get(lay.weight_target) if c.technique == "share" else None
            if kept is not None:
                c = _share_on_kept(c, kept, base_w)
            latents = TECHNIQUES[owner].init(c, base_w) if owner else [base_w.clone()]
            bias, bias_step = None, -1
            if lay.bias_target is not None:
                b = get_attr(self.gm, lay.bias_target).detach()
                for i, s in enumerate(c.steps):
                    if s.bias is not None and s.bias.shape == b.shape:
                        bias, bias_step = torch.nn.Parameter(b.clone()), i
            levels = c.payload.get("binary_act") if c.payload.get("binary") else None
            if levels is not None:
                levels = tuple(torch.nn.Parameter(torch.tensor(float(v))) for v in levels)
            self.entries[lay.name] = _Entry(
                c, owner, [torch.nn.Parameter(w.float().clone()) for w in latents], bias,
                bias_step, mask, levels, _static_outputs(c), kept)
        self.node_of = {o.layer.name: o.layer.node for o in options}
        # parameters that are no layer's weight or bias (norm scales and shifts): trained in
        # place in the student's graph, which the plan is built from
        owned = {t for o in options for t in (o.layer.weight_target, o.layer.bias_target) if t}
        self.others = [p for name, p in self.gm.named_parameters()
                       if train_others and name not in owned and p.is_floating_point()]
        for p in self.others:
            p.requires_grad_(True)

    def _pruned_layout(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                      dict[str, torch.Tensor]]:
        """For the chosen pruned groups: consumer layer -> (kept input columns, initial weight),
        and weight target -> mask of the entries the prune pass keeps."""
        if not self.pruned:
            return {}, {}
        from fxcompress.passes.prune import consumer_weights, make_config, weight_keeps

        config = make_config(list(self.pruned.values()))
        return consumer_weights(self.gm, config), weight_keeps(self.gm, config)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable tensors of the layers, in layer order (without `others`)."""
        out = []
        for e in self.entries.values():
            out += e.latents + ([e.bias] if e.bias is not None else [])
            out += list(e.levels or ())
        return out

    def overrides(self, record: dict | None = None) -> dict[str, Callable]:
        """Node overrides computing every trained layer from its latents (recording each
        layer's output into `record`, if given)."""
        ov = dict(self.fixed)
        for name, e in self.entries.items():
            ov[self.node_of[name]] = self._runner(name, e, record)
        return ov

    @staticmethod
    def _runner(name: str, e: _Entry, record: dict | None):
        from fxcompress.observers import fake_quant_affine

        def run(args, kwargs):
            x = args[input_arg_index(e.cand.layer.op)]
            for i, s in enumerate(e.cand.steps):
                if i == 0 and e.levels is not None:
                    x = _binary_levels(*e.levels)(x)
                elif s.input_quant is not None:
                    x = straight_through(s.input_quant)(x) if x.is_floating_point() \
                        else s.input_quant(x)
                b = e.bias if i == e.bias_step else s.bias
                x = replace(s, weight=e.weight(i), bias=b, input_quant=None).run(x)
                if e.out_q is not None and e.out_q[i] is not None:
                    qp = e.out_q[i]
                    x = straight_through(lambda t, qp=qp: fake_quant_affine(t, *qp))(x)
            if record is not None:
                record[name] = x
            return x

        return run

    def __call__(self, *inputs, record: dict | None = None):
        """Run the student."""
        return OverrideInterpreter(self.gm, self.overrides(record)).run(*inputs)

    def write_back(self) -> tuple[fx.GraphModule, dict[str, Candidate]]:
        """(the base graph with trained weights, the trained candidates of the chosen layers)."""
        from fxcompress.passes.binary import binary_activation

        trained: dict[str, Candidate] = {}
        refit_done = set()  # pruned consumers now trained: the pass slices them as they are
        for name, e in self.entries.items():
            with torch.no_grad():
                lat = [e.latent(i).detach().clone() for i in range(len(e.latents))]
                if e.bias is not None:
                    get_attr(self.gm, e.cand.layer.bias_target).copy_(e.bias)
            if e.mask is not None:
                refit_done.add(name)
            c = e.cand
            if e.owner is None:
                with torch.no_grad():
                    get_attr(self.gm, c.layer.weight_target).copy_(lat[0])
                continue
            c = TECHNIQUES[e.owner].write(c, lat, self.gm)
            if e.kept is not None:
                c = _share_sliced(c, e.kept, self.gm)
            steps = []
            with torch.no_grad():
                for i, s in enumerate(c.steps):
                    b = e.bias.detach().clone() if i == e.bias_step else s.bias
                    s = replace(s, weight=e.weight(i).detach().clone(), bias=b)
                    if i == 0 and e.levels is not None:
                        mu, beta = float(e.levels[0]), float(e.levels[1].clamp_min(1e-6))
                        s = replace(s, input_quant=binary_activation(mu, beta))
                        c = replace(c, payload=dict(c.payload, binary_act=(mu, beta)))
                    steps.append(s)
            trained[name] = replace(c, steps=tuple(steps))
        for name, c in self.pruned.items():
            grams = {k: v for k, v in c.payload.get("grams", {}).items() if k not in refit_done}
            trained[name] = replace(c, payload=dict(c.payload, grams=grams))
        return self.gm, trained


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _stack_data(batches: list[tuple]) -> tuple:
    out = []
    for j, first in enumerate(batches[0]):
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            out.append(torch.cat([b[j] for b in batches], 0))
        else:
            out.append(first)
    return tuple(out)


def _n_examples(inputs: tuple) -> int:
    return next(int(x.shape[0]) for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0)


def training_data(rec: Recover, calib: Calibration) -> tuple[tuple, torch.Tensor | None]:
    """All training inputs stacked along dim 0, and the labels (or None)."""
    from fxcompress.calibration import check_calibration

    batches = calib.batches if rec.data is None else check_calibration(rec.data,
                                                                        calib.batches[0])
    inputs = _stack_data(batches)
    n = _n_examples(inputs)
    if rec.labels is not None and rec.labels.shape[0] != n:
        raise FxCompressError(f"Recover(labels=...) has {rec.labels.shape[0]} labels but the "
                              f"data has {n} examples; pass one label per example, in order")
    return inputs, rec.labels


def _distill_loss(rec: Recover, kind: str, out, ref, labels, feats, tfeats) -> torch.Tensor:
    loss = 0.0
    ys, ts = float_leaves(out), float_leaves(ref)
    for y, t in zip(ys, ts, strict=True):
        if kind == "kl" and y.dim() >= 2:
            T = float(rec.temperature)
            soft = F.kl_div(F.log_softmax(y.flatten(0, -2) / T, -1),
                            F.log_softmax(t.flatten(0, -2) / T, -1), log_target=True,
                            reduction="batchmean") * T * T
        else:
            soft = ((y - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)
        loss = loss + soft
    if labels is not None:
        hard = F.cross_entropy(ys[0].reshape(-1, ys[0].shape[-1]), labels)
        loss = rec.alpha * hard + (1 - rec.alpha) * loss
    for name, f in feats.items():
        t = tfeats[name]
        loss = loss + rec.feature_weight * ((f - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)
    return loss


def fine_tune(student: Student, teacher: fx.GraphModule, rec: Recover, inputs: tuple,
              labels: torch.Tensor | None, seed: int, deadline: float | None,
              label: str = "recovering", kind: str = "kl") -> int:
    """Train the student's latents by distillation from `teacher`; returns the steps run."""
    groups = [{"params": student.parameters(), "lr": rec.lr}]
    if student.others:
        groups.append({"params": student.others,
                       "lr": rec.lr if rec.others_lr is None else rec.others_lr})
    groups = [g for g in groups if g["params"]]
    if not groups:
        return 0
    gen = torch.Generator().manual_seed(seed)
    n = _n_examples(inputs)
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, rec.steps)
    chosen_nodes = {name: student.node_of[name] for name, e in student.entries.items()
                    if e.cand.technique != "none"} if rec.features else {}
    targets = {n.name: n.target for n in teacher.graph.nodes}
    bar = Progress(label)
    order = torch.randperm(n, generator=gen)
    pos, done = 0, 0
    for step in range(rec.steps):
        if deadline is not None and time.perf_counter() > deadline:
            break
        if pos + min(rec.batch_size, n) > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + rec.batch_size]
        pos += len(idx)
        batch = tuple(x[idx] if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                      for x in inputs)
        tfeats: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            tov = {node: _recording(name, targets[node], tfeats)
                   for name, node in chosen_nodes.items()}
            ref = OverrideInterpreter(teacher, tov).run(*batch)
        feats: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            out = student(*batch, record=feats if rec.features else None)
            feats = {k: v for k, v in feats.items() if k in chosen_nodes}
            loss = _distill_loss(rec, kind, out, ref, None if labels is None else labels[idx],
                                 feats, tfeats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        bar.update(done, rec.steps)
    return done


def _recording(name: str, target: Callable, store: dict):
    def run(args, kwargs):
        y = target(*args, **kwargs)
        store[name] = y
        return y

    return run


# --------------------------------------------------------------------------------------------
# The planner's side: recover the chosen plan, then extend it step by step
# --------------------------------------------------------------------------------------------


@dataclass
class StageRecord:
    """One recovery stage, for the report."""

    prefix: int  # index of the plan in the planner's greedy sequence
    rewrites: int
    error_before: float  # end-to-end relative output error of the built plan, untrained
    error_after: float
    score_before: float | None
    score_after: float | None
    steps: int
    seconds: float
    accepted: bool

    def line(self) -> str:
        """One line of the report's notes."""
        s = ""
        if self.score_before is not None:
            s = f", score {self.score_before:.4f} -> {self.score_after:.4f}"
        return (f"recovery stage at plan {self.prefix} ({self.rewrites} rewrites): error "
                f"{self.error_before:.4g} -> {self.error_after:.4g}{s} in {self.steps} steps, "
                f"{self.seconds:.1f}s: {'accepted' if self.accepted else 'rejected'}")


@dataclass
class Recovery:
    """What recovery did: its stages, and the notes on layers it could not train."""

    stages: list[StageRecord] = field(default_factory=list)
    frozen: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def recover_plan(gm: fx.GraphModule, options, calib: Calibration, plan, accept,
                 objective: str, rec: Recover, seed: int, log: Callable[[str], None]):
    """Recover the planner's `plan` by distillation, then (up to `rec.stages` times) extend it
    to a longer prefix of the planner's greedy sequence, recovering again from the trained
    weights, for as long as the recovered plan holds the tolerance, as `accept` (an
    `fxcompress.acceptance.Acceptance`, the planner's own judge) rules. Returns the new `Plan`
    (its `history` extended with each stage's error before / after) and the `Recovery`."""
    from fxcompress.planner import Plan, build, moves

    start = time.perf_counter()
    deadline = None if rec.time_budget is None else start + float(rec.time_budget)
    inputs, labels = training_data(rec, calib)
    teacher = gm
    evaluate = accept.evaluate
    kind = rec.soft_loss if rec.soft_loss != "auto" else ("kl" if evaluate else "mse")
    sequence = moves(options, objective)
    k0 = next((k for k, p in enumerate(sequence) if p.keys() == plan.choice.keys()
               and all(p[n] is plan.choice[n] for n in p)), None)
    info = Recovery()

    def judge(out):
        v = accept(out)
        return v.error.value, v.score, v.ok, v

    def stage(base_gm, choice, k, stage_seed):
        t0 = time.perf_counter()
        before = build(base_gm, choice).graph_module
        e0, s0, _, _ = judge(before)
        student = Student(base_gm, options, choice, rec.train_unchanged, rec.train_others)
        info.frozen.update(student.frozen)
        n = fine_tune(student, teacher, rec, inputs, labels, stage_seed, deadline,
                      label=f"recovering plan {k}", kind=kind)
        new_gm, trained = student.write_back()
        new_choice = {name: trained.get(name, c) for name, c in choice.items()}
        after = build(new_gm, new_choice).graph_module
        e1, s1, ok, v = judge(after)
        rec_ = StageRecord(k, len(choice), e0, e1, s0, s1, n, time.perf_counter() - t0, ok)
        info.stages.append(rec_)
        log(rec_.line())
        return new_gm, new_choice, after, e1, s1, ok, v

    base_gm, choice, out, err, score, ok, v = stage(gm, plan.choice,
                                                    k0 if k0 is not None else -1, seed)
    if not ok:  # recovery made it worse (possible with a poor teacher signal): keep the plan
        best = plan
    else:
        best = Plan(choice, err, score, out, list(plan.history), verdict=v)
    if k0 is not None:
        # extend from the recovered weights where they held, else from the planner's plan
        cur_gm, cur_choice, k = (base_gm, choice, k0) if ok else (gm, plan.choice, k0)
        hi = len(sequence) - 1
        for s in range(rec.stages):
            if k >= hi or (deadline is not None and time.perf_counter() > deadline):
                break
            nxt = k + max(1, (hi - k + 1) // 2)  # halve the remaining way each stage
            merged = {name: (cur_choice[name] if name in cur_choice
                             and sequence[k].get(name) is c else c)
                      for name, c in sequence[nxt].items()}
            g2, c2, out2, e2, s2, ok2, v2 = stage(cur_gm, merged, nxt, seed + s + 1)
            if ok2:
                cur_gm, cur_choice, k = g2, c2, nxt
                best = Plan(c2, e2, s2, out2, list(plan.history), verdict=v2)
            else:
                hi = nxt - 1
    best.history = list(plan.history) + [st.line() for st in info.stages]
    if rec.data is None and evaluate is None and not calib.holdout:
        best.history.append(
            "recovery trained on the calibration data its error is judged on, so that error is "
            "in-sample; pass Recover(data=...) with other inputs (the training inputs, say) for "
            "a held-out judgment")
    for name, why in sorted(info.frozen.items()):
        best.history.append(f"recovery left {name} untrained: {why}")
    info.seconds = time.perf_counter() - start
    return best, info
