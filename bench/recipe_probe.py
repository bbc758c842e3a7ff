"""How a training recipe learns: `fit` of a preset's model on the training images with the preset's recipe, the
test error after every epoch. A probe of a recipe (shortened: fewer epochs, the schedule fitted to them), not a
study: no cross-validation, no tracking, no export.

    .venv/bin/python bench/recipe_probe.py --config strong --epochs 10 --set train.warmup_epochs=1
    .venv/bin/python bench/recipe_probe.py --config strong --epochs 10 --set train.warmup_epochs=1 --set model.stem=conv

Prints a line per epoch as it goes (test and augmented-train error, seconds; with train.ema_decay the test error is
the weight average's and the trained weights' own follows in parentheses; with train.augment.anneal, the
augmentation's strength at the epoch's end), then where the run levelled off: the mean test error over its last
fifth, at most 10 epochs (``--last`` sets the count), and their range as counts of test errors. Last, a markdown
table: every epoch up to 20 epochs, else every 5th and the last (``--every`` sets the step). The data root is the
project's setting ($VITFLOW_DATA_DIR, else the preset's data.root).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.data import load  # noqa: E402
from pipeline.model import build_model, count_parameters  # noqa: E402
from pipeline.train import configure_threads, fit  # noqa: E402


def checkpoints(epochs: int, every: int) -> list[int]:
    """The 1-based epochs a table shows: every ``every``-th, and the last."""
    return sorted(set(range(every, epochs + 1, every)) | {epochs})


def levelled_off(history: list[dict[str, float]], test_images: int, last: int, key: str = "test_error") -> str:
    """Where a run ended up, less noisy than its last epoch: the mean test error (``key``) of its last ``last`` epochs,
    and their range in test errors."""
    tail = [m[key] for m in history[-last:]]
    errors = [round(e * test_images) for e in tail]
    return (f"last {len(tail)} epochs: mean test error {100 * sum(tail) / len(tail):.2f}%, "
            f"{min(errors)}-{max(errors)} test errors of {test_images:,}")


def default_last(epochs: int) -> int:
    """How many of a run's last epochs its levelled-off mean takes by default: a fifth of the run, 1 to 10. A 60-epoch
    run averages its last 10; a 15-epoch one its last 3, not epochs still in the warm-up."""
    return max(1, min(10, epochs // 5))


def table(history: list[dict[str, float]], every: int) -> str:
    shown = checkpoints(len(history), every)

    def row(label: str, key: str, digits: int) -> str:
        return f"| {label} | " + " | ".join(f"{100 * history[e - 1][key]:.{digits}f}%" for e in shown) + " |"

    rows = ["| epoch | " + " | ".join(map(str, shown)) + " |", "|---|" + "---|" * len(shown),
            row("test error", "test_error", 2)]
    if "test_error_raw" in history[-1]:  # train.ema_decay: the test error above is the average's
        rows.append(row("test error, trained weights (no average)", "test_error_raw", 2))
    rows.append(row("train error (augmented)", "train_error", 1))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="strong", help="preset name or YAML path (default: strong)")
    parser.add_argument("--epochs", type=int, help="train.epochs (the cosine schedule is fitted to them)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: every core)")
    parser.add_argument("--every", type=int, help="table columns every N epochs, and the last (default: every epoch "
                                                  "up to 20 epochs, else every 5)")
    parser.add_argument("--last", type=int, help="epochs the levelled-off mean is taken over (default: the last fifth "
                                                 "of the run, at most 10: a short run's mean leaves out its warm-up)")
    args = parser.parse_args(argv)
    for flag in ("every", "last"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    overrides = list(args.set) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        parser.error(str(exc))  # one line, exit status 2, as vitflow run reports it
    threads = configure_threads(args.threads)
    data = load(cfg.data)
    params = count_parameters(build_model(cfg.model, seed=cfg.train.seed))
    print(f"# {cfg.name} {' '.join(overrides)}: {params:,} parameters, {data.summary()}, "
          f"{platform.machine()}, {os.cpu_count()} cores, {threads} threads, torch "
          f"{torch.__version__}, {datetime.date.today()}", flush=True)
    start = time.perf_counter()

    def report(epoch: int, m: dict[str, float]) -> None:
        raw = f" (trained weights {m['test_error_raw']:.4f})" if "test_error_raw" in m else ""
        faded = f"  augmentation {m['augment_strength']:.2f}" if "augment_strength" in m else ""  # train.augment.anneal
        print(f"epoch {epoch:3d}  test error {m['test_error']:.4f}{raw}  train error {m['train_error']:.4f}  "
              f"lr {m['lr']:.2e}{faded}  {m['epoch_seconds']:.0f} s  ({time.perf_counter() - start:.0f} s in all)",
              flush=True)

    result = fit(cfg.model, cfg.train, data.train_images, data.train_labels,
                 {"test": (data.test_images, data.test_labels)}, callback=report, progress=False)
    history = result.history
    last = args.last or default_last(len(history))
    print(f"\n{len(history)} epochs in {result.seconds:.0f} s on {result.device}; final test accuracy "
          f"{100 * (1 - history[-1]['test_error']):.2f}%; {levelled_off(history, len(data.test_labels), last)}")
    if "test_error_raw" in history[-1]:
        print(f"without the weight average (train.ema_decay): final test accuracy "
              f"{100 * (1 - history[-1]['test_error_raw']):.2f}%; "
              f"{levelled_off(history, len(data.test_labels), last, 'test_error_raw')}")
    print()
    every = args.every or (1 if len(history) <= 20 else 5)
    print(table(history, every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
