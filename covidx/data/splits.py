"""Task selection and patient-grouped, label-stratified splits.

No patient ever appears in two splits (COVID-Net#25 and friends: leakage across
splits inflates every metric); splits are deterministic for a seed.
"""

from __future__ import annotations

import zlib

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


def make_split(
    table: pd.DataFrame,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    respect_source_split: bool = False,
    report: IndexReport | None = None,
) -> pd.DataFrame:
    """Assign ``split`` (train/val/test) by patient group, stratified by (source, class). The one split function:
    ``python -m covidx.train`` and ``python -m covidx.data --write-split`` both come here.

    The unit is ``group_id`` (patients joined by a shared image, :func:`covidx.data.duplicates.merge_duplicate_groups`;
    ``patient_id`` when absent): a group is never in two splits. Each group is filed under the (source, class)
    most of its images carry; within each (source, class) the groups are shuffled (``seed``, and the stratum's
    name, so adding a source leaves the others' splits unchanged) and test and val are filled up to their
    fraction of the stratum's *images* (at least one group each when the stratum has three or more), so every
    source keeps its class shares in every split.

    With ``respect_source_split`` rows that came with a split (Kermany, COVIDx, CSV) keep it:

    * an official test set stays intact: a group found in two official splits keeps its images in the higher
      one (test > val > train); its images in the lower one are **removed** (and reported), never moved;
    * rows of a source without a split that join such a group (a copy of an official image) follow it;
    * a source whose official split has no val gets one carved from its official train groups, per class
      (``val_fraction / (1 - test_fraction)`` of them, so val is ``val_fraction`` of the whole);
    * the remaining rows (sources without a split) are split by the fractions as above.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be >= 0 and sum to less than 1")
    out = table.copy()
    if "group_id" not in out.columns:
        out["group_id"] = out["patient_id"]
    label_col = "label" if "label" in out.columns else "finding"
    if respect_source_split:
        out.loc[~out["split"].isin(SPLITS), "split"] = ""
        out = _keep_official_sets(out, report)
    else:
        out["split"] = ""
    official_sources = sorted(out.loc[out["split"] != "", "source"].unique())

    free = out["split"] == ""
    if free.any():
        assign = _carve(out.loc[free], label_col, {"test": test_fraction, "val": val_fraction}, seed)
        out.loc[free, "split"] = out.loc[free, "group_id"].map(assign)
    if respect_source_split and val_fraction > 0:
        frac = val_fraction / max(1e-9, 1 - test_fraction)
        for source in official_sources:
            if ((out["source"] == source) & (out["split"] == "val")).any():
                continue
            train_groups = out.loc[(out["source"] == source) & (out["split"] == "train"), "group_id"].unique()
            rows = out["group_id"].isin(train_groups) & (out["split"] == "train")
            assign = _carve(out.loc[rows], label_col, {"val": frac}, seed, only_source=source)
            out.loc[rows, "split"] = out.loc[rows, "group_id"].map(assign)
    assert_no_patient_leak(out)
    return out


split_table = make_split  # the name earlier releases used


_PRIORITY = {"train": 0, "val": 1, "test": 2}


def _keep_official_sets(out: pd.DataFrame, report: IndexReport | None) -> pd.DataFrame:
    """A group in several official splits keeps only its images of the highest one; groups with official rows
    pull their rows without a split into that split."""
    given = out[out["split"] != ""]
    top = given.groupby("group_id")["split"].agg(lambda s: max(s, key=_PRIORITY.get))
    n_splits = given.groupby("group_id")["split"].nunique()
    shared = n_splits.index[n_splits > 1]
    drop = out["group_id"].isin(shared) & (out["split"] != "") & (out["split"] != out["group_id"].map(top))
    if report is not None and drop.any():
        for gid, rows in out.loc[drop].groupby("group_id"):
            where = "/".join(sorted(rows["split"].unique()))
            report.unmap(gid, f"{len(rows)} image(s) removed from the official {where} split: the patient (or a copy "
                              f"of the image) is in the official {top[gid]} split, which stays intact")
        report.warn(f"{out.loc[drop, 'group_id'].nunique()} patient group(s) in two official splits: "
                    f"{int(drop.sum())} image(s) removed from the lower split (test > val > train), none moved")
    out = out.loc[~drop].copy()
    follow = (out["split"] == "") & out["group_id"].isin(top.index)
    out.loc[follow, "split"] = out.loc[follow, "group_id"].map(top)
    return out.reset_index(drop=True)


def _stratum_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _carve(rows: pd.DataFrame, label_col: str, fractions: dict, seed: int, only_source: str | None = None) -> dict:
    """``group_id -> split`` for the groups of ``rows``: per (source, class) stratum, shuffled groups fill each split
    of ``fractions`` (in order) up to its share of the stratum's images; the rest is train."""
    g = rows.groupby("group_id")
    size = g.size()
    source = g["source"].agg(lambda s: s.value_counts().index[0]) if only_source is None else \
        pd.Series(only_source, index=size.index)
    label = g[label_col].agg(lambda s: s.value_counts().index[0])
    assign = {}
    strata = pd.DataFrame({"size": size, "source": source, "label": label.astype(str)})
    for (src, lab), members in strata.groupby(["source", "label"], sort=True):
        ids = sorted(members.index)
        order = _stratum_rng(seed, f"{src}|{lab}").permutation(len(ids))
        n_img = int(members["size"].sum())
        target = {s: f * n_img for s, f in fractions.items()}
        count = {s: 0 for s in fractions}
        for k in order:
            gid = ids[k]
            n = int(members.at[gid, "size"])
            dest = "train"
            for s, f in fractions.items():
                if f <= 0:
                    continue
                if (count[s] == 0 and len(ids) >= 3) or count[s] + n / 2 <= target[s]:
                    dest = s
                    break
            if dest != "train":
                count[dest] += n
            assign[gid] = dest
    return assign


