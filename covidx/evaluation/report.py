"""Evaluation reports written to a folder: JSON (everything), Markdown (the papers' tables), CSV, PNG.

* :func:`write_classification_report` — one model on one split: ``metrics.json``,
  ``metrics.md`` (one row per class, the macro average and accuracy, with 95%
  CIs, as the cascade paper's Table II / SE-DPN's Tables 2-3), ``metrics.csv``
  (one row per class), ``roc.png``, ``confusion.png``, ``calibration.png``;
* :func:`write_comparison_report` — several models on the same split:
  ``comparison.md`` / ``comparison.csv`` (every pair: McNemar, DeLong, the
  cascade paper's per-class F-test) and ``roc_comparison.png``;
* :func:`write_segmentation_report` — Dice / IoU per image and mean.

``y_true`` holds integer class indices, ``y_prob`` an (N, K) probability array.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from covidx.evaluation.metrics import (
    PER_CLASS_METRICS,
    classification_metrics,
    roc_curves,
    segmentation_metrics,
)
from covidx.evaluation.plots import plot_calibration, plot_confusion, plot_roc, plot_roc_comparison
from covidx.evaluation.stats import compare_models

COLUMN_TITLES = {
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "precision": "Precision",
    "f1": "F1-score",
    "auc": "AUC",
}


# --------------------------------------------------------------------------- formatting helpers
def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_p(p) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return _fmt(value) if ci is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _write_json(obj, path: Path) -> str:
    # allow_nan=False: a NaN slipping into a report is a bug, not a value.
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    return str(path)


def _write_csv(rows: Sequence[Mapping], path: Path) -> str:
    fields = list(rows[0].keys()) if rows else []
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return str(path)


# --------------------------------------------------------------------------- classification
def _classification_markdown(m: dict, model_name: str) -> str:
    boot = m["bootstrap"]
    lines = [f"# Classification report: {model_name}", ""]
    if boot["unit"] == "patient":
        lines.append(f"{m['n_samples']} images from {m['n_patients']} patients.")
    else:
        lines.append(f"{m['n_samples']} images (no patient ids: every image counts as its own patient).")
    if boot["n"]:
        lines.append(
            f"Brackets: {100 * boot['level']:.0f}% percentile bootstrap CI over {boot['n']} replicates "
            f"resampled by {boot['unit']} (seed {boot['seed']})."
        )
    lines += ["", "Each class is scored one-vs-rest; the macro row averages the classes present in the split.", ""]
    header = ["Class", "Support"] + [COLUMN_TITLES[k] for k in PER_CLASS_METRICS]
    rows = []
    for name, row in m["per_class"].items():
        rows.append([name, row["support"]] + [_fmt_ci(row[k], row["ci"][k]) for k in PER_CLASS_METRICS])
    macro = [_fmt_ci(m["macro"][k], m["ci"][f"macro_{k}"]) for k in PER_CLASS_METRICS]
    rows.append(["**Macro average**", m["n_samples"]] + macro)
    accuracy = _fmt_ci(m["accuracy"], m["ci"]["accuracy"])
    rows.append(["**Accuracy**", m["n_samples"], accuracy] + [""] * (len(PER_CLASS_METRICS) - 1))
    lines += _md_table(header, rows)
    if m["absent_classes"]:
        lines += ["", f"Absent from this split: {', '.join(m['absent_classes'])} (sensitivity and AUC undefined, "
                  "left out of the macro average)."]
    if "positive_class" in m:
        pc = m["positive_class"]
        lines += ["", f"## {pc['positive']} as the positive class (all other classes negative)", ""]
        lines += _md_table(
            ["Accuracy (all classes)", "Binary accuracy", "Precision", "Recall", "F1-score", "Specificity", "AUC",
             "TP", "FP", "FN", "TN"],
            [[_fmt(pc["multiclass_accuracy"]), _fmt(pc["accuracy"]), _fmt(pc["precision"]), _fmt(pc["sensitivity"]),
              _fmt(pc["f1"]), _fmt(pc["specificity"]), _fmt(pc["auc"]), pc["tp"], pc["fp"], pc["fn"], pc["tn"]]],
        )
    names = m["class_names"]
    cm = m["confusion_matrix"]
    lines += ["", "## Confusion matrix (rows: true, columns: predicted; count and row fraction)", ""]
    lines += _md_table(
        ["true \\ predicted"] + names,
        [[names[i]] + [f"{cm['counts'][i][j]} ({cm['normalized'][i][j]:.2f})" for j in range(len(names))]
         for i in range(len(names))],
    )
    if m.get("per_source"):
        lines += ["", "## Per source", ""]
        lines += _md_table(["Source", "Images", "Patients", "Accuracy", "Macro AUC"],
                           [[src, v["n_samples"], v["n_patients"], _fmt_ci(v["accuracy"], v["ci"]["accuracy"]),
                             _fmt_ci(v["macro"]["auc"], v["ci"]["macro_auc"])] for src, v in m["per_source"].items()])
    cal = m["calibration"]
    lines += ["", "## Calibration", "", f"Expected calibration error (ECE, {cal['n_bins']} equal-width bins): "
              f"{cal['ece']:.4f}; maximum calibration error: {cal['mce']:.4f}.", ""]
    return "\n".join(lines)


def _classification_csv_rows(m: dict) -> list[dict]:
    rows = []
    for name, row in m["per_class"].items():
        out = {"class": name, "support": row["support"]}
        for k in PER_CLASS_METRICS:
            ci = row["ci"][k]
            out[k] = row[k]
            out[f"{k}_ci_low"] = None if ci is None else ci[0]
            out[f"{k}_ci_high"] = None if ci is None else ci[1]
        rows.append(out)
    return rows


def per_source_metrics(y_true, y_prob, class_names, sources, patient_ids=None, n_bootstrap=1000, seed=0) -> dict:
    """Source name -> the summary metrics of that source's images (counts, accuracy, per-class
    sensitivity / specificity / AUC, macro averages, and their bootstrap CIs)."""
    sources = np.asarray([str(s) for s in sources])
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    pids = None if patient_ids is None else np.asarray(patient_ids)
    out = {}
    for source in sorted(set(sources)):
        sel = sources == source
        sm = classification_metrics(y_true[sel], y_prob[sel], class_names,
                                    patient_ids=None if pids is None else pids[sel],
                                    n_bootstrap=n_bootstrap, seed=seed)
        out[source] = {k: sm[k] for k in ("n_samples", "n_patients", "accuracy", "macro", "ci", "absent_classes")}
        out[source]["per_class"] = {c: {k: v[k] for k in ("support", "sensitivity", "specificity", "auc")}
                                    for c, v in sm["per_class"].items()}
    return out


def write_classification_report(
    y_true,
    y_prob,
    class_names: Sequence[str],
    out_dir,
    patient_ids=None,
    model_name: str = "model",
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
    sources=None,
) -> dict:
    """Evaluate one model and write its report into ``out_dir``.

    ``sources`` (one data-source name per image): when there are several, ``per_source``
    holds the metrics of each source's images (DeGrave et al. 2021: a model that learnt the
    source scores unevenly across sources), and ``metrics.md`` a table of them.

    Returns the metrics dict of :func:`~covidx.evaluation.metrics.classification_metrics`
    with ``model_name`` and ``files`` (name -> written path) added.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = classification_metrics(y_true, y_prob, class_names, patient_ids=patient_ids,
                               n_bootstrap=n_bootstrap, seed=seed, n_bins=n_bins)
    m["model_name"] = model_name
    if sources is not None and len(set(map(str, sources))) > 1:
        m["per_source"] = per_source_metrics(y_true, y_prob, class_names, sources, patient_ids, n_bootstrap, seed)
    files = {
        "roc": plot_roc(m["roc"], out / "roc.png", title=f"{model_name}: ROC (one-vs-rest)"),
        "confusion": plot_confusion(m["confusion_matrix"]["counts"], class_names, out / "confusion.png",
                                    normalized=m["confusion_matrix"]["normalized"], title=model_name),
        "calibration": plot_calibration(m["calibration"], out / "calibration.png", title=f"{model_name}: reliability"),
        "markdown": str(out / "metrics.md"),
        "csv": _write_csv(_classification_csv_rows(m), out / "metrics.csv"),
        "json": str(out / "metrics.json"),
    }
    (out / "metrics.md").write_text(_classification_markdown(m, model_name))
    m["files"] = files
    _write_json(m, out / "metrics.json")
    return m


