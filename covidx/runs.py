"""Training runs on disk: ``runs/<model>/<timestamp>/``, written and read here only.

A run directory holds ``config.json`` (:class:`RunConfig`: every resolved setting, including the
preprocessing definition), ``split.csv`` (the table with the patient-grouped split it trained on),
``best.keras`` / ``last.keras`` (the functional network), ``history.csv``, ``tensorboard/`` and
``backup/`` (optimizer state for ``--resume``). :func:`load_run` accepts a run directory or a
``.keras`` file inside one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from tqdm import tqdm

import covidx.layers  # noqa: F401  (registers the custom layers load_model needs)
import covidx.models  # noqa: F401  (registers the models' own layers)
from covidx.data.io import PATH_COLUMNS, missing_files_message
from covidx.data.pipeline import make_dataset
from covidx.data.preprocess import PreprocessConfig
from covidx.data.splitfile import read_split_file
from covidx.precision import inference_copy
from covidx.tasks import TASKS

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.csv"
LUNG_MASK = "lung_mask"  # the extra input of a Regional-Learning train step


@dataclass
class RunConfig:
    """``config.json`` of a run: what it trained, on what, how, and what a reader needs to use it."""

    model: str
    task: str
    classes: list[str]
    kind: str = "classification"  # or "segmentation"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    trainer: str = "standard"
    trainer_inputs: list[str] = field(default_factory=list)  # extra train-step inputs, e.g. "lung_mask"
    train: dict = field(default_factory=dict)  # the resolved training configuration (``TrainConfig``)
    respect_source_split: bool | None = None
    class_weights: list[float] | None = None
    parameters: int | None = None
    paper: str | None = None
    versions: dict = field(default_factory=dict)
    synthetic: bool = False  # trained on covidx's generated data (procedural images, not patients)
    test_source: str | None = None  # leave-one-source-out (--test-source): its test split is this whole source
    replicas: int = 1  # data-parallel replicas it trained on (tf.distribute); the global batch is split across them
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept on a round trip

    @property
    def regional(self) -> bool:
        """Trained with Regional Learning (a train step that takes lung masks): the system it belongs to
        feeds it the lung region ``X_T = X_O · M`` (Cascade-SEME's stage 2)."""
        return LUNG_MASK in self.trainer_inputs

    @property
    def validation(self) -> dict:
        """``{"kind": "external", "source": S}`` for a run that held source S out, else ``{"kind": "internal"}``."""
        return {"kind": "external", "source": self.test_source} if self.test_source else {"kind": "internal"}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in d.items() if k in names}
        values["preprocess"] = PreprocessConfig.from_dict(d.get("preprocess") or {})
        values["trainer"] = d.get("trainer") or "standard"
        values.setdefault("model", "unknown")  # hand-made configs may say only classes, task and preprocess
        values.setdefault("task", "unknown")
        if "trainer_inputs" not in d and values["trainer"] == "regional":
            values["trainer_inputs"] = [LUNG_MASK]  # configs written before the field: only "regional" took masks
        return cls(**values, extra={k: v for k, v in d.items() if k not in names and k != "extra"})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["preprocess"] = self.preprocess.to_dict()
        return {**d, **self.extra}

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunConfig":
        return cls.from_dict(json.loads((Path(run_dir) / CONFIG_FILE).read_text()))

    @classmethod
    def for_model(cls, model) -> "RunConfig":
        """What can be inferred of a bare ``.keras`` file with no run folder (class names are placeholders)."""
        return cls(model=model.name, task="unknown",
                   classes=[f"class_{i}" for i in range(model.outputs[0].shape[-1])],
                   kind="segmentation" if len(model.outputs[0].shape) == 4 else "classification",
                   preprocess=PreprocessConfig.for_model(model))


@dataclass
class Run:
    model: keras.Model
    config: RunConfig
    directory: Path | None
    checkpoint: Path

    @property
    def name(self) -> str:
        return self.config.model or self.model.name

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.config.preprocess

    @property
    def class_names(self) -> list[str]:
        return list(self.config.classes)

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def regional(self) -> bool:
        return self.config.regional

    def split_table(self) -> pd.DataFrame | None:
        """The run's ``split.csv``; raises :class:`FileNotFoundError` with how many of its files are missing
        (the data moved) and the first few, before any is decoded."""
        if self.directory is None or not (self.directory / SPLIT_FILE).is_file():
            return None
        table = read_split_csv(self.directory / SPLIT_FILE)
        files = [p for col in PATH_COLUMNS if col in table for p in table[col].astype(str)]
        problem = missing_files_message(files, str(self.directory / SPLIT_FILE),
                                        "the data moved: pass --data DATASET to say where it is now")
        if problem:
            raise FileNotFoundError(problem)
        return table


def read_split_csv(path: str | Path) -> pd.DataFrame:
    """A run's split (relative paths resolved against its folder, so evaluation works from any working folder)."""
    return read_split_file(path, strict=False)


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
    return p, (p.parent if (p.parent / CONFIG_FILE).is_file() else None)


def load_run(path: str | Path, compile: bool = False, precision: str | None = None,
             inference: bool = False) -> Run:
    """Load a checkpoint (safe_mode=True: no pickles, no Lambda) and its run configuration.

    ``inference`` (implied by a ``precision``) gives the network evaluate, predict and export run
    (:func:`covidx.precision.inference_copy`: batch norms folded into their convolutions, computed in
    ``precision``: ``fp32`` / ``bf16`` / ``fp16`` / ``auto``, float32 outputs; ``None`` keeps the precision it
    was trained in). Without it the checkpoint is returned as saved (e.g. to explain its layers or fine-tune it).
    """
    ckpt, run_dir = find_checkpoint(path)
    model = keras.models.load_model(ckpt, compile=compile, safe_mode=True)
    if inference or precision is not None:
        model = inference_copy(model, precision)
    config = RunConfig.load(run_dir) if run_dir is not None else RunConfig.for_model(model)
    return Run(model, config, run_dir, ckpt)


def as_run(run_or_path) -> Run:
    """A :class:`Run` from a Run, a run directory or a ``.keras`` file (what every API that takes a run
    accepts)."""
    return run_or_path if isinstance(run_or_path, Run) else load_run(run_or_path)


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


def predict_paths(run_or_path, paths, batch_size: int = 16, progress: bool = False) -> tuple[np.ndarray, Run]:
    """Probabilities ``(N, K)`` of a run on image files, through its own preprocessing; returns the run too."""
    run = as_run(run_or_path)
    probs, _ = predict_table(run, pd.DataFrame(dict(path=list(paths))), batch_size, progress)
    return probs, run
