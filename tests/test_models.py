"""The trained models and data sets (`benchmarks.models`, the digits CNN and its data from
`fxcompress.demo.digits`): loading, accuracy, splits, and export with dynamic batch."""

from __future__ import annotations

import pytest
import torch

from benchmarks import models
from fxcompress.demo import digits

# Measured with the shipped weights (see benchmarks/train_models.py): CNN 99.3 %, MLP 98.2 %,
# transformer 78.8 %. The thresholds leave room for BLAS differences and, for the text task,
# for another Python version wording some stdlib docstrings differently.
THRESHOLDS = {"digits_cnn": 97.0, "digits_mlp": 95.0, "text_transformer": 74.0}
DATA = {
    "digits_cnn": models.digits_data,
    "digits_mlp": models.digits_data,
    "text_transformer": models.text_data,
}


@pytest.fixture(scope="module")
def pretrained() -> dict[str, torch.nn.Module]:
    """All three shipped models, loaded once (they must exist: no training in the tests)."""
    for name in models.MODEL_NAMES:
        assert models.weights_path(name).exists(), f"shipped weights of {name} are missing"
    return {name: models.load_pretrained(name) for name in models.MODEL_NAMES}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_pretrained_accuracy(pretrained: dict[str, torch.nn.Module], name: str) -> None:
    model = pretrained[name]
    assert not model.training
    x, y = DATA[name]("test")
    acc = models.accuracy(model, x, y)
    assert acc >= THRESHOLDS[name], f"{name}: test accuracy {acc:.2f} %"
    assert not model.training


def test_weight_files_are_small() -> None:
    for name in models.MODEL_NAMES:
        assert models.weights_path(name).stat().st_size < 8 * 2**20
    assert (models.WEIGHTS_DIR / "text_vocab.json").exists()


def test_the_package_ships_only_the_digits_cnn(pretrained: dict[str, torch.nn.Module]) -> None:
    """The demo's model loads from fxcompress itself, identical to the benchmarks' copy; the
    other weights live in benchmarks/weights/."""
    assert models.weights_path("digits_cnn") == digits.DIGITS_CNN_WEIGHTS
    assert sorted(p.name for p in digits.WEIGHTS_DIR.iterdir()) == ["digits_cnn.pt"]
    shipped = digits.load_digits_cnn().state_dict()
    ours = pretrained["digits_cnn"].state_dict()
    assert shipped.keys() == ours.keys()
    assert all(torch.equal(shipped[k], ours[k]) for k in shipped)
    assert models.digits_data is digits.digits_data


def test_parameter_counts(pretrained: dict[str, torch.nn.Module]) -> None:
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in pretrained.items()}
    assert 400_000 <= counts["digits_cnn"] <= 800_000
    assert counts["digits_mlp"] == 64 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10
    text = pretrained["text_transformer"]
    assert 1_000_000 <= counts["text_transformer"] <= 3_000_000
    assert text.token_embedding.weight.numel() >= 0.4 * counts["text_transformer"]


def test_digits_splits() -> None:
    parts = {s: models.digits_data(s) for s in models.SPLITS}
    assert [len(parts[s][1]) for s in models.SPLITS] == [1219, 128, 450]
    for x, y in parts.values():
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert set(y.tolist()) == set(range(10))
    # Disjoint and complete: scikit-learn's digits has duplicate-free rows per index, so
    # compare the index sets through the cached split.
    _, _, idx = models._digits_arrays()
    sets = [set(idx[s].tolist()) for s in models.SPLITS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(sets[0] | sets[1] | sets[2]) == 1797
    # Deterministic: a second call returns equal (fresh) tensors.
    x2, y2 = models.digits_data("test")
    assert torch.equal(x2, parts["test"][0]) and torch.equal(y2, parts["test"][1])
    assert x2.data_ptr() != parts["test"][0].data_ptr()


def test_text_splits() -> None:
    parts = {s: models.text_data(s) for s in models.SPLITS}
    vocab = models.text_vocab()
    assert vocab["<pad>"] == 0 and vocab["<unk>"] == 1
    for x, y in parts.values():
        assert x.dtype == torch.int64 and x.shape[1] == models.SEQ_LEN
        assert y.dtype == torch.int64 and len(y) == len(x)
        assert int(x.min()) >= 0 and int(x.max()) < len(vocab)
        assert set(y.tolist()) == set(range(len(models.TEXT_CLASSES)))
    assert len(parts["train"][1]) > 4000 and len(parts["test"][1]) > 500
    # Documents, not windows, are split: no document text sits in two splits.
    docs = models._text_documents()
    texts = {s: {t for _, split, t in docs if split == s} for s in models.SPLITS}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["calib"])
    assert not (texts["calib"] & texts["test"])
    # No held-out window occurs among the training windows.
    train_rows = {tuple(r) for r in parts["train"][0].tolist()}
    for s in ("calib", "test"):
        assert not any(tuple(r) in train_rows for r in parts[s][0].tolist())
    x2, y2 = models.text_data("test")
    assert torch.equal(x2, parts["test"][0]) and torch.equal(y2, parts["test"][1])


@pytest.mark.parametrize("fn", [models.digits_data, models.text_data])
def test_unknown_split(fn) -> None:
    with pytest.raises(ValueError, match="train, calib, test"):
        fn("validation")


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="digits_cnn"):
        models.load_pretrained("resnet50")


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_export_dynamic_batch(pretrained: dict[str, torch.nn.Module], name: str) -> None:
    model = pretrained[name]
    x, _ = DATA[name]("test")
    ep = torch.export.export(
        model, (x[:4],), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False
    )
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in ops
    assert not any("dropout" in op for op in ops)
    if name == "digits_cnn":
        assert {"aten.conv2d.default", "aten.batch_norm.default"} <= ops or {
            "aten.conv2d.default",
            "aten._native_batch_norm_legit_no_training.default",
        } <= ops
    if name == "text_transformer":
        assert "aten.embedding.default" in ops and "aten.softmax.int" in ops
    exported = ep.module()
    with torch.no_grad():
        for batch in (1, 5):
            out = exported(x[:batch])
            classes = 10 if name.startswith("digits") else len(models.TEXT_CLASSES)
            assert out.shape == (batch, classes)
            torch.testing.assert_close(out, model(x[:batch]), rtol=1e-4, atol=1e-4)
