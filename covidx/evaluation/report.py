"""Evaluation reports written to a folder: JSON (everything), Markdown (the papers' tables), CSV, PNG.

* :func:`write_classification_report` — one model on one split: ``metrics.json``,
  ``metrics.md`` (one row per class, the macro average and accuracy, with 95%
  CIs, as the cascade paper's Table II / SE-DPN's Tables 2-3), ``metrics.csv``
  (one row per class), ``roc.png``, ``confusion.png``, ``calibration.png``; with the
  images' sources, every figure again per source and per (source, class), with
  counts and patient-bootstrap CIs (:mod:`covidx.evaluation.sources`);
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

from covidx.evaluation.metrics import (
    PER_CLASS_METRICS,
    classification_metrics,
    roc_curves,
    segmentation_metrics,
)
from covidx.evaluation.plots import plot_calibration, plot_confusion, plot_roc, plot_roc_comparison
from covidx.evaluation.sources import per_source_metrics
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
    if m.get("validation"):
        lines += [_validation_sentence(m["validation"]), ""]
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
    cal = m["calibration"]
    lines += ["", "## Calibration", "", f"Expected calibration error (ECE, {cal['n_bins']} equal-width bins): "
              f"{cal['ece']:.4f}; maximum calibration error: {cal['mce']:.4f}.", ""]
    if m.get("per_source"):
        lines += _per_source_markdown(m["per_source"], names)
    return "\n".join(lines)


def _validation_sentence(v: dict) -> str:
    if v.get("kind") == "external":
        return (f"**External validation**: the test set is every image of source `{v['source']}`, held out "
                "of training as a whole (no image and no patient of it was trained on).")
    return f"Validation: {v.get('kind', 'internal')}."


def _per_source_markdown(per_source: dict, names: Sequence[str]) -> list[str]:
    lines = ["## Per source", "",
             "The same figures within each source alone (one-vs-rest; CIs resampled by patient within the "
             "source). A class absent from a source has no sensitivity there, but its specificity says how "
             "often that source's other images are wrongly given the class.", ""]
    lines += _md_table(["Source", "Images", "Patients", "Accuracy", "Macro AUC"],
                       [[s, r["n_samples"], r["n_patients"], _fmt_ci(r["accuracy"], r["ci"]["accuracy"]),
                         _fmt_ci(r["macro"]["auc"], r["ci"]["macro_auc"])] for s, r in per_source.items()])
    lines += ["", "### Per source and class", ""]
    header = ["Source", "Class", "Support", "TP", "FP", "FN", "TN"] + [COLUMN_TITLES[k] for k in PER_CLASS_METRICS]
    rows = []
    for s, r in per_source.items():
        for name in names:
            c = r["per_class"][name]
            rows.append([s, name, c["support"], c["tp"], c["fp"], c["fn"], c["tn"]]
                        + [_fmt_ci(c[k], c["ci"][k]) for k in PER_CLASS_METRICS])
    lines += _md_table(header, rows)
    return lines + [""]


def _class_csv_row(name: str, row: dict) -> dict:
    out = {"class": name, "support": row["support"]}
    for k in PER_CLASS_METRICS:
        ci = row["ci"][k]
        out[k] = row[k]
        out[f"{k}_ci_low"] = None if ci is None else ci[0]
        out[f"{k}_ci_high"] = None if ci is None else ci[1]
    return out


def _classification_csv_rows(m: dict) -> list[dict]:
    """One row per class; with per-source figures, a ``source`` column (``all`` for the pooled rows),
    the source's accuracy and the one-vs-rest counts, then one row per (source, class)."""
    if not m.get("per_source"):
        return [_class_csv_row(name, row) for name, row in m["per_class"].items()]

    def with_source(source, name, row, accuracy, accuracy_ci, counts):
        out = {"source": source, **_class_csv_row(name, row)}
        out.update({key: counts[key] for key in ("tp", "fp", "fn", "tn")})
        out["accuracy"] = accuracy
        out["accuracy_ci_low"] = None if accuracy_ci is None else accuracy_ci[0]
        out["accuracy_ci_high"] = None if accuracy_ci is None else accuracy_ci[1]
        return out

    names = m["class_names"]
    cm = m["confusion_matrix"]["counts"]
    total = m["n_samples"]
    rows = []
    for c, name in enumerate(names):
        tp = cm[c][c]
        fn = sum(cm[c]) - tp
        fp = sum(cm[r][c] for r in range(len(names))) - tp
        counts = {"tp": tp, "fp": fp, "fn": fn, "tn": total - tp - fp - fn}
        rows.append(with_source("all", name, m["per_class"][name], m["accuracy"], m["ci"]["accuracy"], counts))
    for source, r in m["per_source"].items():
        for name in names:
            c = r["per_class"][name]
            rows.append(with_source(source, name, c, r["accuracy"], r["ci"]["accuracy"], c))
    return rows


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
    validation: dict | None = None,
) -> dict:
    """Evaluate one model and write its report into ``out_dir``.

    ``sources`` ((N,) source name per image) adds ``per_source``
    (:func:`~covidx.evaluation.sources.per_source_metrics`) to every file. ``validation``
    (e.g. ``{"kind": "external", "source": "cohen"}``) is recorded and stated at the top.

    Returns the metrics dict of :func:`~covidx.evaluation.metrics.classification_metrics`
    with ``model_name`` and ``files`` (name -> written path) added.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = classification_metrics(y_true, y_prob, class_names, patient_ids=patient_ids,
                               n_bootstrap=n_bootstrap, seed=seed, n_bins=n_bins)
    m["model_name"] = model_name
    if validation:
        m["validation"] = dict(validation)
    if sources is not None:
        m["per_source"] = per_source_metrics(y_true, y_prob, class_names, sources, patient_ids=patient_ids,
                                             n_bootstrap=n_bootstrap, seed=seed)
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
