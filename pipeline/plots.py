"""Figures for MLflow: each function returns a matplotlib Figure (never shows it).

The figures are made without pyplot (``Figure`` objects, outside pyplot's global registry of open figures): any
thread may build and save them, and none stays open after it is saved (no ``plt.close`` to forget)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], layout: str = "constrained",
              **subplot_kw: Any) -> tuple[Figure, Any]:
    """pyplot's ``subplots`` without pyplot: a Figure of its own and its axes."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def model_selection(rows: Sequence[dict], best_label: str) -> Figure:
    """Mean training vs validation error per configuration over the folds (bars: fold std, dots: each fold's
    validation error), best highlighted.

    ``rows``: dicts with label, train_error_mean/std, val_error_mean/std and optionally fold_val_errors.
    """
    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    width = 0.38
    handles = []
    fig, ax = _subplots(figsize=(max(7.0, 1.6 * len(rows) + 2) + 3.0, 4.8), layout="constrained")
    for offset, key, name, color in ((-width / 2, "train", "training error, averaged over the last epoch's batches",
                                      "#7aa6c2"),
                                     (width / 2, "val", "validation error, after the last epoch", "#e08a3c")):
        means = [100 * r[f"{key}_error_mean"] for r in rows]
        stds = [100 * r[f"{key}_error_std"] for r in rows]
        bars = ax.bar(x + offset, means, width, yerr=stds, capsize=4, color=color)
        handles.append(Patch(facecolor=color, label=f"{name};\nmean ± std over folds"))  # not the outlined bar
        for bar, label in zip(bars, labels):
            if label == best_label:
                bar.set_edgecolor("black")
                bar.set_linewidth(2.2)
    folds = [r.get("fold_val_errors") or [] for r in rows]
    if any(folds):
        fx = [x[i] + width / 2 for i, f in enumerate(folds) for _ in f]
        fy = [100 * v for f in folds for v in f]
        handles.append(ax.scatter(fx, fy, s=18, color="#5a2d0c", zorder=3, label="validation error of each fold"))
    best = labels.index(best_label)
    tip = 100 * max([rows[best]["val_error_mean"] + rows[best]["val_error_std"], *folds[best]])
    ax.annotate("selected", (x[best] + width / 2, tip), xytext=(0, 22), textcoords="offset points", ha="center",
                fontweight="bold", arrowprops={"arrowstyle": "->"})
    ax.set_xticks(x, labels)
    ax.set_xlabel("configuration")
    ax.set_ylabel("misclassification error (%)")
    ax.set_title(f"Model selection: {len(folds[0]) if folds and folds[0] else 'k'}-fold cross-validated error\n"
                 f"per configuration (lower is better)")
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)  # beside the axes: it never hides a bar
    ax.grid(axis="y", alpha=0.3)
    top = max(max(100 * (r[f"{k}_error_mean"] + r[f"{k}_error_std"]) for k in ("train", "val")) for r in rows)
    top = max([top] + [100 * v for f in folds for v in f])
    ax.set_ylim(0, top * 1.2 + 0.5)
    return fig


def learning_curves(history: Sequence[dict], title: str, eval_name: str = "test") -> Figure:
    """Training vs ``eval_name`` error and loss per epoch."""
    epochs = np.arange(1, len(history) + 1)
    fig, (ax_err, ax_loss) = _subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for key, name, style in (("train", "training (averaged over the epoch's batches)", "-o"),
                             (eval_name, f"{eval_name} (after the epoch)", "-s")):
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
    fig, axes = _subplots(1, 2, figsize=(13, 5.6), layout="constrained")
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


def misclassified(images: np.ndarray, true: np.ndarray, probabilities: np.ndarray, title: str,
                  max_images: int = 24, columns: int = 8) -> Figure:
    """The test images the model gets wrong, most confident mistakes first: each with its true digit, the
    predicted digit and the probability given to the prediction.

    ``images``: (N, 28, 28) or (N, 1, 28, 28) intensities; ``probabilities``: (N, classes) for the same images.
    """
    images = np.asarray(images).reshape(len(true), *np.asarray(images).shape[-2:])
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != true)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:max_images]
    rows = max(1, -(-len(shown) // columns))
    fig, axes = _subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows + 0.7), layout="constrained",
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images[i], cmap="gray_r", interpolation="nearest")
        ax.set_title(f"true {true[i]} → {predicted[i]}\n{100 * confidence[i]:.0f}% sure", fontsize=10,
                     color="#b00020")
    if not len(shown):
        axes[0, 0].text(0, 0.5, "no misclassified images", fontsize=12, transform=axes[0, 0].transAxes)
    fig.suptitle(f"{title}: {len(shown)} of {len(wrong)} errors in {len(true)} images, most confident first\n"
                 f"(true digit → predicted digit, probability the model gave its prediction)", fontsize=11)
    return fig


