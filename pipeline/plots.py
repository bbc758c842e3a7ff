"""Figures for MLflow: each function returns a matplotlib Figure (never shows it)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def model_selection(rows: Sequence[dict], best_label: str) -> Figure:
    """Mean training vs validation error per configuration over the folds (bars: fold std), best highlighted.

    ``rows``: dicts with label, train_error_mean/std, val_error_mean/std.
    """
    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.5), layout="constrained")
    for offset, key, name, color in ((-width / 2, "train", "training", "#7aa6c2"),
                                     (width / 2, "val", "validation", "#e08a3c")):
        means = [100 * r[f"{key}_error_mean"] for r in rows]
        stds = [100 * r[f"{key}_error_std"] for r in rows]
        bars = ax.bar(x + offset, means, width, yerr=stds, capsize=4, label=f"{name} error (mean ± std over folds)",
                      color=color)
        for bar, label in zip(bars, labels):
            if label == best_label:
                bar.set_edgecolor("black")
                bar.set_linewidth(2.2)
    best = labels.index(best_label)
    ax.annotate("selected", (x[best] + width / 2, 100 * rows[best]["val_error_mean"]),
                xytext=(0, 14), textcoords="offset points", ha="center", fontweight="bold",
                arrowprops={"arrowstyle": "->"})
    ax.set_xticks(x, labels)
    ax.set_ylabel("misclassification error (%)")
    ax.set_title("Model selection: cross-validated error per configuration (lower is better)")
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, max(100 * (r["val_error_mean"] + r["val_error_std"]) for r in rows) * 1.3 + 0.5)
    return fig


def learning_curves(history: Sequence[dict], title: str, eval_name: str = "test") -> Figure:
    """Training vs ``eval_name`` error and loss per epoch."""
    epochs = np.arange(1, len(history) + 1)
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for key, name, style in (("train", "training", "-o"), (eval_name, eval_name, "-s")):
        ax_err.plot(epochs, [100 * h[f"{key}_error"] for h in history], style, label=name)
        ax_loss.plot(epochs, [h[f"{key}_loss"] for h in history], style, label=name)
    ax_err.set_ylabel("misclassification error (%)")
    ax_loss.set_ylabel("cross-entropy loss")
    for ax, what in ((ax_err, "error"), (ax_loss, "loss")):
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.set_title(f"{what} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, title: str, classes: int = 10) -> Figure:
    """Counts (left) and row-normalised rates (right) of true vs predicted digit."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (true, predicted), 1)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), layout="constrained")
    for ax, matrix, name, fmt in ((axes[0], counts, "counts", "d"), (axes[1], rates, "row-normalised", ".2f")):
        image = ax.imshow(matrix, cmap="Blues")
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_xticks(range(classes))
        ax.set_yticks(range(classes))
        ax.set_xlabel("predicted digit")
        ax.set_ylabel("true digit")
        ax.set_title(name)
        threshold = matrix.max() / 2
        for i in range(classes):
            for j in range(classes):
                value = matrix[i, j]
                if value:
                    ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7,
                            color="white" if value > threshold else "black")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    fig.suptitle(f"{title} (accuracy {100 * accuracy:.2f}% on {counts.sum()} images)")
    return fig
