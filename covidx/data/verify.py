"""Full decode of every image and mask of a table (thread pool; OpenCV releases the GIL)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from covidx.data.io import ImageReadError, read_image, read_mask
from covidx.data.sources import IndexReport


def _check_row(row) -> str | None:
    try:
        img = read_image(row["path"])
    except ImageReadError as e:
        return str(e)
    for col in ("mask_path", "lesion_path"):
        if row.get(col):
            try:
                read_mask(row[col], img.shape)
            except ImageReadError as e:
                return str(e)
    return None


def verify_table(table: pd.DataFrame, report: IndexReport, workers: int = 4, progress: bool = False) -> pd.DataFrame:
    """Decode every file; rows that fail are reported (path and reason) and dropped."""
    rows = table.to_dict("records")
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(_check_row, rows)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(rows), desc="verifying images", unit="img")
        problems = list(results)
    keep = []
    for row, problem in zip(rows, problems):
        if problem is None:
            keep.append(True)
        else:
            keep.append(False)
            path, _, reason = problem.partition(": ")
            report.skip(path, reason or problem)
    return table.loc[keep].reset_index(drop=True)
