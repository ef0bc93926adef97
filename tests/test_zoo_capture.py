"""Every zoo model goes through `fxcompress.compile` on mobile-arm (pruning planned per
dependency group) and the result still runs, keeps its output shape and re-exports."""

import pytest
import torch

import fxcompress
from benchmarks.zoo import ZOO


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_compiles_and_reexports(name):
    model, x = ZOO[name]()
    # the time budget bounds candidate measurement on the larger zoo models (MobileNetV2 has
    # 17 blocks): the test is about capture and re-export, not about the best plan
    small = fxcompress.compile(model, x, profile="mobile-arm", tolerance=0.05,
                               techniques=["prune"], time_budget=5.0)
    small.graph.lint()
    report = small.meta["fxcompress_report"]
    assert report.error <= 0.05
    assert any(lay.name.startswith("prune[") for lay in report.layers)
    with torch.no_grad():
        ref, out = model(*x), small(*x)
    assert out.shape == ref.shape
    ep = torch.export.export(small, x, strict=False)
    with torch.no_grad():
        assert torch.allclose(ep.module()(*x), out, atol=1e-5)
