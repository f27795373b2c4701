"""Classification and segmentation metrics as reported by the papers.

Classification follows the cascade paper (Cascade-SEME, Med. Phys. 2021,
section 5.B and Table II): every class is scored once *one-vs-rest* (that class
positive, all others negative) for sensitivity (recall), specificity,
precision, F1 and AUC, and the per-class values are averaged ("macro") for the
overall row; overall accuracy is the fraction of correct arg-max predictions.
MAG-SD (arXiv 2012.02278, Eqs. 8-11) uses the same definitions; SE-DPN
(Tables 1-3) also reports the figures with COVID-19 as the single positive
class, see :func:`positive_class_metrics`.

Added beyond the papers (because test sets of a few hundred images from a few
dozen patients make point estimates alone misleading):

* 95% bootstrap confidence intervals resampled **by patient** (draw patients
  with replacement, keep all of their images), so correlated images of one
  patient do not shrink the intervals;
* calibration: expected calibration error (Guo et al. 2017) and the
  reliability-diagram data.

Undefined values. A metric whose denominator is zero is reported as ``None``
(never NaN, so every result is strict JSON). In particular a class that is
absent from the evaluated split has ``sensitivity = None`` and ``auc = None``;
macro averages are taken over the classes *present* in ``y_true`` (support > 0)
whose value is defined, and list those classes in ``macro["classes"]``.
Precision of a present class that is never predicted is 0 (as scikit-learn's
``zero_division=0``): the model missed every case of it.

Every function returns plain Python floats / ints / lists / dicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_curve

PER_CLASS_METRICS = ("sensitivity", "specificity", "precision", "f1", "auc")
# Replicates per block in the vectorised bootstrap: keeps the (B, N) weight matrix ~16 MB.
_BOOTSTRAP_BLOCK_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------- inputs
def _check_classification_inputs(y_true, y_prob, class_names):
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    k = len(class_names)
    if y_prob.ndim != 2 or y_prob.shape[1] != k:
        raise ValueError(f"y_prob must have shape (N, {k}), got {y_prob.shape}")
    if y_true.ndim != 1 or len(y_true) != len(y_prob):
        raise ValueError(f"y_true must have shape ({len(y_prob)},), got {y_true.shape}")
    if len(y_true) == 0:
        raise ValueError("no samples to evaluate")
    if not np.issubdtype(y_true.dtype, np.integer):
        if not np.all(np.mod(y_true, 1) == 0):
            raise ValueError("y_true must hold integer class indices")
        y_true = y_true.astype(np.int64)
    if y_true.min() < 0 or y_true.max() >= k:
        raise ValueError(f"y_true must hold class indices in [0, {k}), got {y_true.min()}..{y_true.max()}")
    if not np.all(np.isfinite(y_prob)):
        raise ValueError("y_prob contains NaN or infinite values")
    return y_true.astype(np.int64), y_prob


def _group_index(patient_ids, n: int) -> np.ndarray:
    """Integer patient index per image; each image is its own patient when ids are missing."""
    if patient_ids is None:
        return np.arange(n)
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != (n,):
        raise ValueError(f"patient_ids must have shape ({n},), got {patient_ids.shape}")
    return np.unique(patient_ids, return_inverse=True)[1].reshape(-1)


def _opt(x) -> float | None:
    """A float, or ``None`` for an undefined (NaN) value."""
    x = float(x)
    return x if np.isfinite(x) else None


def _safe_div(num, den):
    """num / den with NaN where den == 0 (internal: turned into ``None`` on output)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


