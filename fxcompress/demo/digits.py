"""What the demo runs: scikit-learn's 8x8 handwritten digits and the trained digits CNN.

:class:`DigitsCNN` is a plain conv/BN/ReLU network (620 k parameters) whose trained weights
ship in ``fxcompress/weights/digits_cnn.pt`` (99.3 % test accuracy); :func:`load_digits_cnn`
loads them. :func:`digits_data` gives the fixed, stratified splits it was trained and tested
on. Nothing is downloaded: the data is scikit-learn's ``load_digits``, the only thing the demo
needs beyond fxcompress (``pip install 'fxcompress[demo]'``). The training function and the
benchmarks' other models live in the repository's ``benchmarks/models.py``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.errors import FxCompressError

__all__ = ["DIGITS_CNN_WEIGHTS", "SPLITS", "WEIGHTS_DIR", "DigitsCNN", "digits_data",
           "load_digits_cnn"]

#: Directory of the weights that ship with fxcompress (the digits CNN's state dict).
WEIGHTS_DIR: Path = Path(__file__).resolve().parents[1] / "weights"

#: The digits CNN's shipped state dict.
DIGITS_CNN_WEIGHTS: Path = WEIGHTS_DIR / "digits_cnn.pt"

#: Splits accepted by :func:`digits_data`.
SPLITS: tuple[str, ...] = ("train", "calib", "test")


def check_split(split: str) -> None:
    """Raise ValueError unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise FxCompressError(f"the digits data is scikit-learn's load_digits, and scikit-learn "
                              f"cannot be imported here ({e}); install it: "
                              "pip install 'fxcompress[demo]'") from None

    ds = load_digits()
    images = (ds.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = ds.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=0.25, random_state=0, stratify=labels)
    fit_idx, calib_idx = train_test_split(
        train_idx, test_size=128, random_state=0, stratify=labels[train_idx]
    )
    splits = {"train": fit_idx, "calib": calib_idx, "test": test_idx}
    return images, labels, splits


def digits_data(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of one split of scikit-learn's 8x8 digits data set.

    ``images`` is float32 of shape ``(N, 1, 8, 8)`` scaled to ``[0, 1]``; ``labels`` is int64
    of shape ``(N,)``. The split is deterministic and stratified: ``"test"`` is 25 % of the
    1797 images (450), ``"calib"`` a fixed 128-image subset of the rest that is never trained
    on, and ``"train"`` the remaining 1219 images. Fresh tensors are returned on every call.

    Raises:
        ValueError: if ``split`` is not one of ``"train"``, ``"calib"``, ``"test"``.
        FxCompressError: if scikit-learn cannot be imported.
    """
    check_split(split)
    images, labels, splits = _digits_arrays()
    idx = splits[split]
    return torch.from_numpy(images[idx].copy()), torch.from_numpy(labels[idx].copy())


class DigitsCNN(nn.Module):
    """Plain CNN for ``(N, 1, 8, 8)`` digit images, ~0.62 M parameters, 10 logits out.

    conv 1->32 (3x3, pad 1) + BN + ReLU, conv 32->64 (3x3, pad 1) + BN + ReLU, 2x2 max-pool,
    conv 64->128 (3x3, pad 1) + BN + ReLU, flatten (2048), linear 2048->256, ReLU,
    linear 256->10.
    """

    def __init__(self, num_classes: int = 10) -> None:
        """Build the layers; ``num_classes`` is the size of the output layer."""
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(128)
        self.fc1 = nn.Linear(128 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, num_classes)
        self.dropout = 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, 1, 8, 8)`` to logits ``(N, num_classes)``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        if self.training:  # no dropout node at all in an eval-mode export
            x = F.dropout(x, self.dropout)
        return self.fc2(x)


def load_digits_cnn() -> DigitsCNN:
    """The trained :class:`DigitsCNN`, in eval mode, from its shipped weights.

    Raises:
        FxCompressError: if the weight file that ships with fxcompress is missing (a broken
            install: reinstall fxcompress).
    """
    if not DIGITS_CNN_WEIGHTS.exists():
        raise FxCompressError(f"the digits CNN's weights ({DIGITS_CNN_WEIGHTS}) are missing "
                              "from this install of fxcompress; reinstall it")
    model = DigitsCNN()
    model.load_state_dict(torch.load(DIGITS_CNN_WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()
