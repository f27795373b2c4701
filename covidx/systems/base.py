"""The interface every multi-model system shares (MONAI's ``apps/`` idea: trained networks joined by a rule).

A system is built from trained runs (``from_runs``), runs on images of any size (``predict``: file
paths, PNG/JPEG bytes or arrays, each model with its own preprocessing), explains its decisions
(``explain``: Grad-CAM of each model on the input it decided from) and persists as a folder of
``.keras`` files plus one JSON (``save`` / ``load``, ``safe_mode=True``). :func:`load_system` opens a
saved folder whichever system wrote it; :mod:`covidx.serving.systems` exports each as one SavedModel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from covidx.systems.cascade import CascadeSEME
from covidx.systems.two_stage import TwoStagePredictor


@runtime_checkable
class System(Protocol):
    def predict(self, images, batch_size: int = 16): ...

    def explain(self, images, out_dir=None, method: str = "gradcam", batch_size: int = 16) -> list[dict]: ...

    def config(self) -> dict: ...

    def save(self, directory: str | Path) -> Path: ...


# The JSON file that marks a saved system folder, and the class that reads it.
SYSTEM_FILES = {"cascade.json": CascadeSEME, "two_stage.json": TwoStagePredictor}


def system_kind(directory: str | Path) -> str | None:
    """``"cascade.json"`` / ``"two_stage.json"`` for a saved system folder, else ``None``."""
    d = Path(directory)
    return next((name for name in SYSTEM_FILES if (d / name).is_file()), None)


def load_system(directory: str | Path) -> System:
    kind = system_kind(directory)
    if kind is None:
        raise FileNotFoundError(f"{directory}: not a saved system (no {' or '.join(SYSTEM_FILES)})")
    return SYSTEM_FILES[kind].load(directory)
