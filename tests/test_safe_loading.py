"""Loading users' files runs nothing from them: `.pt2` programs (`fxcompress.export.load_program`,
`fxcompress compile`, `sweep`, `report`), stored reports and calibration files.

The attacks are built for real: a program saved with `torch.export.save`, its zip entries copied
into a new archive with one more entry, an example-inputs pickle whose `__reduce__` creates a
marker file, named so that it collides (in letter case, or exactly) with the real entry torch
reads. Plain `torch.export.load` runs such a payload (checked below, so the tests cannot pass
on a dead payload); fxcompress must refuse the file before anything is unpickled."""

import io
import json
import os
import pathlib
import re
import sys
import warnings
import zipfile

import pytest
import torch
from torch import nn
from torch.export import Dim

from fxcompress import FxCompressError, cli
from fxcompress.calibration import check_calibration

ex = sys.modules["fxcompress.export"]  # the module; `fxcompress.export` is the function
ROOT = pathlib.Path(__file__).resolve().parents[1]
X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))


class _Touch:
    """Unpickling this creates `marker`: a stand-in for `os.system(...)`."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _payload(marker: pathlib.Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_Touch(marker), buf)
    return buf.getvalue()


class _Reshape(nn.Module):
    """A dynamic batch and a reshape by half of it: symbolic shape expressions and guards."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).reshape(x.shape[0] // 2, -1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
    """A tiny program, saved as torch.export.save writes it."""
    d = tmp_path_factory.mktemp("safe")
    torch.manual_seed(0)
    ep = torch.export.export(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), (X,))
    torch.export.save(ep, d / "prog.pt2")
    return d / "prog.pt2"


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("dyn")
    ep = torch.export.export(_Reshape(), (X,), dynamic_shapes=({0: Dim.AUTO},))
    torch.export.save(ep, d / "dyn.pt2")
    return d / "dyn.pt2"


def _rebuild(src: pathlib.Path, dst: pathlib.Path, *, add=(), first=True, edit=None):
    """`src`'s entries copied into `dst` (through `edit(name, data)` when given), with the
    (name, data) pairs of `add` written before or after them."""
    with zipfile.ZipFile(src) as zin:
        items = [(i.filename, zin.read(i)) for i in zin.infolist()]
    if edit is not None:
        items = [(n, edit(n, data)) for n, data in items]
    items = [*add, *items] if first else [*items, *add]
    with warnings.catch_warnings(), zipfile.ZipFile(dst, "w") as zout:
        warnings.simplefilter("ignore")  # "Duplicate name": the point of some of these
        for name, data in items:
            zout.writestr(name, data)
    return dst


def _root(path: pathlib.Path) -> str:
    with zipfile.ZipFile(path) as z:
        return z.namelist()[0].split("/")[0]


def _edit_json(suffix: str, change):
    def edit(name, data):
        if not name.endswith(suffix):
            return data
        obj = json.loads(data)
        change(obj)
        return json.dumps(obj).encode()
    return edit


# name of the extra entry (relative to the archive's root), before the real ones?, message
ATTACKS = {
    "case-colliding folder": ("{root}/data/Sample_Inputs/model.pt", True, "letter case"),
    "case-colliding file": ("{root}/data/sample_inputs/MODEL.pt", True, "letter case"),
    "case-colliding root": ("{ROOT}/data/sample_inputs/model.pt", False, "letter case"),
    "duplicate, first": ("{root}/data/sample_inputs/model.pt", True, "2 entries named"),
    "duplicate, last": ("{root}/data/sample_inputs/model.pt", False, "2 entries named"),
}


def _attack(saved: pathlib.Path, dst: pathlib.Path, variant: str, marker: pathlib.Path):
    name, first, _ = ATTACKS[variant]
    root = _root(saved)
    name = name.format(root=root, ROOT=root.upper())
    return _rebuild(saved, dst, add=[(name, _payload(marker))], first=first)


# --- the payload and the attack are live ------------------------------------------------------
def test_payload_runs_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "sanity"
    with pytest.raises(Exception, match="(?i)unpickl|weights"):
        torch.load(io.BytesIO(_payload(marker)), weights_only=True)
    assert not marker.exists()
    torch.load(io.BytesIO(_payload(marker)), weights_only=False)
    assert marker.exists(), "the payload must be live, or the tests below prove nothing"


