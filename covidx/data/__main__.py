"""``python -m covidx.data PATH [PATH ...] [--layout L] [--task T]``: what a dataset folder holds.

Prints images per class, source and split, patients, images per class and source (with a warning
when a class comes from a single source: a model can learn the source), and every skipped file,
unmapped row and file whose patient could not be read, with its reason. With ``--verify`` every image (and mask) is decoded
in full, which also finds truncated files and masks whose size differs from their image.
``--duplicates`` lists the groups of copied images (exact and near copies, cross-source groups
first). ``--write-split FILE`` (with ``--task``) writes the split ``python -m covidx.train`` would use
with the same flags; ``python -m covidx.train --split FILE`` trains on it.
"""

from __future__ import annotations

import argparse
import sys

from covidx.data.confounding import (
    SINGLE_SOURCE_ADVICE, format_label_source_table, label_source_table, single_source_warnings,
)
from covidx.data.duplicates import describe_groups, duplicate_groups, fingerprint_table
from covidx.data.prepare import add_split_arguments, build_split, options_from_args
from covidx.data.io import DEFAULT_MAX_PIXELS, set_max_pixels
from covidx.data.sources import LAYOUTS, DatasetError, load_sources, parse_views
from covidx.data.splitfile import write_split_file
from covidx.data.splits import select_task, split_summary
from covidx.data.verify import bit_depth_summary, verify_table
from covidx.tasks import TASKS, get_task


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m covidx.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="dataset folder(s) or CSV manifest(s)")
    ap.add_argument("--layout", action="append", choices=LAYOUTS,
                    help="layout of each PATH (repeat per path; detected when omitted)")
    ap.add_argument("--task", choices=sorted(TASKS), help="also show the table as this task sees it")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                    help="decode every image and mask in full (default: only with --write-split, as training does)")
    ap.add_argument("--duplicates", dest="list_duplicates", action="store_true",
                    help="list groups of duplicate images (exact and near copies), cross-source groups first")
    ap.add_argument("--write-split", metavar="FILE",
                    help="write the split covidx.train would use (path,label,patient_id,source,split); needs --task")
    ap.add_argument("--relative-paths", action="store_true",
                    help="with --write-split: paths relative to the split file's folder (to share it with the data)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help=f"refuse larger images, read from the header (default {DEFAULT_MAX_PIXELS:,})")
    add_split_arguments(ap)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.write_split and not args.task:
        print("error: --write-split needs --task (the task covidx.train will use)", file=sys.stderr)
        return 2
    set_max_pixels(args.max_pixels)
    task = get_task(args.task) if args.task else None
    groups = None
    depth_lines = []
    try:
        if args.write_split:
            options = options_from_args(args, verify=args.verify is not False)
            table, report, respect, groups = build_split(args.paths, args.layout, task, options, progress=True)
        else:
            rule = options_from_args(args).patient_rule()
            table, report = load_sources(args.paths, args.layout, views=parse_views(args.views), patients=rule)
            if args.verify:
                table = verify_table(table, report)
                depth_lines = bit_depth_summary(table["path"].tolist())
            if task:
                table = select_task(table, task, report)
            if args.list_duplicates:
                table = fingerprint_table(table, report, progress=len(table) > 500)
                groups = duplicate_groups(table, args.near_distance)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    label = "label" if task else "finding"
    print(f"{len(table)} images, {table['patient_id'].nunique()} patients, "
          f"sources: {', '.join(sorted(table['source'].unique()))}")
    if (table["mask_path"] != "").any() or (table["lesion_path"] != "").any():
        print(f"lung masks: {(table['mask_path'] != '').sum()}, lesion masks: {(table['lesion_path'] != '').sum()}")
    if not args.write_split and not (table["split"] != "").all():
        print("(rows with no split of their own: covidx.train splits them by patient; --write-split shows how)")
    classes = task.image_classes if task else None
    print(split_summary(table.assign(label=table[label]), classes))
    print("\nimages per class and source:")
    print(format_label_source_table(label_source_table(table, classes, label)))
    warnings = single_source_warnings(table, classes, label)
    for warning in warnings:
        print(f"warning: {warning}")
    if warnings:
        print(f"  ({SINGLE_SOURCE_ADVICE})")
    if groups is not None:
        n_groups = groups["dup_group"].nunique() if len(groups) else 0
        kinds = groups.groupby("dup_group")["kind"].first().value_counts() if len(groups) else {}
        print(f"\nduplicate groups: {n_groups} ({kinds.get('exact', 0)} exact, {kinds.get('near', 0)} near), "
              f"{len(groups)} images, {int(groups['cross_source'].sum()) if len(groups) else 0} of them in "
              f"cross-source groups")
        if args.list_duplicates:
            print("\n".join(describe_groups(groups)))
    if depth_lines:
        print("\n16-bit images (scaled to [0, 255] by their significant bits):")
        print("\n".join(f"  {line}" for line in depth_lines))
    lines = report.lines()
    if lines:
        print(f"\n{len(report.skipped)} skipped, {len(report.unmapped)} unmapped, "
              f"{len(report.no_patient)} without a readable patient:")
        print("\n".join(f"  {line}" for line in lines))
    if args.write_split:
        out = write_split_file(table, args.write_split, relative=args.relative_paths)
        print(f"\nsplit written: {out} ({len(table)} rows; respect_source_split={respect}, seed={args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
