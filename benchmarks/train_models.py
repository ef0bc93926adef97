"""Retrain the trained models and rewrite their weight files.

Trains ``digits_cnn``, ``digits_mlp`` and ``text_transformer`` with the seeded training
functions of :mod:`benchmarks.models`, and the language model ``docs_lm`` with
:func:`benchmarks.lm.train_docs_lm`, writes their weights atomically (the digits CNN's, which
ship with fxcompress, to ``fxcompress/weights/digits_cnn.pt``; the others to
``benchmarks/weights/<name>.pt``) and prints, per model: parameter count, training time,
calib/test accuracy (perplexity for ``docs_lm``) and weight-file size. With
``--rebuild-vocab`` the vocabularies (``benchmarks/weights/text_vocab.json``,
``docs_lm_vocab.json``) of the models being retrained are rebuilt from the training split
first (they are otherwise reused, so the token ids stay stable). The shipped ``docs_lm`` was
trained with one thread (``--threads 1``, about 7 minutes).

    .venv/bin/python benchmarks/train_models.py [--only digits_cnn text_transformer docs_lm ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* as a script

from benchmarks import lm, models  # noqa: E402

NAMES = (*models.MODEL_NAMES, "docs_lm")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, retrain the chosen models, save them and print a summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=NAMES, default=NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--rebuild-vocab", action="store_true")
    parser.add_argument("--no-save", action="store_true", help="train and evaluate only")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rebuild_vocab:
        if "text_transformer" not in args.only and "docs_lm" not in args.only:
            parser.error("--rebuild-vocab changes the token ids: retrain text_transformer "
                         "and/or docs_lm too")
        if "text_transformer" in args.only:
            (models.WEIGHTS_DIR / "text_vocab.json").unlink(missing_ok=True)
        if "docs_lm" in args.only:
            (models.WEIGHTS_DIR / "docs_lm_vocab.json").unlink(missing_ok=True)
        models.reset_caches()
        lm.reset_caches()

    trainers = {
        "digits_cnn": (models.train_digits_cnn, models.digits_data),
        "digits_mlp": (models.train_digits_mlp, models.digits_data),
        "text_transformer": (models.train_text_transformer, models.text_data),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.only:
        if name == "docs_lm":
            rows.append(_train_lm(args.seed, args.no_save))
            continue
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
    print("| model | parameters | train time (s) | calib acc (%) / ppl | test acc (%) / ppl "
          "| weights |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, params, seconds, calib, test, size in rows:
        print(f"| {name} | {params:,} | {seconds:.1f} | {calib:.2f} | {test:.2f} | {size} |")


def _train_lm(seed: int, no_save: bool) -> tuple:
    """Train, evaluate and save ``docs_lm``; its summary row (perplexities, not accuracies)."""
    t0 = time.perf_counter()
    result = lm.train_docs_lm(seed=seed, log=lambda s: print(f"docs_lm {s}", flush=True))
    model = result.model
    params = sum(p.numel() for p in model.parameters())
    ppl = {s: lm.perplexity(model, *lm.lm_data(s)) for s in ("calib", "test")}
    size = "-"
    if not no_save:
        path = lm.save_docs_lm(model)
        size = f"{path.stat().st_size / 2**20:.2f} MiB"
    print(f"docs_lm: {params:,} params, trained in {result.seconds:.1f} s "
          f"({time.perf_counter() - t0:.1f} s with data), calib perplexity {ppl['calib']:.2f}, "
          f"test perplexity {ppl['test']:.2f}, weights {size}", flush=True)
    return ("docs_lm", params, result.seconds, ppl["calib"], ppl["test"], size)


if __name__ == "__main__":
    main()
