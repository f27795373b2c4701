"""The label x source table of a dataset, and the warning a user needs before training on it.

When every image of a class comes from one source (all COVID-19 images from the
Cohen collection of adult radiographs, all normal ones from Kermany's paediatric
set), a model can learn the source instead of the disease and still score well on
a test split drawn from the same mix (Roberts et al. 2021, Nat. Mach. Intell.
3:199; DeGrave, Janizek & Lee 2021, Nat. Mach. Intell. 3:610). Seeing the table
before training is the cheapest defence; ``python -m covidx.evaluate`` repeats the
check on the predictions (:mod:`covidx.evaluation.confounding`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

SINGLE_SOURCE_SHARE = 0.95
MIN_SOURCE_AUC = 0.7
SINGLE_SOURCE_ADVICE = ("a test split of these data cannot tell the source from the disease: add images of that "
                        "class from other sources, or hold a whole source out as the test set "
                        "(python -m covidx.train --test-source SOURCE)")


def _label_column(table: pd.DataFrame, label_col: str | None) -> str:
    return label_col or ("label" if "label" in table.columns else "finding")


def label_source_table(table: pd.DataFrame, classes: Sequence[str] | None = None,
                       label_col: str | None = None) -> pd.DataFrame:
    """Images per class (rows, in ``classes`` order when given) and source (columns, sorted), with totals."""
    col = _label_column(table, label_col)
    labels = table[col].astype(str).replace("", "(unlabelled)")
    counts = pd.crosstab(labels, table["source"].astype(str))
    rows = list(classes) if classes is not None else sorted(counts.index)
    counts = counts.reindex(index=rows, columns=sorted(counts.columns), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts.loc["total"] = counts.sum(axis=0)
    counts.index.name, counts.columns.name = "class", "source"
    return counts.astype(int)


def format_label_source_table(counts: pd.DataFrame) -> str:
    """:func:`label_source_table` as aligned text."""
    width = max(12, *(len(str(r)) + 2 for r in counts.index))
    cols = list(counts.columns)
    cw = [max(8, len(str(c)) + 2) for c in cols]
    lines = [f"{'class':<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cols, cw))]
    for r in counts.index:
        lines.append(f"{r:<{width}}" + "".join(f"{counts.loc[r, c]:>{w}}" for c, w in zip(cols, cw)))
    return "\n".join(lines)


def source_only_auc(labels, sources, cls: str) -> float | None:
    """AUC of the best rule that sees only the source: each image scores its source's share of ``cls``."""
    positive = np.asarray(labels).astype(str) == cls
    if positive.all() or not positive.any():
        return None
    _, index = np.unique(np.asarray(sources).astype(str), return_inverse=True)
    prevalence = np.bincount(index, weights=positive.astype(float)) / np.bincount(index)
    return float(roc_auc_score(positive, prevalence[index]))


def single_source_warnings(table: pd.DataFrame, classes: Sequence[str] | None = None,
                           label_col: str | None = None, share: float = SINGLE_SOURCE_SHARE,
                           min_auc: float = MIN_SOURCE_AUC) -> list[str]:
    """One sentence per class whose images come (almost, ``share``) only from one source
    (``"every covid19 image comes from cohen: a model can learn the source instead of the disease"``);
    :data:`SINGLE_SOURCE_ADVICE` says what to do about it.

    Nothing is said when the whole table holds one source, nor when the class's source also holds most
    images of the other classes (pneumonia and normal both from Kermany): then the source alone says little
    about the class (source-only AUC below ``min_auc``, :func:`source_only_auc`).
    """
    col = _label_column(table, label_col)
    counts = label_source_table(table, classes, label_col).drop(index="total", columns="total")
    if counts.shape[1] < 2:
        return []
    out = []
    for cls, row in counts.iterrows():
        n = int(row.sum())
        if n == 0 or cls == "(unlabelled)":
            continue
        source = str(row.idxmax())
        top = int(row.max())
        auc = source_only_auc(table[col], table["source"], cls)
        if top / n < share or auc is None or auc < min_auc:
            continue
        lead = (f"every {cls} image comes from {source}" if top == n else
                f"{100 * top / n:.0f}% of the {cls} images ({top} of {n}) come from {source}")
        out.append(f"{lead}: a model can learn the source instead of the disease")
    return out
