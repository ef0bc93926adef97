"""`fxcompress demo`: a clear message where its extra is missing, the target's own (.pte)
figure where the target runs a .pte, progress on standard error."""

from __future__ import annotations

import re
import sys

import pytest

import fxcompress
from benchmarks.models import load_pretrained
from fxcompress import cli, demo
from fxcompress.errors import FxCompressError


def test_missing_scikit_learn_names_the_demo_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` now fails
    with pytest.raises(FxCompressError, match=r"pip install 'fxcompress\[demo\]'"):
        demo.run("mobile-arm")


def test_missing_scikit_learn_is_a_clean_cli_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert cli.main(["demo"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "fxcompress: error:" in err and "fxcompress[demo]" in err
    assert "Traceback" not in err


def test_missing_executorch_names_the_demo_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)
    note = demo.pte_unavailable(fxcompress.load_profile("mobile-arm"))
    assert note is not None and "pip install 'fxcompress[demo]'" in note


def test_progress_lines_carry_elapsed_seconds(capsys):
    demo.stderr_progress()("measuring 41 candidates")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(r"\[\s*\d+\.\d s\] measuring 41 candidates\n", captured.err)


def _result(**pte) -> dict:
    base = {"model": "digits_cnn", "profile": "mobile-arm", "tolerance": 0.02,
            "accuracy_before": 99.3, "accuracy_after": 99.1, "bytes_before": 1000,
            "bytes_after": 250, "latency_ratio": 1.3, "compile_seconds": 5.0, "batch": 64,
            "pte_latency_ratio": None, "pte_bytes_before": None, "pte_bytes_after": None,
            "pte_note": None}
    return base | pte


def test_pte_target_prints_the_pte_figure_as_the_targets():
    prof = fxcompress.load_profile("mobile-arm")
    lines = demo.figures(_result(pte_latency_ratio=0.25, pte_bytes_before=900,
                                 pte_bytes_after=200), prof)
    text = "\n".join(lines)
    assert ".pte latency     0.250× of the original .pte (ExecuTorch + XNNPACK, batch 64" in text
    assert ".pte size        900 B → 200 B" in text
    assert "mobile-arm runs the .pte (executorch-xnnpack): the .pte figure is the target's" in text


def test_pte_target_without_executorch_says_what_to_install():
    prof = fxcompress.load_profile("mobile-arm")
    note = "the ExecuTorch runtime is not installed: pip install 'fxcompress[demo]'"
    text = "\n".join(demo.figures(_result(pte_note=note), prof))
    assert "eager latency    1.300×" in text
    assert ".pte latency     not measured: the ExecuTorch runtime is not installed: " \
           "pip install 'fxcompress[demo]'" in text


def test_other_targets_keep_eager_and_name_their_runtime():
    prof = fxcompress.load_profile("x86-server")
    text = "\n".join(demo.figures(_result(profile="x86-server"), prof))
    assert ".pte" not in text
    assert "x86-server runs its .pt2 under inductor" in text


def test_run_times_both_pte_files_for_a_pte_target():
    pytest.importorskip("executorch.runtime")
    lines = []
    r = demo.run("mobile-arm", model_name="digits_mlp", techniques=["int8"], runs=3,
                 progress=lines.append, model=load_pretrained("digits_mlp"))
    assert r["export_format"] == ".pte" and r["pte_note"] is None
    assert r["pte_latency_ratio"] > 0
    assert 0 < r["pte_bytes_after"] < r["pte_bytes_before"]  # int8 weights: a smaller file
    assert any(line.startswith("measuring ") for line in lines)  # compile's own progress
    assert any("writing the original model as .pte" in line for line in lines)


def test_run_without_executorch_measures_eager_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)
    r = demo.run("mobile-arm", model_name="digits_mlp", techniques=["int8"], runs=3,
                 model=load_pretrained("digits_mlp"))
    assert r["latency_ratio"] > 0
    assert r["pte_latency_ratio"] is None and r["pte_bytes_before"] is None
    assert "fxcompress[demo]" in r["pte_note"]


def test_the_demo_ships_only_the_digits_cnn():
    with pytest.raises(FxCompressError, match="model="):
        demo.run("mobile-arm", model_name="digits_mlp")
