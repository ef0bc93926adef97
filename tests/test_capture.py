"""Capture: nn.Module, ExportedProgram and symbolic_trace GraphModule all become one IR."""

import pytest
import torch
from torch import fx, nn

from fxcompress.capture import capture
from fxcompress.errors import FxCompressError
from fxcompress.graph import find_layers


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


X = torch.randn(2, 3, 4, 4)


def _ops(gm):
    return sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def test_module_export_and_symbolic_trace_give_the_same_ir():
    torch.manual_seed(0)
    m = Small().eval()
    a = capture(m, (X,))
    b = capture(torch.export.export(m, (X,), strict=False), (X,))
    c = capture(fx.symbolic_trace(m), (X,))
    assert _ops(a.graph_module) == _ops(c.graph_module)
    assert "aten.linear.default" in _ops(b.graph_module)
    for cap in (a, b, c):
        torch.testing.assert_close(cap.graph_module(X), m(X))
    assert [lay.op for lay in find_layers(a.graph_module)] == ["conv2d", "linear"]
    assert [lay.name for lay in find_layers(c.graph_module)] == ["conv", "fc"]


def test_batch_is_dynamic_even_from_a_batch_of_one():
    m = Small().eval()
    cap = capture(m, (X[:1],))
    assert cap.dynamic_batch
    for n in (1, 3, 7):
        assert cap.graph_module(torch.randn(n, 3, 4, 4)).shape == (n, 5)


def test_static_batch_model_is_captured_and_says_so():
    class Fixed(nn.Module):
        def forward(self, x):
            return x.reshape(2, -1).sum(1)  # hard-codes the batch

    cap = capture(Fixed(), (torch.randn(2, 3),))
    assert not cap.dynamic_batch
    assert "static" in cap.note or "specialized" in cap.note


def test_a_dynamic_capture_that_fails_once_is_tried_again(monkeypatch):
    """A transient failure of the dynamic-batch export (seen under a profiler's sampling
    thread) must not turn into a static-batch model: it is tried a second time. A failure
    that repeats still falls back to a static batch, and says why."""
    import fxcompress.capture as cap_mod

    real, calls = cap_mod._export, []

    def flaky(model, inputs, dynamic_shapes):
        calls.append(dynamic_shapes is not None)
        if len(calls) == 1:
            raise RuntimeError("fake tensor in the exported program constant's list")
        return real(model, inputs, dynamic_shapes)

    monkeypatch.setattr(cap_mod, "_export", flaky)
    cap = capture(Small().eval(), (X,))
    assert cap.dynamic_batch and calls == [True, True]

    def broken(model, inputs, dynamic_shapes):
        calls.append(dynamic_shapes is not None)
        if dynamic_shapes is not None:
            raise RuntimeError("the model's own dynamic-shape failure")
        return real(model, inputs, dynamic_shapes)

    calls.clear()
    monkeypatch.setattr(cap_mod, "_export", broken)
    cap = capture(Small().eval(), (X,))
    assert not cap.dynamic_batch and calls == [True, True, False]
    assert "static batch" in cap.note and "own dynamic-shape failure" in cap.note


def test_uncapturable_model_names_the_failure():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a tensor value
                return x * 2
            return x

    with pytest.raises(FxCompressError, match="could not capture.*traceable"):
        capture(DataDependent(), (torch.randn(3),))


def test_capture_never_touches_the_model():
    m = Small()
    m.train()
    capture(m, (X,))
    assert m.training  # capture works on a copy, in eval mode


def test_transformers_bert_captures():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    cap = capture(model, (ids,))
    layers = find_layers(cap.graph_module)
    assert sum(lay.op == "linear" for lay in layers) >= 6
    assert any(lay.op == "embedding" for lay in layers)
    out = cap.graph_module(torch.randint(0, 100, (3, 8)))
    assert out.last_hidden_state.shape == (3, 8, 32)
