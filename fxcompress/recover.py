"""Accuracy recovery: fine-tune the compressed model against the original as teacher.

Post-training rewrites lose accuracy; the field's answer is to train the compressed model a
little: knowledge distillation from the original (soft targets with a temperature, labels mixed
in when given: L = alpha * L_hard + (1 - alpha) * L_soft), quantization-aware fine-tuning
through a straight-through estimator, and iterative schedules that compress a step further and
recover between steps.

How it fits the planner. The plan is `{layer name: Candidate}`, each a chain of `Step`s. The
student is the original graph run through an `OverrideInterpreter` whose layers compute their
steps from trainable *latent* weights; each step's format applies its straight-through
quantizer in the forward (`FORMATS`), so the student computes exactly what the built graph
will. After training the latents are written back through each technique's adapter
(`TECHNIQUES`: new SVD factors in the payload, or the base graph's weight for layers whose pass
re-encodes it, as int8 and binary do) and the plan is built by the normal passes, so the stored
form and exportability are exactly those of a plan without recovery. A technique or format
without an adapter is not trained (its layer stays as the planner made it, with a note):
new techniques plug in by registering here.
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
from fxcompress.graph import get_attr
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
    train_others: bool = False  # also fine-tune the other parameters (norm affines); off:
    # binary activation levels are fixed from calibration, and shifting the norms under them
    # hurt in our one trial (digits CNN, binary: 91 % off at lr 1e-3, 65 % on at lr 2e-3)
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


def _int8_fake(w: torch.Tensor) -> torch.Tensor:
    # per output channel, symmetric, as passes/int8.py stores it
    dims = list(range(1, w.dim()))
    amax = w.abs().amax(dim=dims, keepdim=True) if dims else w.abs()
    scale = (amax / 127).clamp_min(1e-12)
    return torch.round(w / scale).clamp(-127, 127) * scale


def _binary_fake(w: torch.Tensor) -> torch.Tensor:
    # sign(W) * mean|W| per output channel, sign(0) = +1, as passes/binary.py stores it
    dims = list(range(1, w.dim()))
    alpha = w.abs().mean(dim=dims, keepdim=True) if dims else w.abs()
    return torch.where(w >= 0, 1.0, -1.0) * alpha


#: step format -> latent weight to effective weight, differentiable (straight-through).
FORMATS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fp32": lambda w: w,
    "fp16": straight_through(lambda w: w.half().float()),
    "int8": straight_through(_int8_fake),
    "binary": straight_through(_binary_fake),
}


@dataclass(frozen=True)
class TrainableTechnique:
    """How one technique's candidates train: `init(candidate, base_weight)` gives the latent
    weight of every step (or None to defer to the next technique of a stack); `write(candidate,
    latents, graph)` returns the candidate rebuilt from the trained latents, writing into the
    student's copy of the base graph where that technique's pass reads its weight from there."""

    init: Callable[[Candidate, torch.Tensor], list[torch.Tensor] | None]
    write: Callable[[Candidate, list[torch.Tensor], fx.GraphModule], Candidate]


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


#: technique name -> its trainable form. A candidate trains when every technique of its stack
#: ("svd+int8") is here and every step's format is in `FORMATS`.
TECHNIQUES: dict[str, TrainableTechnique] = {
    "svd": TrainableTechnique(_svd_init, _svd_write),
    "int8": TrainableTechnique(_reencoded_init, _reencoded_write),
    "binary": TrainableTechnique(_reencoded_init, _reencoded_write),
}


def trainable(c: Candidate) -> str | None:
    """None if candidate `c` can be fine-tuned, else why not."""
    for t in c.technique.split("+"):
        if t != "none" and t not in TECHNIQUES:
            return f"no trainable form of {t!r} yet"
    for s in c.steps:
        if s.fmt not in FORMATS:
            return f"no straight-through quantizer for format {s.fmt!r} yet"
    if c.overrides is not None:
        return "custom simulation"
    return None


# --------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    cand: Candidate
    latents: list[torch.nn.Parameter]
    bias: torch.nn.Parameter | None  # the base graph's bias, trained, used by `bias_step`
    bias_step: int


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
        targets = {n.name: n.target for n in self.gm.graph.nodes}
        for o in options:
            lay = o.layer
            cand = choice.get(lay.name)
            if cand is None and not train_unchanged:
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
            latents = None
            for t in c.technique.split("+"):
                if t in TECHNIQUES:
                    latents = TECHNIQUES[t].init(c, base_w)
                    if latents is not None:
                        break
            if latents is None:
                latents = [s.weight.detach().clone() for s in c.steps]
            bias, bias_step = None, -1
            if lay.bias_target is not None:
                b = get_attr(self.gm, lay.bias_target).detach()
                for i, s in enumerate(c.steps):
                    if s.bias is not None and s.bias.shape == b.shape:
                        bias, bias_step = torch.nn.Parameter(b.clone()), i
            self.entries[lay.name] = _Entry(
                c, [torch.nn.Parameter(w.float().clone()) for w in latents], bias, bias_step)
        self.node_of = {o.layer.name: o.layer.node for o in options}
        # parameters that are no layer's weight or bias (norm scales and shifts): trained in
        # place in the student's graph, which the plan is built from
        owned = {t for o in options for t in (o.layer.weight_target, o.layer.bias_target) if t}
        self.others = [p for name, p in self.gm.named_parameters()
                       if train_others and name not in owned and p.is_floating_point()]
        for p in self.others:
            p.requires_grad_(True)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable tensors, in layer order."""
        out = []
        for e in self.entries.values():
            out += e.latents + ([e.bias] if e.bias is not None else [])
        return out + self.others

    def overrides(self, record: dict | None = None) -> dict[str, Callable]:
        """Node overrides computing every trained layer from its latents (recording each
        layer's output into `record`, if given)."""
        ov = dict(self.fixed)
        for name, e in self.entries.items():
            ov[self.node_of[name]] = self._runner(name, e, record)
        return ov

    @staticmethod
    def _runner(name: str, e: _Entry, record: dict | None):
        def run(args, kwargs):
            x = args[1] if e.cand.layer.op == "embedding" else args[0]  # aten.embedding(w, ids)
            for i, s in enumerate(e.cand.steps):
                if s.input_quant is not None:
                    x = straight_through(s.input_quant)(x) if x.is_floating_point() \
                        else s.input_quant(x)
                w = FORMATS[s.fmt](e.latents[i])
                b = e.bias if i == e.bias_step else s.bias
                x = replace(s, weight=w, bias=b, input_quant=None).run(x)
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
        for name, e in self.entries.items():
            lat = [p.detach().clone() for p in e.latents]
            if e.bias is not None:
                with torch.no_grad():
                    get_attr(self.gm, e.cand.layer.bias_target).copy_(e.bias)
            c = e.cand
            if c.technique == "none":
                with torch.no_grad():
                    get_attr(self.gm, c.layer.weight_target).copy_(lat[0])
                continue
            for t in c.technique.split("+"):
                c = TECHNIQUES[t].write(c, lat, self.gm)
            steps = []
            with torch.no_grad():
                for i, s in enumerate(c.steps):
                    b = e.bias.detach().clone() if i == e.bias_step else s.bias
                    steps.append(replace(s, weight=FORMATS[s.fmt](lat[i]).detach(), bias=b))
            trained[name] = replace(c, steps=tuple(steps))
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
    params = student.parameters()
    if not params:
        return 0
    gen = torch.Generator().manual_seed(seed)
    n = _n_examples(inputs)
    opt = torch.optim.Adam(params, lr=rec.lr)
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


