"""Calibration: reference outputs, per-layer activation statistics, and error measurement.

The planner measures each candidate rewrite by *simulating* it on the original graph: a
candidate is a set of node overrides (node name -> function of that node's evaluated args), run
through an FX interpreter, so measuring a candidate never builds or copies a graph. The plan
that is finally chosen is verified on the real rewritten graph.

Error is the relative output error over the whole calibration set,
``sqrt(sum ||y' - y||^2) / sqrt(sum ||y||^2)`` over every floating-point output leaf.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils import _pytree as pytree

from fxcompress.errors import FxCompressError
from fxcompress.graph import input_arg_index, op_type

Override = Callable[[tuple, dict], torch.Tensor]

#: Examples a candidate is measured on before `Calibration.errors` may settle it (stop
#: measuring it because its error is already far beyond the tolerance).
SETTLE_EXAMPLES = 4
#: A candidate whose per-batch squared errors (relative to the reference's) already agree, the
#: standard error of their mean within this share of the mean after at least `AGREE_BATCHES`
#: batches, is settled too: more batches would move its estimate by less than that share (its
#: error by about half of it), and the plan built from the estimates is judged on every batch.
AGREE_SHARE = 0.1
AGREE_BATCHES = 3


class OverrideInterpreter(fx.Interpreter):
    """Runs a graph with some nodes' computations replaced, and optionally records the inputs
    (first argument; an embedding's indices) of watched nodes through `on_input(node_name,
    tensor)`, or hands the live values to `on_reach(node, env)` just before evaluating a node
    named in `reach`."""

    def __init__(self, gm: fx.GraphModule, overrides: Mapping[str, Override] | None = None,
                 watch: Iterable[str] = (), on_input: Callable | None = None,
                 reach: Iterable[str] = (), on_reach: Callable | None = None):
        super().__init__(gm, garbage_collect_values=True)
        self.overrides = dict(overrides or {})
        self.watch = set(watch)
        self.on_input = on_input
        self.reach = set(reach)
        self.on_reach = on_reach

    def run_node(self, n: fx.Node):
        """Evaluate `n`, through its override if it has one."""
        if n.name in self.reach and self.on_reach is not None:
            self.on_reach(n, self.env)
        if n.name in self.watch and self.on_input is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            # the layer's input: the indices of an embedding (aten.embedding(weight, indices)),
            # the first argument of every other layer op
            self.on_input(n.name, args[input_arg_index(op_type(n))])
        fn = self.overrides.get(n.name)
        if fn is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return fn(args, kwargs)
        return super().run_node(n)


def float_leaves(out) -> list[torch.Tensor]:
    """The floating-point tensors of a (possibly nested) output."""
    return [t for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


@dataclass(frozen=True)
class PatchGeometry:
    """How a k x k convolution reads its input: what `LayerStats.add_patches` unfolds."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


#: the widest unfolded patch (C kh kw) whose second moment calibration keeps: 2304 columns
#: are a 42 MB float64 moment while it is summed
PATCH_MAX_COLUMNS = 2304


def patch_geometries(layers) -> dict[str, PatchGeometry]:
    """Node -> geometry of the ungrouped k x k convolutions among `layers` (`graph.Layer`)
    whose unfolded patch has at most `PATCH_MAX_COLUMNS` columns and whose padding is
    numeric."""
    out = {}
    for lay in layers:
        if lay.op != "conv2d" or lay.groups != 1 or isinstance(lay.padding, str):
            continue
        kh, kw = lay.weight_shape[2:]
        if kh * kw == 1 or lay.weight_shape[1] * kh * kw > PATCH_MAX_COLUMNS:
            continue
        out[lay.node] = PatchGeometry((kh, kw), tuple(lay.stride), tuple(lay.padding),
                                      tuple(lay.dilation))
    return out


@dataclass
class LayerStats:
    """Statistics of one layer's input over the calibration data."""

    rows: int = 0  # number of input vectors seen (tokens, or pixels for convs)
    # E[x x^T] over the rows (uncentred second moment; linear: in_features^2): the float64
    # sum of x x^T while batches are folded in; `finish` divides it by `rows` and keeps it in
    # float32 (a down projection's is 5632^2: 127 MB instead of 254), read as float64 through
    # `covariance`
    moment: torch.Tensor | None = None
    fourth: float = 0.0  # sum of ||x||^4 over rows (the spread of x x^T: Ledoit-Wolf shrinkage)
    absmax: float = 0.0  # largest |x| seen
    shape: tuple[int, ...] = ()  # input shape of the first calibration batch
    out_shape: tuple[int, ...] = ()  # output shape of the first calibration batch (filled later)
    samples: list[torch.Tensor] = field(default_factory=list)  # a few flattened input rows
    # the layer's output: range over all batches and a few values (static int8 output qparams)
    out_min: float = float("inf")
    out_max: float = float("-inf")
    out_samples: list[torch.Tensor] = field(default_factory=list)
    # k x k convolutions whose compression asks for it (`Calibration(patches=...)`): the same
    # second moment over unfolded input patches ((C kh kw)^2, columns in the weight's
    # flattened order), the number of patches and the sum of their ||x||^4
    patch_moment: torch.Tensor | None = None
    patch_rows: int = 0
    patch_fourth: float = 0.0
    # the float64 covariance while something holds it; the leader whose input this layer reads
    _cov64: Any = field(default=None, init=False, repr=False, compare=False)
    _source: LayerStats | None = field(default=None, init=False, repr=False, compare=False)

    def add_output(self, y: torch.Tensor, keep_values: int) -> None:
        """Fold one batch of layer outputs in."""
        if not y.is_floating_point() or y.numel() == 0:
            return
        y = y.detach()
        self.out_min = min(self.out_min, float(y.min()))
        self.out_max = max(self.out_max, float(y.max()))
        have = sum(s.numel() for s in self.out_samples)
        if have < keep_values:
            self.out_samples.append(y.reshape(-1)[: keep_values - have].float().clone())

    def add(self, x: torch.Tensor, kind: str, keep_rows: int) -> None:
        """Fold one batch of layer inputs in."""
        if not self.shape:
            self.shape = tuple(x.shape)
        if not x.is_floating_point():
            return
        self.absmax = max(self.absmax, float(x.detach().abs().max()))
        if kind == "linear":
            rows = x.detach().reshape(-1, x.shape[-1]).double()
        elif kind == "conv2d":
            rows = x.detach().transpose(0, 1).reshape(x.shape[1], -1).T.double()
        else:
            return
        if self.moment is None:
            self.moment = rows.T @ rows
        else:  # added in place, no second in_features^2 float64 (a down projection's: 250 MB)
            self.moment.addmm_(rows.T, rows)
        self.fourth += float((rows * rows).sum(1).square().sum())
        self.rows += rows.shape[0]
        have = sum(s.shape[0] for s in self.samples)
        if have < keep_rows:
            self.samples.append(rows[: keep_rows - have].float())

    def add_patches(self, x: torch.Tensor, geometry: PatchGeometry) -> None:
        """Fold one batch of a k x k convolution's input in as its unfolded patches."""
        if not x.is_floating_point():
            return
        cols = F.unfold(x.detach().double(), geometry.kernel, geometry.dilation,
                        geometry.padding, geometry.stride)  # (N, C kh kw, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        if self.patch_moment is None:
            self.patch_moment = rows.T @ rows
        else:
            self.patch_moment.addmm_(rows.T, rows)
        self.patch_fourth += float((rows * rows).sum(1).square().sum())
        self.patch_rows += rows.shape[0]

    def finish(self) -> None:
        """The sum of x x^T becomes E[x x^T], kept in float32: call once, after the last
        batch."""
        if self.moment is not None and self.moment.dtype == torch.float64:
            self.moment = self.moment.div_(max(self.rows, 1)).float()
        if self.patch_moment is not None and self.patch_moment.dtype == torch.float64:
            self.patch_moment = self.patch_moment.div_(max(self.patch_rows, 1)).float()

    @property
    def covariance(self) -> torch.Tensor | None:
        """E[x x^T] over all rows seen (uncentred second moment), float64: one tensor for as
        long as anything holds it (a candidate keeping its layer's Hessian), shared by the
        layers that share the input, made again from `moment` once nothing does."""
        if self._source is not None:
            return self._source.covariance
        if self.moment is None:
            return None
        cov = None if self._cov64 is None else self._cov64()
        if cov is None:
            cov = self.moment.double()
            self._cov64 = weakref.ref(cov)
        return cov

    def shares_input_of(self, leader: LayerStats) -> None:
        """Take `leader`'s input statistics (the same tensors, not copies): for a layer whose
        input is the leader's (q / k / v projections of one hidden state)."""
        self._source = leader
        self.rows, self.moment, self.fourth = leader.rows, leader.moment, leader.fourth
        self.absmax, self.shape, self.samples = leader.absmax, leader.shape, list(leader.samples)


class Calibration:
    """Calibration batches, the original graph's outputs on them, and per-layer input stats."""

    def __init__(self, gm: fx.GraphModule, batches: list[tuple], layers: Mapping[str, str],
                 keep_rows: int = 4096, holdout: list[tuple] | None = None,
                 patches: Mapping[str, PatchGeometry] | None = None):
        self.gm = gm
        self.batches = batches
        # batches no statistic, candidate error or fit uses: what built plans are judged on
        # (see fxcompress.acceptance); empty: they are judged on `batches`
        self.holdout = list(holdout or [])
        self.stats: dict[str, LayerStats] = {node: LayerStats() for node in layers}
        kinds = dict(layers)
        out_shapes: dict[str, tuple] = {}
        # layers of one kind reading the same value (q / k / v of one hidden state) share one
        # set of input statistics, gathered by the first of them (the leader)
        leader_of = _input_leaders(gm, kinds)

        patches = dict(patches or {})

        def on_input(name, x):
            if leader_of[name] == name:
                self.stats[name].add(x, kinds[name], keep_rows)
            if name in patches:  # the layer's own: convolutions of one input read it unlike
                self.stats[name].add_patches(x, patches[name])

        self.reference: list[list[torch.Tensor]] = []
        with torch.no_grad():
            for i, batch in enumerate(batches):
                interp = OverrideInterpreter(gm, watch=kinds, on_input=on_input)
                _record_outputs(interp, set(kinds), out_shapes if i == 0 else {}, self.stats,
                                keep_rows * 64)
                out = _run_batch(interp.run, batch, f"calibration batch {i}")
                self.reference.append([t.detach() for t in float_leaves(out)])
        for name, shape in out_shapes.items():
            self.stats[name].out_shape = shape
        for name, leader in leader_of.items():
            if leader == name or name in patches:
                self.stats[name].finish()
        for name, leader in leader_of.items():
            if leader != name:
                self.stats[name].shares_input_of(self.stats[leader])
        self.ref_energy = sum(float((t.double() ** 2).sum()) for ref in self.reference
                              for t in ref)
        if not any(self.reference):
            kinds = sorted({str(t.dtype).removeprefix("torch.") for t in pytree.tree_leaves(out)
                            if isinstance(t, torch.Tensor)}) or ["no tensor"]
            raise FxCompressError(
                f"the model's output is not floating point ({', '.join(kinds)}), so the "
                "relative output error that fxcompress keeps within the tolerance cannot be "
                "measured; make forward return the float scores (the logits) and take the "
                "argmax / threshold on the compiled model's output instead")
        if self.ref_energy == 0.0:
            raise FxCompressError("the model's outputs on the calibration data are all zero, so "
                                  "relative error is undefined; pass real calibration inputs")
        self.holdout_reference: list[list[torch.Tensor]] = []
        with torch.no_grad():
            for i, batch in enumerate(self.holdout):
                out = _run_batch(gm, batch, f"held-out calibration batch {i}")
                self.holdout_reference.append([t.detach() for t in float_leaves(out)])

    def sensitivity_batches(self, examples: int = 64) -> int:
        """How many leading batches hold at least `examples` examples (all, if fewer)."""
        seen = 0
        for i, batch in enumerate(self.batches):
            first = next((x for x in batch if isinstance(x, torch.Tensor) and x.dim() > 0), None)
            seen += 1 if first is None else int(first.shape[0])
            if seen >= examples:
                return i + 1
        return len(self.batches)

    def error(self, overrides: Mapping[str, Override] | None = None, limit: int | None = None,
              ) -> float:
        """Relative output error of the graph with `overrides` over the calibration batches
        (the first `limit` of them, if given)."""
        num = den = 0.0
        batches = self.batches if limit is None else self.batches[:limit]
        with torch.no_grad():
            for batch, ref in zip(batches, self.reference, strict=False):
                out = float_leaves(OverrideInterpreter(self.gm, overrides).run(*batch))
                for y, r in zip(out, ref, strict=True):
                    num += float(((y.double() - r.double()) ** 2).sum())
                    den += float((r.double() ** 2).sum())
        return (num / den) ** 0.5 if den > 0 else 0.0

    def errors(self, jobs: Mapping[str, list[Mapping[str, Override]]], limit: int | None = None,
               stop: Callable[[], bool] | None = None,
               progress: Callable[[int], None] | None = None,
               settle_above: float | None = None) -> dict[str, list[float | None]]:
        """Relative output error of many override sets at once, keyed by the node each set
        starts at (its earliest overridden node). The graph runs once per batch; on reaching a
        start node, each of its override sets runs only the rest of the graph, from a copy of
        the live values, so what comes before a layer is computed once, not once per
        candidate. Once `stop()` is true, sets not yet measured are skipped and come back as
        None; `progress(n)` is told of each `n` sets measured on the first batch.

        `settle_above`: a set whose error over the batches run so far (at least
        `SETTLE_EXAMPLES` examples) is above it is not run on the later batches; its error is
        the one measured so far. The planner passes a multiple of the tolerance (such a
        rewrite enters a plan only where errors largely cancel); on a large model most of the
        measurement is spent on such rewrites. A set whose per-batch errors already agree
        (`AGREE_SHARE`, after `AGREE_BATCHES` batches) is settled the same way."""
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        skipped: set[str] = set()
        nodes = list(self.gm.graph.nodes)
        acc = {k: [[0.0, 0.0] for _ in v] for k, v in jobs.items()}
        per_batch = {k: [[] for _ in v] for k, v in jobs.items()}  # each batch's error^2
        settled = {k: [False] * len(v) for k, v in jobs.items()}
        batches = self.batches if limit is None else self.batches[:limit]

        current: dict = {}  # the batch being run and its reference outputs

        def on_reach(node, env):
            if node.name in skipped or (stop is not None and stop()):
                skipped.add(node.name)
                return
            if progress is not None and current["first"]:
                progress(len(jobs[node.name]))
            before = nodes[: order[node.name]]
            for i, ov in enumerate(jobs[node.name]):
                if settled[node.name][i]:
                    continue
                # the values computed so far, copied; a weight read by a later node is the
                # module's own tensor, as every run reads it: not copied (a block's weights)
                start = {m: (env[m] if m.op == "get_attr" else _clone(env[m])) if m in env
                         else None for m in before}
                out = OverrideInterpreter(self.gm, ov).run(*current["batch"], initial_env=start)
                num = den = 0.0
                for y, r in zip(float_leaves(out), current["ref"], strict=True):
                    num += float(((y.double() - r.double()) ** 2).sum())
                    den += float((r.double() ** 2).sum())
                acc[node.name][i][0] += num
                acc[node.name][i][1] += den
                if den > 0:
                    per_batch[node.name][i].append(num / den)

        seen = 0
        with torch.no_grad():
            for i, (batch, ref) in enumerate(zip(batches, self.reference, strict=False)):
                current.update(batch=batch, ref=ref, first=i == 0)
                active = [k for k in jobs if not all(settled[k])]
                if not active:
                    break
                OverrideInterpreter(self.gm, reach=active, on_reach=on_reach).run(*batch)
                seen += _batch_size(batch) or 1
                if seen < SETTLE_EXAMPLES:
                    continue
                for k, v in acc.items():
                    for j, (n, d) in enumerate(v):
                        if settle_above is not None and d > 0 and n / d > settle_above ** 2:
                            settled[k][j] = True
                        elif _agrees(per_batch[k][j]):
                            settled[k][j] = True
        return {k: [None if k in skipped else (n / d) ** 0.5 if d > 0 else 0.0 for n, d in v]
                for k, v in acc.items()}

    def error_of(self, model: Callable) -> float:
        """Relative output error of any callable model (the rewritten graph) against the
        reference outputs of the calibration batches the fits use."""
        num, den = _example_errors(model, self.batches, self.reference)
        total = float(den.sum())
        return (float(num.sum()) / total) ** 0.5 if total > 0 else 0.0

    def example_errors(self, model: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example squared output error of `model` and squared reference output, on the
        held-out batches (on the calibration batches when none is held out): two float64
        vectors whose sums' ratio's root is the relative output error. An example is one index
        of the batch dimension; a batch whose outputs do not all lead with it counts as one."""
        if self.holdout:
            return _example_errors(model, self.holdout, self.holdout_reference)
        return _example_errors(model, self.batches, self.reference)

    @staticmethod
    def example_count(batches: list[tuple]) -> int:
        """Examples in `batches` (a batch without a batch dimension counts as one)."""
        return sum(_batch_size(b) or 1 for b in batches)


def _agrees(errors2: list[float]) -> bool:
    """Whether per-batch squared errors agree well enough to stop measuring (`AGREE_SHARE`)."""
    n = len(errors2)
    if n < AGREE_BATCHES:
        return False
    mean = sum(errors2) / n
    if mean == 0.0:
        return True
    var = sum((e - mean) ** 2 for e in errors2) / (n - 1)
    return (var / n) ** 0.5 <= AGREE_SHARE * mean


def _example_errors(model: Callable, batches: list[tuple], refs: list[list[torch.Tensor]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """See `Calibration.example_errors`."""
    nums, dens = [], []
    with torch.no_grad():
        for batch, ref in zip(batches, refs, strict=True):
            out = float_leaves(model(*batch))
            if len(out) != len(ref):
                raise ValueError(f"model gives {len(out)} float outputs, expected {len(ref)}")
            n = _batch_size(batch)
            per = n is not None and all(r.dim() >= 1 and r.shape[0] == n for r in ref)
            num = torch.zeros(n if per else 1, dtype=torch.float64)
            den = torch.zeros_like(num)
            for y, r in zip(out, ref, strict=True):
                d = (y.double() - r.double()) ** 2
                e = r.double() ** 2
                num += d.reshape(n, -1).sum(1) if per else d.sum()
                den += e.reshape(n, -1).sum(1) if per else e.sum()
            nums.append(num)
            dens.append(den)
    return torch.cat(nums), torch.cat(dens)


def _run_batch(run: Callable, batch: tuple, what: str):
    """`run(*batch)`; the user error naming `what` when the batch does not run."""
    try:
        return run(*batch)
    except Exception as e:
        raise FxCompressError(
            f"{what} does not run through the model ({type(e).__name__}: {str(e)[:200]}); "
            "each calibration item must be a tuple shaped like example_inputs (any batch "
            "size)") from e


def _batch_size(batch: tuple) -> int | None:
    first = next((x for x in batch if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def _record_outputs(interp: OverrideInterpreter, names: set[str], out: dict,
                    stats: dict[str, LayerStats], keep_values: int) -> None:
    original = interp.run_node

    def run_node(n):
        result = original(n)
        if n.name in names and isinstance(result, torch.Tensor):
            out[n.name] = tuple(result.shape)
            stats[n.name].add_output(result, keep_values)
        return result

    interp.run_node = run_node


def _input_leaders(gm: fx.GraphModule, kinds: Mapping[str, str]) -> dict[str, str]:
    """For each layer node in `kinds`: the first layer node of the same kind whose input is the
    same graph value (itself, when none before it reads that value)."""
    first: dict[tuple, str] = {}
    leaders = {}
    for n in gm.graph.nodes:
        if n.name not in kinds:
            continue
        i = input_arg_index(op_type(n))
        src = n.args[i] if len(n.args) > i else None
        key = (kinds[n.name], src.name if isinstance(src, fx.Node) else f"own:{n.name}")
        leaders[n.name] = first.setdefault(key, n.name)
    for name in kinds:  # a layer the walk did not meet leads itself
        leaders.setdefault(name, name)
    return leaders


def _clone(v):
    # in-place ops of a resumed run must not reach the shared snapshot
    return v.clone() if isinstance(v, torch.Tensor) else v


def check_calibration(calibration, example_inputs: tuple) -> list[tuple]:
    """Calibration items as a list of input tuples that match `example_inputs` in count, dtype
    and every dimension but the batch; the user error otherwise."""
    if calibration is None:
        return [example_inputs]
    if isinstance(calibration, torch.Tensor):
        raise FxCompressError("calibration must be an iterable of input tuples, not a tensor; "
                              "pass e.g. [(x1,), (x2,)] or a DataLoader of (x,) batches")
    try:
        items = list(calibration)
    except TypeError:
        raise FxCompressError(f"calibration must be an iterable of input tuples, not "
                              f"{type(calibration).__name__}") from None
    if not items:
        raise FxCompressError("calibration is empty; pass at least one input tuple, or None to "
                              "calibrate on the example inputs")
    batches = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            item = (item,)
        if isinstance(item, list):
            item = tuple(item)
        if not isinstance(item, tuple) or len(item) != len(example_inputs):
            got = len(item) if isinstance(item, tuple) else type(item).__name__
            raise FxCompressError(
                f"calibration item {i} has {got} inputs, example_inputs has "
                f"{len(example_inputs)}; each item must be a tuple like example_inputs")
        for j, (a, b) in enumerate(zip(item, example_inputs, strict=True)):
            if isinstance(b, torch.Tensor):
                if not isinstance(a, torch.Tensor):
                    raise FxCompressError(f"calibration item {i}, input {j} is "
                                          f"{type(a).__name__}, expected a tensor")
                if a.dtype != b.dtype or a.dim() != b.dim() or a.shape[1:] != b.shape[1:]:
                    raise FxCompressError(
                        f"calibration item {i}, input {j} has shape {tuple(a.shape)} "
                        f"{a.dtype}, but example input {j} is {tuple(b.shape)} {b.dtype}; only "
                        "the batch dimension (dim 0) may differ")
                _check_finite(a, b, i, j)
        batches.append(item)
    return batches


def check_example_finite(example_inputs: tuple) -> None:
    """The example inputs follow the rule of calibration inputs (see `_check_finite`): they
    are the calibration data when none is given, and the reference that rule allows infinity
    against. NaN and +inf are refused; -inf is allowed (an additive attention mask)."""
    for j, x in enumerate(example_inputs):
        for a in pytree.tree_leaves(x):
            if not isinstance(a, torch.Tensor) or not (a.is_floating_point() or a.is_complex()):
                continue
            if bool(torch.isfinite(a).all()):
                continue
            nan = int(torch.isnan(a).sum())
            pos = 0 if a.is_complex() else int((a == float("inf")).sum())
            if nan == 0 and pos == 0:
                continue  # -inf only: an additive mask
            what = f"{nan} NaN" if nan else f"{pos} +infinite"
            raise FxCompressError(
                f"example input {j} holds {what} value(s) of {a.numel()}; the example inputs "
                "must be finite (-inf is allowed, for an additive attention mask): replace them "
                "(e.g. torch.nan_to_num(x)) or pick other samples")


def _check_finite(a: torch.Tensor, example: torch.Tensor, i: int, j: int) -> None:
    """Calibration values must be finite: NaN or infinity poisons every statistic and error
    measured on them. Infinity is allowed where the example input holds it too (an additive
    attention mask of -inf, say). One pass over the tensor when it is finite."""
    if not (a.is_floating_point() or a.is_complex()) or bool(torch.isfinite(a).all()):
        return
    nan = int(torch.isnan(a).sum())
    if nan == 0 and bool(torch.isinf(example).any()):
        return
    what = f"{nan} NaN" if nan else f"{int(torch.isinf(a).sum())} infinite"
    raise FxCompressError(f"calibration item {i}, input {j} holds {what} value(s) of "
                          f"{a.numel()}; calibration needs finite inputs: replace them (e.g. "
                          "torch.nan_to_num(x)) or drop those samples")
