"""``python -m covidx.data PATH [PATH ...] [--layout L] [--task T]``: what a dataset folder holds.

Prints images per class and split, patients, and every skipped file or unmapped
row with its reason. With ``--verify`` every image (and mask) is decoded in full,
which also finds truncated files and masks whose size differs from their image.
"""

from __future__ import annotations

import argparse
import sys

from covidx.data.sources import LAYOUTS, DatasetError, load_sources
from covidx.data.splits import select_task, split_summary
from covidx.data.verify import verify_table
from covidx.tasks import TASKS, get_task


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m covidx.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="dataset folder(s) or CSV manifest(s)")
    ap.add_argument("--layout", action="append", choices=LAYOUTS,
                    help="layout of each PATH (repeat per path; detected when omitted)")
    ap.add_argument("--task", choices=sorted(TASKS), help="also show the table as this task sees it")
    ap.add_argument("--verify", action="store_true", help="decode every image and mask in full")
    args = ap.parse_args(argv)
    try:
        table, report = load_sources(args.paths, args.layout)
        if args.verify:
            table = verify_table(table, report)
        classes = None
        if args.task:
            task = get_task(args.task)
            table = select_task(table, task, report)
            classes = task.classes
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    label = "label" if args.task else "finding"
    print(f"{len(table)} images, {table['patient_id'].nunique()} patients, "
          f"sources: {', '.join(sorted(table['source'].unique()))}")
    if (table["mask_path"] != "").any() or (table["lesion_path"] != "").any():
        print(f"lung masks: {(table['mask_path'] != '').sum()}, lesion masks: {(table['lesion_path'] != '').sum()}")
    if not (table["split"] != "").any():
        print("(no split of its own: covidx.train makes a patient-grouped split)")
    print(split_summary(table.assign(label=table[label]), classes))
    lines = report.lines()
    if lines:
        print(f"\n{len(report.skipped)} skipped, {len(report.unmapped)} unmapped:")
        print("\n".join(f"  {line}" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
