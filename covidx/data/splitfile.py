"""Split files: a split written once, shared, and reused (as COVIDx publishes its ``train.txt`` / ``test.txt``).

A CSV with the columns ``path, label, patient_id, source, split`` (one row per image), then any of
``group_id`` (patients joined by a shared image), ``finding``, ``mask_path``, ``lesion_path``.
Paths are written absolute, or relative to the split file's folder (``relative=True``: a split file
kept beside the data travels with it); relative paths are always resolved against the split file's
folder, so a split file works from any working directory.

``python -m covidx.data PATHS --task T --write-split FILE`` writes one; ``python -m covidx.train
--split FILE`` trains on it; every run keeps its own as ``split.csv`` (read by evaluation).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from covidx.data.io import is_dicom
from covidx.data.sources import DatasetError
from covidx.data.splits import SPLITS, assert_no_patient_leak
from covidx.tasks import Task

SPLIT_COLUMNS = ["path", "label", "patient_id", "source", "split"]
EXTRA_COLUMNS = ["group_id", "finding", "label_index", "mask_path", "lesion_path"]


def write_split_file(table: pd.DataFrame, file: str | Path, relative: bool = False) -> Path:
    """Write ``table``'s split to ``file`` (CSV); returns the path."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    base = file.parent.resolve()
    out = table[SPLIT_COLUMNS + [c for c in EXTRA_COLUMNS if c in table.columns]].copy()

    def place(p):
        if not p:
            return p
        p = Path(p).resolve()
        return os.path.relpath(p, base) if relative else str(p)

    for col in ("path", "mask_path", "lesion_path"):
        if col in out.columns:
            out[col] = [place(str(p)) for p in out[col].fillna("").astype(str)]
    out.to_csv(file, index=False)
    return file


def read_split_file(file: str | Path, task: Task | None = None, strict: bool = True) -> pd.DataFrame:
    """Read a split file as a table the pipeline takes (``label_index``, ``dicom``, mask columns).

    With ``task`` every label must be one of its classes and ``label_index`` is recomputed from them.
    ``strict=False`` (a run's own ``split.csv``, possibly written by hand or an older release) only needs
    ``path`` and ``split``: the other columns are filled in, and the patient check runs when it can.

    Raises:
        DatasetError: missing file or columns, a label outside the task, an unknown split name, or a patient
            in two splits (the message names the file and the rows).
    """
    file = Path(file)
    if not file.is_file():
        raise DatasetError(f"{file}: no such split file")
    try:
        df = pd.read_csv(file, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DatasetError(f"{file}: not a CSV split file ({e})") from None
    if not strict:
        for col in SPLIT_COLUMNS[1:]:
            if col not in df.columns:
                df[col] = df["finding"] if col == "label" and "finding" in df.columns else ""
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"{file}: missing column(s) {', '.join(missing)} (a split file has {', '.join(SPLIT_COLUMNS)})")
    if df.empty:
        raise DatasetError(f"{file}: the split file has no rows")
    bad = df.index[~df["split"].isin(SPLITS if strict else SPLITS + ("",))]
    if len(bad):
        raise DatasetError(f"{file}: row {bad[0] + 2} has split {df.at[bad[0], 'split']!r}; expected one of {', '.join(SPLITS)}")
    base = file.parent

    def resolve(p):
        return str(p if not p or Path(p).is_absolute() else (base / p).resolve())

    for col in ("path", "mask_path", "lesion_path"):
        df[col] = [resolve(p) for p in df[col]] if col in df.columns else ""
    if "finding" not in df.columns:
        df["finding"] = df["label"]
    if task is not None:
        wrong = df.index[~df["label"].isin(task.classes)]
        if len(wrong):
            raise DatasetError(f"{file}: row {wrong[0] + 2} has label {df.at[wrong[0], 'label']!r}, not a class of task "
                               f"{task.name} ({', '.join(task.classes)})")
        df["label_index"] = df["label"].map(task.classes.index).astype(int)
    elif "label_index" in df.columns:
        df["label_index"] = pd.to_numeric(df["label_index"], errors="coerce").fillna(0).astype(int)
    try:
        assert_no_patient_leak(df if strict or (df["patient_id"] != "").all() else df.drop(columns="patient_id"))
    except AssertionError as e:
        raise DatasetError(f"{file}: {e}") from None
    df["dicom"] = [is_dicom(p) for p in df["path"]]
    return df
