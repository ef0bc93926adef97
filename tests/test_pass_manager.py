"""The pass contract: lint and recompile after each pass, errors name the pass history."""

import pytest
import torch
from torch import fx

from fxcompress.errors import FxCompressError, InternalError
from fxcompress.passes_infra import PassResult, run_passes


def _gm():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    return fx.symbolic_trace(M())


def _noop(gm, config):
    return PassResult(gm, False)


def _relu_to_sigmoid(gm, config):
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.relu:
            n.target = torch.sigmoid
            changed = True
    return PassResult(gm, changed)


def _breaks_graph(gm, config):
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    gm.graph.erase_node(x)  # still has users: a bug of the pass
    return PassResult(gm, True)


def test_modified_is_reported_and_code_recompiled():
    gm = _gm()
    res = run_passes(gm, [("noop", _noop, None)])
    assert res.modified is False
    res = run_passes(gm, [("noop", _noop, None), ("swap", _relu_to_sigmoid, None)])
    assert res.modified is True
    assert "sigmoid" in res.graph_module.code
    x = torch.randn(4)
    torch.testing.assert_close(res.graph_module(x), torch.sigmoid(x) + 1)
    # run again: nothing left to change, and the pass says so
    assert run_passes(res.graph_module, [("swap", _relu_to_sigmoid, None)]).modified is False


def test_failing_pass_is_named_with_history():
    with pytest.raises(InternalError, match="pass 'broken' failed.*before it: noop, swap"):
        run_passes(_gm(), [("noop", _noop, None), ("swap", _relu_to_sigmoid, None),
                           ("broken", _breaks_graph, None)])


def test_user_error_from_a_pass_passes_through():
    def user_mistake(gm, config):
        raise FxCompressError("bad setting; fix it")

    with pytest.raises(FxCompressError, match="fix it"):
        run_passes(_gm(), [("user", user_mistake, None)])
