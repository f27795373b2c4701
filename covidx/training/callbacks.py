"""Callbacks: save the functional network (not the training wrapper); stop at a time budget."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import keras


class NetCheckpoint(keras.callbacks.Callback):
    """Save ``trainer.net`` as ``last.keras`` every epoch and ``best.keras`` when ``monitor`` improves.

    The best value is kept in ``best.json`` so a resumed run keeps comparing against it.
    """

    def __init__(self, run_dir: str | Path, monitor: str = "val_loss", mode: str = "min"):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.monitor, self.mode = monitor, mode
        state = self.run_dir / "best.json"
        self.best = json.loads(state.read_text())["value"] if state.is_file() else (math.inf if mode == "min" else -math.inf)

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
            (self.run_dir / "best.json").write_text(
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
