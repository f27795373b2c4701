"""Figures of the papers' evaluation: ROC curves, confusion matrices, reliability diagram.

Figures are drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg
canvas, never through ``pyplot``: no global backend switch, no open-figure
registry to leak, safe in headless jobs and inside notebooks alike. Every
function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 150
FONT_SIZE = 11


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **subplots_kw):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplots_kw)
    return fig, axes.ravel()


def _save(fig: Figure, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return str(path)


def _roc_axes(ax, title: str) -> None:
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate (1 - specificity)", fontsize=FONT_SIZE)
    ax.set_ylabel("True positive rate (sensitivity)", fontsize=FONT_SIZE)
    ax.set_title(title, fontsize=FONT_SIZE + 1)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=FONT_SIZE - 1)


def plot_roc(curves: Mapping[str, dict | None], path, title: str = "ROC (one-vs-rest)") -> str:
    """One-vs-rest ROC curve per class with its AUC in the legend (cascade paper Fig. 9).

    ``curves`` is ``classification_metrics(...)["roc"]``; classes without a
    curve (``None``: absent from the split) are listed as "n/a".
    """
    fig, (ax,) = _figure(6.5, 6.5)
    for name, curve in curves.items():
        if curve is None:
            ax.plot([], [], linestyle="none", label=f"{name} (AUC n/a: class absent)")
            continue
        ax.plot(curve["fpr"], curve["tpr"], linewidth=2, label=f"{name} (AUC = {curve['auc']:.3f})")
    _roc_axes(ax, title)
    return _save(fig, path)


def plot_roc_comparison(model_curves: Mapping[str, Mapping[str, dict | None]], path) -> str:
    """ROC curves of several models overlaid, one panel per class (cascade paper Fig. 9).

    ``model_curves`` maps a model name to its ``roc`` dict (class -> curve).
    """
    class_names = list(next(iter(model_curves.values())).keys())
    ncols = min(len(class_names), 2)
    nrows = int(np.ceil(len(class_names) / ncols))
    fig, axes = _figure(6.0 * ncols, 6.0 * nrows, ncols=ncols, nrows=nrows)
    for ax, cls in zip(axes, class_names):
        for model, curves in model_curves.items():
            curve = curves.get(cls)
            if curve is None:
                ax.plot([], [], linestyle="none", label=f"{model} (AUC n/a)")
            else:
                ax.plot(curve["fpr"], curve["tpr"], linewidth=2, label=f"{model} (AUC = {curve['auc']:.3f})")
        _roc_axes(ax, f"{cls} vs rest")
    for ax in axes[len(class_names):]:
        ax.set_visible(False)
    return _save(fig, path)


def _matrix_panel(fig, ax, values, labels, class_names, title, vmax):
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
    k = len(class_names)
    ticks = np.arange(k)
    ax.set_xticks(ticks, class_names, rotation=30, ha="right", fontsize=FONT_SIZE)
    ax.set_yticks(ticks, class_names, fontsize=FONT_SIZE)
    ax.set_xlabel("Predicted class", fontsize=FONT_SIZE)
    ax.set_ylabel("True class", fontsize=FONT_SIZE)
    ax.set_title(title, fontsize=FONT_SIZE + 1)
    cell_font = max(7, FONT_SIZE + 2 - k)
    for i in range(k):
        for j in range(k):
            dark = values[i, j] > 0.5 * vmax  # white text on dark cells stays readable
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=cell_font,
                    color="white" if dark else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def plot_confusion(cm, class_names: Sequence[str], path, normalized=None, title: str | None = None) -> str:
    """Confusion matrix as counts and row-normalised side by side (MAG-SD Fig. 8).

    Rows are true classes, columns predicted ones. ``normalized`` defaults to
    ``cm`` divided by its row sums (rows of absent classes stay 0).
    """
    counts = np.asarray(cm, dtype=np.float64)
    if normalized is None:
        rows = counts.sum(axis=1, keepdims=True)
        normalized = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    normalized = np.asarray(normalized, dtype=np.float64)
    k = len(class_names)
    side = max(5.0, 1.1 * k + 2.5)
    fig, (ax_counts, ax_norm) = _figure(2 * side + 1, side, ncols=2)
    count_labels = [[f"{int(v)}" for v in row] for row in counts]
    norm_labels = [[f"{v:.2f}" for v in row] for row in normalized]
    _matrix_panel(fig, ax_counts, counts, count_labels, class_names, "Counts", max(counts.max(), 1.0))
    _matrix_panel(fig, ax_norm, normalized, norm_labels, class_names, "Normalised by true class", 1.0)
    if title:
        fig.suptitle(title, fontsize=FONT_SIZE + 2)
    return _save(fig, path)


def plot_calibration(reliability: Mapping, path, title: str = "Reliability diagram") -> str:
    """Reliability diagram: accuracy vs confidence per bin, with the ECE, over a histogram of confidences.

    ``reliability`` is ``classification_metrics(...)["calibration"]``.
    """
    bins = reliability["bins"]
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    accuracy = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins])
    confidence = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins])
    counts = np.array([b["count"] for b in bins])
    fig, (ax, ax_hist) = _figure(6.5, 7.5, nrows=2, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = counts > 0
    ax.bar(lower[filled], accuracy[filled], width=width[filled], align="edge", color="tab:blue",
           edgecolor="black", alpha=0.8, label="accuracy")
    ax.bar(lower[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width[filled],
           align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.4", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy", fontsize=FONT_SIZE)
    ax.set_title(f"{title} (ECE = {reliability['ece']:.3f}, {reliability['n_bins']} bins)", fontsize=FONT_SIZE + 1)
    ax.legend(loc="upper left", fontsize=FONT_SIZE - 1)
    ax.grid(alpha=0.3)
    ax_hist.bar(lower, counts, width=width, align="edge", color="0.5", edgecolor="black")
    ax_hist.set_xlabel("Confidence (max predicted probability)", fontsize=FONT_SIZE)
    ax_hist.set_ylabel("Images", fontsize=FONT_SIZE)
    ax_hist.grid(alpha=0.3)
    return _save(fig, path)
