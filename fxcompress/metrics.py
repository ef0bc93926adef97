"""Accuracy helpers for classifiers, in the form `fxcompress.compile(evaluate=...)` takes.

`correct` gives one score per example (100 for a right top-1 prediction, 0 for a wrong one):
passed as ``evaluate=lambda m: fxcompress.correct(m, x_val, y_val)``, the accuracy drop is
bounded by a paired bootstrap over the examples. `accuracy` is its mean, one number in percent.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["accuracy", "correct"]


def correct(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Per-example top-1 correctness of ``model`` in percent: a float tensor of 100 (right) and
    0 (wrong), one per label, whose mean is `accuracy`. What `compile(evaluate=...)` takes to
    bound an accuracy drop by a paired bootstrap over the examples.

    Runs in eval mode under ``torch.no_grad`` in batches of ``batch_size``; the module's
    previous train/eval mode is restored afterwards.
    """
    if len(labels) == 0:
        raise ValueError("accuracy of an empty data set is undefined")
    was_training = model.training
    model.eval()
    hits = []
    try:
        with torch.no_grad():
            for start in range(0, len(labels), batch_size):
                logits = model(inputs[start : start + batch_size])
                pred = logits.argmax(dim=-1)
                hits.append(pred == labels[start : start + batch_size])
    finally:
        model.train(was_training)
    return 100.0 * torch.cat(hits).float()


def accuracy(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Top-1 accuracy of ``model`` on ``inputs``/``labels`` in percent (0-100): the mean of
    `correct`.

    Runs in eval mode under ``torch.no_grad`` in batches of ``batch_size``; the module's
    previous train/eval mode is restored afterwards.
    """
    return float(correct(model, inputs, labels, batch_size).double().mean())
