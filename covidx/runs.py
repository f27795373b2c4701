"""Training runs on disk: ``runs/<model>/<timestamp>/`` and how to load them back.

A run directory holds ``config.json`` (every resolved setting, including the
preprocessing definition), ``split.csv`` (the table with the patient-grouped
split it trained on), ``best.keras`` / ``last.keras`` (the functional network),
``history.csv``, ``tensorboard/`` and ``backup/`` (optimizer state for
``--resume``). :func:`load_run` accepts a run directory or a ``.keras`` file
inside one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covidx.data.preprocess import PreprocessConfig


@dataclass
class Run:
    model: object  # keras.Model
    config: dict
    directory: Path | None
    checkpoint: Path

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.config.get("preprocess", {}))

    @property
    def class_names(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def regional(self) -> bool:
        """Trained with Regional Learning (a train step that takes lung masks): the system it belongs to feeds
        it the lung region ``X_T = X_O · M`` (Cascade-SEME's stage 2)."""
        name = self.config.get("trainer")
        if not name:
            return False
        import covidx.training  # noqa: F401  (registers every trainer)
        from covidx.training.trainers import get_trainer

        try:
            return "lung_mask" in get_trainer(name).needs
        except ValueError:
            return False

    def split_table(self) -> pd.DataFrame | None:
        if self.directory is None or not (self.directory / "split.csv").is_file():
            return None
        return pd.read_csv(self.directory / "split.csv", dtype={"split": str, "mask_path": str, "lesion_path": str},
                           keep_default_na=False)


def find_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint file, run directory or None) for a run directory or a ``.keras`` file."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.keras", "last.keras"):
            if (p / name).is_file():
                return p / name, p
        raise FileNotFoundError(f"{p}: no best.keras or last.keras in this run directory")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such checkpoint")
    return p, (p.parent if (p.parent / "config.json").is_file() else None)


def load_config(run_dir: Path | None) -> dict:
    if run_dir is None:
        return {}
    return json.loads((run_dir / "config.json").read_text())


def load_run(path: str | Path, compile: bool = False) -> Run:
    """Load a checkpoint (safe_mode=True: no pickles, no Lambda) and its run configuration."""
    import keras

    import covidx.layers  # noqa: F401  (registers custom layers)
    import covidx.models  # noqa: F401

    ckpt, run_dir = find_checkpoint(path)
    model = keras.models.load_model(ckpt, compile=compile, safe_mode=True)
    config = load_config(run_dir)
    if not config:
        # A bare .keras file: infer what can be inferred, say what was assumed.
        shape = model.inputs[0].shape
        config = {"classes": [f"class_{i}" for i in range(model.outputs[0].shape[-1])], "task": "unknown",
                  "preprocess": PreprocessConfig(image_size=int(shape[1]), channels=int(shape[-1])).to_dict()}
    return Run(model, config, run_dir, ckpt)


def lung_region_input(run: Run, table: pd.DataFrame) -> bool:
    """Whether ``run`` is fed the lung region ``X_T = X_O · M`` for ``table``: a Regional-Learning run
    (deployed that way as the cascade's stage 2) and a lung mask for every row."""
    return run.regional and "mask_path" in table and bool((table["mask_path"].astype(str) != "").all())


def predict_table(run: Run, table: pd.DataFrame, batch_size: int = 16, progress: bool = False,
                  lung_region: bool = False):
    """Run ``run.model`` over ``table`` with the run's own preprocessing (the evaluation path).

    ``lung_region`` feeds ``X_T = X_O · M`` with the masks of ``mask_path`` (the Regional-Learning
    input, see :func:`lung_region_input`) instead of the image. Returns ``(outputs, targets)``:
    probabilities ``(N, K)`` (or per-pixel probabilities for segmenters) and the targets the pipeline
    derived (one-hot / class maps; meaningless for tables without labels). Rows are kept in order;
    unreadable files raise (check them first).
    """
    import numpy as np

    from covidx.data import make_dataset
    from covidx.tasks import TASKS

    table = table.copy()
    for col in ("mask_path", "lesion_path"):
        if col not in table:
            table[col] = ""
    if "label_index" not in table:
        table["label_index"] = 0
    task = TASKS.get(run.task, TASKS["4class"])
    ds = make_dataset(table, task, run.preprocess, batch_size=batch_size, cache=False, ignore_errors=False,
                      lung_masks=lung_region)
    if progress:
        from tqdm import tqdm

        ds = tqdm(ds, total=-(-len(table) // batch_size), desc="predicting", unit="batch")
    outs, ys = [], []
    for x, y, _ in ds:
        if lung_region:
            x = x["image"] * x["lung_mask"]
        out = run.model.predict_on_batch(x)  # a compiled function: eager calls re-trace grouped convs
        out = out[0] if isinstance(out, (list, tuple)) else out
        outs.append(np.asarray(out, dtype=np.float32))
        ys.append(np.asarray(y))
    return np.concatenate(outs), np.concatenate(ys)
