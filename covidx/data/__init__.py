"""Datasets: real public layouts, patient-grouped splits, the tf.data pipeline, synthetic X-rays.

Typical use::

    from covidx.data import load_sources, select_task, split_table, make_dataset, PreprocessConfig
    table, report = load_sources(["data/chest_xray", "data/covid-chestxray-dataset"])
    table = make_split(select_task(table, "4class", report), seed=0, respect_source_split=False)
    # or everything training does (patients joined by shared images, verified files) in one call:
    table, report, respect, duplicates = build_split(["data/chest_xray"], None, "4class", SplitOptions(seed=0))
    ds = make_dataset(table[table.split == "train"], "4class", PreprocessConfig(image_size=224), training=True)
"""

from covidx.data.pipeline import balanced_class_weights, make_dataset
from covidx.data.preprocess import PreprocessConfig
from covidx.data.sources import LAYOUTS, DatasetError, IndexReport, detect_layout, load_source, load_sources
from covidx.data.splits import make_split, select_task, split_summary, split_table, split_warnings
from covidx.data.splitfile import read_split_file, write_split_file
from covidx.data.prepare import SplitOptions, build_split

__all__ = [
    "LAYOUTS", "DatasetError", "IndexReport", "PreprocessConfig", "balanced_class_weights", "detect_layout",
    "load_source", "load_sources", "make_dataset", "select_task", "split_summary", "split_table",
    "make_split", "split_warnings", "read_split_file", "write_split_file", "SplitOptions", "build_split",
]
