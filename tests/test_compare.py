"""benchmarks/compare.py: the Torch-Pruning ratio search and the verdicts, on tiny inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"


def _compare():
    spec = importlib.util.spec_from_file_location("bench_compare", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    x = torch.randn(96, 8)
    with torch.no_grad():
        y = model(x).argmax(-1)  # labels the model gets right: 100 % calibration accuracy
    return model, x, y


def test_pruning_search_respects_the_accuracy_budget():
    pytest.importorskip("torch_pruning")
    cmp = _compare()
    model, x, y = _tiny()
    n0 = sum(p.numel() for p in model.parameters())
    # an unlimited budget takes the largest ratio, and the hidden layer really shrinks
    ratio, pruned = cmp.tp_search(model, x[:4], x, y, budget=100.0)
    assert ratio == pytest.approx(0.9)
    assert pruned[0].out_features < 64 and pruned[2].in_features == pruned[0].out_features
    assert sum(p.numel() for p in pruned.parameters()) < 0.3 * n0
    assert pruned(x).shape == (96, 3)
    # a budget nothing can meet keeps the model itself
    ratio, kept = cmp.tp_search(model, x[:4], x, y, budget=-1.0)
    assert ratio == 0.0
    assert torch.equal(kept(x), model(x))
    assert model[0].out_features == 64  # the input model is never modified


def test_verdicts_and_table_say_where_fxcompress_loses(tmp_path):
    cmp = _compare()
    rows = [
        cmp.Row("m", "fp32 eager (baseline)", accuracy=90.0, size=1000, eager_ratio=1.0),
        cmp.Row("m", "peer small", accuracy=91.0, size=200, eager_ratio=0.5),
        cmp.Row("m", "peer big", accuracy=85.0, size=800, eager_ratio=0.9),
        cmp.Row("m", "fxcompress p", accuracy=89.0, size=400, eager_ratio=0.7, peer=False),
    ]
    (v,) = cmp.verdicts(rows)
    assert "larger than peer small (200 B, 91.00 %, ×2.00)" in v
    assert "peer big" not in v.split(";")[0]
    assert "slower than peer small (0.50×)" in v
    text = cmp.write_markdown(rows, runs=3, seconds=60, path=tmp_path / "B.md", plot=None)
    assert (tmp_path / "B.md").read_text() == text
    assert "| m | fxcompress p | .pt2 | 89.00 | 400 | 0.400 | 0.70 | — |" in text


def test_files_are_compared_with_the_fp32_file_of_their_format(tmp_path):
    cmp = _compare()
    rows = [
        cmp.Row("m", "fp32 eager (baseline)", accuracy=90.0, size=1000, eager_ratio=1.0),
        cmp.Row("m", "fp32 → .onnx", fmt=".onnx", accuracy=90.0, size=800, lowered_ratio=1.0,
                runtime="onnxruntime"),
        cmp.Row("m", "peer", fmt=".onnx", accuracy=90.0, size=500, lowered_ratio=0.6,
                runtime="onnxruntime"),
        cmp.Row("m", "fxcompress p → .onnx", fmt=".onnx", accuracy=90.0, size=200,
                lowered_ratio=0.8, runtime="onnxruntime", peer=False),
    ]
    (v,) = cmp.verdicts(rows)
    assert "on ONNX Runtime (0.80×) slower than peer (0.60×)" in v and "eager" not in v
    text = cmp.write_markdown(rows, runs=3, seconds=60, path=tmp_path / "B.md", plot=None)
    assert "| fxcompress p → .onnx | .onnx | 90.00 | 200 | 0.250 | — | 0.80 | onnxruntime" in text


def test_onnx_rows_run_the_exported_file(tmp_path):
    pytest.importorskip("onnxruntime")
    cmp = _compare()
    model, x, y = _tiny()
    f = cmp.onnx_file(model, x[:cmp.BATCH], "x86-server")
    assert f.size > 4 * sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(f(x[:cmp.BATCH]), model(x[:cmp.BATCH]), rtol=1e-4, atol=1e-5)
    assert cmp.fixed_batch_accuracy(f, x, y) == 100.0  # the last, partial batch is padded
