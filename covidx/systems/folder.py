"""A saved system folder: one ``.keras`` file per model and one JSON that says how they fit together."""

from __future__ import annotations

import json
from pathlib import Path

import keras


def write_folder(directory: str | Path, models: dict, config_file: str, config: dict) -> Path:
    """Save each model as ``<name>.keras`` (a ``None`` model removes a stale file) and ``config`` as JSON."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        (d / f"{name}.keras").unlink(missing_ok=True)
        if model is not None:
            model.save(d / f"{name}.keras")
    (d / config_file).write_text(json.dumps(config, indent=2))
    return d


def read_folder(directory: str | Path, config_file: str, hint: str):
    """``(config dict, load(name) -> keras.Model)`` of a saved folder; ``load`` uses ``safe_mode=True`` (no
    pickles, no Lambda). A folder without ``config_file`` raises FileNotFoundError with ``hint``."""
    d = Path(directory)
    if not (d / config_file).is_file():
        raise FileNotFoundError(f"{d}: no {config_file} ({hint})")

    def load(name: str) -> keras.Model:
        return keras.models.load_model(d / f"{name}.keras", compile=False, safe_mode=True)

    return json.loads((d / config_file).read_text()), load
