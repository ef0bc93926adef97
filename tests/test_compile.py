"""fxcompress.compile end to end on small models: the public contract (README.md, "Use")."""

import copy
import json

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import FxCompressError
from fxcompress.acceptance import DEFAULT_HOLDOUT, split_batches


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


X = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
CAL = [(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(3)]


@pytest.fixture(scope="module")
def compiled():
    m = _model()
    state = copy.deepcopy(m.state_dict())
    small = fxcompress.compile(m, (X,), profile="mobile-arm", calibration=CAL, tolerance=0.02)
    return m, state, small


def test_result_is_a_graph_module_within_tolerance(compiled):
    m, _, small = compiled
    assert isinstance(small, torch.fx.GraphModule)
    small.graph.lint()
    report = small.meta["fxcompress_report"]
    assert 0 < report.error <= 0.02
    # the measured error is the real one: recompute it on the held-out calibration batch
    # (the middle one of three), which is what plans are judged on
    _, held = split_batches(CAL, DEFAULT_HOLDOUT)
    assert held == [CAL[1]]
    with torch.no_grad():
        num = sum(float(((small(x) - m(x)) ** 2).sum()) for (x,) in held)
        den = sum(float((m(x) ** 2).sum()) for (x,) in held)
    assert abs((num / den) ** 0.5 - report.error) < 1e-4
    # and it was accepted on the upper end of its interval
    low, high = report.error_interval
    assert low <= report.error <= high <= 0.02
    assert "held out" in report.accepted_on
    assert report.serialized_bytes_after < report.serialized_bytes_before


def test_input_model_is_bit_for_bit_unchanged(compiled):
    m, state, _ = compiled
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(isinstance(x, torch.fx.GraphModule) for x in m.modules())


def test_result_exports_and_takes_any_batch(compiled):
    _, _, small = compiled
    ep = torch.export.export(small, (X,))
    torch.testing.assert_close(ep.module()(X), small(X))
    dyn = torch.export.export(small, (X,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for n in (1, 3, 32):
        assert dyn.module()(torch.randn(n, 1, 8, 8)).shape == (n, 10)
        assert small(torch.randn(n, 1, 8, 8)).shape == (n, 10)


def test_report_covers_every_layer_and_round_trips(compiled):
    _, _, small = compiled
    report = small.meta["fxcompress_report"]
    # per-layer entries, then one entry per dependency group for pruning ("prune[...]")
    assert [lay.name for lay in report.layers if not lay.name.startswith("prune[")] == \
        ["0", "3", "5"]
    for lay in report.layers:
        assert lay.reason, f"layer {lay.name} has no reason"
        assert lay.candidates, f"layer {lay.name} lists no candidates"
    assert any(lay.applied != "none" for lay in report.layers)
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    again = fxcompress.Report.from_dict(data)
    assert str(again) == str(report)
    text = str(report)
    assert "serialized size" in text and "mobile-arm" in text


def test_same_inputs_and_seed_give_the_same_model_and_report(compiled):
    _, _, small = compiled
    again = fxcompress.compile(_model(), (X,), profile="mobile-arm", calibration=CAL,
                               tolerance=0.02)
    a, b = small.meta["fxcompress_report"].to_dict(), again.meta["fxcompress_report"].to_dict()
    for timing in ("compile_seconds", "phase_seconds"):  # wall time is not an input
        a.pop(timing), b.pop(timing)
    for r in (a, b):  # nor is how many cores the machine's load left free (the note says)
        r["notes"] = [n for n in r["notes"] if not n.startswith("compiled with")]
    assert a == b
    sa, sb = small.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_looser_tolerance_never_gives_a_bigger_model():
    sizes = []
    for tol in (0.002, 0.02, 0.2):
        out = fxcompress.compile(_model(), (X,), profile="mobile-arm", calibration=CAL,
                                 tolerance=tol, objective="size")
        rep = out.meta["fxcompress_report"]
        assert rep.error <= tol
        sizes.append(rep.serialized_bytes_after)
    assert sizes[0] >= sizes[1] >= sizes[2]


def test_techniques_restrict_what_is_applied():
    out = fxcompress.compile(_model(), (X,), profile="mobile-arm", calibration=CAL,
                             tolerance=0.05, techniques=["int8"])
    applied = {lay.applied.split("(")[0] for lay in out.meta["fxcompress_report"].layers}
    assert applied <= {"int8", "none"} and "int8" in applied
    weights = [b for b in out.buffers() if b.dtype == torch.int8]
    assert weights, "int8 weights are stored as int8"


# --- user errors: one documented type, the fix in the message --------------------------------

def test_unknown_profile():
    with pytest.raises(FxCompressError, match="unknown profile 'phone'.*use one of"):
        fxcompress.compile(_model(), (X,), profile="phone")


def test_malformed_profile_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('name = "x"\ndescription = "y"\n[backend]\nruntime = 3\n')
    with pytest.raises(FxCompressError, match="'backend.runtime' has type int; give a str"):
        fxcompress.compile(_model(), (X,), profile=str(f))


def test_uncapturable_model():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(FxCompressError, match="could not capture"):
        fxcompress.compile(Branchy(), (torch.randn(4),))


@pytest.mark.parametrize("cal,match", [
    ([(torch.randn(4, 1, 9, 9),)], r"shape \(4, 1, 9, 9\).*only the batch dimension"),
    ([(torch.randn(4, 1, 8, 8), torch.randn(2))], "has 2 inputs, example_inputs has 1"),
    ([(torch.randn(4, 1, 8, 8).double(),)], "torch.float64"),
    ([], "calibration is empty"),
    (torch.randn(4, 1, 8, 8), "not a tensor"),
])
def test_calibration_that_does_not_match(cal, match):
    with pytest.raises(FxCompressError, match=match):
        fxcompress.compile(_model(), (X,), calibration=cal)


@pytest.mark.parametrize("tol", [-0.1, float("nan"), float("inf"), "0.01"])
def test_tolerance_out_of_range(tol):
    with pytest.raises(FxCompressError, match="tolerance"):
        fxcompress.compile(_model(), (X,), tolerance=tol)


def test_technique_the_profile_cannot_run():
    with pytest.raises(FxCompressError, match="'binary' cannot run on mobile-arm.*drop it"):
        fxcompress.compile(_model(), (X,), profile="mobile-arm", techniques=["binary"])


def test_unknown_technique():
    with pytest.raises(FxCompressError, match="unknown technique 'magic'"):
        fxcompress.compile(_model(), (X,), techniques=["magic"])


def test_missing_example_inputs():
    with pytest.raises(FxCompressError, match="example_inputs is required"):
        fxcompress.compile(_model())


def test_eval_is_a_no_op_and_train_says_what_to_do(compiled):
    _, _, small = compiled
    assert small.eval() is small
    assert not small.training  # save-and-restore of the mode (model.train(was_training)) works
    small.train(False)
    with pytest.raises(FxCompressError, match="captured for inference.*recover="):
        small.train()