def assert_no_patient_leak(table: pd.DataFrame):
    """No patient, and no patient group (patients sharing an image), in two splits."""
    for col in ("patient_id", "group_id"):
        if col not in table.columns:
            continue
        n = table.groupby(col)["split"].nunique()
        leaked = list(n.index[n > 1])
        if leaked:
            raise AssertionError(f"{len(leaked)} {col.replace('_id', '')}(s) in more than one split: {leaked[:5]}")


def split_warnings(table: pd.DataFrame, classes=None) -> list[str]:
    """What makes a split unfit for evaluation: an empty test split, a split without a class of the task,
    a class of the task absent from the data."""
    label_col = "label" if "label" in table.columns else "finding"
    present = set(table[label_col])
    classes = list(classes) if classes is not None else sorted(present)
    out = [f"class {c!r} of the task is absent from the data" for c in classes if c not in present]
    if table["split"].isin(SPLITS).any() and not (table["split"] == "test").any():
        out.append("the test split is empty (pass --no-respect-source-split or data with a test split)")
    for s in SPLITS:
        rows = table[table["split"] == s]
        if len(rows):
            missing = [c for c in classes if c in present and not (rows[label_col] == c).any()]
            if missing:
                out.append(f"the {s} split has no {', '.join(map(repr, missing))} images")
    return out


def split_summary(table: pd.DataFrame, classes=None, warnings: bool = True) -> str:
    """Images (and patients) per class and per source in every split, a column of rows with no split yet, the
    totals, and :func:`split_warnings`. Every row and column adds up to its total."""
    label_col = "label" if "label" in table.columns else "finding"
    classes = list(classes) if classes is not None else sorted(table[label_col].unique())
    extra = [c for c in sorted(table[label_col].unique()) if c not in classes]
    sources = sorted(table["source"].unique()) if "source" in table.columns else []
    columns = list(SPLITS) + ["no split", "total"]
    rows = [(str(c), table[label_col] == c) for c in classes + extra]
    rows += [("total", pd.Series(True, index=table.index))]
    rows += [(f"source {s}", table["source"] == s) for s in sources]
    width = max(12, *(len(name) + 2 for name, _ in rows))
    lines = [f"{'':<{width}}" + "".join(f"{c:>16}" for c in columns)]
    for name, sel in rows:
        cells = []
        for c in columns:
            part = table[sel] if c == "total" else table[sel & (table["split"] == ("" if c == "no split" else c))]
            cells.append(f"{len(part)} ({part['patient_id'].nunique()}p)")
        lines.append(f"{name:<{width}}" + "".join(f"{x:>16}" for x in cells))
    if warnings:
        lines += [f"warning: {w}" for w in split_warnings(table, classes)]
    return "\n".join(lines)


def hold_out_source(table: pd.DataFrame, source: str, report: IndexReport | None = None) -> pd.DataFrame:
    """Leave-one-source-out: every image of ``source`` becomes the ``test`` split (external validation).

    Rows of other sources whose patient (or patient group, ``group_id``, when the table
    has one: patients joined by a shared image) also appears in ``source`` are dropped
    (and reported), so no patient of the held-out source is trained on. Other rows lose a
    ``test`` split they came with (``""``: to be split into train/val). Roberts et al.
    (2021, Nat. Mach. Intell. 3:199) ask for exactly this: a test set from a source the
    model never saw, which a source shortcut cannot pass.
    """
    names = sorted(table["source"].astype(str).unique())
    if source not in names:
        raise DatasetError(f"--test-source {source!r}: no such source; the data hold {', '.join(names)}")
    if len(names) < 2:
        raise DatasetError(f"--test-source {source!r}: it is the only source, nothing would be left to train on")
    key = "group_id" if "group_id" in table.columns else "patient_id"
    held = table["source"] == source
    shared = ~held & table[key].isin(set(table.loc[held, key]))
    if shared.any() and report is not None:
        for pid, n in table.loc[shared, "patient_id"].value_counts().items():
            report.unmap(pid, f"patient also in held-out source {source!r}; {n} image(s) of other sources dropped")
    out = table.loc[~shared].copy()
    held = out["source"] == source
    out.loc[held, "split"] = "test"
    out.loc[~held & (out["split"] == "test"), "split"] = ""
    return out


def split_holding_out_source(
    table: pd.DataFrame,
    source: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    respect_source_split: bool = False,
    report: IndexReport | None = None,
) -> pd.DataFrame:
    """:func:`hold_out_source`, then the other sources split by patient into train and val (:func:`make_split`
    with no test fraction): the test split is exactly ``source``."""
    out = hold_out_source(table, source, report)
    test = out["split"] == "test"
    rest = make_split(out.loc[~test], val_fraction, 0.0, seed, respect_source_split, report)
    out = pd.concat([rest, out.loc[test]]).sort_index()
    assert_no_patient_leak(out)
    return out