def attention_maps(images: np.ndarray, labels: Sequence[int], predictions: Sequence[int], last_block: np.ndarray,
                   rollout: np.ndarray, title: str, pool: str = "cls") -> Figure:
    """Where the class token looks, overlaid on sample digits (one column per image): the last block's
    class-token attention over the patch grid for each head, then the attention rollout across all blocks. With
    ``pool="mean"`` (a model that classifies the mean of its patch tokens) the maps are the average token's.

    ``images``: (N, 28, 28) or (N, 1, 28, 28); ``last_block``: (N, heads, g, g); ``rollout``: (N, g, g).
    Each map is scaled to its own maximum (the colour says where, not how much in absolute terms).
    """
    images = np.asarray(images).reshape(len(labels), *np.asarray(images).shape[-2:])
    last_block, rollout = np.asarray(last_block), np.asarray(rollout)
    n, heads = last_block.shape[:2]
    size = images.shape[-1]
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)
    row_names = ["digit"] + [f"last block\nhead {h + 1}" for h in range(heads)] + ["rollout\n(all blocks)"]
    fig, axes = _subplots(len(row_names), n, figsize=(1.45 * n + 0.9, 1.5 * len(row_names) + 0.8),
                             layout="constrained", squeeze=False)
    for col in range(n):
        maps = [None] + [last_block[col, h] for h in range(heads)] + [rollout[col]]
        for row, attn in enumerate(maps):
            ax = axes[row, col]
            ax.imshow(images[col], cmap="gray", interpolation="nearest", extent=extent)
            if attn is not None:
                peak = attn.max()
                ax.imshow(attn / peak if peak > 0 else attn, cmap="inferno", alpha=0.6, vmin=0, vmax=1,
                          interpolation="nearest", extent=extent)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(row_names[row], fontsize=10)
        wrong = predictions[col] != labels[col]
        axes[0, col].set_title(f"digit {labels[col]}\npredicted {predictions[col]}", fontsize=10,
                               color="#b00020" if wrong else "black")
    grid = rollout.shape[-1]
    whose = "class-token" if pool == "cls" else "average-token"
    fig.suptitle(f"{title}: {whose} attention over the {grid}x{grid} patch grid (bright = more attention; "
                 f"each map scaled to its own maximum)", fontsize=11)
    return fig


def _fold_lines(ax_err: Axes, histories: Sequence[Sequence[dict]], eval_name: str = "val",
                legend: bool = True) -> None:
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, history in enumerate(histories):
        epochs = np.arange(1, len(history) + 1)
        color = colors[k % len(colors)]
        ax_err.plot(epochs, [100 * h["train_error"] for h in history], "--o", color=color, markersize=4,
                    alpha=0.8, label=f"fold {k + 1} training" if legend else None)
        ax_err.plot(epochs, [100 * h[f"{eval_name}_error"] for h in history], "-s", color=color, markersize=5,
                    label=f"fold {k + 1} validation" if legend else None)
    epochs = max(len(h) for h in histories)
    ax_err.set_xticks(np.arange(1, epochs + 1))
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("misclassification error (%)")
    ax_err.grid(alpha=0.3)


def fold_curves(histories: Sequence[Sequence[dict]], label: str) -> Figure:
    """One configuration's cross-validation: training (dashed) and validation (solid) error and loss per epoch,
    one colour per fold. ``histories``: per fold, the per-epoch metric dicts (train_/val_ error and loss)."""
    fig, (ax_err, ax_loss) = _subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    _fold_lines(ax_err, histories)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, history in enumerate(histories):
        epochs = np.arange(1, len(history) + 1)
        color = colors[k % len(colors)]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "--o", color=color, markersize=4, alpha=0.8)
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "-s", color=color, markersize=5)
    ax_loss.set_xticks(ax_err.get_xticks())
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.grid(alpha=0.3)
    ax_err.set_title("error per epoch")
    ax_loss.set_title("loss per epoch")
    ax_err.legend(fontsize=8, ncol=2)
    fig.suptitle(f"Cross-validation of {label}: {len(histories)} folds (dashed: training, solid: validation)")
    return fig


def fold_curves_grid(rows: Sequence[dict], best_label: str) -> Figure:
    """Every configuration's fold learning curves side by side on one error scale, selected one marked.
    ``rows``: leaderboard rows with label and fold_histories."""
    columns = min(4, len(rows))
    nrows = -(-len(rows) // columns)
    fig, axes = _subplots(nrows, columns, figsize=(3.8 * columns + 0.6, 3.4 * nrows + 0.9), sharey=True,
                             layout="constrained", squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for i, (ax, row) in enumerate(zip(axes.flat, rows)):
        _fold_lines(ax, row["fold_histories"], legend=i == 0)
        selected = row["label"] == best_label
        ax.set_title(f"{row['label']}{'  (selected)' if selected else ''}\nval error "
                     f"{100 * row['val_error_mean']:.2f}% ± {100 * row['val_error_std']:.2f}",
                     fontsize=10, fontweight="bold" if selected else "normal")
        if i % columns:
            ax.set_ylabel("")
    axes.flat[0].legend(fontsize=7)
    folds = len(rows[0]["fold_histories"])
    fig.suptitle(f"Cross-validation learning curves: {len(rows)} configurations x {folds} folds\n"
                 f"(dashed: training, solid: validation; one colour per fold)")
    return fig
