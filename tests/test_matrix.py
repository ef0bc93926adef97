"""A fast subset of the architecture matrix (`benchmarks/matrix.py`, the whole of it in
`benchmarks/results/zoo.md`), and what it found: shared weights (ALBERT), symbolic shapes
after pruning (BLOOM), matrix products that are layers (GPT-2's `Conv1D`, Falcon's `x @ W.T`),
plans that must not grow the file they shrink."""

import dataclasses

import pytest
import torch
from torch import nn

import fxcompress
from benchmarks.matrix import TOLERANCE, run_case
from fxcompress.capture import capture
from fxcompress.graph import find_layers
from fxcompress.hardware_profiles import load_profile

#: (architecture, profile): one of each family the matrix once failed or left uncompressed
SUBSET = [("albert", "mobile-arm"), ("bloom", "nvidia-gpu"), ("gpt2", "mcu-int8"),
          ("falcon", "x86-server"), ("bert", "apple-ane"), ("resnet", "fpga-binary")]


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


class DeadInput(nn.Module):
    """A classifier whose input is all zeros on the calibration data (a ReLU of negative
    features, as in a randomly initialised MobileNetV2): its observed range is empty."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(torch.relu(-x.abs()))


def test_an_empty_activation_range_keeps_runtime_biases_in_int32(tmp_path):
    """Runtimes quantize the bias at input scale x weight scale into int32: an input scale
    from an empty range (1e-8) overflowed it, and the .onnx computed garbage (MobileNetV2 and
    MobileViT on x86-server, their .pte on mobile-arm)."""
    from fxcompress.candidates import Step
    from fxcompress.passes.int8 import BIAS_INT32_LIMIT, bias_scale_floor
    from fxcompress.passes.int8.observers import MIN_SCALE, affine_qparams

    torch.manual_seed(0)
    model = DeadInput().eval()
    x = torch.randn(4, 16)
    int8_only = dataclasses.replace(load_profile("x86-server"), int8_required=True)
    small = fxcompress.compile(model, (x,), profile=int8_only, techniques=["int8"],
                               calibration=[(torch.randn(4, 16),) for _ in range(4)],
                               tolerance=0.05)
    assert small.meta["fxcompress_report"].layers[0].applied.startswith("int8")
    result = fxcompress.export(small, (x,), tmp_path / "m.onnx")
    assert result.check_error < 1e-3  # the file computes what the compiled model does
    scale, zp = affine_qparams(0.0, 0.0)
    assert scale >= MIN_SCALE and zp == -128
    w = model.fc.weight.detach().abs().amax(1) / 127
    floor = bias_scale_floor(Step("linear", model.fc.weight.detach(), model.fc.bias.detach()))
    assert float((model.fc.bias.abs() / (floor * w)).max()) <= BIAS_INT32_LIMIT * (1 + 1e-6)
