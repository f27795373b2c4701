"""Task selection and patient-grouped, label-stratified splits.

No patient ever appears in two splits (COVID-Net#25 and friends: leakage across
splits inflates every metric); splits are deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidx.data.sources import DatasetError, IndexReport
from covidx.tasks import Task, get_task

SPLITS = ("train", "val", "test")


def select_task(table: pd.DataFrame, task: str | Task, report: IndexReport | None = None) -> pd.DataFrame:
    """Keep the rows the task uses and add ``label`` and ``label_index``.

    Classification: rows whose finding the task maps. Segmentation: rows that have
    the task's mask file (``mask_path`` for ``lungs``, ``lesion_path`` for
    ``lesions``). What is dropped is summarised in ``report`` per finding.
    """
    task = get_task(task) if isinstance(task, str) else task
    if task.kind == "segmentation":
        keep = table[task.mask_column].astype(str) != ""
        out = table.loc[keep].copy()
        out["label"] = task.classes[1]
        out["label_index"] = 1
        dropped = int((~keep).sum())
        if dropped and report is not None:
            report.unmap(f"{dropped} images", f"no {task.mask_column.replace('_path', '')} mask for task {task.name}")
    else:
        labels = table["finding"].map(lambda f: task.label_of(f))
        keep = labels.notna()
        out = table.loc[keep].copy()
        out["label"] = labels[keep]
        out["label_index"] = out["label"].map(task.classes.index).astype(int)
        if report is not None:
            for finding, n in table.loc[~keep, "finding"].value_counts().items():
                report.unmap(f"{n} images", f"finding {finding or 'unlabelled'!r} is not part of task {task.name}")
    if out.empty:
        raise DatasetError(f"no images of this dataset belong to task {task.name} ({task.description})")
    return out.reset_index(drop=True)


def split_table(
    table: pd.DataFrame,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    respect_source_split: bool = False,
    report: IndexReport | None = None,
) -> pd.DataFrame:
    """Assign ``split`` (train/val/test) by patient, stratified by label.

    Each patient gets the label most of its images carry; within every label the
    patients are shuffled with ``seed`` and cut into test, val and train by the
    fractions (at least one patient per non-empty split when a label has three or
    more patients). With ``respect_source_split`` rows that came with a split
    (Kermany, COVIDx) keep it; the rest are split as above, and when the sources
    define no val split one is carved from their train patients. A patient found
    in two source splits is moved wholly to the split holding most of its images
    (and reported).
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be >= 0 and sum to less than 1")
    out = table.copy()
    label_col = "label" if "label" in out.columns else "finding"
    rng = np.random.default_rng(seed)
    given = out["split"].isin(SPLITS) if respect_source_split else pd.Series(False, index=out.index)
    if not respect_source_split:
        out["split"] = ""
    else:
        out.loc[~given, "split"] = ""
        _fix_patients_across_splits(out, given, report)

    def cut(patients_by_label: dict, fractions: dict) -> dict:
        assign = {}
        for label in sorted(patients_by_label):
            pats = sorted(patients_by_label[label])
            rng.shuffle(pats)
            n = len(pats)
            counts = {s: int(round(f * n)) for s, f in fractions.items()}
            if n >= 3:
                counts = {s: max(1, c) if fractions[s] > 0 else 0 for s, c in counts.items()}
            start = 0
            for s, c in counts.items():
                for p in pats[start:start + c]:
                    assign[p] = s
                start += c
            for p in pats[start:]:
                assign[p] = "train"
        return assign

    def majority(rows):
        return rows.groupby("patient_id")[label_col].agg(lambda s: s.value_counts().index[0])

    free = out.loc[out["split"] == ""]
    if len(free):
        maj = majority(free)
        groups = {lab: list(maj.index[maj == lab]) for lab in maj.unique()}
        assign = cut(groups, {"test": test_fraction, "val": val_fraction})
        out.loc[free.index, "split"] = free["patient_id"].map(assign)
    if respect_source_split and val_fraction > 0 and not (out["split"] == "val").any():
        train = out.loc[out["split"] == "train"]
        maj = majority(train)
        groups = {lab: list(maj.index[maj == lab]) for lab in maj.unique()}
        frac = val_fraction / max(1e-9, 1 - test_fraction)
        assign = cut(groups, {"val": frac})
        out.loc[train.index, "split"] = train["patient_id"].map(assign)
    assert_no_patient_leak(out)
    return out


def _fix_patients_across_splits(out: pd.DataFrame, given: pd.Series, report: IndexReport | None):
    sub = out.loc[given]
    n_splits = sub.groupby("patient_id")["split"].nunique()
    for pid in n_splits.index[n_splits > 1]:
        rows = out.index[(out["patient_id"] == pid) & given]
        target = out.loc[rows, "split"].value_counts().index[0]
        out.loc[out["patient_id"] == pid, "split"] = target
        if report is not None:
            report.unmap(pid, f"patient in several source splits; all {len(rows)} images moved to {target}")


def assert_no_patient_leak(table: pd.DataFrame):
    n = table.groupby("patient_id")["split"].nunique()
    leaked = list(n.index[n > 1])
    if leaked:
        raise AssertionError(f"patients in more than one split: {leaked[:5]}")


def split_summary(table: pd.DataFrame, classes=None) -> str:
    """Counts per class and split (images, and patients in brackets) as a text table."""
    label_col = "label" if "label" in table.columns else "finding"
    classes = list(classes) if classes is not None else sorted(table[label_col].unique())
    splits = [s for s in SPLITS if (table["split"] == s).any()] or ["(all)"]
    width = max(12, *(len(str(c)) + 2 for c in classes))
    lines = [f"{'class':<{width}}" + "".join(f"{s:>16}" for s in splits) + f"{'total':>16}"]
    for c in classes + ["total"]:
        rows = table if c == "total" else table[table[label_col] == c]
        cells = []
        for s in splits + ["total"]:
            sel = rows if s in ("total", "(all)") else rows[rows["split"] == s]
            cells.append(f"{len(sel)} ({sel['patient_id'].nunique()}p)")
        lines.append(f"{c or '(unlabelled)':<{width}}" + "".join(f"{x:>16}" for x in cells))
    return "\n".join(lines)