def recover_plan(gm: fx.GraphModule, options, calib: Calibration, plan, tolerance: float,
                 objective: str, evaluate: Callable | None, base_score: float | None,
                 rec: Recover, seed: int, log: Callable[[str], None]):
    """Recover the planner's `plan` by distillation, then (up to `rec.stages` times) extend it
    to a longer prefix of the planner's greedy sequence, recovering again from the trained
    weights, for as long as the recovered plan holds the tolerance. Returns the new `Plan`
    (its `history` extended with each stage's error before / after) and the `Recovery`."""
    from fxcompress.planner import Plan, build, moves

    start = time.perf_counter()
    deadline = None if rec.time_budget is None else start + float(rec.time_budget)
    inputs, labels = training_data(rec, calib)
    teacher = gm
    kind = rec.soft_loss if rec.soft_loss != "auto" else ("kl" if evaluate else "mse")
    sequence = moves(options, objective)
    k0 = next((k for k, p in enumerate(sequence) if p.keys() == plan.choice.keys()
               and all(p[n] is plan.choice[n] for n in p)), None)
    info = Recovery()

    def judge(out):
        err = calib.error_of(out)
        score = float(evaluate(out)) if evaluate is not None else None
        ok = (base_score - score <= tolerance + 1e-12) if evaluate is not None \
            else err <= tolerance
        return err, score, ok

    def stage(base_gm, choice, k, stage_seed):
        t0 = time.perf_counter()
        before = build(base_gm, choice).graph_module
        e0, s0, _ = judge(before)
        student = Student(base_gm, options, choice, rec.train_unchanged, rec.train_others)
        info.frozen.update(student.frozen)
        n = fine_tune(student, teacher, rec, inputs, labels, stage_seed, deadline,
                      label=f"recovering plan {k}", kind=kind)
        new_gm, trained = student.write_back()
        new_choice = {name: trained.get(name, c) for name, c in choice.items()}
        after = build(new_gm, new_choice).graph_module
        e1, s1, ok = judge(after)
        rec_ = StageRecord(k, len(choice), e0, e1, s0, s1, n, time.perf_counter() - t0, ok)
        info.stages.append(rec_)
        log(rec_.line())
        return new_gm, new_choice, after, e1, s1, ok

    base_gm, choice, out, err, score, ok = stage(gm, plan.choice, k0 if k0 is not None else -1,
                                                 seed)
    if not ok:  # recovery made it worse (possible with a poor teacher signal): keep the plan
        best = plan
    else:
        best = Plan(choice, err, score, out, list(plan.history))
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
            g2, c2, out2, e2, s2, ok2 = stage(cur_gm, merged, nxt, seed + s + 1)
            if ok2:
                cur_gm, cur_choice, k = g2, c2, nxt
                best = Plan(c2, e2, s2, out2, list(plan.history))
            else:
                hi = nxt - 1
    best.history = list(plan.history) + [st.line() for st in info.stages]
    for name, why in sorted(info.frozen.items()):
        best.history.append(f"recovery left {name} untrained: {why}")
    info.seconds = time.perf_counter() - start
    return best, info