# --------------------------------------------------------------------------- comparison
def _comparison_markdown(rows: list[dict], class_names: Sequence[str]) -> str:
    lines = ["# Model comparison", "",
             "Paired tests on the same test cases. McNemar: accuracy (b = only A right, c = only B right). "
             "DeLong: one-vs-rest AUC per class and macro AUC. F-test (cascade paper 5.B): ratio of the "
             "variances of the two models' output for each class.", "",
             "## Accuracy and AUC", ""]
    header = ["Model A", "Model B", "Acc A", "Acc B", "McNemar b/c", "McNemar p",
              "Macro AUC A", "Macro AUC B", "DeLong p (macro)"]
    header += [f"DeLong p ({c})" for c in class_names]
    body = []
    for r in rows:
        body.append([r["model_a"], r["model_b"], _fmt(r["accuracy_a"]), _fmt(r["accuracy_b"]),
                     f"{r['mcnemar_b']}/{r['mcnemar_c']}", _fmt_p(r["mcnemar_p"]),
                     _fmt(r["auc_macro_a"]), _fmt(r["auc_macro_b"]), _fmt_p(r["delong_macro_p"])]
                    + [_fmt_p(r[f"delong_{c}_p"]) for c in class_names])
    lines += _md_table(header, body)
    lines += ["", "## F-test on the output distributions (F statistic, p)", ""]
    lines += _md_table(
        ["Model A", "Model B"] + list(class_names),
        [[r["model_a"], r["model_b"]]
         + [f"{_fmt(r[f'f_{c}_statistic'])} ({_fmt_p(r[f'f_{c}_p'])})" for c in class_names]
         for r in rows],
    )
    return "\n".join(lines) + "\n"