@pytest.mark.parametrize("variant", ["case-colliding folder", "duplicate, first"])
def test_plain_torch_export_load_runs_the_attack(saved, tmp_path, variant):
    """What fxcompress guards against: torch itself executes these archives."""
    marker = tmp_path / "plain"
    evil = _attack(saved, tmp_path / "evil.pt2", variant, marker)
    with pytest.raises(Exception):  # noqa: B017 - torch fails after running the payload
        torch.export.load(evil)
    if not marker.exists():
        pytest.skip(f"this torch ({torch.__version__}) no longer runs the {variant} attack")


# --- refused, with nothing run ------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(ATTACKS))
def test_load_program_refuses_colliding_entries(saved, tmp_path, variant):
    marker = tmp_path / "pwned"
    evil = _attack(saved, tmp_path / "evil.pt2", variant, marker)
    with pytest.raises(FxCompressError) as err:
        ex.load_program(evil)
    assert not marker.exists(), "the payload ran"
    assert ATTACKS[variant][2] in str(err.value)  # says what is wrong
    assert "torch.export.save" in str(err.value)  # and what to do
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # left as it was


@pytest.mark.parametrize("variant", list(ATTACKS))
def test_cli_compile_and_report_refuse_colliding_entries(saved, tmp_path, variant, capsys):
    marker = tmp_path / "pwned"
    evil = _attack(saved, tmp_path / "evil.pt2", variant, marker)
    out = tmp_path / "out.pt2"
    codes = [cli.main(["compile", str(evil), "-o", str(out)]), cli.main(["report", str(evil)]),
             cli.main(["sweep", str(evil), "--plot", "none", "--tolerances", "0.01"])]
    assert not marker.exists(), "the payload ran"
    assert codes == [2, 2, 2] and not out.exists()
    err = capsys.readouterr().err
    assert err.count(ATTACKS[variant][2]) == 3 and "Traceback" not in err


def test_the_original_still_loads_and_runs(saved, tmp_path):
    ep = ex.load_program(saved)
    torch.testing.assert_close(ep.module()(X), torch.export.load(saved).module()(X))
    assert ep.example_inputs is not None
    # the archive's root folder is the name it was saved under, whatever its characters
    for name in ["my model (1).pt2", "modèle.pt2", "a.b.pt2"]:
        torch.export.save(ep, tmp_path / name)
        torch.testing.assert_close(ex.load_program(tmp_path / name).module()(X), ep.module()(X))


@pytest.mark.parametrize("name, message", [
    ("{root}/data/aotinductor/model/model.so", "does not write"),
    ("{root}/data/constants/custom_obj_0", "does not write"),
    ("{root}/data/constants/opaque_obj_0", "does not write"),
    ("{root}/data/executorch/model.pte", "does not write"),
    ("{root}/models/other.json", "does not write"),
    ("{root}/extra/notes.txt", "does not write"),
    ("{root}/data/weights/model.pt", "legacy pickled"),
    ("{root}/../escape", "unsafe name"),
    ("/{root}/absolute", "unsafe name"),
    ("{root}/data//weight_0", "unsafe name"),
    ("{root}\\data\\x", "unsafe name"),
    ("{root}/data/sample_inputs/mödel.pt", "does not write"),
    ("{root}/data/sample_inputs/model.pt\x01", "unsafe name"),
    ("elsewhere/data/sample_inputs/model.pt", "outside its root"),
])
def test_entries_outside_the_saved_layout_are_refused(saved, tmp_path, name, message):
    marker = tmp_path / "pwned"
    evil = _rebuild(saved, tmp_path / "evil.pt2", first=False,
                    add=[(name.format(root=_root(saved)), _payload(marker))])
    with pytest.raises(FxCompressError, match=message):
        ex.load_program(evil)
    assert not marker.exists()


def test_pickled_weights_and_objects_are_refused(saved, tmp_path):
    def custom_obj(cfg):
        next(iter(cfg["config"].values()))["path_name"] = "custom_obj_0"

    def pickled(cfg):
        next(iter(cfg["config"].values()))["use_pickle"] = True

    for i, change in enumerate([custom_obj, pickled]):
        bad = _rebuild(saved, tmp_path / f"bad{i}.pt2",
                       edit=_edit_json("model_weights_config.json", change))
        with pytest.raises(FxCompressError, match="pickled object"):
            ex.load_program(bad)


