"""Graph-surgery helpers shared by the passes: inserting ops with valid `meta["val"]`."""

from __future__ import annotations

from typing import Any

from torch import fx

from fxcompress.graph import LAYER_META, fake_mode_of


def _val(a: Any):
    return a.meta.get("val") if isinstance(a, fx.Node) else a


def set_val(node: fx.Node) -> None:
    """Fill `node.meta["val"]` by running its op on its inputs' fake values."""
    args = fx.node.map_arg(node.args, _val)
    kwargs = fx.node.map_arg(node.kwargs, _val)
    mode = fake_mode_of(node.graph)
    if mode is None or node.op != "call_function":
        return
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def call(graph: fx.Graph, target, args: tuple, kwargs: dict | None = None,
         layer: str | None = None) -> fx.Node:
    """Insert `target(*args, **kwargs)` at the graph's current insertion point, tagged with
    `layer` and with a valid `meta["val"]`."""
    node = graph.call_function(target, args, kwargs or {})
    if layer is not None:
        node.meta[LAYER_META] = layer
    set_val(node)
    return node
