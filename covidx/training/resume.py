"""Resuming a killed run so that it repeats the uninterrupted run epoch for epoch.

Two sources of randomness advance per epoch: the input pipeline (its shuffle order and the per-image
stateless seeds, :func:`covidx.data.pipeline.make_dataset`, both re-drawn each time an iterator of the
dataset is created, i.e. each epoch) and Keras' seed generators (dropout, random layers, trainers that
draw with ``keras.random``). :class:`EpochSeeds` sets the latter from ``(seed, epoch)`` at the start of
every epoch; :func:`fast_forward` brings a fresh pipeline to the epoch a resumed run starts at, by creating
(and discarding) one iterator per completed epoch, as the uninterrupted run did.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

METADATA = "training_metadata.json"  # written by keras.callbacks.BackupAndRestore in its backup folder


def completed_epochs(backup_dir: str | Path) -> int:
    """Epochs a run finished before it stopped, from ``BackupAndRestore``'s metadata (0 when none)."""
    path = Path(backup_dir) / METADATA
    if not path.is_file():
        return 0
    try:
        return int(json.loads(path.read_text()).get("epoch", 0))
    except (ValueError, TypeError):
        return 0


def fast_forward(dataset, epochs: int) -> None:
    """Advance ``dataset``'s per-iteration randomness (reshuffle, re-randomised seeds) by ``epochs`` epochs
    without reading it: creating an iterator draws the next epoch's seeds."""
    for _ in range(epochs):
        iterator = iter(dataset)
        del iterator


def epoch_seed(seed: int, epoch: int) -> int:
    """One 31-bit seed per (run seed, epoch)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_generators(model) -> list:
    """Every ``keras.random.SeedGenerator`` a model's layers hold (dropout, random augmentation layers)."""
    found = []
    for layer in [model, *model._flatten_layers(include_self=False)]:
        found.extend(getattr(layer, "_seed_generators", []) or [])
    return found


class EpochSeeds(keras.callbacks.Callback):
    """At the start of each epoch: Python, NumPy, TF and Keras' global seeds and the state of every layer
    seed generator from ``(seed, epoch)``, so epoch ``e`` draws the same numbers whether or not the run was
    interrupted before it."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = int(seed)

    def on_epoch_begin(self, epoch, logs=None):
        s = epoch_seed(self.seed, epoch)
        keras.utils.set_random_seed(s)
        for i, gen in enumerate(seed_generators(self.model)):
            state = np.asarray(keras.ops.convert_to_numpy(gen.state))
            gen.state.assign(np.asarray([epoch_seed(s, i), 0], dtype=state.dtype).reshape(state.shape))
