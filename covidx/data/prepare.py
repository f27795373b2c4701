"""From dataset folders to the split a run trains on: one function for ``covidx.train`` and ``covidx.data``.

:func:`build_split` reads the sources (patients from their file names or a patient rule, views),
decodes every image, keeps the task's rows, fingerprints the images and joins the patients that
share an image (:mod:`covidx.data.duplicates`), then splits by patient group (:func:`make_split`).
``python -m covidx.train`` and ``python -m covidx.data --write-split`` both call it with the same
:class:`SplitOptions` (and the same command-line flags, :func:`add_split_arguments`), so the split
file written by one is the split the other trains on.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pandas as pd

from covidx.data.duplicates import NEAR_DISTANCE, duplicate_groups, fingerprint_table, merge_duplicate_groups
from covidx.data.patients import PatientRule
from covidx.data.sources import DEFAULT_VIEWS, DatasetError, IndexReport, load_sources, parse_views
from covidx.data.splits import make_split, select_task, split_holding_out_source
from covidx.data.verify import verify_table
from covidx.tasks import Task, get_task


@dataclass
class SplitOptions:
    """Everything that decides a split besides the data (flags of :func:`add_split_arguments`)."""

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    respect_source_split: bool | None = None  # None: True when every row comes with a split
    test_source: str | None = None  # leave-one-source-out: this whole source is the test split (external)
    duplicates: bool = True  # join patients that share an image (exact or near copy)
    near_distance: int = NEAR_DISTANCE  # pHash bits; -1: exact copies only
    views: tuple[str, ...] = field(default_factory=lambda: DEFAULT_VIEWS)
    patient_pattern: str | None = None
    patient_table: str | None = None
    verify: bool = True  # decode every image (and mask) before splitting; unreadable ones are dropped
    hash_cache: bool | str = True  # fingerprint cache: True = default file, a path, or False

    def patient_rule(self) -> PatientRule | None:
        return PatientRule(self.patient_pattern, self.patient_table) if (self.patient_pattern or self.patient_table) else None


def build_split(paths, layouts, task: str | Task, options: SplitOptions | None = None,
                progress: bool = False) -> tuple[pd.DataFrame, IndexReport, bool, pd.DataFrame]:
    """Load ``paths`` and split them for ``task``; returns ``(table, report, respect, duplicate_groups)``.

    ``table`` has ``split`` and ``group_id``; ``respect`` is whether sources' own splits were kept;
    ``duplicate_groups`` lists the copies found (empty when ``options.duplicates`` is off).
    """
    o = options or SplitOptions()
    task = get_task(task) if isinstance(task, str) else task
    try:
        rule = o.patient_rule()
    except ValueError as e:
        raise DatasetError(str(e)) from None
    table, report = load_sources(paths, layouts or None, views=tuple(o.views), patients=rule)
    if o.verify:
        table = verify_table(table, report, progress=progress and len(table) > 500)
    table = select_task(table, task, report)
    groups = table.iloc[:0]
    if o.duplicates:
        table = fingerprint_table(table, report, cache=o.hash_cache, progress=progress and len(table) > 500)
        groups = duplicate_groups(table, o.near_distance)
        table = merge_duplicate_groups(table, groups, report)
    respect = o.respect_source_split
    if respect is None:
        respect = bool((table["split"] != "").all())
    if o.test_source:
        table = split_holding_out_source(table, o.test_source, o.val_fraction, o.seed, respect, report)
    else:
        table = make_split(table, o.val_fraction, o.test_fraction, o.seed, respect, report)
    return table, report, respect, groups


def add_split_arguments(ap: argparse.ArgumentParser):
    """The flags that decide a split; shared by ``python -m covidx.train`` and ``python -m covidx.data``."""
    g = ap.add_argument_group("split (the same in covidx.train and covidx.data --write-split)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--test-fraction", type=float, default=0.2)
    g.add_argument("--respect-source-split", action=argparse.BooleanOptionalAction, default=None,
                   help="keep a source's own train/val/test split (default: when every source has one)")
    g.add_argument("--test-source", metavar="NAME",
                   help="external validation: every image of this source is the test split, none of its patients "
                        "is trained on (leave-one-source-out; --test-fraction is then unused)")
    g.add_argument("--views", default=",".join(DEFAULT_VIEWS),
                   help="views kept from metadata that has them, comma-separated (default PA,AP: the frontal ones; "
                        "add 'unknown' to keep rows without a view, or 'all')")
    g.add_argument("--patient-pattern", metavar="REGEX",
                   help="regular expression on the file name giving the patient (group 'patient' or 1) of files "
                        "whose layout does not say it (folders, masks, manifests without patient_id)")
    g.add_argument("--patient-table", metavar="CSV", help="CSV 'path|filename,patient_id' for the same purpose")
    g.add_argument("--no-duplicate-groups", dest="duplicates", action="store_false",
                   help="do not fingerprint images nor join patients that share an image (not recommended)")
    g.add_argument("--near-duplicate-bits", dest="near_distance", type=int, default=NEAR_DISTANCE,
                   help=f"pHash Hamming distance up to which two images are copies (default {NEAR_DISTANCE}; "
                        "-1: exact copies only)")


def options_from_args(args, verify: bool = True) -> SplitOptions:
    return SplitOptions(seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                        respect_source_split=args.respect_source_split, test_source=args.test_source,
                        duplicates=args.duplicates,
                        near_distance=args.near_distance, views=parse_views(args.views),
                        patient_pattern=args.patient_pattern, patient_table=args.patient_table, verify=verify)
