"""binary: packing round-trips exactly, the graph computes α·sign(W) from packed bits, binary
activations where the profile runs them, 32x smaller weights, and export."""

from __future__ import annotations

import io

import pytest
import torch

import fxcompress
from fxcompress.capture import capture
from fxcompress.graph import find_layers
from fxcompress.passes.binary import (
    BinaryConfig,
    binary_pass,
    binary_weight,
    pack_bits,
    packed_bytes,
    unpack_bits,
)


class MLP(torch.nn.Module):
    def __init__(self, sizes=(64, 96, 80, 10)):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b)
                                          for a, b in zip(sizes, sizes[1:], strict=False))

    def forward(self, x):
        for i, lay in enumerate(self.layers):
            x = lay(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 24, 3, padding=1)
        self.dw = torch.nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.fc = torch.nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.dw(torch.relu(self.c2(x))))
        return self.fc(x.mean((2, 3)))


def _size(gm, args) -> int:
    buf = io.BytesIO()
    ep = torch.export.export(gm, tuple(a.clone() for a in args), strict=False)
    torch.export.save(ep, buf)
    return buf.getbuffer().nbytes


@pytest.mark.parametrize("shape", [(5, 8), (7, 13), (4, 3, 3, 3), (6, 1, 5, 5), (1, 1)])
def test_pack_round_trip_exact(shape):
    torch.manual_seed(0)
    bits = torch.randn(shape) >= 0
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == shape[0] * ((bits[0].numel() + 7) // 8)
    assert torch.equal(unpack_bits(packed, shape), bits)


def test_binary_pass_linear_and_conv_exact_to_its_decoding():
    torch.manual_seed(0)
    for model, x in ((MLP(), torch.randn(4, 64)), (ConvNet(), torch.randn(2, 3, 8, 8))):
        model.eval()
        gm = capture(model, (x,)).graph_module
        layers = find_layers(gm)
        res = binary_pass(gm, BinaryConfig({lay.name: None for lay in layers}))
        assert res.modified
        gm = res.graph_module
        gm.graph.lint()
        gm.recompile()
        assert not any(n.op == "get_attr" and n.target.endswith("weight")
                       for n in gm.graph.nodes)
        assert all(b.dtype == torch.uint8 for n, b in gm.named_buffers() if "signs" in n)
        # the graph computes exactly the reference α·sign(W) model
        ref = _reference(model)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.export.export(gm, (x,), strict=False)


def _reference(model):
    import copy

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            m.weight.data = binary_weight(m.weight.data)
    return ref


def test_binary_activations_two_levels():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(8, 64)
    gm = capture(model, (x,)).graph_module
    names = [lay.name for lay in find_layers(gm)]
    gm = binary_pass(gm, BinaryConfig({names[1]: (0.5, 0.25)})).graph_module
    gm.graph.lint()
    seen = {}
    lin = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default][1]

    def hook(mod, args, out):
        return out

    interp = torch.fx.Interpreter(gm)
    orig = interp.run_node

    def run_node(n):
        r = orig(n)
        if n is lin.args[0]:
            seen["x"] = r
        return r

    interp.run_node = run_node
    with torch.no_grad():
        interp.run(x)
    assert set(seen["x"].unique().tolist()) <= {0.25, 0.75}


def test_binary_mlp_size_is_about_1_32():
    torch.manual_seed(0)
    model, x = MLP((256, 512, 512, 256)).eval(), torch.randn(2, 256)
    gm = capture(model, (x,)).graph_module
    before = _size(gm, (x,))
    layers = find_layers(gm)
    out = binary_pass(gm, BinaryConfig({lay.name: None for lay in layers})).graph_module
    after = _size(out, (x,))
    weights = sum(packed_bytes(lay.weight_shape) for lay in layers)
    assert weights * 28 < sum(4 * lay.weight_numel for lay in layers)
    assert after < 0.08 * before  # biases and the program itself stay fp32 / text


def test_planner_offers_binary_on_fpga_and_keeps_first_last():
    torch.manual_seed(0)
    model = MLP((64, 128, 128, 128, 10)).eval()
    x = torch.randn(32, 64)
    out = fxcompress.compile(model, (x,), profile="fpga-binary", techniques=["binary"],
                             tolerance=0.9)
    rep = out.meta["fxcompress_report"]
    applied = [lay.applied for lay in rep.layers]
    assert applied[0] == "none" and applied[-1] == "none"
    assert any(a.startswith("binary") for a in applied[1:-1])
    with torch.no_grad():
        y0, y = model(x), out(x)
    assert abs(float((y - y0).norm() / y0.norm()) - rep.error) < 1e-4  # simulation == build
    torch.export.export(out, (x,), strict=False)


def test_binary_not_offered_where_profile_does_not_run_it():
    model = MLP().eval()
    with pytest.raises(fxcompress.FxCompressError, match="binary"):
        fxcompress.compile(model, (torch.randn(4, 64),), profile="x86-server",
                           techniques=["binary"])
