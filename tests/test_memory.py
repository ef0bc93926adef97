"""What a compile holds: layers reading one input share its covariance, int8 / intx candidates
keep codes rather than float weights, and a program's size is counted without holding its
bytes. These keep a block's compile within `fxcompress.blocks.MEMORY_FACTOR`."""

import io

import torch
from torch import nn

from fxcompress.api import prepare, serialized_size
from fxcompress.export.pt2 import save_program
from fxcompress.passes.int8 import dequantize_per_channel
from fxcompress.passes.intx.quant import dequantize


class _Attention(nn.Module):
    """Three projections of one input (q / k / v), then one of their mix."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.o = nn.Linear(64, 64)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)) * self.k(x) + self.v(x))


def _prepared(techniques):
    torch.manual_seed(0)
    model = _Attention().eval()
    g = torch.Generator().manual_seed(1)
    cal = [(torch.randn(8, 16, 64, generator=g),) for _ in range(3)]
    return model, cal, prepare(model, cal[0], profile="mobile-arm", calibration=cal,
                               techniques=techniques, holdout=0)


def test_layers_reading_one_input_share_its_covariance():
    model, cal, prep = _prepared(["int8"])
    stats = {o.layer.name: prep.calib.stats[o.layer.node] for o in prep.options}
    assert stats["q"].moment is stats["k"].moment is stats["v"].moment
    assert stats["o"].moment is not stats["q"].moment
    assert stats["q"].moment.dtype == torch.float32  # kept at half the bytes
    rows = torch.cat([x.reshape(-1, 64) for (x,) in cal]).double()
    want = rows.T @ rows / rows.shape[0]
    cov = stats["q"].covariance
    assert cov.dtype == torch.float64 and torch.equal(cov, want.float().double())
    # one float64 tensor while it is held, for every layer reading that input
    assert stats["k"].covariance is cov and stats["q"].covariance is cov
    assert stats["k"].rows == stats["q"].rows == rows.shape[0]
    # outputs stay each layer's own
    assert stats["q"].out_max != stats["v"].out_max


def test_int8_and_intx_candidates_keep_codes_not_float_weights():
    _, cal, prep = _prepared(["int8", "intx"])
    seen = set()
    for opt in prep.options:
        for c in opt.candidates:
            step = c.steps[0]
            assert step.weight.device.type == "meta"  # no values held
            w = step.dense()
            assert w.shape == opt.base.steps[0].weight.shape and w.device.type == "cpu"
            if c.technique == "intx":
                part = c.part("intx")
                assert torch.equal(w, dequantize(part.q, part.scale, part.group_size))
            else:
                assert torch.equal(w, dequantize_per_channel(step.decode.q, step.decode.scale))
            seen.add(c.technique)
            # the simulation runs the decoded weight: the candidate's output on a batch
            out = c.simulation()[opt.layer.node]((cal[0][0],), {})
            assert out.shape == (8, 16, 64) and torch.isfinite(out).all()
    assert seen == {"int8", "intx"}


def test_program_size_is_the_written_files(tmp_path):
    model = _Attention().eval()
    ep = torch.export.export(model, (torch.randn(2, 16, 64),))
    traces = [n.meta.get("stack_trace") for n in ep.graph.nodes]
    size = serialized_size(ep)
    assert ep.example_inputs is not None  # put back
    assert [n.meta.get("stack_trace") for n in ep.graph.nodes] == traces  # and the metadata
    ep.example_inputs = None  # serialized_size leaves them out
    save_program(ep, tmp_path / "archive.pt2")
    assert size == (tmp_path / "archive.pt2").stat().st_size
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    # the weights (4 x 64 x 64 floats) stay; the program's JSON is deflated
    assert 4 * 64 * 64 * 4 < size < buf.getbuffer().nbytes
