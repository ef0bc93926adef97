"""The pass contract and the pass manager.

A pass is a callable `pass_fn(graph_module, config) -> PassResult`: a function of a graph and a
frozen config dataclass, returning the (rewritten) graph module and whether it changed anything,
computed from what it did, never hard-coded. The manager runs passes in order, lints and
recompiles after each, and wraps a failure in `InternalError` naming the failing pass and the
passes that ran before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx

from fxcompress.errors import FxCompressError, InternalError


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the graph module and whether the pass changed it."""

    graph_module: fx.GraphModule
    modified: bool


PassFn = Callable[[fx.GraphModule, Any], PassResult]


def run_passes(gm: fx.GraphModule, passes: Sequence[tuple[str, PassFn, Any]]) -> PassResult:
    """Run `(name, pass_fn, config)` triples in order on `gm`; lint and recompile after each.

    Returns the final module and whether any pass modified it. A user error raised by a pass
    passes through; anything else becomes `InternalError` with the pass history."""
    history: list[str] = []
    modified = False
    for name, fn, config in passes:
        try:
            result = fn(gm, config)
            if not isinstance(result, PassResult):
                raise TypeError(f"pass returned {type(result).__name__}, not PassResult")
            gm = result.graph_module
            gm.graph.lint()
            gm.recompile()
        except FxCompressError:
            raise
        except Exception as e:
            before = ", ".join(history) or "none"
            raise InternalError(
                f"pass '{name}' failed ({type(e).__name__}: {e}); passes run before it: "
                f"{before}") from e
        history.append(name)
        modified = modified or result.modified
    return PassResult(gm, modified)
