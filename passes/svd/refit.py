"""SVD's sequential re-fit: the chosen factors re-computed in graph order from the inputs
the already-rewritten model feeds each layer (see `__init__.py`, "Sequential re-fit")."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import fx

from fxcompress.calibration import OverrideInterpreter
from fxcompress.graph import LAYER_META, get_attr, op_type
from fxcompress.passes.svd.decompose import decompose, shrinkage, shrunk

#: Damping of the re-fit's regression, relative to the mean input energy per feature (the
#: default of `REFIT_DAMP`).
REFIT_DAMP = 1e-2


class _Reached(Exception):
    """Raised to stop an interpreter run just before a node (see `_advance`)."""


def _advance(gm: fx.GraphModule, batch: tuple, env: dict | None, overrides: Mapping,
             target: fx.Node) -> tuple[torch.Tensor, dict]:
    """Run `gm` on `batch` from the snapshot `env` up to (not including) `target`: the input
    of `target`, and the snapshot to resume from (values garbage-collected as dead are None, so
    a resumed run skips them)."""
    seen: dict = {}

    def on_reach(node, live):
        seen["x"] = live[node.args[0]]
        seen["env"] = {m: live.get(m) for m in before}
        raise _Reached

    nodes = list(gm.graph.nodes)
    before = nodes[: nodes.index(target)]
    try:
        OverrideInterpreter(gm, overrides, reach=[target.name], on_reach=on_reach).run(
            *batch, initial_env=dict(env) if env is not None else None)
    except _Reached:
        return seen["x"], seen["env"]
    raise RuntimeError(f"{target.name} was not reached")  # every node runs in an FX graph


def _rows(x: torch.Tensor, op: str) -> torch.Tensor:
    # one row per input vector the layer's matrix multiplies, as calibration's LayerStats
    if op == "linear":
        return x.detach().reshape(-1, x.shape[-1]).double()
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1).T.double()


def _effective(node: fx.Node, w: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    """Override that runs `node` with weight `w` (the product of its factors) and, when given,
    bias `bias`."""
    def run(args, kwargs):
        rest = list(args[2:])
        if bias is not None:
            if rest:
                rest[0] = bias
            else:
                kwargs = {**kwargs, "bias": bias}
        return node.target(args[0], w, *rest, **kwargs)
    return run


def refit_factors(gm: fx.GraphModule, batches: list[tuple],
                  factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  overrides: Mapping[str, Callable] | None = None,
                  damp: float | Mapping[str, float] = REFIT_DAMP,
                  seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor,
                                                    torch.Tensor | None]]:
    """Sequentially re-fitted factors (same ranks) for the layers in `factors` (layer name ->
    (V, U), as `SVDConfig` holds them) of the original graph `gm`, on the calibration `batches`:
    layer name -> (V, U, bias), the bias re-fitted too where the layer has one (None where not).

    Layers are re-fitted in graph order; each sees the inputs of the graph in which the layers
    before it run with their re-fitted factors and `overrides` (node name -> override, the other
    rewrites of the plan) apply, and is fitted to the original layer's output on the original
    inputs. With a bias the regression is on centred inputs and the bias absorbs the mean of
    the error (the shift a truncated layer upstream leaves after a ReLU / GELU). Deterministic:
    same graph, batches and factors give the same result."""
    overrides = dict(overrides or {})
    targets = [n for n in gm.graph.nodes if n.meta.get(LAYER_META) in factors
               and op_type(n) in ("linear", "conv2d")]
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    orig_env: list[dict | None] = [None] * len(batches)
    new_env: list[dict | None] = [None] * len(batches)
    for node in targets:
        name = node.meta[LAYER_META]
        v0, u0 = factors[name]
        weight = get_attr(gm, node.args[1].target).detach()
        w = weight.double().reshape(weight.shape[0], -1)
        if w.shape[1] != v0.shape[1]:
            raise ValueError(f"factors of {name} do not match its weight")
        bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = None if bias_node is None else get_attr(gm, bias_node.target).detach().double()
        op = op_type(node)
        n = w.shape[1]
        c = torch.zeros(n, n, dtype=torch.float64)
        d = torch.zeros(n, n, dtype=torch.float64)
        sx = torch.zeros(n, dtype=torch.float64)
        st = torch.zeros(n, dtype=torch.float64)
        rows = 0
        fourth = 0.0
        with torch.no_grad():
            for i, batch in enumerate(batches):
                x, orig_env[i] = _advance(gm, batch, orig_env[i], {}, node)
                xt, new_env[i] = _advance(gm, batch, new_env[i], overrides, node)
                x, xt = _rows(x, op), _rows(xt, op)
                c += xt.T @ xt
                d += x.T @ xt
                sx += x.sum(0)
                st += xt.sum(0)
                fourth += float((xt * xt).sum(1).square().sum())
                rows += x.shape[0]
        rows = max(rows, 1)
        mx, mt = sx / rows, st / rows
        # the regression's inputs are few rows for many features: the covariance is shrunk and
        # the ridge raised by the same Ledoit-Wolf intensity (see `shrinkage`)
        rho = shrinkage(c / rows, rows, fourth)
        if bias is not None:
            # centred second moments: the bias takes the means, the factors the rest
            c = c - rows * torch.outer(mt, mt)
            d = d - rows * torch.outer(mx, mt)
        d0 = damp.get(name, REFIT_DAMP) if isinstance(damp, Mapping) else damp
        lam = max(d0, rho / max(1 - rho, 1e-6)) * float(c.diagonal().mean().clamp_min(1e-30))
        eye = torch.eye(n, dtype=torch.float64)
        # B = W (D + l I)(C + l I)^-1: C + l I is symmetric positive definite, so Cholesky
        # (a third of a general solve's cost on BERT-base's 3072-wide FFN inputs)
        chol, info = torch.linalg.cholesky_ex(c + lam * eye)
        rhs = (w @ (d + lam * eye)).T
        if int(info) == 0:
            b = torch.cholesky_solve(rhs, chol).T
        else:  # round-off made it indefinite: the general solve still has an answer
            b = torch.linalg.solve(c + lam * eye, rhs).T
        rank = v0.shape[0]
        dec = decompose(b, shrunk(c / rows, rho), aware=True, max_rank=rank, seed=seed)
        v, u = dec.factors(rank)
        new_bias = None
        if bias is not None:
            new_bias = (bias + w @ mx - u.double() @ (v.double() @ mt)).float()
        out[name] = (v, u, new_bias)
        eff = (u @ v).reshape(u.shape[0], *weight.shape[1:])
        overrides[node.name] = _effective(node, eff, new_bias)
    return out
