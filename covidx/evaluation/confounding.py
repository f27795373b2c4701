"""Source-confounding audit: does a figure measure the disease or the place an image came from?

Public COVID-19 chest X-ray sets are assembled from different collections, and the
COVID-19 images usually come from other hospitals, machines and age groups than the
normal and pneumonia images (Kermany's are paediatric). Models then learn the
*source* (exposure, noise, field of view, patient size, text on the film) and score
well on pooled test sets drawn from the same mix: the most common flaw of published
models (Roberts et al. 2021, Nat. Mach. Intell. 3:199; DeGrave, Janizek & Lee 2021,
Nat. Mach. Intell. 3:610). The lung-mask shortcut audit (:mod:`covidx.explain.audit`)
looks for markers outside the lungs; it cannot see a confounder that covers the
whole image. This audit looks at the sources themselves.

For every class, on the evaluated images:

* **how well the source alone predicts the class**: the AUC of a source-only
  predictor (an image scores the fraction of its source's images that have the
  class, i.e. the best any rule that sees only the source can do, fitted on the
  same images, so an upper bound) and the mutual information between the source
  and "has the class" (scikit-learn's ``mutual_info_score``, in bits), also as the
  fraction of the class's uncertainty the source removes;
* **the model within each source**: its one-vs-rest sensitivity and specificity
  on that source's images alone, next to the pooled values.

A class is **flagged** when

1. its positives come (almost) only from one source (share >= ``single_source_share``,
   0.95 by default) *and* the source tells the class (source-only AUC >= ``min_source_auc``,
   0.7): no figure on these data can separate the disease from the source. When the main
   source of a class also holds most images of the other classes (Kermany: pneumonia and
   normal), the source says little about it (AUC near 0.5); the model must then tell the
   classes apart within that source, which the within-source figures measure, and the
   class is not flagged for its share alone (the verdict says so);
2. or, within some source with at least ``min_negatives`` images of other classes,
   the model's specificity for the class falls below ``specificity_ratio`` (0.5)
   times its pooled specificity: inside that source the model gives the class to
   images that do not have it, i.e. it answers the source.

Every flag carries its reason as a sentence a clinician reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import entropy
from sklearn.metrics import mutual_info_score, roc_auc_score

from covidx.evaluation.metrics import _check_classification_inputs

SINGLE_SOURCE_SHARE = 0.95
MIN_SOURCE_AUC = 0.7
SPECIFICITY_RATIO = 0.5
MIN_NEGATIVES = 5
HOLD_OUT_HINT = "python -m covidx.train --test-source SOURCE"


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _source_only_auc(positive: np.ndarray, sources: np.ndarray) -> float | None:
    """AUC of the best source-only score, P(class | source), fitted on the same images."""
    if positive.all() or not positive.any():
        return None
    names, index = np.unique(sources, return_inverse=True)
    prevalence = np.bincount(index, weights=positive.astype(float)) / np.bincount(index)
    return float(roc_auc_score(positive, prevalence[index]))


def _information(positive: np.ndarray, sources: np.ndarray) -> tuple[float, float, float | None]:
    """(mutual information in bits, entropy of the label in bits, their ratio or None)."""
    mi = mutual_info_score(sources, positive) / np.log(2)
    p = positive.mean()
    h = float(entropy([p, 1 - p], base=2))
    return float(max(0.0, mi)), h, (float(min(1.0, mi / h)) if h > 0 else None)


def confounding_audit(
    y_true,
    y_prob,
    class_names: Sequence[str],
    sources,
    single_source_share: float = SINGLE_SOURCE_SHARE,
    specificity_ratio: float = SPECIFICITY_RATIO,
    min_negatives: int = MIN_NEGATIVES,
    min_source_auc: float = MIN_SOURCE_AUC,
) -> dict:
    """Audit one model's predictions for source confounding (see the module docstring).

    Args:
        y_true: (N,) integer class indices.
        y_prob: (N, K) predicted probabilities; the decision is the arg-max.
        class_names: the K class names in index order.
        sources: (N,) source name of each image.
        single_source_share: flag a class when this share of its positives comes from one source.
        specificity_ratio: flag a class when its specificity within a source is below this times
            the pooled one.
        min_negatives: a source needs this many images of other classes for its specificity to count.
        min_source_auc: a single-source class is flagged only when the source-only AUC reaches this.

    Returns a JSON-ready dict: ``sources``, ``n_samples``, ``thresholds``, ``per_class: {class:
    {positives, positives_by_source, dominant_source, dominant_share, source_auc,
    mutual_information_bits, label_entropy_bits, information_fraction, pooled: {sensitivity,
    specificity}, within_source: {source: {positives, negatives, tp, fp, fn, tn, sensitivity,
    specificity}}, flags: [{kind, source, text}], flagged, verdict}}``, ``flagged`` (class names) and
    ``summary`` (one sentence per class, flagged ones first).
    """
    y_true, y_prob = _check_classification_inputs(y_true, y_prob, class_names)
    sources = np.asarray(sources).astype(str)
    if sources.shape != y_true.shape:
        raise ValueError(f"sources must have shape {y_true.shape}, got {sources.shape}")
    if not 0.5 < single_source_share <= 1 or not 0 < specificity_ratio < 1:
        raise ValueError("single_source_share must be in (0.5, 1] and specificity_ratio in (0, 1)")
    y_pred = y_prob.argmax(axis=1)
    names = sorted(set(sources.tolist()))
    per_class = {}
    for c, cls in enumerate(class_names):
        positive, called = y_true == c, y_pred == c
        n_pos = int(positive.sum())
        by_source = {s: int(np.sum(positive & (sources == s))) for s in names}
        dominant = max(by_source, key=lambda s: (by_source[s], s)) if n_pos else None
        share = by_source[dominant] / n_pos if n_pos else None
        mi, h, frac = _information(positive, sources)
        pooled = {"sensitivity": _rate(int(np.sum(positive & called)), n_pos),
                  "specificity": _rate(int(np.sum(~positive & ~called)), int(np.sum(~positive)))}
        within = {}
        for s in names:
            sel = sources == s
            tp, fn = int(np.sum(sel & positive & called)), int(np.sum(sel & positive & ~called))
            fp, tn = int(np.sum(sel & ~positive & called)), int(np.sum(sel & ~positive & ~called))
            within[s] = {"positives": tp + fn, "negatives": fp + tn, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                         "sensitivity": _rate(tp, tp + fn), "specificity": _rate(tn, tn + fp)}
        row = {
            "positives": n_pos, "positives_by_source": by_source, "dominant_source": dominant,
            "dominant_share": share, "source_auc": _source_only_auc(positive, sources),
            "mutual_information_bits": mi, "label_entropy_bits": h, "information_fraction": frac,
            "pooled": pooled, "within_source": within,
        }
        row["flags"] = _flags(cls, row, len(names), single_source_share, specificity_ratio, min_negatives,
                              min_source_auc)
        row["flagged"] = bool(row["flags"])
        row["verdict"] = _verdict(cls, row, len(names), specificity_ratio, min_negatives, single_source_share)
        per_class[cls] = row
    flagged = [cls for cls in class_names if per_class[cls]["flagged"]]
    summary = [per_class[cls]["verdict"] for cls in flagged]
    summary += [per_class[cls]["verdict"] for cls in class_names if cls not in flagged]
    return {
        "sources": names,
        "n_samples": int(len(y_true)),
        "thresholds": {"single_source_share": single_source_share, "specificity_ratio": specificity_ratio,
                       "min_negatives": min_negatives, "min_source_auc": min_source_auc},
        "per_class": per_class,
        "flagged": flagged,
        "summary": summary,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _single_source(row, n_sources, single_share) -> bool:
    return n_sources > 1 and bool(row["positives"]) and row["dominant_share"] >= single_share


def _flags(cls, row, n_sources, single_share, ratio, min_negatives, min_auc) -> list[dict]:
    flags = []
    auc = row["source_auc"]
    if _single_source(row, n_sources, single_share) and auc is not None and auc >= min_auc:
        s, n, n_dom = row["dominant_source"], row["positives"], row["positives_by_source"][row["dominant_source"]]
        lead = (f"Every {cls} image ({n}) comes from one source, '{s}'" if n_dom == n else
                f"{_pct(row['dominant_share'])} of the {cls} images ({n_dom} of {n}) come from one source, '{s}'")
        knowing = f"; knowing only the source of an image identifies {cls} with AUC {auc:.2f}"
        negatives = row["within_source"][s]["negatives"]
        inside = (f" Source '{s}' holds no image without {cls}, so nothing here can show what the model does with "
                  f"such an image from it." if negatives == 0 else
                  f" Only {negatives} image(s) of '{s}' are not {cls}." if negatives < min_negatives else "")
        flags.append({"kind": "single_source", "source": s, "text": (
            f"{lead}{knowing}. A model can reach high {cls} figures by recognising where an image was taken "
            f"(hospital, equipment, patient age, text on the film) without seeing the disease, and these data "
            f"cannot tell the two apart.{inside}")})
    pooled = row["pooled"]["specificity"]
    if n_sources > 1 and pooled:
        for s, w in row["within_source"].items():
            if w["negatives"] >= min_negatives and w["specificity"] < ratio * pooled:
                flags.append({"kind": "specificity_collapse", "source": s, "text": (
                    f"Within source '{s}', {w['fp']} of {w['negatives']} images that are not {cls} were called "
                    f"{cls} (specificity {w['specificity']:.2f}, against {pooled:.2f} over all sources): inside "
                    f"this source the model does not tell {cls} from the other findings, so the pooled {cls} "
                    f"figures come from telling the sources apart.")})
    return flags


def _verdict(cls, row, n_sources, ratio, min_negatives, single_share) -> str:
    if row["flags"]:
        reasons = " ".join(f["text"] for f in row["flags"])
        return (f"{cls}: FLAGGED. {reasons} Do not trust the pooled {cls} figures; measure the model on {cls} and "
                f"non-{cls} images from the same source, or on a source held out of training "
                f"({HOLD_OUT_HINT}).")
    if n_sources < 2:
        return f"{cls}: not assessed (all images come from one source)."
    if not row["positives"]:
        return f"{cls}: no {cls} image in these data; nothing to flag."
    n_from = sum(1 for v in row["positives_by_source"].values() if v)
    auc = row["source_auc"]
    checked = [s for s, w in row["within_source"].items() if w["negatives"] >= min_negatives]
    pooled = row["pooled"]["specificity"]
    spec = ("" if pooled is None or not checked else
            f"; within {'each of ' if len(checked) > 1 else ''}{', '.join(repr(s) for s in checked)} the "
            f"specificity stays at or above {ratio:g} times the pooled {pooled:.2f}")
    note = ""
    if _single_source(row, n_sources, single_share):
        note = (f" Most {cls} images come from '{row['dominant_source']}', but that source holds most of the other "
                f"classes' images too, so the source says little about {cls}; its within-source figures are the "
                "ones to read.")
    return (f"{cls}: not flagged. Its images come from {n_from} source(s), at most "
            f"{_pct(row['dominant_share'])} from '{row['dominant_source']}'"
            + ("" if auc is None else f"; the source alone predicts {cls} with AUC {auc:.2f}") + spec + "." + note)


def _fmt(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def confounding_markdown(audit: dict, model_name: str = "model") -> str:
    """The audit as Markdown: the verdicts in words, then the figures behind them."""
    t = audit["thresholds"]
    lines = [f"# Source-confounding audit: {model_name}", "",
             f"{audit['n_samples']} images from {len(audit['sources'])} sources: "
             f"{', '.join(audit['sources'])}.", "",
             f"A class is flagged when at least {_pct(t['single_source_share'])} of its images come from one "
             f"source and the source alone predicts it (AUC at least {t['min_source_auc']:g}), or when, within "
             f"a source holding at least {t['min_negatives']} images of other classes, "
             f"the model's specificity for it falls below {t['specificity_ratio']:g} times its pooled "
             "specificity.", "", "## Verdicts", ""]
    lines += [f"- {s}" for s in audit["summary"]]
    lines += ["", "## How well the source alone predicts each class", "",
              "Source-only AUC: every image scores the share of its source's images that have the class (fitted "
              "on these images: an upper bound for any rule that sees only the source; 0.5 = the source says "
              "nothing). Information: mutual information between source and class, as a share of the class's "
              "uncertainty (0 = none, 1 = the source determines it).", "",
              "| Class | Images | Largest source (share) | Source-only AUC | Mutual information (bits) | "
              "Share of uncertainty |", "|---|---|---|---|---|---|"]
    for cls, r in audit["per_class"].items():
        dom = "n/a" if r["dominant_source"] is None else f"{r['dominant_source']} ({_pct(r['dominant_share'])})"
        lines.append(f"| {cls} | {r['positives']} | {dom} | {_fmt(r['source_auc'])} | "
                     f"{_fmt(r['mutual_information_bits'], 3)} | {_fmt(r['information_fraction'])} |")
    lines += ["", "## The model within each source", "",
              "One-vs-rest, arg-max decision. Positives / negatives: images with / without the class.", "",
              "| Class | Source | Positives | Negatives | Sensitivity | Specificity | Pooled sensitivity | "
              "Pooled specificity |", "|---|---|---|---|---|---|---|---|"]
    for cls, r in audit["per_class"].items():
        for s, w in r["within_source"].items():
            lines.append(f"| {cls} | {s} | {w['positives']} | {w['negatives']} | {_fmt(w['sensitivity'])} | "
                         f"{_fmt(w['specificity'])} | {_fmt(r['pooled']['sensitivity'])} | "
                         f"{_fmt(r['pooled']['specificity'])} |")
    return "\n".join(lines) + "\n"


def write_confounding_report(audit: dict, out_dir, model_name: str = "model") -> dict:
    """Write ``confounding.json`` and ``confounding.md`` into ``out_dir``; returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "confounding.json").write_text(json.dumps({"model_name": model_name, **audit}, indent=2,
                                                     allow_nan=False) + "\n")
    (out / "confounding.md").write_text(confounding_markdown(audit, model_name))
    return {"json": str(out / "confounding.json"), "markdown": str(out / "confounding.md")}
