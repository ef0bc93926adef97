"""Retrain the three trained models and rewrite their weight files.

Trains ``digits_cnn``, ``digits_mlp`` and ``text_transformer`` with the seeded training
functions of :mod:`benchmarks.models`, writes their weights atomically (the digits CNN's, which
ship with fxcompress, to ``fxcompress/weights/digits_cnn.pt``; the others to
``benchmarks/weights/<name>.pt``) and prints, per model: parameter count, training time,
calib/test accuracy and weight-file size. With ``--rebuild-vocab`` the text vocabulary
(``benchmarks/weights/text_vocab.json``) is rebuilt from the training split first (it is
otherwise reused, so the token ids stay stable).

    .venv/bin/python benchmarks/train_models.py [--only digits_cnn text_transformer ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* as a script

from benchmarks import models  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, retrain the chosen models, save them and print a summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=models.MODEL_NAMES, default=models.MODEL_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild-vocab", action="store_true")
    parser.add_argument("--no-save", action="store_true", help="train and evaluate only")
    args = parser.parse_args(argv)

    if args.rebuild_vocab:
        if "text_transformer" not in args.only:
            parser.error("--rebuild-vocab changes the token ids: retrain text_transformer too")
        (models.WEIGHTS_DIR / "text_vocab.json").unlink(missing_ok=True)
        models.reset_caches()

    trainers = {
        "digits_cnn": (models.train_digits_cnn, models.digits_data),
        "digits_mlp": (models.train_digits_mlp, models.digits_data),
        "text_transformer": (models.train_text_transformer, models.text_data),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.only:
        train, data = trainers[name]
        t0 = time.perf_counter()
        result = train(seed=args.seed)
        model = result.model
        params = sum(p.numel() for p in model.parameters())
        accs = {s: models.accuracy(model, *data(s)) for s in ("calib", "test")}
        size = "-"
        if not args.no_save:
            path = models.save_weights(name, model)
            size = f"{path.stat().st_size / 2**20:.2f} MiB"
        rows.append((name, params, result.seconds, accs["calib"], accs["test"], size))
        print(
            f"{name}: {params:,} params, trained in {result.seconds:.1f} s "
            f"({time.perf_counter() - t0:.1f} s with data), calib {accs['calib']:.2f} %, "
            f"test {accs['test']:.2f} %, weights {size}",
            flush=True,
        )

    print()
    print("| model | parameters | train time (s) | calib acc (%) | test acc (%) | weights |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, params, seconds, calib, test, size in rows:
        print(f"| {name} | {params:,} | {seconds:.1f} | {calib:.2f} | {test:.2f} | {size} |")


if __name__ == "__main__":
    main()
