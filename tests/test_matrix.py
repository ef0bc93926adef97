"""A fast subset of the architecture matrix (`benchmarks/matrix.py`, the whole of it in
`benchmarks/results/zoo.md`), and what it found: shared weights (ALBERT), symbolic shapes
after pruning (BLOOM), matrix products that are layers (GPT-2's `Conv1D`, Falcon's `x @ W.T`),
plans that must not grow the file they shrink."""

import pytest
import torch
from torch import nn

import fxcompress
from benchmarks.matrix import TOLERANCE, run_case
from fxcompress.capture import capture
from fxcompress.graph import find_layers

#: (architecture, profile): one of each family the matrix once failed or left uncompressed
SUBSET = [("albert", "mobile-arm"), ("bloom", "nvidia-gpu"), ("gpt2", "mcu-int8"),
          ("falcon", "x86-server"), ("bert", "apple-ane"), ("mobilevit", "fpga-binary")]


@pytest.mark.parametrize("arch,profile", SUBSET)
def test_matrix_case_compiles(arch, profile):
    row = run_case(arch, profile, files=False)
    assert row["outcome"] == "ok", row.get("trace", row["message"])
    assert row["export"] == "ok"
    assert row["techniques"], "nothing applied"
    # the tolerance is judged on held-out calibration batches by a bootstrap bound; a batch
    # the calibration never saw stays near it
    assert row["unseen_error"] <= 2 * TOLERANCE
    if profile in ("apple-ane",):  # size objective, nothing required: the file shrinks
        assert row["size_ratio"] < 1.0


class MatmulLayers(nn.Module):
    """Weights used through matrix products rather than `F.linear`."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_in_out = nn.Parameter(torch.randn(16, 24, generator=g) / 4)  # Conv1D layout
        self.b = nn.Parameter(torch.randn(24, generator=g))
        self.w_out_in = nn.Parameter(torch.randn(8, 24, generator=g) / 5)  # x @ W.T
        self.w_mm = nn.Parameter(torch.randn(8, 8, generator=g) / 3)

    def forward(self, x):
        h = torch.addmm(self.b, x.view(-1, 16), self.w_in_out).view(*x.shape[:-1], 24)
        h = torch.relu(h) @ self.w_out_in.T
        return torch.mm(h.reshape(-1, 8), self.w_mm)


def test_matrix_products_become_linear_layers():
    model = MatmulLayers().eval()
    x = torch.randn(3, 5, 16)
    cap = capture(model, (x,))
    layers = {lay.name: lay.op for lay in find_layers(cap.graph_module)}
    assert layers == {"w_in_out": "linear", "w_out_in": "linear", "w_mm": "linear"}
    with torch.no_grad():
        assert torch.allclose(cap.graph_module(x), model(x), atol=1e-5)
    # the user's model keeps its own layout
    assert model.w_in_out.shape == (16, 24)
    small = fxcompress.compile(model, (x,), profile="x86-server",
                               calibration=[(torch.randn(3, 5, 16),) for _ in range(8)],
                               tolerance=0.05)
    applied = {lay.name: lay.applied for lay in small.meta["fxcompress_report"].layers}
    assert any(a != "none" for a in applied.values())
