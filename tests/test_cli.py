"""The `fxcompress` command line: end to end in a subprocess, bad inputs included (exit code 2,
a message saying what to fix, nothing written)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

from fxcompress import cli

ex = sys.modules["fxcompress.export"]
ROOT = Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = _model()
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO},), strict=False)
    torch.export.save(ep, d / "model.pt2")
    torch.save(torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(1)), d / "cal.pt")
    torch.save(torch.randn(96, 1, 7, 7), d / "badcal.pt")
    torch.save([_Evil()], d / "evilcal.pt")
    torch.save(model, d / "pickled.pt2")  # a whole pickled module, not a saved program
    (d / "notes.pt2").write_text("not a program")
    return d, model


def _run(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "fxcompress", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def compiled(files):
    """`fxcompress compile model.pt2 ... -o out.pt2 --json`, run once: (rc, stdout, stderr)."""
    d, _ = files
    return _wait(_run(["compile", "model.pt2", "--profile", "mobile-arm",
                       "--calibration", "cal.pt", "--tolerance", "0.05",
                       "--techniques", "int8", "-o", "out.pt2", "--json"], d))


def test_compile_then_report_end_to_end(files, compiled):
    d, model = files
    rc, out, err = compiled
    assert rc == 0, err
    result = json.loads(out)  # stdout is only the JSON; progress went to stderr
    assert "compiling" in err
    written = result["output"]
    assert written["format"] == ".pt2" and written["size_bytes"] == (d / "out.pt2").stat().st_size
    assert written["check_error"] < 1e-3
    report = result["report"]
    assert report["profile"] == "mobile-arm" and 0 < report["error"] <= 0.05
    # cal.pt's 96 examples are two batches (64, 32): the second is held out to judge on
    assert "1 batch of calibration held out (32 examples)" in report["accepted_on"]
    assert any(lay["applied"].startswith("int8") for lay in report["layers"])
    assert report["serialized_bytes_after"] < 0.5 * report["serialized_bytes_before"]
    # the written program is the compressed model: within tolerance of the original
    small = ex.load_program(d / "out.pt2").module()
    cal = torch.load(d / "cal.pt", weights_only=True)
    with torch.no_grad():
        assert float((small(cal) - model(cal)).norm() / model(cal).norm()) <= 0.05
    rc, out, err = _wait(_run(["report", "out.pt2", "--json"], d))
    assert rc == 0, err
    assert json.loads(out) == report


def test_report_prints_the_table(files, compiled, monkeypatch, capsys):
    d, _ = files
    assert compiled[0] == 0, compiled[2]
    monkeypatch.chdir(d)
    assert cli.main(["report", "out.pt2"]) == 0
    out = capsys.readouterr().out
    assert "fxcompress report — profile mobile-arm" in out and "int8" in out


def test_bad_inputs_exit_2_and_write_nothing(files):
    d, _ = files
    # two in a subprocess (the exit code as a shell sees it); the rest in process below
    cases = {
        "pickle": (["compile", "pickled.pt2", "-o", "o1.pt2"], "pickle"),
        "unsafe calibration": (["compile", "model.pt2", "--calibration", "evilcal.pt",
                                "-o", "o2.pt2"], "does not unpickle"),
    }
    procs = {name: _run(args, d) for name, (args, _) in cases.items()}  # in parallel
    for name, proc in procs.items():
        rc, out, err = _wait(proc)
        assert rc == 2, (name, err)
        assert cases[name][1] in err, (name, err)
        assert "Traceback" not in err, name
    assert not any((d / f"o{i}.pt2").exists() for i in range(1, 3))
    assert not (d / "pwned").exists()


@pytest.mark.parametrize("args, message", [
    (["compile", "nope.pt2", "-o", "o.pt2"], "does not exist"),
    (["compile", "notes.pt2", "-o", "o.pt2"], "not a saved program"),
    (["compile", "model.pt2", "--calibration", "badcal.pt", "-o", "o.pt2"],
     "only the batch dimension"),
    (["compile", "model.pt2", "-o", "out.tflite"], "suffix"),
    (["compile", "model.pt2", "-o", "nofolder/out.pt2"], "does not exist"),
    (["compile", "model.pt2", "--profile", "tpu9000", "-o", "o.pt2"], "unknown profile"),
    (["compile", "model.pt2", "--tolerance", "-0.5", "-o", "o.pt2"], "out of range"),
    (["compile", "model.pt2", "--techniques", "magic", "-o", "o.pt2"], "unknown technique"),
    (["compile", "model.pt2", "--holdout", "1.5", "-o", "o.pt2"], "holdout must be a share"),
    (["compile", "model.pt2", "--calibration", "notes.pt2", "-o", "o.pt2"], "torch.save"),
    (["report", "model.pt2"], "carries no fxcompress report"),
    (["report", "gone.pt2"], "does not exist"),
    (["sweep", "model.pt2", "--tolerances", "0.01,x"], "comma-separated"),
    (["sweep", "model.pt2", "--plot", "sweep.svg"], ".png"),
    (["frobnicate"], "invalid choice"),
])
def test_user_mistakes_in_process(files, monkeypatch, capsys, args, message):
    d, _ = files
    monkeypatch.chdir(d)
    before = sorted(p.name for p in d.iterdir())
    assert cli.main([*args, "--json"] if args[0] != "frobnicate" else args) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    if args[0] != "frobnicate":
        assert message in json.loads(captured.out.strip().splitlines()[-1])["error"]
    assert sorted(p.name for p in d.iterdir()) == before


def test_profiles_lists_every_builtin(capsys):
    import fxcompress

    assert cli.main(["profiles", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == fxcompress.list_profiles()
    mobile = next(r for r in rows if r["name"] == "mobile-arm")
    assert mobile["delegate"] == "xnnpack" and mobile["export_format"] == ".pte"


def test_sweep_table_and_plot(files, monkeypatch, capsys):
    d, _ = files
    monkeypatch.chdir(d)
    code = cli.main(["sweep", "model.pt2", "--calibration", "cal.pt", "--techniques", "int8",
                     "--tolerances", "0.05,0.0001", "--plot", "sweep.png", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [r["tolerance"] for r in rows] == [0.0001, 0.05]
    assert all(r["error"] <= r["tolerance"] for r in rows)
    # a looser tolerance buys a smaller file and a lower estimated latency
    assert rows[1]["bytes"] < rows[0]["bytes"] and rows[1]["latency_us"] < rows[0]["latency_us"]
    assert (d / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = cli.main(["sweep", "model.pt2", "--calibration", "cal.pt", "--techniques", "int8",
                     "--tolerances", "0.05", "--plot", "none"])
    assert code == 0
    table = capsys.readouterr().out
    assert "tolerance" in table and "0.05" in table and "size ×" in table


def test_demo_is_wired_to_fxcompress_demo(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "--help"])
    assert stop.value.code == 0
    assert "--profile" in capsys.readouterr().out
