"""Callbacks that save the functional network (not the training wrapper)."""

from __future__ import annotations

import json
import math
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