def write_comparison_report(results: Mapping[str, tuple], class_names: Sequence[str], out_dir) -> dict:
    """Compare every pair of models evaluated on the same cases; ``results``: name -> (y_true, y_prob).

    Writes ``comparison.md``, ``comparison.csv`` (one row per pair, all columns of
    :func:`~covidx.evaluation.stats.compare_models`) and ``roc_comparison.png``.
    Returns ``{"rows": [...], "files": {...}}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = compare_models(results, class_names)
    curves = {name: roc_curves(y_true, y_prob, class_names) for name, (y_true, y_prob) in results.items()}
    (out / "comparison.md").write_text(_comparison_markdown(rows, class_names))
    files = {
        "markdown": str(out / "comparison.md"),
        "csv": _write_csv(rows, out / "comparison.csv"),
        "roc_comparison": plot_roc_comparison(curves, out / "roc_comparison.png"),
    }
    return {"rows": rows, "files": files}


# --------------------------------------------------------------------------- segmentation
def write_segmentation_report(true_masks, pred_masks, out_dir, ids=None, threshold: float = 0.5) -> dict:
    """Dice / IoU per image and mean: ``metrics.json``, ``metrics.md``, ``metrics.csv``.

    The CSV holds one row per image followed by a ``mean`` row.
    Returns the dict of :func:`~covidx.evaluation.metrics.segmentation_metrics` plus ``files``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = segmentation_metrics(true_masks, pred_masks, ids=ids, threshold=threshold)
    lines = ["# Segmentation report", "",
             "Dice = 2|A∩B|/(|A|+|B|), IoU = |A∩B|/|A∪B|; an image with both masks empty scores 1.", ""]
    lines += _md_table(
        ["", "Dice", "IoU"],
        [["Mean", _fmt(m["mean_dice"], 4), _fmt(m["mean_iou"], 4)],
         ["Std", _fmt(m["std_dice"], 4), _fmt(m["std_iou"], 4)],
         ["Median", _fmt(m["median_dice"], 4), _fmt(m["median_iou"], 4)]],
    )
    lines += ["", f"## Per image ({m['n_images']})", ""]
    lines += _md_table(["Image", "Dice", "IoU", "True pixels", "Predicted pixels"],
                       [[r["id"], _fmt(r["dice"], 4), _fmt(r["iou"], 4), r["true_pixels"], r["pred_pixels"]]
                        for r in m["per_image"]])
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    csv_rows = [{"id": r["id"], "dice": r["dice"], "iou": r["iou"], "true_pixels": r["true_pixels"],
                 "pred_pixels": r["pred_pixels"]} for r in m["per_image"]]
    csv_rows.append({"id": "mean", "dice": m["mean_dice"], "iou": m["mean_iou"],
                     "true_pixels": None, "pred_pixels": None})
    m["files"] = {
        "markdown": str(out / "metrics.md"),
        "csv": _write_csv(csv_rows, out / "metrics.csv"),
        "json": str(out / "metrics.json"),
    }
    _write_json(m, out / "metrics.json")
    return m
