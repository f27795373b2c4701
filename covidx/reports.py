"""Reports on trained runs: what to evaluate a run on, its metrics report, pairwise comparisons, report.html.

The library behind ``python -m covidx.evaluate``: predictions come from :func:`covidx.runs.predict_table`
(the run's own preprocessing), figures and tables from :mod:`covidx.evaluation`, the shortcut audit
from :func:`covidx.explain.runs.run_audit`, the Grad-CAM gallery of ``report.html`` from
:mod:`covidx.explain` (rendered by :mod:`covidx.evaluation.html`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from covidx.data import load_sources, select_task
from covidx.data.synthetic import is_synthetic
from covidx.data.verify import verify_table
from covidx.evaluation import (
    confounding_audit,
    write_classification_report,
    write_comparison_report,
    write_confounding_report,
    write_segmentation_report,
)
from covidx.evaluation.html import GalleryCase, ModelSection, data_summary, gallery_cases, write_html_report
from covidx.explain.overlay import display_gray, overlay_heatmap
from covidx.explain.runs import gradcam_heatmaps, model_inputs
from covidx.runs import lung_region_input, predict_table


def evaluation_table(run, data=None, layouts=None, split: str | None = "test") -> pd.DataFrame:
    """The rows to evaluate ``run`` on: its held-out split, or ``data`` (a split of it when it has one)."""
    if data:
        table, report = load_sources(data, layouts)
        table = verify_table(table, report)
        for line in report.lines()[:20]:
            print(f"  {line}", file=sys.stderr)
        table = select_task(table, run.task)
        if split and (table["split"] == split).any():
            table = table[table["split"] == split]
        return table.reset_index(drop=True)
    table = run.split_table()
    if table is None:
        raise FileNotFoundError(f"{run.checkpoint}: no split.csv beside it; pass --data to say what to evaluate on")
    split = split or "test"
    table = table[table["split"] == split]
    if table.empty:
        raise ValueError(f"{run.checkpoint}: its {split} split is empty")
    return table.reset_index(drop=True)


def validation_of(run, data=None, split: str | None = "test") -> dict | None:
    """``{"kind": "external", "source": S}`` when ``run`` held source S out (``--test-source``) and is
    evaluated on that held-out split; ``None`` otherwise."""
    if run.config.test_source and not data and (split or "test") == "test":
        return run.config.validation
    return None


def evaluate_run(run, table: pd.DataFrame, out_dir: Path, n_bootstrap: int = 1000, batch_size: int = 16,
                 confounding: bool | None = None, validation: dict | None = None, return_probs: bool = False):
    """A run's report on ``table``; a Regional-Learning run is scored on the lung region when every row
    has a lung mask (:func:`covidx.runs.lung_region_input`), the input the cascade gives it.

    Classifiers are also scored per source (the table's ``source`` column). ``confounding`` (``None``: when
    ``table`` holds more than one source) adds the source-confounding audit
    (:func:`covidx.evaluation.confounding_audit`) as ``m["confounding"]`` and ``confounding.json/.md``;
    ``validation`` (:func:`validation_of`) is recorded in the report. Returns the metrics, and the predicted
    probabilities too with ``return_probs``."""
    probs, targets = predict_table(run, table, batch_size, lung_region=lung_region_input(run, table))
    name = run.name
    if run.config.kind == "segmentation" or probs.ndim == 4:
        pred = probs.argmax(-1)
        m = write_segmentation_report(targets, pred, out_dir, ids=list(table["path"]))
        return (m, probs) if return_probs else m
    y_true = table["label_index"].to_numpy().astype(int)
    sources = table["source"].astype(str).to_numpy() if "source" in table else None
    m = write_classification_report(y_true, probs, run.class_names, out_dir,
                                    patient_ids=list(table["patient_id"]), model_name=name,
                                    n_bootstrap=n_bootstrap, sources=sources, validation=validation)
    if confounding is None:
        confounding = sources is not None and len(set(sources)) > 1
    if confounding:
        if sources is None:
            raise ValueError("the confounding audit needs the source of every image (a 'source' column)")
        audit = confounding_audit(y_true, probs, run.class_names, sources)
        audit["files"] = write_confounding_report(audit, out_dir, model_name=name)
        m["confounding"] = audit
    return (m, probs) if return_probs else m


def gradcam_gallery(run, table: pd.DataFrame, probs, per_class: int = 2, batch_size: int = 16) -> list:
    """Grad-CAM overlays (of the predicted class) of the most confident correct and wrong cases per class,
    on the input the model was scored on (the lung region for a Regional-Learning run with masks)."""
    cases = gallery_cases(table["label_index"].to_numpy().astype(int), probs, run.class_names, per_class)
    if not cases:
        return []
    rows = table.iloc[[c["index"] for c in cases]].reset_index(drop=True)
    images = model_inputs(run, rows["path"].tolist(), batch_size)
    if lung_region_input(run, rows):
        size = images.shape[1:3]
        masks = np.stack([cv2.resize((cv2.imread(m, cv2.IMREAD_GRAYSCALE) > 127).astype(np.float32), size[::-1],
                                     interpolation=cv2.INTER_NEAREST) for m in rows["mask_path"]])
        images = images * masks[..., None]
    maps, _ = gradcam_heatmaps(run, images, batch_size=batch_size)
    return [GalleryCase(image=overlay_heatmap(display_gray(im), heat), true_class=c["true_class"],
                        predicted_class=c["predicted_class"], probability=c["probability"], correct=c["correct"],
                        name=Path(path).name)
            for im, heat, c, path in zip(images, maps, cases, rows["path"])]


def report_section(run, table: pd.DataFrame, m: dict, probs, evaluated_on: str, audit: dict | None = None,
                   gallery_per_class: int = 2, batch_size: int = 16, name: str | None = None) -> ModelSection:
    """The :class:`covidx.evaluation.html.ModelSection` of one evaluated classifier."""
    split = run.split_table()
    data = data_summary(split if split is not None and "label" in split else table, run.class_names, table,
                        evaluated_on, run.config.extra.get("duplicates_removed"), synthetic=is_synthetic(table))
    gallery = []
    if gallery_per_class > 0:
        try:
            gallery = gradcam_gallery(run, table, probs, gallery_per_class, batch_size)
        except ValueError as e:  # a model Grad-CAM cannot explain still gets its report
            print(f"  (no Grad-CAM gallery: {e})", file=sys.stderr)
    files = m["files"]
    run_name = f"{run.directory.parent.name}/{run.directory.name}" if run.directory else Path(run.checkpoint).name
    return ModelSection(name=name or run.name, metrics=m, run=run.config.to_dict(), run_name=run_name,
                        data=data, gallery=gallery, audit=audit,
                        figures={"ROC (one-vs-rest)": files["roc"], "Confusion matrix": files["confusion"],
                                 "Reliability diagram": files["calibration"]})


def write_report(path: Path, sections: list, comparison: dict | None = None) -> None:
    """``report.html`` at ``path``; prints its size and the time it took."""
    start = time.perf_counter()
    write_html_report(path, sections, comparison)
    print(f"  report {path} ({path.stat().st_size:,} bytes, written in {time.perf_counter() - start:.2f} s)")


def compare(results: dict, out_root: Path, batch_size: int = 16) -> dict | None:
    """Pairwise comparison on the cases every run was evaluated on; returns what report.html shows of it
    (``rows``, ``class_names``, ``roc``, ``n_cases``), ``None`` when the runs cannot be compared."""
    common = set.intersection(*(set(t["path"]) for _, t in results.values()))
    classes = {tuple(r.class_names) for r, _ in results.values()}
    if len(classes) > 1:
        print("  (no comparison: the runs have different classes)")
        return None
    if not common:
        print("  (no comparison: the runs share no evaluation images; pass --data)")
        return None
    paired = {}
    for key, (run, table) in results.items():
        t = table[table["path"].isin(common)].sort_values("path").reset_index(drop=True)
        probs, _ = predict_table(run, t, batch_size, lung_region=lung_region_input(run, t))
        paired[key] = (t["label_index"].to_numpy().astype(int), probs)
    class_names = list(classes.pop())
    report = write_comparison_report(paired, class_names, out_root)
    print(f"comparison of {len(paired)} models on {len(common)} shared images -> {report['files']['markdown']}")
    (out_root / "comparison.json").write_text(json.dumps(report["rows"], indent=2, default=float))
    return dict(rows=report["rows"], class_names=class_names, roc=report["files"]["roc_comparison"],
                n_cases=len(common))
