"""Accuracy recovery: fine-tune the compressed model against the original as teacher.

Post-training rewrites lose accuracy; the field's answer is to train the compressed model a
little: knowledge distillation from the original (soft targets with a temperature, labels mixed
in when given: L = alpha * L_hard + (1 - alpha) * L_soft), quantization-aware fine-tuning
through a straight-through estimator, and iterative schedules that compress a step further and
recover between steps.

How it fits the planner. Recovery is a strategy of selection (`recover_plan`): it takes the
plan `planner.verify` selected, with its position in the selection's greedy sequence, trains it,
and tries longer prefixes of the same sequence from the trained weights, each judged by the
same `Acceptance` and built by the same `planner.build_plan` (re-fitted where selection
re-fits), so the returned plan holds the candidates its graph was built from.

The student is the original graph run through an `OverrideInterpreter` whose layers compute
their steps from trainable *latent* tensors, so the student computes exactly what the built
graph will. How each rewrite trains is its technique's (`Technique.trainable`, a
`fxcompress.technique.Trainable`; the stored formats' straight-through quantizers are
`Technique.formats`), and a technique that reshapes other layers says how those train
(`Technique.regroup`): SVD and Tucker factors train directly; int8 and binary weights train a
latent full-precision weight through their format's straight-through estimator, written back
to the base graph's weight, which their passes re-encode; static int8 activations keep their
calibrated quantizers (STE), and binary activation levels train as learned quantizer
parameters (LSQ-style); shared weights train their palettes with the indices fixed (centroid
fine-tuning); a pruned group's consumers train their kept columns (initialized by the pass's
re-fit) and are then stored as trained.

The plan is then built by the normal passes, so the stored form and exportability are exactly
those of a plan without recovery. A technique without a trainable form is not trained (its
layer stays as the planner made it, with a note).
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
from fxcompress.technique import (
    REGISTRY,
    Trainable,
    fake_quantizer,
    straight_through,
    techniques_of,
)


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
# How candidates train: each technique's `Trainable` (fxcompress.technique), asked here
# --------------------------------------------------------------------------------------------


#: Float formats' straight-through forms; a compressed format's comes from the technique that
#: introduces it (`Technique.formats`, e.g. int8's per-channel rounding, binary's sign).
FLOAT_FORMATS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fp32": lambda w: w,
    "fp16": straight_through(lambda w: w.half().float()),
}


def format_quantizer(c: Candidate, fmt: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The differentiable (straight-through) form of stored format `fmt` for candidate `c`."""
    return FLOAT_FORMATS.get(fmt) or fake_quantizer(c, fmt)


def _trainable(c: Candidate) -> list[Trainable]:
    return [t.trainable for t in techniques_of(c) if t.trainable is not None]


def _hook(c: Candidate, name: str):
    """The first technique of `c`'s stack (outermost first) that has the Trainable hook
    `name`, as that hook; None if none has."""
    for t in reversed(_trainable(c)):
        fn = getattr(t, name)
        if fn is not None:
            return fn
    return None


def _ask(c: Candidate, name: str):
    """The Trainable hook `name` of `c`'s stack (see `_hook`) applied to `c`; None where no
    technique of the stack has it."""
    fn = _hook(c, name)
    return None if fn is None else fn(c)


def _owner(c: Candidate) -> Trainable | None:
    """The trainable form of `c`'s stack whose latents train: the outermost technique that
    claims them (int8 defers on a chain, so the factors of "svd+int8" train; share claims its
    palettes, so "svd+share" trains those)."""
    for t in reversed(_trainable(c)):
        if t.init(c, c.steps[0].dense()) is not None:
            return t
    return None


def trainable(c: Candidate) -> str | None:
    """None if candidate `c` can be fine-tuned, else why not."""
    for name in c.techniques:
        tech = REGISTRY.get(name)
        if tech is None or tech.trainable is None:
            return f"no trainable form of {name!r} yet"
    if c.overrides is not None and _ask(c, "output_quant") is None:
        return "custom simulation"
    owner = _owner(c) if c.techniques else None
    if owner is None or owner.weight is None:
        for s in c.steps:
            if format_quantizer(c, s.fmt) is None:
                return f"no straight-through quantizer for format {s.fmt!r} yet"
    return None


# --------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    cand: Candidate
    owner: Trainable | None  # whose latents these are (None: the layer as it is)
    latents: list[torch.nn.Parameter]
    bias: torch.nn.Parameter | None  # the layer's bias, trained, used by `bias_step`
    bias_step: int
    mask: torch.Tensor | None = None  # a pruned group's consumer: its kept input columns
    levels: tuple[torch.nn.Parameter, torch.nn.Parameter] | None = None  # learned input levels
    out_q: tuple | None = None  # per step, a fixed output fake-quantizer or None
    kept: torch.Tensor | None = None  # a weight re-encoded from the entries pruning keeps

    def _gathered(self) -> bool:
        # the owner computes the weight from latents of another shape (a palette)
        return self.owner is not None and self.owner.weight is not None

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
            w = self.owner.weight(self.cand, i, self.latent(i))
            return w if self.mask is None or i != 0 else w * self.mask
        return format_quantizer(self.cand, self.cand.steps[i].fmt)(self.latent(i))


