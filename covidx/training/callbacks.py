"""Callbacks: save the functional network (not the training wrapper); stop at a time budget."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import keras


def checkpoint_monitor(kind: str, validation: bool) -> tuple[str, str]:
    """``(metric, mode)`` that picks ``best.keras``: the figure the papers report, on the validation split.

    Classifiers: validation macro AUC (Keras' one-vs-rest ``auc``, ``multi_label=True``), segmenters:
    validation Dice. Not the validation loss: a from-scratch network's cross-entropy climbs while its ranking
    still improves (over-confident wrong answers weigh more and more), and under cosine annealing to 0 the last
    epochs are the best-ranking ones (Kermany, SEME-ResNet50, 8 epochs at 128 px: the lowest-loss checkpoint,
    epoch 6, scored validation macro AUC 0.912, the last 0.920). Without a validation split: the training
    loss.
    """
    if not validation:
        return "loss", "min"
    return ("val_dice", "max") if kind == "segmentation" else ("val_auc", "max")


BEST_STATE = "best.json"  # which epoch best.keras is: {"monitor", "value", "epoch"}


def kept_checkpoint(run_dir: str | Path) -> dict:
    """``best.json`` of a run folder (``{}`` when there is none): the monitor, value and epoch of ``best.keras``."""
    state = Path(run_dir) / BEST_STATE
    return json.loads(state.read_text()) if state.is_file() else {}


class NetCheckpoint(keras.callbacks.Callback):
    """Save ``trainer.net`` as ``last.keras`` every epoch and ``best.keras`` when ``monitor`` improves.

    The best value is kept in ``best.json`` (with the monitor and epoch) so a resumed run keeps comparing
    against it; a ``best.json`` written for another monitor starts the comparison afresh.
    """

    def __init__(self, run_dir: str | Path, monitor: str = "val_loss", mode: str = "min"):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.monitor, self.mode = monitor, mode
        saved = kept_checkpoint(self.run_dir)
        self.best = saved["value"] if saved.get("monitor") == monitor else (math.inf if mode == "min" else -math.inf)

    def _better(self, value: float) -> bool:
        return value < self.best if self.mode == "min" else value > self.best

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        net = self.model.net
        net.save(self.run_dir / "last.keras")
        value = logs.get(self.monitor, logs.get(self.monitor.replace("val_", "")))
        if value is not None and math.isfinite(float(value)) and self._better(float(value)):
            self.best = float(value)
            net.save(self.run_dir / "best.keras")
            (self.run_dir / BEST_STATE).write_text(
                json.dumps({"monitor": self.monitor, "value": self.best, "epoch": epoch + 1})
            )


def process_cpu_seconds() -> float:
    """User + system CPU time of this process, every thread included (tf.data's and TF's pools)."""
    t = os.times()
    return t.user + t.system


class TimeBudget(keras.callbacks.Callback):
    """Stop training once ``seconds`` of ``clock`` ("cpu": this process's CPU time; "wall") have passed.

    Checked after every batch; Keras then finishes the epoch's bookkeeping (validation, checkpoints).
    Writes ``budget.json`` in ``run_dir``: steps, images seen, CPU and wall seconds, images per wall second.
    A CPU budget is what a shared machine can compare: wall time grows with other people's load.
    """

    def __init__(self, seconds: float, clock: str = "cpu", batch_size: int = 1, run_dir: str | Path | None = None):
        super().__init__()
        if clock not in ("cpu", "wall"):
            raise ValueError(f"unknown clock {clock!r} (cpu, wall)")
        self.seconds, self.clock, self.batch_size = float(seconds), clock, int(batch_size)
        self.run_dir = Path(run_dir) if run_dir else None
        self.steps = 0
        self.exhausted = False

    def _now(self) -> float:
        return process_cpu_seconds() if self.clock == "cpu" else time.perf_counter()

    def on_train_begin(self, logs=None):
        self.start, self.cpu0, self.wall0 = self._now(), process_cpu_seconds(), time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self._now() - self.start >= self.seconds:
            self.exhausted = True
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        wall = time.perf_counter() - self.wall0
        stats = {"clock": self.clock, "budget_s": self.seconds, "exhausted": self.exhausted, "steps": self.steps,
                 "images": self.steps * self.batch_size, "cpu_s": process_cpu_seconds() - self.cpu0, "wall_s": wall,
                 "images_per_wall_s": self.steps * self.batch_size / max(wall, 1e-9)}
        if self.run_dir is not None:
            (self.run_dir / "budget.json").write_text(json.dumps(stats, indent=2))


class ValidationGap(keras.callbacks.Callback):
    """Say so when the validation loss is non-finite or ``ratio`` times the training loss, with the likely cause.

    What it catches (a lung U-Net under the Cascade-SEME paper's Adam at eta_max 0.1 printed
    ``val_loss: 2.65e21``): weights that jump at every step leave BatchNorm's running mean and variance
    (an average over recent steps) describing activations the network no longer produces, so in inference
    mode (validation) activations grow layer after layer; and because Keras computes the cross-entropy
    of a softmax output from its logits (numerically exact, but unbounded), the validation loss grows
    with the logits instead of stopping near -log(1e-7). The run goes on; this names the cause once and
    the size of the gap at every epoch where it holds.
    """

    def __init__(self, ratio: float = 100.0, setting: str = ""):
        super().__init__()
        self.ratio, self.setting, self.said = float(ratio), setting, False

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss, val = logs.get("loss"), logs.get("val_loss")
        if loss is None or val is None:
            return
        loss, val = float(loss), float(val)
        if math.isfinite(val) and val <= self.ratio * max(loss, 1e-3):
            return
        gap = f"{val / loss:,.0f}x " if math.isfinite(val) and loss > 0 else ""
        print(f"warning: epoch {epoch + 1}: validation loss {val:.3g} is {gap}the training loss {loss:.3g}", flush=True)
        if not self.said:
            self.said = True
            print("  the network in inference mode (BatchNorm's running statistics) no longer matches what it "
                  "computes in training, usually because the learning rate is too high for it"
                  + (f" ({self.setting})" if self.setting else "")
                  + ": try --recipe quick or a 10-100x smaller --lr; validation figures of this run mean little "
                    "until the gap closes", flush=True)
