"""Full decode of every image and mask of a table (thread pool; OpenCV releases the GIL)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from covidx.data.io import ImageReadError, bit_depth_note, read_image, read_mask
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


def bit_depth_summary(paths, workers: int = 4) -> list[str]:
    """How 16-bit images are scaled to [0, 255] (PNG sBIT, or the bits their maximum needs), one line per
    decision with its file count and an example; empty when every image is 8-bit (``--verify`` prints it)."""
    def note(path):
        try:
            return bit_depth_note(path)
        except (ImageReadError, OSError):
            return None

    with ThreadPoolExecutor(workers) as pool:
        notes = list(pool.map(note, paths))
    counts = Counter(n for n in notes if n)
    example = {n: p for p, n in zip(paths, notes) if n}
    return [f"{c} x {n}, e.g. {example[n]}" for n, c in counts.most_common()]