def _pass_gradient(simulation: Callable, target: Callable) -> Callable:
    """A layer that is not trained still passes gradients to the layers before it: forward
    as its simulation (which may round through integer types), backward as the original op."""

    def run(args, kwargs):
        y = simulation(args, kwargs)
        if not torch.is_grad_enabled():
            return y
        return straight_through(lambda _: y)(target(*args, **kwargs))

    return run


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
        # rewrites that reshape other layers (pruned groups), by their technique's `Regroup`
        self.regrouped = {n: c for n, c in choice.items()
                          if any(t.regroup is not None for t in techniques_of(c))}
        consumers, keeps = self._regrouped_layout()
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
            owner = _owner(c) if c.techniques else None
            kept = None
            if owner is not None and owner.on_kept is not None and len(c.techniques) == 1:
                kept = keeps.get(lay.weight_target)
                if kept is not None:
                    c = owner.on_kept(c, kept, base_w)
            latents = owner.init(c, base_w) if owner else [base_w.clone()]
            bias, bias_step = self._bias(lay, c, o.base)
            levels = _ask(c, "input_levels")
            if levels is not None:
                levels = tuple(torch.nn.Parameter(torch.tensor(float(v))) for v in levels)
            self.entries[lay.name] = _Entry(
                c, owner, [torch.nn.Parameter(w.float().clone()) for w in latents], bias,
                bias_step, mask, levels, _ask(c, "output_quant"), kept)
        self.node_of = {o.layer.name: o.layer.node for o in options}
        # parameters that are no layer's weight or bias (norm scales and shifts): trained in
        # place in the student's graph, which the plan is built from
        owned = {t for o in options for t in (o.layer.weight_target, o.layer.bias_target) if t}
        self.others = [p for name, p in self.gm.named_parameters()
                       if train_others and name not in owned and p.is_floating_point()]
        for p in self.others:
            p.requires_grad_(True)

    def _bias(self, lay, c: Candidate, base: Candidate) -> tuple[torch.nn.Parameter | None, int]:
        """The layer's trainable bias and the step that adds it: the graph's (trained by an
        earlier stage, perhaps), unless the candidate's technique replaced it (a re-fitted
        bias), then that one."""
        if lay.bias_target is None:
            return None, -1
        b = get_attr(self.gm, lay.bias_target).detach()
        own = base.steps[-1].bias
        for i, s in enumerate(c.steps):
            if s.bias is not None and s.bias.shape == b.shape:
                replaced = own is None or s.bias.shape != own.shape \
                    or not torch.equal(s.bias, own)
                return torch.nn.Parameter((s.bias if replaced else b).detach().clone()), i
        return None, -1

    def _regrouped_layout(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                         dict[str, torch.Tensor]]:
        """For the chosen rewrites that reshape other layers: consumer layer -> (kept input
        columns, initial weight), and weight target -> mask of the entries kept."""
        consumers: dict = {}
        keeps: dict = {}
        by_tech: dict[str, list[Candidate]] = {}
        for c in self.regrouped.values():
            for t in techniques_of(c):
                if t.regroup is not None:
                    by_tech.setdefault(t.name, []).append(c)
        for name, chosen in by_tech.items():
            cons, kp = REGISTRY[name].regroup.layout(self.gm, chosen)
            consumers.update(cons)
            keeps.update(kp)
        return consumers, keeps

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
        levels = _hook(e.cand, "learned_levels") if e.levels is not None else None

        def run(args, kwargs):
            x = args[input_arg_index(e.cand.layer.op)]
            for i, s in enumerate(e.cand.steps):
                if i == 0 and levels is not None:
                    x = levels(*e.levels)(x)
                elif s.input_quant is not None:
                    x = straight_through(s.input_quant)(x) if x.is_floating_point() \
                        else s.input_quant(x)
                b = e.bias if i == e.bias_step else s.bias
                x = replace(s, weight=e.weight(i), bias=b, input_quant=None).run(x)
                if e.out_q is not None and e.out_q[i] is not None:
                    x = straight_through(e.out_q[i])(x)
            if record is not None:
                record[name] = x
            return x

        return run

    def __call__(self, *inputs, record: dict | None = None):
        """Run the student."""
        return OverrideInterpreter(self.gm, self.overrides(record)).run(*inputs)

    def write_back(self) -> tuple[fx.GraphModule, dict[str, Candidate]]:
        """(the base graph with trained weights, the trained candidates of the chosen layers)."""
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
            c = e.owner.write(c, lat, self.gm)
            if e.kept is not None:
                c = e.owner.off_kept(c, e.kept, self.gm)
            steps = []
            with torch.no_grad():
                for i, s in enumerate(c.steps):
                    b = e.bias.detach().clone() if i == e.bias_step else s.bias
                    steps.append(replace(s, weight=e.weight(i).detach().clone(), bias=b))
            c = replace(c, steps=tuple(steps))
            if e.levels is not None:
                mu = float(e.levels[0].detach())
                beta = float(e.levels[1].detach().clamp_min(1e-6))
                c = _hook(c, "with_input_levels")(c, mu, beta)
            trained[name] = c
        for name, c in self.regrouped.items():
            for t in techniques_of(c):
                if t.regroup is not None:
                    c = t.regroup.trained(c, refit_done)
            trained[name] = c
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