def test_example_inputs_that_need_unpickling_are_refused(saved, tmp_path):
    """The single real entry replaced by the payload: torch.load(weights_only=True) refuses it,
    and so would torch's own load, which fxcompress forces to weights_only=True."""
    marker = tmp_path / "pwned"
    bad = _rebuild(saved, tmp_path / "bad.pt2", edit=lambda n, data: _payload(marker)
                   if n.endswith("data/sample_inputs/model.pt") else data)
    with pytest.raises(FxCompressError, match="not plain tensors"):
        ex.load_program(bad)
    assert not marker.exists()


def test_torch_loads_inside_load_program_cannot_unpickle(saved, tmp_path, monkeypatch):
    """The belt on top of the checks: if torch.export.load itself retried unsafely (as its
    example-inputs reader does), the retry is still weights_only."""
    marker = tmp_path / "pwned"

    def unsafe_load(f, **kwargs):
        return torch.load(io.BytesIO(_payload(marker)), weights_only=False)

    monkeypatch.setattr(torch.export, "load", unsafe_load)
    with pytest.raises(FxCompressError, match="could not be loaded"):
        ex.load_program(saved)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


# --- the graph's code-bearing strings -----------------------------------------------------------
def test_dynamic_programs_with_guards_load(dynamic):
    with zipfile.ZipFile(dynamic) as z:
        model = json.loads(z.read(f"{_root(dynamic)}/models/model.json"))
    assert model["guards_code"], "the fixture should carry guards"
    ep = ex.load_program(dynamic)
    assert ep.module()(X).shape == (3, 6)


def _set_first_expr(payload: str):
    def change(obj):
        stack = [obj]
        while stack:
            o = stack.pop()
            if isinstance(o, dict):
                if "expr_str" in o:
                    o["expr_str"] = payload
                    return
                stack.extend(o.values())
            elif isinstance(o, list):
                stack.extend(o)
        raise AssertionError("no shape expression to replace")
    return change


def _code(marker: pathlib.Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def test_shape_expression_code_is_refused(dynamic, tmp_path):
    plain, marker = tmp_path / "plain", tmp_path / "pwned"
    sane = _rebuild(dynamic, tmp_path / "sane.pt2",
                    edit=_edit_json("models/model.json", _set_first_expr(_code(plain))))
    try:  # plain torch evaluates it with sympy.sympify (an eval)
        torch.export.load(sane)
    except Exception:  # noqa: BLE001
        pass
    assert plain.exists(), "the expression must be live code for plain torch"
    bad = _rebuild(dynamic, tmp_path / "bad.pt2",
                   edit=_edit_json("models/model.json", _set_first_expr(_code(marker))))
    with pytest.raises(FxCompressError, match="shape expression"):
        ex.load_program(bad)
    assert not marker.exists()


def test_guard_code_is_refused(dynamic, tmp_path):
    plain, marker = tmp_path / "plain", tmp_path / "pwned"

    def add_guard(m):
        return lambda obj: obj["guards_code"].append(f"{_code(m)} is None")

    sane = _rebuild(dynamic, tmp_path / "sane.pt2",
                    edit=_edit_json("models/model.json", add_guard(plain)))
    try:  # plain torch exec's the guards into the module it builds, which runs them
        torch.export.load(sane).module()(X)
    except Exception:  # noqa: BLE001
        pass
    if not plain.exists():
        pytest.skip(f"this torch ({torch.__version__}) does not run guards_code")
    bad = _rebuild(dynamic, tmp_path / "bad.pt2",
                   edit=_edit_json("models/model.json", add_guard(marker)))
    with pytest.raises(FxCompressError, match="guards"):
        ex.load_program(bad)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["torch.os.system", "torch.ops.load_library",
                                    "torch.ops.aten.save.default",
                                    "torch.ops.aten.from_file.default",
                                    "torch.ops.higher_order.call_torchbind"])