# --------------------------------------------------------------------------- core (weighted, vectorised)
def _rates_from_counts(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    """One-vs-rest rates from (possibly weighted) counts; NaN where undefined.

    sensitivity = TP/(TP+FN), specificity = TN/(TN+FP), precision = TP/(TP+FP),
    F1 = 2TP/(2TP+FP+FN) (MAG-SD Eq. 11, equal to the harmonic mean of
    precision and recall, SE-DPN Eq. 4).
    """
    support = tp + fn
    precision = _safe_div(tp, tp + fp)
    # A present class that is never predicted: precision 0 (it was missed), not undefined.
    precision = np.where(np.isnan(precision) & (support > 0), 0.0, precision)
    return {
        "sensitivity": _safe_div(tp, support),
        "specificity": _safe_div(tn, tn + fp),
        "precision": precision,
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
    }


def _weighted_auc(weights: np.ndarray, scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC per row of ``weights`` (B, N) (Mann-Whitney, ties count 1/2).

    With integer weights this is the AUC of the data set in which image ``i``
    appears ``weights[b, i]`` times, i.e. of a bootstrap resample, computed for
    all replicates at once from one sort of the scores. NaN where a row has no
    positive or no negative weight.
    """
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Boundaries of runs of tied scores: ties are resolved per run (midrank convention).
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    pos = positive[order]
    w_pos = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
    w_neg = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    pairs = np.sum(w_pos * (neg_below + 0.5 * w_neg), axis=1)
    return _safe_div(pairs, w_pos.sum(axis=1) * w_neg.sum(axis=1))


def _metrics_for_weights(weights, y_true, y_pred, y_prob, k: int) -> dict[str, np.ndarray]:
    """All classification metrics for each row of ``weights`` (B, N).

    Row ``b`` weights image ``i`` by ``weights[b, i]``; a row of ones gives the
    point estimates, a row of patient-bootstrap counts one replicate. Returns
    (B, K) arrays per class metric, (B,) arrays for accuracy and macro values
    (NaN = undefined).
    """
    b = weights.shape[0]
    cells = y_true * k + y_pred
    cm = np.zeros((b, k * k))
    for cell in np.unique(cells):  # at most K*K weighted sums over the images
        cm[:, cell] = weights[:, cells == cell].sum(axis=1)
    cm = cm.reshape(b, k, k)
    total = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    fp = predicted - tp
    fn = support - tp
    tn = total[:, None] - tp - fp - fn
    out = _rates_from_counts(tp, fp, fn, tn)
    out["auc"] = np.stack([_weighted_auc(weights, y_prob[:, c], y_true == c) for c in range(k)], axis=1)
    out["support"] = support
    out["accuracy"] = _safe_div(np.trace(cm, axis1=1, axis2=2), total)
    present = support > 0
    for name in PER_CLASS_METRICS:
        valid = present & np.isfinite(out[name])
        out[f"macro_{name}"] = _safe_div(np.where(valid, out[name], 0.0).sum(axis=1), valid.sum(axis=1))
    return out


# --------------------------------------------------------------------------- bootstrap
def _bootstrap_intervals(y_true, y_pred, y_prob, k, groups, n_bootstrap, seed, level):
    """Percentile CIs of every metric from a patient-level (group) bootstrap.

    Each replicate draws as many patients as there are, with replacement, and
    keeps all images of each drawn patient (an image is counted as often as
    its patient is drawn). Replicates in which a metric is undefined (e.g. a
    rare class not drawn) are left out of that metric's interval.
    """
    rng = np.random.default_rng(seed)
    n_groups = int(groups.max()) + 1
    block = max(1, _BOOTSTRAP_BLOCK_ELEMENTS // len(y_true))
    samples: dict[str, list[np.ndarray]] = {}
    done = 0
    while done < n_bootstrap:
        size = min(block, n_bootstrap - done)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=size)
        rep = _metrics_for_weights(counts[:, groups].astype(np.float64), y_true, y_pred, y_prob, k)
        for key, value in rep.items():
            samples.setdefault(key, []).append(value)
        done += size
    alpha = 100 * (1 - level) / 2

    def interval(values: np.ndarray):
        values = values[np.isfinite(values)]
        if values.size == 0:
            return None
        lo, hi = np.percentile(values, [alpha, 100 - alpha])
        return [float(lo), float(hi)]

    stacked = {key: np.concatenate(v, axis=0) for key, v in samples.items()}
    overall = {"accuracy": interval(stacked["accuracy"])}
    overall.update({f"macro_{m}": interval(stacked[f"macro_{m}"]) for m in PER_CLASS_METRICS})
    per_class = [{m: interval(stacked[m][:, c]) for m in PER_CLASS_METRICS} for c in range(k)]
    return overall, per_class


# --------------------------------------------------------------------------- calibration / curves
def calibration(y_true, y_prob, n_bins: int = 15) -> dict:
    """Expected calibration error and reliability-diagram data (Guo et al., ICML 2017).

    Confidence is the maximum predicted probability, correctness whether its
    arg-max is the true class. Confidences fall into ``n_bins`` equal-width bins
    ``(lower, upper]`` on [0, 1] (the first bin also holds 0), and

        ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|,
        MCE = max_m |acc(B_m) - conf(B_m)| over non-empty bins.

    Empty bins have ``accuracy = confidence = None`` and count 0.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    gaps = np.abs(acc_sum - conf_sum)  # = count * |acc - conf| per bin
    filled = counts > 0
    bins = [
        {
            "lower": float(edges[m]),
            "upper": float(edges[m + 1]),
            "count": int(counts[m]),
            "confidence": float(conf_sum[m] / counts[m]) if filled[m] else None,
            "accuracy": float(acc_sum[m] / counts[m]) if filled[m] else None,
        }
        for m in range(n_bins)
    ]
    return {
        "ece": float(gaps.sum() / len(y_true)),
        "mce": float((gaps[filled] / counts[filled]).max()),
        "n_bins": int(n_bins),
        "bins": bins,
    }


def roc_curves(y_true, y_prob, class_names: Sequence[str]) -> dict:
    """One-vs-rest ROC curve per class (cascade paper 5.B: one-hot targets, one binary ROC each).

    ``{class: {"fpr", "tpr", "thresholds", "auc"}}``; ``None`` for a class that
    has no positive or no negative case. scikit-learn's first threshold
    (``inf``, "predict nothing") is stored as ``max(score) + 1`` so the curve
    stays valid JSON (scikit-learn < 1.3 used the same convention).
    """
    y_true, y_prob = _check_classification_inputs(y_true, y_prob, class_names)
    curves = {}
    for c, name in enumerate(class_names):
        positive = y_true == c
        if positive.all() or not positive.any():
            curves[name] = None
            continue
        fpr, tpr, thresholds = roc_curve(positive, y_prob[:, c])
        thresholds = np.where(np.isinf(thresholds), y_prob[:, c].max() + 1.0, thresholds)
        auc = _weighted_auc(np.ones((1, len(y_true))), y_prob[:, c], positive)[0]
        curves[name] = {
            "fpr": fpr.tolist(),
            "tpr": tpr.tolist(),
            "thresholds": thresholds.tolist(),
            "auc": float(auc),
        }
    return curves


# --------------------------------------------------------------------------- public API
def classification_metrics(
    y_true,
    y_prob,
    class_names: Sequence[str],
    patient_ids=None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
    n_bins: int = 15,
    positive_class: str | None = "covid19",
) -> dict:
    """Every classification figure of the papers for one model on one split.

    Args:
        y_true: (N,) integer class indices.
        y_prob: (N, K) predicted probabilities (softmax outputs); the decision is the arg-max.
        class_names: the K class names, in index order (a task's ``classes``).
        patient_ids: (N,) patient of each image; the bootstrap resamples patients.
            ``None`` treats every image as its own patient.
        n_bootstrap: bootstrap replicates (0 disables the confidence intervals).
        seed: seed of the bootstrap.
        ci_level: confidence level of the percentile intervals.
        n_bins: calibration bins.
        positive_class: if it is one of ``class_names``, add the binary figures
            with that class positive (SE-DPN Tables 1-3, COVID-19 positive).

    Returns a JSON-serialisable dict::

        class_names, n_samples, n_patients, accuracy,
        per_class: {name: {support, sensitivity, specificity, precision, f1, auc,
                           ci: {metric: [lo, hi] | None}}},
        macro: {sensitivity, specificity, precision, f1, auc, classes},
        ci: {accuracy, macro_sensitivity, ..., macro_auc: [lo, hi] | None},
        confusion_matrix: {counts, normalized}   (rows = true class, cols = predicted),
        roc: {name: {fpr, tpr, thresholds, auc} | None},
        calibration: {ece, mce, n_bins, bins},
        absent_classes, bootstrap: {n, level, seed, unit},
        positive_class: {...} (only when requested and present)

    Undefined values are ``None`` (see the module docstring).
    """
    y_true, y_prob = _check_classification_inputs(y_true, y_prob, class_names)
    k = len(class_names)
    n = len(y_true)
    groups = _group_index(patient_ids, n)
    y_pred = y_prob.argmax(axis=1)

    point = _metrics_for_weights(np.ones((1, n)), y_true, y_pred, y_prob, k)
    if n_bootstrap > 0:
        ci_overall, ci_class = _bootstrap_intervals(
            y_true, y_pred, y_prob, k, groups, n_bootstrap, seed, ci_level
        )
    else:
        ci_overall = {"accuracy": None, **{f"macro_{m}": None for m in PER_CLASS_METRICS}}
        ci_class = [{m: None for m in PER_CLASS_METRICS} for _ in range(k)]

    support = point["support"][0].astype(int)
    per_class = {}
    for c, name in enumerate(class_names):
        row = {"support": int(support[c])}
        row.update({m: _opt(point[m][0, c]) for m in PER_CLASS_METRICS})
        row["ci"] = ci_class[c]
        per_class[name] = row
    macro = {m: _opt(point[f"macro_{m}"][0]) for m in PER_CLASS_METRICS}
    macro["classes"] = [name for c, name in enumerate(class_names) if support[c] > 0]

    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    row_sums = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, row_sums, out=np.zeros((k, k)), where=row_sums > 0)

    result = {
        "class_names": list(class_names),
        "n_samples": int(n),
        "n_patients": int(groups.max()) + 1,
        "accuracy": float(point["accuracy"][0]),
        "per_class": per_class,
        "macro": macro,
        "ci": ci_overall,
        "confusion_matrix": {"counts": counts.tolist(), "normalized": normalized.tolist()},
        "roc": roc_curves(y_true, y_prob, class_names),
        "calibration": calibration(y_true, y_prob, n_bins),
        "absent_classes": [name for c, name in enumerate(class_names) if support[c] == 0],
        "bootstrap": {
            "n": int(n_bootstrap),
            "level": float(ci_level),
            "seed": int(seed),
            "unit": "image" if patient_ids is None else "patient",
        },
    }
    if positive_class is not None and positive_class in class_names:
        result["positive_class"] = positive_class_metrics(y_true, y_prob, class_names, positive_class)
    return result


def binary_metrics(y_true, y_score, threshold: float = 0.5, y_pred=None) -> dict:
    """Two-class figures (positive = 1): counts, sensitivity, specificity, precision, F1,
    accuracy (SE-DPN Eqs. 1-4, MAG-SD Eqs. 8-11) and AUC of ``y_score``.

    The decision is ``y_score >= threshold`` unless ``y_pred`` is given. Undefined values are ``None``.
    """
    y_true = np.asarray(y_true).astype(bool)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape != y_score.shape or y_true.ndim != 1:
        raise ValueError("y_true and y_score must be 1-D arrays of equal length")
    y_pred = (y_score >= threshold) if y_pred is None else np.asarray(y_pred).astype(bool)
    tp = float(np.sum(y_true & y_pred))
    fp = float(np.sum(~y_true & y_pred))
    fn = float(np.sum(y_true & ~y_pred))
    tn = float(np.sum(~y_true & ~y_pred))
    rates = _rates_from_counts(np.array(tp), np.array(fp), np.array(fn), np.array(tn))
    auc = _weighted_auc(np.ones((1, len(y_true))), y_score, y_true)[0]
    out = {"tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn)}
    out.update({m: _opt(v) for m, v in rates.items()})
    out["accuracy"] = float((tp + tn) / len(y_true))
    out["auc"] = _opt(auc)
    return out


def positive_class_metrics(y_true, y_prob, class_names: Sequence[str], positive: str = "covid19") -> dict:
    """Figures with one class positive and all others negative (SE-DPN Tables 1-3: COVID-19 positive).

    The decision is the multi-class arg-max (an image counts as positive when
    ``positive`` has the highest probability), so the counts agree with the
    confusion matrix; the AUC ranks by that class's probability.
    ``multiclass_accuracy`` is the K-class accuracy SE-DPN's Table 1 puts
    next to the COVID-19 precision/recall/F1.
    """
    y_true, y_prob = _check_classification_inputs(y_true, y_prob, class_names)
    c = list(class_names).index(positive)
    y_pred = y_prob.argmax(axis=1)
    out = {"positive": positive}
    out.update(binary_metrics(y_true == c, y_prob[:, c], y_pred=y_pred == c))
    out["multiclass_accuracy"] = float(np.mean(y_pred == y_true))
    return out


# --------------------------------------------------------------------------- segmentation
def _as_binary_mask(mask, threshold: float) -> np.ndarray:
    mask = np.asarray(mask)
    if np.issubdtype(mask.dtype, np.floating):
        return mask > threshold
    return mask != 0


def segmentation_metrics(y_true_masks, y_pred_masks, ids: Sequence | None = None, threshold: float = 0.5) -> dict:
    """Dice and IoU (Jaccard) per image and their mean, std and median.

    Masks are per-image arrays (a stacked (N, H, W) array or a list of arrays
    of any shape); an integer / boolean mask counts non-zero pixels as
    foreground, a float mask (probabilities) pixels ``> threshold``.

        Dice = 2 |A ∩ B| / (|A| + |B|),   IoU = |A ∩ B| / |A ∪ B|   (MAG-SD Eq. 12).

    An image whose true and predicted masks are both empty scores Dice = IoU =
    1.0 (the prediction is exactly right), so these images do not turn the
    mean undefined.
    """
    if len(y_true_masks) != len(y_pred_masks):
        raise ValueError(f"{len(y_true_masks)} true masks but {len(y_pred_masks)} predicted masks")
    if len(y_true_masks) == 0:
        raise ValueError("no masks to evaluate")
    ids = list(range(len(y_true_masks))) if ids is None else list(ids)
    if len(ids) != len(y_true_masks):
        raise ValueError("ids must have one entry per mask")
    per_image = []
    for image_id, t, p in zip(ids, y_true_masks, y_pred_masks):
        t = _as_binary_mask(t, threshold)
        p = _as_binary_mask(p, threshold)
        if t.shape != p.shape:
            raise ValueError(f"mask shapes differ for {image_id!r}: {t.shape} vs {p.shape}")
        inter = int(np.logical_and(t, p).sum())
        union = int(np.logical_or(t, p).sum())
        total = int(t.sum() + p.sum())
        per_image.append(
            {
                "id": int(image_id) if isinstance(image_id, (int, np.integer)) else str(image_id),
                "dice": 2.0 * inter / total if total else 1.0,
                "iou": inter / union if union else 1.0,
                "true_pixels": int(t.sum()),
                "pred_pixels": int(p.sum()),
            }
        )
    dice = np.array([r["dice"] for r in per_image])
    iou = np.array([r["iou"] for r in per_image])
    return {
        "n_images": len(per_image),
        "mean_dice": float(dice.mean()),
        "mean_iou": float(iou.mean()),
        "std_dice": float(dice.std()),
        "std_iou": float(iou.std()),
        "median_dice": float(np.median(dice)),
        "median_iou": float(np.median(iou)),
        "per_image": per_image,
    }
