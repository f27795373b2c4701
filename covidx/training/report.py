"""Pictures and verdicts of learning: ``curves.png`` every epoch, "did validation beat chance?" at the end.

* :class:`LearningCurves` redraws ``curves.png`` (loss and every compiled metric per epoch,
  training and validation) from ``history.csv`` after each epoch, so a killed or resumed run
  has its picture too.
* :func:`split_figures` scores a run's checkpoint on one of its own splits and says, in one
  line, whether it beat chance. Classifiers: the macro AUC's 95 % confidence interval from a
  patient bootstrap (1,000 resamples of patients, :func:`covidx.evaluation.classification_metrics`)
  must lie above 0.5, the AUC of a model that ranks at random. Segmenters: the per-image Dice
  must beat the Dice of marking every pixel as foreground, with the bootstrap 95 % interval of
  the mean difference above 0.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import keras
import numpy as np
from matplotlib.ticker import MaxNLocator

from covidx.evaluation import classification_metrics
from covidx.evaluation.plots import _figure, _save
from covidx.runs import load_run, lung_region_input, predict_table

CURVES = "curves.png"
END_OF_RUN = "end_of_run.json"
N_BOOTSTRAP = 1000


def _read_history(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                out.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                out.setdefault(k, []).append(math.nan)
    return out


def plot_learning_curves(history_csv: str | Path, path: str | Path, title: str = "") -> str | None:
    """One panel per quantity (loss first, then each metric), training and validation against epoch."""
    history = _read_history(Path(history_csv))
    if not history.get("epoch"):
        return None
    epochs = np.asarray(history["epoch"]) + 1
    names = [k for k in history if k not in ("epoch", "learning_rate") and not k.startswith("val_")]
    names = sorted(names, key=lambda k: (k != "loss", k))
    fig, axes = _figure(3.6 * len(names), 3.2, ncols=len(names))
    for ax, name in zip(axes, names):
        ax.plot(epochs, history[name], marker="o", markersize=3, label="training")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], marker="o", markersize=3, label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


class LearningCurves(keras.callbacks.Callback):
    """Redraw ``run_dir/curves.png`` from ``history.csv`` at the end of every epoch (after CSVLogger)."""

    def __init__(self, run_dir: str | Path, title: str = ""):
        super().__init__()
        self.run_dir, self.title = Path(run_dir), title

    def on_epoch_end(self, epoch, logs=None):
        history = self.run_dir / "history.csv"
        if history.is_file():
            plot_learning_curves(history, self.run_dir / CURVES, self.title)


def _dice_per_image(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, pred.ndim))
    inter = (pred & true).sum(axes)
    total = pred.sum(axes) + true.sum(axes)
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def split_figures(run_dir: str | Path, split: str = "val", seed: int = 0) -> dict | None:
    """Score ``run_dir``'s best checkpoint (or the run's checkpoint file given, e.g. ``RUN/last.keras``) on its
    ``split`` (from ``split.csv``); ``None`` if the split is empty.

    Returns ``{"split", "n", "kind", figures..., "beat_chance": bool, "line": str}``.
    """
    run = load_run(run_dir)
    table = run.split_table()
    if table is None:
        return None
    table = table[table["split"] == split].reset_index(drop=True)
    if table.empty:
        return None
    regional = lung_region_input(run, table)
    probs, targets = predict_table(run, table, lung_region=regional)
    where = " (lung region)" if regional else ""
    if run.config.kind == "segmentation" or probs.ndim == 4:
        true = targets.argmax(-1) > 0 if targets.ndim == 4 else targets > 0
        dice = _dice_per_image(probs.argmax(-1) > 0, true)
        trivial = _dice_per_image(np.ones_like(true), true)
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(dice), size=(N_BOOTSTRAP, len(dice)))
        lo, hi = np.percentile((dice - trivial)[idx].mean(1), [2.5, 97.5])
        beat = bool(lo > 0)
        line = (f"{split}{where}: Dice {dice.mean():.3f} vs {trivial.mean():.3f} for marking every pixel; "
                f"beat chance: {'yes' if beat else 'NO'} (bootstrap 95 % CI of the difference {lo:+.3f} to {hi:+.3f}, "
                f"{len(dice)} images)")
        return dict(split=split, n=len(dice), kind="segmentation", dice=float(dice.mean()),
                    trivial_dice=float(trivial.mean()), ci=[float(lo), float(hi)], beat_chance=beat, line=line)
    y_true = table["label_index"].to_numpy().astype(int)
    m = classification_metrics(y_true, probs, run.class_names, patient_ids=list(table["patient_id"]),
                               n_bootstrap=N_BOOTSTRAP, seed=seed, positive_class=None)
    auc, ci = m["macro"]["auc"], m["ci"].get("macro_auc")
    k = len(run.class_names)
    beat = bool(ci is not None and ci[0] is not None and ci[0] > 0.5)
    ci_text = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and ci[0] is not None else "undefined"
    auc_text = f"{auc:.3f}" if auc is not None else "undefined"
    line = (f"{split}{where}: accuracy {m['accuracy']:.3f} (chance {1 / k:.2f}), macro AUC {auc_text}; "
            f"beat chance: {'yes' if beat else 'NO'} (macro AUC patient-bootstrap 95 % CI {ci_text} "
            f"{'above' if beat else 'not above'} 0.5; {m['n_samples']} images, {m['n_patients']} patients)")
    return dict(split=split, n=m["n_samples"], kind="classification", accuracy=m["accuracy"], macro_auc=auc,
                ci=ci, beat_chance=beat, line=line)
