"""Per-source evaluation: every classification figure within each image source, beside the pooled one.

Why. Public COVID-19 radiograph sets pool images from different collections, and
the most common flaw of published models is that they learn the *source* of an
image (hospital, scanner, age group, burnt-in text) instead of the disease
(Roberts et al., "Common pitfalls and recommendations for using machine learning
to detect and prognosticate for COVID-19", Nat. Mach. Intell. 3:199, 2021;
DeGrave, Janizek & Lee, "AI for radiographic COVID-19 detection selects
shortcuts over signal", Nat. Mach. Intell. 3:610, 2021). A pooled sensitivity
and specificity can both be high while, inside one source, almost every image is
called COVID-19. Scoring each source on its own shows it.

Within a source the figures are those of
:func:`~covidx.evaluation.metrics.classification_metrics` on that source's images
alone (one-vs-rest per class, arg-max decision, 95% bootstrap intervals resampled
by patient within the source), plus the one-vs-rest counts TP/FP/FN/TN of every
class, so each rate can be checked by hand. A class absent from a source has no
sensitivity or AUC there (``None``), but its specificity is defined: how many of
that source's other images the model wrongly gives that class, which is exactly
where a source shortcut shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covidx.evaluation.metrics import PER_CLASS_METRICS, _check_classification_inputs, classification_metrics


def one_vs_rest_counts(y_true, y_pred, k: int) -> list[dict]:
    """TP, FP, FN, TN of each of ``k`` classes scored one-vs-rest (integer class indices)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    out = []
    for c in range(k):
        t, p = y_true == c, y_pred == c
        out.append({"tp": int(np.sum(t & p)), "fp": int(np.sum(~t & p)), "fn": int(np.sum(t & ~p)),
                    "tn": int(np.sum(~t & ~p))})
    return out


def source_label_counts(y_true, sources, class_names: Sequence[str]) -> dict:
    """``{source: {class: images}}`` (every class listed, zeros included), sources sorted by name."""
    y_true = np.asarray(y_true)
    sources = np.asarray(sources).astype(str)
    return {s: {name: int(np.sum((sources == s) & (y_true == c))) for c, name in enumerate(class_names)}
            for s in sorted(set(sources.tolist()))}


def per_source_metrics(
    y_true,
    y_prob,
    class_names: Sequence[str],
    sources,
    patient_ids=None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
) -> dict:
    """Every classification figure within each source.

    Args:
        y_true: (N,) integer class indices.
        y_prob: (N, K) predicted probabilities; the decision is the arg-max.
        class_names: the K class names in index order.
        sources: (N,) source name of each image (the table's ``source`` column).
        patient_ids: (N,) patient of each image (bootstrap unit); ``None``: every image its own patient.
        n_bootstrap, seed, ci_level: as :func:`~covidx.evaluation.metrics.classification_metrics`,
            run separately within each source.

    Returns ``{source: {...}}`` sorted by source name, each holding ``n_samples, n_patients, accuracy,
    ci`` (accuracy and macro CIs), ``macro``, ``per_class: {class: {support, sensitivity, specificity,
    precision, f1, auc, tp, fp, fn, tn, ci}}``, ``confusion_matrix`` (counts, rows true),
    ``absent_classes`` and ``ece``. ROC curves and reliability bins are left to the pooled report.
    """
    y_true, y_prob = _check_classification_inputs(y_true, y_prob, class_names)
    sources = np.asarray(sources).astype(str)
    if sources.shape != y_true.shape:
        raise ValueError(f"sources must have shape {y_true.shape}, got {sources.shape}")
    patients = None if patient_ids is None else np.asarray(patient_ids)
    if patients is not None and patients.shape != y_true.shape:
        raise ValueError(f"patient_ids must have shape {y_true.shape}, got {patients.shape}")
    k = len(class_names)
    out = {}
    for source in sorted(set(sources.tolist())):
        sel = sources == source
        m = classification_metrics(y_true[sel], y_prob[sel], class_names,
                                   patient_ids=None if patients is None else patients[sel],
                                   n_bootstrap=n_bootstrap, seed=seed, ci_level=ci_level, positive_class=None)
        counts = one_vs_rest_counts(y_true[sel], y_prob[sel].argmax(axis=1), k)
        per_class = {}
        for c, name in enumerate(class_names):
            row = {key: m["per_class"][name][key] for key in ("support", *PER_CLASS_METRICS)}
            row.update(counts[c])
            row["ci"] = m["per_class"][name]["ci"]
            per_class[name] = row
        out[source] = {
            "n_samples": m["n_samples"],
            "n_patients": m["n_patients"],
            "accuracy": m["accuracy"],
            "ci": m["ci"],
            "macro": m["macro"],
            "per_class": per_class,
            "confusion_matrix": m["confusion_matrix"]["counts"],
            "absent_classes": m["absent_classes"],
            "ece": m["calibration"]["ece"],
        }
    return out