def test_operators_outside_torch_ops_or_touching_files_are_refused(saved, tmp_path, target):
    def retarget(obj):
        obj["graph_module"]["graph"]["nodes"][0]["target"] = target

    bad = _rebuild(saved, tmp_path / "bad.pt2", edit=_edit_json("models/model.json", retarget))
    with pytest.raises(FxCompressError, match=re.escape(target)):
        ex.load_program(bad)


# --- the stored report --------------------------------------------------------------------------
@pytest.mark.parametrize("content, lib_message, cli_message", [
    ("{not json", "not valid JSON", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON", "not valid JSON"),
    ("[1, 2, 3]", "not an object", "not an object"),
    ('"a string"', "not an object", "not an object"),
    ('{"layers": 3}', None, "not one fxcompress wrote"),
    ('{"profile": "x"}', None, "not one fxcompress wrote"),
])
def test_a_corrupt_report_is_a_clear_error(saved, tmp_path, capsys, content, lib_message,
                                           cli_message):
    f = _rebuild(saved, tmp_path / "r.pt2", first=False,
                 add=[(f"{_root(saved)}/extra/fxcompress_report.json", content)])
    if lib_message is None:
        assert isinstance(ex.read_report(f), dict)  # an object: the CLI judges its fields
    else:
        with pytest.raises(FxCompressError, match=lib_message):
            ex.read_report(f)
    assert cli.main(["report", str(f)]) == 2
    err = capsys.readouterr().err
    assert cli_message in err and "re-export" in err and "Traceback" not in err


def test_a_stored_report_reads_back(tmp_path):
    ep = torch.export.export(nn.Linear(4, 3), (X,))
    f = tmp_path / "r.pt2"
    torch.export.save(ep, f, extra_files={"fxcompress_report.json": '{"profile": "p"}'})
    assert ex.read_report(f) == {"profile": "p"}
    torch.export.save(ep, f)
    assert ex.read_report(f) is None


# --- calibration files --------------------------------------------------------------------------
def _cal(tmp_path, obj) -> str:
    path = tmp_path / "cal.pt"
    torch.save(obj, path)
    return str(path)


def test_calibration_file_that_needs_unpickling_is_refused(saved, tmp_path, capsys):
    marker = tmp_path / "pwned"
    cal = _cal(tmp_path, [(_Touch(marker),)])
    out = tmp_path / "out.pt2"
    assert cli.main(["compile", str(saved), "--calibration", cal, "-o", str(out)]) == 2
    assert "does not unpickle" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()
    torch.load(cal, weights_only=False)  # sanity: the file is live
    assert marker.exists()


@pytest.mark.parametrize("content, message", [
    (lambda: [(torch.full((6, 4), float("nan")),)], "NaN"),
    (lambda: torch.cat([X, torch.tensor([[float("inf")] * 4] * 6)]), "infinite"),
    (lambda: [], "empty"),
    (lambda: [("text",)], "batch 0 holds str"),
    (lambda: [(X, {"a": X})], "batch 0 holds Tensor, dict"),
    (lambda: [()], "batch 0 holds nothing"),
    (lambda: {"x": X}, "holds dict"),
    (lambda: X.to_sparse(), "dense tensor"),
])
def test_calibration_content_is_checked(saved, tmp_path, capsys, content, message):
    out = tmp_path / "out.pt2"
    rc = cli.main(["compile", str(saved), "--calibration", _cal(tmp_path, content()),
                   "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_check_calibration_wants_finite_values():
    x = X.clone()
    x[0, 0] = float("nan")
    with pytest.raises(FxCompressError, match="1 NaN value.*nan_to_num"):
        check_calibration([(x,)], (X,))
    x[0, 0] = float("-inf")
    with pytest.raises(FxCompressError, match="1 infinite"):
        check_calibration([(x,)], (X,))
    # an input that is infinite by design (an additive mask) keeps its infinities
    assert check_calibration([(x,)], (x,))[0][0] is x
    assert check_calibration([(X.long(),)], (X.long(),))  # integers: nothing to check


def test_nothing_in_fxcompress_unpickles_unsafely():
    for path in (ROOT / "fxcompress").rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text, path
        assert not re.search(r"\bpickle\.loads?\(|\bUnpickler\(", text), path
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 1, m.end()
            while depth:  # to the parenthesis that closes the call
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            assert "weights_only=True" in text[m.start():end], (path, text[m.start():end])
