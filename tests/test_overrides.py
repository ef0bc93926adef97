"""compile(overrides=...): per-layer settings, one precedence (global < op type < name pattern),
checked before any work, shown in the report."""

import copy
import json

import pytest
import torch

import fxcompress
from benchmarks.models import digits_data, load_pretrained
from fxcompress import FxCompressError, cli
from fxcompress.overrides import check_overrides, resolve

X, _ = digits_data("calib")
CAL = [(X[i:i + 32],) for i in range(0, len(X), 32)]
TECHS = ("svd", "prune", "share", "int8")


def _compile(overrides, profile="mobile-arm", tolerance=0.05, **kw):
    model = load_pretrained("digits_mlp")
    small = fxcompress.compile(model, (X[:8],), profile=profile, calibration=CAL,
                               tolerance=tolerance, overrides=overrides, **kw)
    return model, small, small.meta["fxcompress_report"]


def _layer(rep, name):
    return next(lay for lay in rep.layers if lay.name == name)


def test_precedence_global_then_op_type_then_name_patterns_in_order():
    o = check_overrides({"fc*": {"bits": 4}, "*": {"techniques": ["int8"], "bits": 8},
                         "op:linear": {"rank": 16}, "fc1": {"bits": 2, "skip": False}}, TECHS)
    s = resolve(o, "fc1", "linear")
    assert (s.techniques, s.rank, s.bits, s.skip) == (("int8",), 16, 2, False)
    assert s.keys == ("*", "op:linear", "fc*", "fc1")
    s2 = resolve(o, "fc2", "linear")
    assert s2.bits == 4 and s2.keys == ("*", "op:linear", "fc*")
    assert resolve(o, "emb", "embedding").rank is None  # op:linear does not select it
    assert resolve({}, "fc1", "linear").describe() == ""


def test_skip_leaves_the_layer_and_every_group_that_would_change_it():
    model, small, rep = _compile({"fc2": {"skip": True}})
    fc2 = _layer(rep, "fc2")
    assert fc2.applied == "none" and "skipped by overrides (fc2)" in fc2.reason
    # pruning fc1's outputs would change fc2's inputs: that group is dropped, with the reason
    group = _layer(rep, "prune[fc1]")
    assert group.applied == "none"
    assert any("overrides (fc2) keep from prune" in c.verdict for c in group.candidates)
    # fc2's weight is the original's, untouched
    tensors = list(small.parameters()) + list(small.buffers())
    assert any(t.shape == model.fc2.weight.shape and torch.equal(t, model.fc2.weight)
               for t in tensors)
    assert any("overrides['fc2'] (skip True) applied to fc2" in n for n in rep.notes)


def test_techniques_per_op_type_and_a_fixed_rank():
    _, _, rep = _compile({"*": {"techniques": ["svd"]}, "fc1": {"rank": 8}}, tolerance=0.5)
    fc1 = _layer(rep, "fc1")
    assert fc1.applied == "svd(rank=8, aware=True)"
    assert all(lay.applied.startswith(("svd", "none")) for lay in rep.layers)
    svd_ranks = {c.rewrite for c in fc1.candidates if c.rewrite.startswith("svd(")}
    assert svd_ranks == {"svd(rank=8, aware=True)"}  # the only rank offered


def test_bits_keep_only_that_width():
    _, _, rep = _compile({"*": {"bits": 4}}, profile="apple-ane", tolerance=0.5)
    for lay in rep.layers:
        if lay.params.get("bits") is not None:
            assert lay.params["bits"] == 4, lay.applied
        assert not any(c.verdict == "chosen" and "bits=2" in c.rewrite for c in lay.candidates)
    assert any(lay.params.get("bits") == 4 for lay in rep.layers)


@pytest.mark.parametrize("overrides, message", [
    ({"fc9": {"skip": True}}, "select no layer; the model's layers are fc1, fc2, fc3"),
    ({"fc1": {"skp": True}}, "unknown setting(s) 'skp'"),
    ({"fc1": {"skip": "yes"}}, "must be True or False"),
    ({"fc1": {"rank": 0}}, "must be a positive integer"),
    ({"fc1": {"bits": 16}}, "8 bits or fewer"),
    ({"fc1": {"techniques": ["binary"]}}, "which this compile does not run"),
    ({"op:lstm": {"skip": True}}, "unknown op type 'lstm'"),
    ({"fc1": True}, "must be a dict of settings"),
    (["fc1"], "must be a dict from layer pattern to settings"),
])
def test_malformed_overrides_are_user_errors(overrides, message):
    with pytest.raises(FxCompressError) as e:
        _compile(overrides)
    assert message in str(e.value)


