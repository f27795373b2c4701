"""``MODEL_CARD.md`` of a run: what the model is, what it is for, what it must not be used for.

The sections are those of Mitchell et al. 2019, "Model Cards for Model Reporting"
(FAT* '19, Sec. 4): model details, intended use, factors, metrics, evaluation data,
training data, quantitative analyses, ethical considerations, caveats and
recommendations. Everything is filled from the run folder (``config.json``,
``split.csv``) and, once the run has been evaluated, from the evaluation's
``metrics.json``. Training writes the card at its end; ``python -m covidx.evaluate``
rewrites it with the latest evaluation; ``python -m covidx.export`` copies it into
``assets.extra/MODEL_CARD.md`` of the SavedModel.

Runs layer: reads run folders, never trains.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from covidx.data.synthetic import is_synthetic
from covidx.runs import CONFIG_FILE, SPLIT_FILE, RunConfig, read_split_csv

CARD_NAME = "MODEL_CARD.md"
EVALUATION_NAME = "model_card_evaluation.json"  # the evaluation the card reports, kept beside it
SECTIONS = (
    "Model details",
    "Intended use",
    "Factors",
    "Metrics",
    "Evaluation data",
    "Training data",
    "Quantitative analyses",
    "Ethical considerations",
    "Caveats and recommendations",
)

_TASK_PURPOSE = {
    "classification": "classify a frontal chest radiograph into {classes}",
    "segmentation": "segment {classes} in a frontal chest radiograph",
}


def _counts_table(table: pd.DataFrame, column: str) -> list[str]:
    """Markdown table: ``column`` values x splits, images (patients)."""
    splits = [s for s in ("train", "val", "test") if (table["split"] == s).any()]
    lines = ["| " + " | ".join([column.replace("_", " ").capitalize()] + splits + ["total"]) + " |",
             "|" + "|".join("---" for _ in range(len(splits) + 2)) + "|"]
    for key in sorted(table[column].astype(str).unique()) + ["total"]:
        rows = table if key == "total" else table[table[column].astype(str) == key]
        cells = [f"{int((rows['split'] == s).sum())} ({rows.loc[rows['split'] == s, 'patient_id'].nunique()} p)"
                 for s in splits]
        cells.append(f"{len(rows)} ({rows['patient_id'].nunique()} p)")
        lines.append("| " + " | ".join([f"**{key}**" if key == "total" else (key or "(unnamed)")] + cells) + " |")
    return lines


def _ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if not ci else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _metrics_lines(m: Mapping) -> list[str]:
    if "per_class" not in m:  # a segmentation report
        return [f"- Mean Dice {m['mean_dice']:.4f}, mean IoU {m['mean_iou']:.4f} over {m['n_images']} images."]
    lines = [f"{m['n_samples']} images of {m['n_patients']} patients; 95 % bootstrap intervals "
             f"({m['bootstrap']['n']} replicates resampled by {m['bootstrap']['unit']}).", "",
             "| Class | Support | Sensitivity | Specificity | Precision | F1 | AUC |", "|---|---|---|---|---|---|---|"]
    for name, row in m["per_class"].items():
        lines.append(f"| {name} | {row['support']} | " + " | ".join(
            _ci(row[k], row["ci"][k]) for k in ("sensitivity", "specificity", "precision", "f1", "auc")) + " |")
    lines.append("| **Macro average** | " + str(m["n_samples"]) + " | " + " | ".join(
        _ci(m["macro"][k], m["ci"][f"macro_{k}"]) for k in ("sensitivity", "specificity", "precision", "f1", "auc"))
        + " |")
    lines += ["", f"Accuracy {_ci(m['accuracy'], m['ci']['accuracy'])}; expected calibration error "
              f"{m['calibration']['ece']:.3f} ({m['calibration']['n_bins']} bins)."]
    if m.get("per_source"):
        lines += ["", "Per source:", "", "| Source | Images | Accuracy | Macro AUC |", "|---|---|---|---|"]
        for src, v in m["per_source"].items():
            lines.append(f"| {src} | {v['n_samples']} | {_ci(v['accuracy'], v['ci']['accuracy'])} | "
                         f"{_ci(v['macro']['auc'], v['ci']['macro_auc'])} |")
    return lines


def render_model_card(config: Mapping, split: pd.DataFrame | None = None, evaluation: Mapping | None = None) -> str:
    """The Markdown text of the card.

    Args:
        config: the run's ``config.json``.
        split: the run's ``split.csv`` (``label``, ``patient_id``, ``source``, ``split``).
        evaluation: ``{"metrics": metrics.json, "evaluated_on": str, "date": str, "audit": {...} | None}``
            of the latest evaluation, or ``None`` when the run has not been evaluated.
    """
    model = config.get("model", "model")
    classes = list(config.get("classes", []))
    kind = config.get("kind", "classification")
    train = config.get("train", {})
    pre = config.get("preprocess", {})
    # Generated data: the run's config says so, or its split table does (runs from before the config was right).
    synthetic = bool(config.get("synthetic")) or (split is not None and is_synthetic(split))
    L = [f"# Model card: {model}", ""]
    if synthetic:
        L += ["> **SYNTHETIC**: trained on procedurally generated images, not on patients. Its figures say nothing "
              "about real radiographs.", ""]
    L += ["> Research use only. Not a medical device: not for diagnosis, triage or any clinical decision.", ""]

    L += ["## Model details", "",
          f"- Model: `{model}`" + (f", {config['parameters']:,} parameters" if config.get("parameters") else ""),
          f"- Paper: {config.get('paper') or 'n/a'}",
          f"- Task: `{config.get('task', 'n/a')}` ({kind}), classes: {', '.join(classes) or 'n/a'}",
          f"- Input: {pre.get('image_size', '?')}x{pre.get('image_size', '?')} pixels, {pre.get('channels', '?')} "
          f"channel(s), resize `{pre.get('resize', 'n/a')}`" + (", CLAHE" if pre.get("clahe") else ""),
          f"- Training: {train.get('epochs')} epochs, optimizer {train.get('optimizer')}, learning rate "
          f"{train.get('learning_rate')}, batch size {train.get('batch_size')}, seed {train.get('seed')}"
          + (f", train step `{config['trainer']}`" if config.get("trainer") else "")
          if train else "- Training: not recorded (no `train` settings in config.json)",
          "- Software: " + (", ".join(f"{k} {v}" for k, v in (config.get("versions") or {}).items()) or "not recorded"),
          "- Format: Keras 3 `.keras` (reloads with `safe_mode=True`); `python -m covidx.export` writes a "
          "TF Serving SavedModel with this card in `assets.extra/`.", ""]

    purpose = _TASK_PURPOSE.get(kind, _TASK_PURPOSE["classification"]).format(classes=", ".join(classes) or "?")
    L += ["## Intended use", "",
          f"- Primary use: research on methods that {purpose}, reproducing and comparing published models.",
          "- Primary users: machine-learning and medical-imaging researchers.",
          "- Out of scope: any clinical use (diagnosis, triage, screening, treatment decisions), images other than "
          "frontal chest radiographs, populations and devices unlike the training data, and any use on "
          "SYNTHETIC-trained weights beyond testing software.", ""]

    L += ["## Factors", "",
          "- Data source (hospital, collection, device): public COVID-19 collections differ from pneumonia and "
          "normal collections in acquisition and markings, and a model can learn the source instead of the "
          "disease (DeGrave et al., Nat. Mach. Intell. 2021; Roberts et al., Nat. Mach. Intell. 2021). Metrics are "
          "reported per source where the evaluation has several, and the shortcut audit measures how much of the "
          "Grad-CAM evidence falls inside the lungs.",
          "- Patient: images of one patient are correlated; splits are grouped by patient and intervals resampled "
          "by patient.",
          "- Not recorded by the public sets and therefore not evaluated: age, sex, ethnicity, view "
          "(PA/AP) for most images, disease stage, device vendor.", ""]

    L += ["## Metrics", "",
          "Per class, one-vs-rest: sensitivity, specificity, precision, F1 and AUC with 95 % bootstrap intervals; "
          "macro averages; accuracy; expected calibration error (cascade paper Table II, MAG-SD Eqs. 8-11, "
          "SE-DPN Tables 2-3). Segmenters: Dice and IoU.", ""]

    L += ["## Evaluation data", ""]
    if evaluation:
        L.append(f"Latest evaluation ({evaluation.get('date', 'n/a')}): {evaluation.get('evaluated_on', 'n/a')}.")
    else:
        L.append("Not evaluated yet: `python -m covidx.evaluate --checkpoint RUN_DIR` fills this section. "
                 "The held-out test split of the table below is what it evaluates by default.")
    L.append("")

    L += ["## Training data", ""]
    if split is not None and len(split):
        source = split["source"].astype(str) if "source" in split else pd.Series("", index=split.index)
        t = split.assign(source=source)
        L.append(f"{len(t)} images of {t['patient_id'].nunique()} patients from "
                 f"{t['source'].nunique()} source(s), split by patient (no patient in two splits); "
                 f"images (patients) per split:")
        if config.get("duplicates_removed") is not None:
            L.append(f"{config['duplicates_removed']} duplicate images removed before splitting.")
        L.append("")
        if "label" in t:
            L += _counts_table(t, "label") + [""]
        L += _counts_table(t, "source") + [""]
    else:
        L += ["No split table recorded with this run.", ""]

    L += ["## Quantitative analyses", ""]
    if evaluation and evaluation.get("metrics"):
        L += _metrics_lines(evaluation["metrics"])
        audit = evaluation.get("audit")
        if audit:
            L += ["", f"Shortcut audit ({audit.get('input', 'full')} images): median share of Grad-CAM inside the "
                  "lungs " + ", ".join(f"{c} {v['median_share']:.3f}" for c, v in audit["per_class"].items()
                                      if v.get("n") and v.get("median_share") is not None)
                  + f"; flagged: {', '.join(audit.get('flagged') or []) or 'none'}."]
    else:
        L.append("None yet (not evaluated).")
    L.append("")

    L += ["## Ethical considerations", "",
          "- Public chest X-ray sets are de-identified; they still stem from patients who did not consent to this "
          "model. Do not try to re-identify anyone from images or predictions.",
          "- A wrong \"normal\" answer can delay care; a wrong COVID-19 answer can misdirect it. The model has not "
          "been validated prospectively, on any hospital's population, or against radiologists.",
          "- Public COVID-19 collections copy each other and mix sources with classes (Roberts et al. 2021); high "
          "scores on them can reflect shortcuts." + (" This run used SYNTHETIC data only." if synthetic else ""), ""]

    L += ["## Caveats and recommendations", "",
          "- Read the metrics per source and the shortcut audit before the overall accuracy.",
          "- Evaluate on data from a source the model never saw before drawing any conclusion.",
          "- Feed images exactly as `python -m covidx.predict` or the exported SavedModel preprocess them (the "
          "run's recorded preprocessing); other scaling gives the same answer for every image.",
          "- Small test splits give wide intervals: report the intervals with the numbers.",
          f"- Card written {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by covidx.", ""]
    return "\n".join(L)


def write_model_card(run_dir, evaluation: Mapping | None = None) -> Path:
    """Write ``run_dir/MODEL_CARD.md`` from the run folder.

    ``evaluation`` (see :func:`render_model_card`) replaces the stored latest evaluation
    (``model_card_evaluation.json``); without it the stored one, if any, is used, so
    re-writing the card never loses the metrics.
    """
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir).to_dict()
    split = read_split_csv(run_dir / SPLIT_FILE) if (run_dir / SPLIT_FILE).is_file() else None
    stored = run_dir / EVALUATION_NAME
    if evaluation is not None:
        stored.write_text(json.dumps(evaluation, indent=2, default=lambda v: None))
    elif stored.is_file():
        evaluation = json.loads(stored.read_text())
    path = run_dir / CARD_NAME
    path.write_text(render_model_card(config, split, evaluation))
    return path


def card_text(run_dir, config: Mapping | None = None) -> str:
    """The run's card (written now from ``config`` alone when ``run_dir`` is ``None`` or has none)."""
    if run_dir is not None and (Path(run_dir) / CARD_NAME).is_file():
        return (Path(run_dir) / CARD_NAME).read_text()
    if run_dir is not None and (Path(run_dir) / CONFIG_FILE).is_file():
        return write_model_card(run_dir).read_text()
    return render_model_card(config or {})