def _no_worse(after, before) -> bool:
    """Whether verdict `after` is at least as good as `before` (the score with evaluate=, else
    the error); True when `before` is unknown."""
    if before is None or after is None:
        return True
    if after.score is not None and before.score is not None:
        return after.score >= before.score
    return after.error.value <= before.error.value


@dataclass
class Recovery:
    """What recovery did: its stages, and the notes on layers it could not train."""

    stages: list[StageRecord] = field(default_factory=list)
    frozen: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def recover_plan(selection, plan, accept, rec: Recover, log: Callable[[str], None]):
    """Recover the selected `plan` (a `planner.Plan` from `planner.verify` on `selection`) by
    distillation, then (up to `rec.stages` times) extend it to a longer prefix of the
    selection's greedy sequence, recovering again from the trained weights, for as long as
    the recovered plan holds the tolerance, as `accept` (an `fxcompress.acceptance.Acceptance`,
    the planner's own judge) rules. Each stage builds its plan as selection does
    (`planner.build_plan`, re-fitted where selection re-fits) and trains the plan as built.
    Returns the new `Plan` (its `history` extended with each stage's error before / after) and
    the `Recovery`."""
    from fxcompress.planner import Plan, build_plan, plan_gain

    gm, options, calib, seed = selection.gm, selection.options, selection.calib, selection.seed
    start = time.perf_counter()
    deadline = None if rec.time_budget is None else start + float(rec.time_budget)
    inputs, labels = training_data(rec, calib)
    teacher = gm
    evaluate = accept.evaluate
    kind = rec.soft_loss if rec.soft_loss != "auto" else ("kl" if evaluate else "mse")
    sequence = selection.sequence(False)[0]
    k0 = plan.index if accept.exact_limit is None else None
    info = Recovery()

    def stage(base_gm, choice, k, stage_seed, v0=None):
        t0 = time.perf_counter()
        if v0 is None:  # else `choice` is a plan selection built and judged already
            before, choice = build_plan(base_gm, choice,
                                        calib if selection.refit else None, seed)
            v0 = accept(before.graph_module)
        student = Student(base_gm, options, choice, rec.train_unchanged, rec.train_others)
        info.frozen.update(student.frozen)
        n = fine_tune(student, teacher, rec, inputs, labels, stage_seed, deadline,
                      label=f"recovering plan {k}", kind=kind)
        new_gm, trained = student.write_back()
        new_choice = {name: trained.get(name, c) for name, c in choice.items()}
        after, new_choice = build_plan(new_gm, new_choice)
        v = accept(after.graph_module)
        rec_ = StageRecord(k, len(choice), v0.error.value, v.error.value, v0.score, v.score, n,
                           time.perf_counter() - t0, v.ok)
        info.stages.append(rec_)
        log(rec_.line())
        return new_gm, new_choice, Plan(new_choice, v.error.value, v.score, after.graph_module,
                                        verdict=v, index=k), v.ok

    base_gm, choice, trained_plan, ok = stage(gm, plan.choice, k0 if k0 is not None else -1,
                                              seed, plan.verdict)
    # recovery can make the same plan worse (a poor teacher signal, a learning rate too high
    # for pretrained weights): then keep the plan as selected, and extend from it
    ok = ok and _no_worse(trained_plan.verdict, plan.verdict)
    best = trained_plan if ok else plan
    if k0 is not None:
        # extend from the recovered weights where they held, else from the selected plan
        cur_gm, cur_choice, k = (base_gm, choice, k0) if ok else (gm, plan.choice, k0)
        hi = len(sequence) - 1
        for s in range(rec.stages):
            if k >= hi or (deadline is not None and time.perf_counter() > deadline):
                break
            nxt = k + max(1, (hi - k + 1) // 2)  # halve the remaining way each stage
            # the layers whose rewrite is unchanged since plan k keep their trained form
            merged = {name: (cur_choice[name] if name in cur_choice
                             and sequence[k].get(name) is c else c)
                      for name, c in sequence[nxt].items()}
            g2, c2, p2, ok2 = stage(cur_gm, merged, nxt, seed + s + 1)
            # a selected plan filled past its prefix (`planner._fill`) can gain more than a
            # longer prefix: an extension is taken only when it gains more than the best
            if ok2 and plan_gain(c2, options, selection.objective) \
                    <= plan_gain(best.choice, options, selection.objective):
                hi = nxt - 1
                continue
            if ok2:
                cur_gm, cur_choice, k, best = g2, c2, nxt, p2
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