def test_an_int8_only_target_refuses_to_skip_a_layer():
    with pytest.raises(FxCompressError, match="runs linear layers in int8 only"):
        _compile({"fc1": {"skip": True}}, profile="mcu-int8")


def test_the_input_model_and_overrides_are_not_modified():
    model = load_pretrained("digits_mlp")
    state = copy.deepcopy(model.state_dict())
    given = {"op:linear": {"techniques": ["int8"]}}
    fxcompress.compile(model, (X[:8],), calibration=CAL, overrides=given)
    assert given == {"op:linear": {"techniques": ["int8"]}}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_cli_reads_overrides_as_json(tmp_path, monkeypatch, capsys):
    model = load_pretrained("digits_mlp")
    ep = torch.export.export(model, (X[:8],), strict=False)
    torch.export.save(ep, tmp_path / "m.pt2")
    torch.save(X, tmp_path / "cal.pt")
    (tmp_path / "o.json").write_text(json.dumps({"fc3": {"skip": True}}))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compile", "m.pt2", "--calibration", "cal.pt", "--overrides", "o.json",
                     "-o", "out.pt2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["report"]
    assert next(lay for lay in rep["layers"] if lay["name"] == "fc3")["applied"] == "none"
    assert cli.main(["compile", "m.pt2", "--overrides", "{fc3: 1}", "-o", "o2.pt2"]) == 2
    assert "--overrides is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o2.pt2").exists()


# --- a technique's settings, per layer --------------------------------------------------------
def test_technique_settings_resolve_field_by_field_with_the_same_precedence():
    import fxcompress.passes  # noqa: F401  (registers the techniques)
    from fxcompress.technique import settings_of

    o = check_overrides({"*": {"svd": {"sequential_refit": False, "refit_damp": 0.1}},
                         "fc1": {"svd": {"refit_damp": 0.5}}}, TECHS)
    fc1 = settings_of("svd", resolve(o, "fc1", "linear"))
    fc2 = settings_of("svd", resolve(o, "fc2", "linear"))
    assert (fc1.sequential_refit, fc1.refit_damp) == (False, 0.5)
    assert (fc2.sequential_refit, fc2.refit_damp) == (False, 0.1)
    assert settings_of("svd", resolve({}, "fc1", "linear")).sequential_refit is True
    assert resolve(o, "fc1", "linear").describe() == "svd sequential_refit=False, refit_damp=0.5"


@pytest.mark.parametrize("overrides, message", [
    ({"*": {"svd": {"rank_ladder": [0.1]}}}, "unknown svd setting"),
    ({"*": {"svd": {"refit_damp": -1}}}, "refit_damp must be a number >= 0"),
    ({"*": {"prune": {"ratios": [1.5]}}}, "ratios must be a non-empty list of shares"),
    ({"*": {"int8": {"observer": "max"}}}, "observer must be one of"),
    ({"*": {"share": "4"}}, "must be a dict of share settings"),
    ({"*": {"fp64": {}}}, "a technique's name for its settings"),
])
def test_bad_technique_settings_are_user_errors_before_any_work(overrides, message):
    with pytest.raises(FxCompressError, match=message):
        check_overrides(overrides, TECHS)


def test_technique_settings_change_the_candidates_of_the_layers_they_select():
    from fxcompress.api import prepare

    model = load_pretrained("digits_mlp")
    kw = dict(profile="mobile-arm", calibration=CAL, techniques=["svd", "prune"])

    def ranks(prep, name):
        opt = next(o for o in prep.options if o.layer.name == name)
        return sorted(c.params["rank"] for c in opt.candidates if c.technique == "svd")

    def ratios(prep):
        return sorted(len(o.candidates) for o in prep.options if o.layer.name.startswith("prune["))

    base = prepare(model, (X[:8],), **kw)
    one = prepare(model, (X[:8],), overrides={"fc1": {"svd": {"local_error_ladder": [0.2]}},
                                              "*": {"prune": {"ratios": [0.5]}}}, **kw)
    assert len(ranks(base, "fc1")) > 1 and len(ranks(one, "fc1")) == 1
    assert ranks(one, "fc1")[0] in ranks(base, "fc1")
    assert ranks(one, "fc2") == ranks(base, "fc2")  # the pattern selects fc1 only
    assert max(ratios(one)) == 1 < max(ratios(base))  # one pruning ratio per group
