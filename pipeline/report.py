"""What a person reads about a study: the model card (Markdown) and the numbers the terminal summary shares
with it. Pure functions over the study summary (pipeline.study.summarize), so the card, the Prefect artifact
and ``vitflow run``'s table cannot disagree: every number is formatted here, once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

MNIST_TRAIN, MNIST_TEST = 60_000, 10_000
DESCRIPTION_LIMIT = 5000  # characters in a registered model version's description (MLflow's SQL column)


def percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def mean_std(row: dict[str, Any], metric: str) -> str:
    """'1.23% ± 0.45' for an error's mean and standard deviation over the folds (both in percent)."""
    return f"{100 * row[f'{metric}_mean']:.2f}% ± {100 * row[f'{metric}_std']:.2f}"


def cv_rows(leaderboard: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The leaderboard's cells as text, best first: rank, configuration, parameters, val error, train error,
    and each fold's validation error."""
    return [{"rank": str(r["rank"]), "configuration": r["label"], "parameters": f"{r['parameters']:,}",
             "val_error": mean_std(r, "val_error"), "train_error": mean_std(r, "train_error"),
             "fold_val_errors": ", ".join(percent(v) for v in r.get("fold_val_errors", []))}
            for r in leaderboard]


def folds_of(leaderboard: list[dict[str, Any]]) -> int:
    return len(leaderboard[0].get("fold_val_errors", [])) if leaderboard else 0


def cv_table_markdown(leaderboard: list[dict[str, Any]], max_rows: int | None = None) -> str:
    """The cross-validation leaderboard as a Markdown table (also the Prefect 'cv-leaderboard' artifact);
    ``max_rows``: only the best ones, with a line saying how many were left out."""
    lines = ["| rank | configuration | parameters | val error (mean ± std) | train error (mean ± std) | "
             "val error per fold |", "|---:|---|---:|---:|---:|---|"]
    shown = leaderboard[:max_rows] if max_rows else leaderboard
    for cells, row in zip(cv_rows(shown), shown):
        name = f"**{cells['configuration']}** (selected)" if row["rank"] == 1 else cells["configuration"]
        lines.append(f"| {cells['rank']} | {name} | {cells['parameters']} | {cells['val_error']} | "
                     f"{cells['train_error']} | {cells['fold_val_errors']} |")
    if len(shown) < len(leaderboard):
        lines.append(f"\n{len(leaderboard) - len(shown)} more configurations: see model_card.md on the final run.")
    return (f"### Cross-validation leaderboard ({folds_of(leaderboard)} folds, final-epoch errors)\n\n"
            + "\n".join(lines))


def key_numbers(s: dict[str, Any]) -> dict[str, str]:
    """The headline numbers as text, shared by the model card and the terminal summary."""
    last = s["final_history"][-1]
    return {
        "test_accuracy": percent(s["test_accuracy"]),
        "torch_test_accuracy": percent(1 - last["test_error"]),
        "torch_test_loss": f"{last['test_loss']:.4f}",
        "parity": f"{s['parity_max_abs_diff']:.1e}",
        "throughput": f"{s['images_per_second']:,.0f} images/s",
        "throughput_detail": (f"{s['images_per_second']:,.0f} images/s ({s['provider']}, "
                              f"{s['data']['test_images']:,} images in batches of {s.get('batch_size', 1024)})"),
        "parameters": f"{s['parameters']:,}",
        "wall_time": f"{s['timings']['total_s']:.1f} s",
    }


def result_line(s: dict[str, Any]) -> str:
    """The study's outcome in one line, the flow's last log line before Prefect's own: what a deployment run's
    ``prefect deployment run --watch``, the worker's terminal and the Prefect UI's log show of the result."""
    n, reg = key_numbers(s), s["registration"]
    return (f"result: {s['selected']} selected; test accuracy {n['test_accuracy']} (ONNX Runtime, {s['provider']}; "
            f"PyTorch {n['torch_test_accuracy']}); {reg['model_uri']} -> @{reg['alias']} ({reg['reason']}); "
            f"wall time {n['wall_time']}; model card: the study-summary artifact, and model_card.md on MLflow run "
            f"{s['final_run_id']}")


def epochs_trained(s: dict[str, Any]) -> int:
    """Epochs of the final training: those it trained (fewer than train.epochs under a time budget)."""
    return int(s.get("epochs_trained") or s["configuration"]["train"]["epochs"])


def budgeted(s: dict[str, Any]) -> bool:
    return (s.get("time_budget") or {}).get("flow_s") is not None


def final_training(s: dict[str, Any]) -> str:
    """``20 epochs`` or, under a time budget, ``22 of train.epochs=30 epochs (time budget: flow 840 s, ...)``."""
    epochs, cap = epochs_trained(s), s["configuration"]["train"]["epochs"]
    if not budgeted(s):
        return f"{epochs} epoch" + ("" if epochs == 1 else "s")
    budget = s["time_budget"]
    return (f"{epochs} of train.epochs={cap} epochs (time budget: flow {budget['flow_s']:g} s, "
            f"{budget['reserve_s']:g} s kept after the training)")


def _table(pairs: list[tuple[str, str]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in pairs]
    return "\n".join(lines)


def known_limits(s: dict[str, Any]) -> list[str]:
    data = s["data"]
    limits = [
        "Trained and tested on MNIST only: centred, size-normalised 28x28 handwritten digits, white on black. "
        "Photos, other scripts, inverted (dark-on-light) images or off-centre digits are out of distribution "
        "for the model itself; the test accuracy says nothing about them. `vitflow predict` prepares image files "
        "the way MNIST was made (ink made bright, digit size-normalised and centred by its centre of mass); a "
        "caller feeding the model directly must do the same.",
        "The input must be float32 intensities in [0, 1], shape (N, 1, 28, 28); normalisation is inside the "
        "model. The output is logits; apply softmax for probabilities, which are not calibrated.",
        f"A deliberately tiny model ({s['parameters']:,} parameters, {epochs_trained(s)} "
        f"epochs); it is a teaching study, not a state-of-the-art digit reader.",
        f"Model selection used {folds_of(s['leaderboard'])}-fold cross-validation with one seed per fold; the "
        "± is the standard deviation over those few folds, so differences smaller than it are not evidence.",
        "The test set was scored after every epoch of the final training for the learning curves only; it "
        "chose nothing (selection used the validation folds, the epoch count was "
        + ("set by the time budget from the pace of the first epochs)." if budgeted(s) else "fixed in advance)."),
        f"Throughput ({s['images_per_second']:,.0f} images/s) was measured once, on the machine that ran the "
        f"study, with {s['provider']}; re-measure on the serving hardware.",
    ]
    if data["train_images"] < MNIST_TRAIN or data["test_images"] < MNIST_TEST:
        limits.insert(0, f"**Subset run:** {data['train_images']:,} of {MNIST_TRAIN:,} training and "
                         f"{data['test_images']:,} of {MNIST_TEST:,} test images; the numbers are noisier than a "
                         f"full run's and not comparable with it.")
    return limits


def model_card(s: dict[str, Any], max_cv_rows: int | None = None) -> str:
    """The Markdown model card of a registered version, from the study summary (``max_cv_rows``: shorten the
    cross-validation table to the best ones)."""
    n = key_numbers(s)
    reg = s["registration"]
    data = s["data"]
    cfg = s["configuration"]
    title = f"# Model card: {reg['model_name']} version {reg['version']}"
    intro = (f"Study **{s['study']}**{' (preset: ' + s['description'] + ')' if s.get('description') else ''}. "
             f"Selected configuration **{s['selected']}** by {folds_of(s['leaderboard'])}-fold cross-validation "
             f"over {len(s['leaderboard'])} configurations, retrained on all {data['train_images']:,} training "
             f"images, exported to ONNX and scored once more with ONNX Runtime on {data['test_images']:,} test "
             f"images.")
    alias = f"Registered as `{reg['model_uri']}` with alias **@{reg['alias']}** ({reg['reason']})."
    metrics = _table([
        (f"test accuracy (ONNX Runtime, {s['provider']})", f"**{n['test_accuracy']}**"),
        ("test accuracy (PyTorch, same weights)", n["torch_test_accuracy"]),
        ("test cross-entropy (PyTorch)", n["torch_test_loss"]),
        (f"ONNX vs PyTorch logits, max abs difference ({int(s.get('parity_images', 0))} images)", n["parity"]),
        ("ONNX Runtime provider", s["provider"]),
        ("ONNX Runtime throughput", n["throughput_detail"]),
        ("parameters", n["parameters"]),
        ("ONNX file size", f"{s.get('onnx_size_kb', 0):.1f} KB"),
    ], ("metric", "value"))
    md5 = _table([(f"`{name}`", f"`{digest}`") for name, digest in sorted(data["md5"].items())], ("file", "md5"))
    subset = []
    if data.get("train_subset") or data.get("test_subset"):
        subset = [f"- subsets: train_subset={data.get('train_subset')}, test_subset={data.get('test_subset')} "
                  f"(stratified)"]
    data_lines = "\n".join([
        f"- MNIST, {data['train_images']:,} training / {data['test_images']:,} test images, 28x28 grey",
        *subset,
        f"- read from `{data['root']}`; every raw file's md5 checked against the published value:",
    ])
    config = "\n".join(f"- {section}: " + " ".join(f"`{k}={json.dumps(v)}`" for k, v in values.items())
                       for section, values in cfg.items())
    grid = ", ".join(f"`{k}` in {json.dumps(v)}" for k, v in s.get("grid", {}).items())
    lineage = _table([
        ("MLflow experiment", f"`{s['experiment']}` ({s['tracking_uri']})"),
        ("study run", f"`{s['study_run_id']}`"),
        ("final run (model, figures, this card)", f"`{s['final_run_id']}`"),
        ("ONNX file", f"`{s['onnx_path']}`"),
        ("git commit", f"`{s.get('git_commit', 'unknown')}`"),
        ("config fingerprint", f"`{s.get('config_fingerprint', '')}`"),
        ("wall time", n["wall_time"]),
    ], ("what", "where"))
    figures = ("Figures on the final run under `figures/`: model selection, learning curves, confusion matrix, "
               "misclassified test images, attention maps; fold learning curves on each configuration run.")
    return "\n\n".join([
        title, intro, alias,
        "## Test metrics", metrics,
        "## Data", data_lines, md5,
        "## Configuration", f"Selected **{s['selected']}**; searched: {grid or 'n/a'}. Final training: "
                            f"{final_training(s)}.", config,
        "## Model selection", cv_table_markdown(s["leaderboard"], max_cv_rows),
        "## Input and output",
        "`pixels`: float32 (N, 1, 28, 28) in [0, 1], white digit on black -> `logits`: (N, 10) for digits 0-9.",
        "## Known limits", "\n".join(f"- {line}" for line in known_limits(s)),
        "## Lineage", lineage, figures,
    ]) + "\n"


def version_description(s: dict[str, Any], card: str) -> str:
    """The card itself when it fits a model version's description; else the card with the cross-validation table
    cut to its best rows, and as a last resort its head with a pointer to the full card."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    short = model_card(s, max_cv_rows=5)
    if len(short) <= DESCRIPTION_LIMIT:
        return short
    note = f"\n\n(cut; the full card is model_card.md on run {s['final_run_id']})\n"
    return short[:DESCRIPTION_LIMIT - len(note)] + note


def duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 2 h 07 min: for a person reading a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class EpochProgress:
    """Progress lines for a training that a person may be watching in a log (the Prefect UI, ``--watch``, a
    served deployment's output), where no progress bar shows: the first epoch's line (how fast it goes, how long
    it will take), then at most one line per ``every`` seconds, and the last epoch's. Use it as a ``fit``
    callback, or call it from one.

    ``final depth=4: epoch 5/22, test_error 0.0153, train_loss 0.6418, 28.9 s per epoch, about 8 min 12 s left``

    The time per epoch leaves out the first epoch once there are others: on CUDA it includes the warm-up and the
    graph capture. ``quiet`` (for the many short trainings of a CV): no line at all for a training that its first
    epoch says will be over within ``every`` seconds, and a last line only after earlier ones. ``clock`` is for
    tests."""

    def __init__(self, desc: str, epochs: int, emit: Callable[[str], None], every: float = 30.0,
                 quiet: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.desc, self.epochs, self.emit, self.every, self.quiet, self.clock = desc, epochs, emit, every, quiet, clock
        self.seconds: list[float] = []
        self.last: float | None = None
        self.started = clock()

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        self.seconds.append(float(metrics.get("epoch_seconds", 0.0)))
        now = self.clock()
        steady = self.seconds[1:] or self.seconds
        per_epoch = sum(steady) / len(steady)
        if self.last is None:
            due = epoch == 1 and not (self.quiet and per_epoch * self.epochs <= self.every)
            due = due or now - self.started >= self.every
        else:
            due = epoch == self.epochs or now - self.last >= self.every
        if not due:
            return
        self.last = now
        errors = [f"{name} {value:.4f}" for name, value in metrics.items()
                  if name.endswith("_error") and name != "train_error"]
        parts = [f"epoch {epoch}/{self.epochs}", *errors]
        if "train_loss" in metrics:
            parts.append(f"train_loss {metrics['train_loss']:.4f}")
        parts.append(f"{per_epoch:.1f} s per epoch")
        left = self.epochs - epoch
        parts.append(f"about {duration(left * per_epoch)} left" if left else f"{duration(sum(self.seconds))} in all")
        self.emit(f"{self.desc}: " + ", ".join(parts))
