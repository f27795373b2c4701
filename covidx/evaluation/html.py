"""``report.html``: one self-contained page per evaluation (every figure embedded as a base64 PNG).

The page gathers what :mod:`covidx.evaluation.report` writes as loose files — the
per-class table with 95 % bootstrap CIs (cascade paper Table II, SE-DPN Tables 2-3),
ROC (cascade paper Fig. 9), confusion matrix (MAG-SD Fig. 8), reliability diagram —
with the model, paper and run it belongs to, the data it was trained and evaluated
on (sources, patients, split sizes per class and source), metrics per source where
there are several (the source is the usual shortcut in COVID-19 collections:
DeGrave et al., Nat. Mach. Intell. 2021), a gallery of Grad-CAM overlays (the most
confident correct and wrong cases per class), the shortcut audit when it was run
and, for several models, their comparison (McNemar, DeLong, the cascade paper's
F-test; overlaid ROC curves).

This module renders only: overlays are computed by the caller (through
:mod:`covidx.explain`) and passed in as RGB arrays. The page is a Jinja2 template
shipped as package data (``templates/report.html.j2``), autoescaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import jinja2
import numpy as np
import pandas as pd

from covidx.evaluation.metrics import PER_CLASS_METRICS

RESEARCH_NOTICE = "Research use only. Not a medical device: not for diagnosis, triage or any clinical decision."
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- data carried by the page
@dataclass
class GalleryCase:
    """One Grad-CAM overlay of the gallery: ``image`` is (H, W, 3) uint8 RGB."""

    image: np.ndarray
    true_class: str
    predicted_class: str
    probability: float  # of the predicted class
    correct: bool
    name: str = ""


@dataclass
class ModelSection:
    """Everything the page shows about one evaluated model."""

    name: str
    metrics: dict  # classification_metrics(...) as written to metrics.json
    run: dict = field(default_factory=dict)  # config.json of the run (model, paper, task, preprocess, ...)
    run_name: str = ""
    data: dict | None = None  # :func:`data_summary`
    figures: dict = field(default_factory=dict)  # title -> PNG path or bytes
    gallery: list[GalleryCase] = field(default_factory=list)
    audit: dict | None = None  # covidx.explain.audit.shortcut_audit summary (+ "input")


def gallery_cases(y_true, y_prob, class_names: Sequence[str], per_class: int = 2) -> list[dict]:
    """The most confident correct and the most confident wrong predictions of every true class.

    Returns dicts ``{"index", "true_class", "predicted_class", "probability", "correct"}``,
    class by class, correct cases first, each group by decreasing probability of the
    predicted class.
    """
    y_true = np.asarray(y_true).astype(int)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    pred = y_prob.argmax(axis=1)
    conf = y_prob.max(axis=1)
    out = []
    for k, name in enumerate(class_names):
        for correct in (True, False):
            idx = np.flatnonzero((y_true == k) & ((pred == k) if correct else (pred != k)))
            idx = idx[np.argsort(-conf[idx], kind="stable")][:per_class]
            out += [dict(index=int(i), true_class=name, predicted_class=class_names[int(pred[i])],
                         probability=float(conf[i]), correct=correct) for i in idx]
    return out


def data_summary(table: pd.DataFrame, classes: Sequence[str], evaluated: pd.DataFrame | None = None,
                 evaluated_on: str = "", duplicates_removed: int | None = None, synthetic: bool = False) -> dict:
    """Counts the page shows: sources, patients, images per split x class and split x source.

    ``table`` is the run's split table (``split.csv``: ``label``, ``patient_id``, ``source``,
    ``split``); ``evaluated`` the rows the metrics were computed on, described by
    ``evaluated_on``. ``duplicates_removed`` is shown when the split recorded it. ``synthetic``: the
    evaluated images are generated ones (the page then carries the SYNTHETIC banner).
    """
    def counts(rows: pd.DataFrame, column: str, keys: Sequence[str]) -> list[dict]:
        splits = [s for s in SPLITS if (rows["split"] == s).any()] or sorted(rows["split"].unique())
        out = []
        for key in list(keys) + ["total"]:
            sel = rows if key == "total" else rows[rows[column] == key]
            cells = [dict(images=int((sel["split"] == s).sum()),
                          patients=int(sel.loc[sel["split"] == s, "patient_id"].nunique())) for s in splits]
            cells.append(dict(images=len(sel), patients=int(sel["patient_id"].nunique())))
            out.append(dict(key=key, cells=cells))
        return [dict(header=splits + ["total"])] + out

    summary = dict(n_images=len(table), n_patients=int(table["patient_id"].nunique()),
                   sources=[], per_class=None, per_source=None, duplicates_removed=duplicates_removed,
                   evaluated_on=evaluated_on, evaluated=None, synthetic=bool(synthetic))
    source = table["source"].astype(str) if "source" in table else pd.Series("", index=table.index)
    for name, rows in table.assign(source=source).groupby("source", sort=True):
        summary["sources"].append(dict(name=name or "(unnamed)", images=len(rows),
                                       patients=int(rows["patient_id"].nunique())))
    if "split" in table and "label" in table:
        t = table.assign(source=source)
        summary["per_class"] = counts(t, "label", classes)
        if t["source"].nunique() > 1:
            summary["per_source"] = counts(t, "source", sorted(t["source"].unique()))
    if evaluated is not None:
        summary["evaluated"] = dict(images=len(evaluated), patients=int(evaluated["patient_id"].nunique())
                                    if "patient_id" in evaluated else None)
    return summary


# --------------------------------------------------------------------------- rendering
def _png_data_uri(image) -> str:
    """``data:image/png;base64,...`` from PNG bytes, a PNG file path or an RGB / grayscale uint8 array."""
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR
        ok, buf = cv2.imencode(".png", arr)
        if not ok:
            raise ValueError(f"could not encode an image of shape {arr.shape} as PNG")
        data = buf.tobytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG image")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _aspect(image) -> float:
    """Width / height of a PNG (path or bytes) from its IHDR chunk; 1 for arrays."""
    if isinstance(image, (str, Path)):
        with open(image, "rb") as handle:
            head = handle.read(24)
    elif isinstance(image, (bytes, bytearray)):
        head = bytes(image[:24])
    else:
        return 1.0
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return width / height if height else 1.0


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_p(p) -> str:
    return "n/a" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("covidx.evaluation", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["fmt_p"] = _fmt_p
    env.filters["png"] = _png_data_uri
    return env


def _section_context(section: ModelSection) -> dict:
    m = section.metrics
    rows = []
    for name, row in m["per_class"].items():
        rows.append(dict(name=name, support=row["support"], key=f"per_class.{name}",
                         cells=[dict(metric=k, value=row[k], ci=row["ci"][k]) for k in PER_CLASS_METRICS]))
    macro = [dict(metric=k, value=m["macro"][k], ci=m["ci"][f"macro_{k}"]) for k in PER_CLASS_METRICS]
    per_source = []
    for source, sm in (m.get("per_source") or {}).items():
        per_source.append(dict(name=source, n_samples=sm["n_samples"], n_patients=sm["n_patients"],
                               accuracy=sm["accuracy"], accuracy_ci=sm["ci"]["accuracy"],
                               macro_auc=sm["macro"]["auc"], macro_auc_ci=sm["ci"]["macro_auc"],
                               classes=[dict(name=c, support=v["support"], sensitivity=v["sensitivity"],
                                             specificity=v["specificity"], auc=v["auc"])
                                        for c, v in sm["per_class"].items()]))
    audit = None
    if section.audit:
        audit = dict(input=section.audit.get("input", "full"), flagged=section.audit.get("flagged", []),
                     min_enrichment=section.audit.get("min_enrichment"),
                     classes=[dict(name=c, **{k: (None if v is None or (isinstance(v, float) and np.isnan(v))
                                                  else v) for k, v in stats.items()})
                              for c, stats in section.audit["per_class"].items()])
    run = section.run or {}
    return dict(
        name=section.name, run=run, run_name=section.run_name, metrics=m, rows=rows, macro=macro,
        columns=[(k, k.capitalize() if k != "auc" else "AUC") for k in PER_CLASS_METRICS],
        per_source=per_source, data=section.data, audit=audit,
        figures=[dict(title=t, src=_png_data_uri(p), wide=_aspect(p) > 1.4) for t, p in section.figures.items()],
        gallery=[dict(src=_png_data_uri(c.image), true_class=c.true_class, predicted=c.predicted_class,
                      probability=c.probability, correct=c.correct, name=c.name) for c in section.gallery],
        synthetic=bool(run.get("synthetic")),
        preprocess=run.get("preprocess") or {},
    )


def generated_data(sections: Sequence[ModelSection]) -> bool:
    """Whether a page shows generated data: a run trained on it (``config["synthetic"]``), or data that
    :func:`data_summary` was told are generated or whose sources are named so."""
    for s in sections:
        data = s.data or {}
        if (s.run or {}).get("synthetic") or data.get("synthetic") or any(
                "synthetic" in src["name"].lower() for src in data.get("sources", [])):
            return True
    return False


def render_report(sections: Sequence[ModelSection], comparison: Mapping | None = None,
                  synthetic: bool | None = None, title: str | None = None) -> str:
    """The HTML text of the report.

    Args:
        sections: one :class:`ModelSection` per evaluated model.
        comparison: ``{"rows": compare_models(...), "class_names": [...], "roc": PNG path/bytes,
            "n_cases": int}`` for several models evaluated on the same cases.
        synthetic: show the SYNTHETIC banner; default: :func:`generated_data`.
        title: page title (default: the model names).
    """
    if not sections:
        raise ValueError("a report needs at least one evaluated model")
    ctx = [_section_context(s) for s in sections]
    if synthetic is None:
        synthetic = generated_data(sections)
    comp = None
    if comparison:
        names = list(comparison["class_names"])
        comp = dict(rows=comparison["rows"], class_names=names, n_cases=comparison.get("n_cases"),
                    roc=_png_data_uri(comparison["roc"]) if comparison.get("roc") is not None else None)
    return _environment().get_template("report.html.j2").render(
        title=title or "Evaluation report: " + ", ".join(s.name for s in sections),
        sections=ctx, comparison=comp, synthetic=synthetic, notice=RESEARCH_NOTICE,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_html_report(path, sections: Sequence[ModelSection], comparison: Mapping | None = None,
                      synthetic: bool | None = None, title: str | None = None) -> str:
    """Render :func:`render_report` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(sections, comparison, synthetic, title), encoding="utf-8")
    return str(path)
