"""covidx.evaluation.metrics against scikit-learn / NumPy / hand computations on fixed arrays."""

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from covidx.evaluation import metrics as M

NAMES = ["covid19", "bacterial", "viral", "normal"]


def _synthetic(n, k=4, strength=0.6, seed=0):
    """Noisy softmax-like probabilities that favour the true class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n)
    p[np.arange(n), y] += strength * rng.random(n)
    return y, p / p.sum(axis=1, keepdims=True)


# Fixed 3-class example small enough to check by hand.
Y3 = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
P3 = np.array(
    [
        [0.7, 0.2, 0.1],  # 0 -> 0
        [0.5, 0.4, 0.1],  # 0 -> 0
        [0.2, 0.3, 0.5],  # 0 -> 2
        [0.1, 0.8, 0.1],  # 1 -> 1
        [0.6, 0.3, 0.1],  # 1 -> 0
        [0.1, 0.1, 0.8],  # 2 -> 2
        [0.2, 0.2, 0.6],  # 2 -> 2
        [0.3, 0.4, 0.3],  # 2 -> 1
        [0.1, 0.3, 0.6],  # 2 -> 2
        [0.2, 0.5, 0.3],  # 1 -> 1
    ]
)


def test_point_metrics_match_sklearn():
    y, p = _synthetic(400)
    pred = p.argmax(axis=1)
    m = M.classification_metrics(y, p, NAMES, n_bootstrap=0)
    rec = recall_score(y, pred, average=None)
    prec = precision_score(y, pred, average=None, zero_division=0)
    f1 = f1_score(y, pred, average=None)
    cm = confusion_matrix(y, pred)
    for c, name in enumerate(NAMES):
        row = m["per_class"][name]
        assert row["sensitivity"] == pytest.approx(rec[c])
        assert row["precision"] == pytest.approx(prec[c])
        assert row["f1"] == pytest.approx(f1[c])
        assert row["auc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))
        assert row["support"] == int(np.sum(y == c))
        # specificity by hand: TN / (TN + FP) from the confusion matrix
        fp = cm[:, c].sum() - cm[c, c]
        tn = cm.sum() - cm[c, :].sum() - cm[:, c].sum() + cm[c, c]
        assert row["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro"]["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["macro"]["precision"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["macro"]["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["macro"]["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"]["counts"] == cm.tolist()
    np.testing.assert_allclose(m["confusion_matrix"]["normalized"], cm / cm.sum(axis=1, keepdims=True))


def test_hand_computed_three_class_example():
    m = M.classification_metrics(Y3, P3, ["a", "b", "c"], n_bootstrap=0, positive_class=None)
    # class a: TP=2 (rows 0,1), FN=1 (row 2), FP=1 (row 4), TN=6
    a = m["per_class"]["a"]
    assert (a["sensitivity"], a["specificity"], a["precision"]) == pytest.approx((2 / 3, 6 / 7, 2 / 3))
    assert a["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # class c: TP=3, FN=1 (row 7), FP=1 (row 2), TN=5
    c = m["per_class"]["c"]
    assert (c["sensitivity"], c["specificity"], c["precision"]) == pytest.approx((3 / 4, 5 / 6, 3 / 4))
    assert m["accuracy"] == pytest.approx(7 / 10)
    # AUC of class a by pair counting: positives 0.7, 0.5, 0.2 against negatives
    neg = P3[Y3 != 0, 0]
    pairs = sum((x > neg).sum() + 0.5 * (x == neg).sum() for x in P3[Y3 == 0, 0])
    assert a["auc"] == pytest.approx(pairs / (3 * 7))
    assert "positive_class" not in m


def test_tied_scores_auc_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    p = np.round(rng.dirichlet(np.ones(3), 200), 1)  # heavy ties
    p[:, 2] = 1 - p[:, 0] - p[:, 1]
    m = M.classification_metrics(y, p, ["x", "y", "z"], n_bootstrap=0)
    for c, name in enumerate("xyz"):
        assert m["per_class"][name]["auc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))


def test_roc_curves_match_sklearn_and_are_json_safe():
    y, p = _synthetic(150, k=3)
    curves = M.roc_curves(y, p, ["a", "b", "c"])
    fpr, tpr, thr = roc_curve(y == 1, p[:, 1])
    np.testing.assert_allclose(curves["b"]["fpr"], fpr)
    np.testing.assert_allclose(curves["b"]["tpr"], tpr)
    np.testing.assert_allclose(curves["b"]["thresholds"][1:], thr[1:])
    assert curves["b"]["thresholds"][0] == pytest.approx(p[:, 1].max() + 1)
    json.dumps(curves, allow_nan=False)


def test_absent_class_is_none_and_excluded_from_macro():
    y, p = _synthetic(120)
    y[y == 2] = 1  # "viral" absent from the split
    m = M.classification_metrics(y, p, NAMES, n_bootstrap=50)
    viral = m["per_class"]["viral"]
    assert viral["support"] == 0
    assert viral["sensitivity"] is None and viral["auc"] is None
    assert viral["ci"]["sensitivity"] is None and viral["ci"]["auc"] is None
    assert m["roc"]["viral"] is None
    assert m["absent_classes"] == ["viral"]
    assert m["macro"]["classes"] == ["covid19", "bacterial", "normal"]
    pred = p.argmax(axis=1)
    present = [0, 1, 3]
    assert m["macro"]["sensitivity"] == pytest.approx(recall_score(y, pred, labels=present, average="macro"))
    assert m["macro"]["f1"] == pytest.approx(f1_score(y, pred, labels=present, average="macro"))
    expected_auc = np.mean([roc_auc_score(y == c, p[:, c]) for c in present])
    assert m["macro"]["auc"] == pytest.approx(expected_auc)
    text = json.dumps(m, allow_nan=False)  # raises on NaN / inf
    assert "NaN" not in text


def test_single_class_split_does_not_crash():
    y = np.zeros(10, dtype=int)
    p = np.tile([0.6, 0.3, 0.1], (10, 1))
    m = M.classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=20)
    assert m["per_class"]["a"]["sensitivity"] == 1.0
    assert m["per_class"]["a"]["specificity"] is None and m["per_class"]["a"]["auc"] is None
    assert m["macro"]["auc"] is None
    json.dumps(m, allow_nan=False)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        M.classification_metrics([0, 1], np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError):
        M.classification_metrics([0, 5], np.ones((2, 2)) / 2, ["a", "b"])
    with pytest.raises(ValueError):
        M.classification_metrics([0, 1], np.array([[np.nan, 1], [0.5, 0.5]]), ["a", "b"])


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data():
    widths = {}
    for n in (50, 2000):
        y, p = _synthetic(n, seed=1)
        m = M.classification_metrics(y, p, NAMES, n_bootstrap=400, seed=0)
        for key, value in [("accuracy", m["accuracy"])] + [(f"macro_{k}", m["macro"][k]) for k in M.PER_CLASS_METRICS]:
            lo, hi = m["ci"][key]
            assert lo <= value <= hi, (n, key)
        for name in NAMES:
            row = m["per_class"][name]
            for k in M.PER_CLASS_METRICS:
                lo, hi = row["ci"][k]
                assert lo <= row[k] <= hi, (n, name, k)
        widths[n] = m["ci"]["accuracy"][1] - m["ci"]["accuracy"][0]
        widths[(n, "auc")] = m["ci"]["macro_auc"][1] - m["ci"]["macro_auc"][0]
    assert widths[2000] < widths[50] / 3  # ~ sqrt(40) narrower
    assert widths[(2000, "auc")] < widths[(50, "auc")] / 3


def test_bootstrap_is_reproducible_by_seed():
    y, p = _synthetic(80)
    a = M.classification_metrics(y, p, NAMES, n_bootstrap=100, seed=7)["ci"]
    b = M.classification_metrics(y, p, NAMES, n_bootstrap=100, seed=7)["ci"]
    c = M.classification_metrics(y, p, NAMES, n_bootstrap=100, seed=8)["ci"]
    assert a == b and a != c


def test_bootstrap_resamples_patients():
    # 40 patients x 10 images; all images of a patient are right or all wrong.
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(40), 10)
    y = np.repeat(rng.integers(0, 2, 40), 10)
    correct = np.repeat(rng.random(40) < 0.7, 10)
    pred = np.where(correct, y, 1 - y)
    p = np.stack([np.where(pred == 0, 0.8, 0.2), np.where(pred == 0, 0.2, 0.8)], axis=1)
    by_image = M.classification_metrics(y, p, ["a", "b"], n_bootstrap=500)
    by_patient = M.classification_metrics(y, p, ["a", "b"], patient_ids=patients, n_bootstrap=500)
    width = lambda m: m["ci"]["accuracy"][1] - m["ci"]["accuracy"][0]  # noqa: E731
    assert by_patient["n_patients"] == 40 and by_patient["bootstrap"]["unit"] == "patient"
    assert by_image["n_patients"] == 400 and by_image["bootstrap"]["unit"] == "image"
    # effective sample size 40 instead of 400: ~sqrt(10) = 3.2x wider
    assert width(by_patient) > 2.2 * width(by_image)
    # string patient ids work the same as integers
    ids = np.array([f"p{i:03d}" for i in patients])
    same = M.classification_metrics(y, p, ["a", "b"], patient_ids=ids, n_bootstrap=500)
    assert same["ci"] == by_patient["ci"]


def test_weighted_auc_equals_auc_of_expanded_resample():
    y, p = _synthetic(60, k=3, seed=4)
    counts = np.random.default_rng(0).integers(0, 3, 60)
    idx = np.repeat(np.arange(60), counts)
    got = M._weighted_auc(counts[None, :].astype(float), p[:, 1], y == 1)[0]
    assert got == pytest.approx(roc_auc_score(y[idx] == 1, p[idx, 1]))


def test_ece_against_hand_computation():
    # 4 bins of width 0.25. Confidences: 0.35, 0.4 (bin 2), 0.6 (bin 3), 0.9, 0.95 (bin 4)
    y_prob = np.array([[0.3, 0.35, 0.35], [0.4, 0.3, 0.3], [0.6, 0.2, 0.2], [0.9, 0.05, 0.05], [0.95, 0.03, 0.02]])
    y_prob = y_prob / y_prob.sum(axis=1, keepdims=True)
    y_true = np.array([1, 0, 1, 0, 0])  # arg-max: 1 (0.35 tie -> first = 1), 0, 0, 0, 0
    conf = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(float)
    bins = [[0, 1], [2], [3, 4]]
    expected = sum(len(b) / 5 * abs(correct[b].mean() - conf[b].mean()) for b in bins)
    cal = M.calibration(y_true, y_prob, n_bins=4)
    assert cal["ece"] == pytest.approx(expected)
    assert [b["count"] for b in cal["bins"]] == [0, 2, 1, 2]
    assert cal["bins"][0]["accuracy"] is None
    assert cal["bins"][3]["confidence"] == pytest.approx(conf[[3, 4]].mean())
    assert cal["mce"] == pytest.approx(max(abs(correct[b].mean() - conf[b].mean()) for b in bins))
    assert M.calibration(y_true, y_prob, n_bins=10)["n_bins"] == 10


def test_positive_class_and_binary_helpers():
    y, p = _synthetic(200, seed=5)
    pc = M.positive_class_metrics(y, p, NAMES, "covid19")
    t, d = y == 0, p.argmax(axis=1) == 0
    assert pc["precision"] == pytest.approx(precision_score(t, d))
    assert pc["sensitivity"] == pytest.approx(recall_score(t, d))
    assert pc["f1"] == pytest.approx(f1_score(t, d))
    assert pc["accuracy"] == pytest.approx(accuracy_score(t, d))
    assert pc["multiclass_accuracy"] == pytest.approx(accuracy_score(y, p.argmax(axis=1)))
    assert pc["auc"] == pytest.approx(roc_auc_score(t, p[:, 0]))
    assert [pc["tn"], pc["fp"], pc["fn"], pc["tp"]] == confusion_matrix(t, d).ravel().tolist()
    # the same numbers appear in the one-vs-rest row of that class
    row = M.classification_metrics(y, p, NAMES, n_bootstrap=0)["per_class"]["covid19"]
    assert row["f1"] == pytest.approx(pc["f1"]) and row["specificity"] == pytest.approx(pc["specificity"])
    b = M.binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], threshold=0.5)
    assert (b["tp"], b["fp"], b["fn"], b["tn"]) == (1, 1, 1, 1)
    assert b["auc"] == pytest.approx(0.75)
    assert M.binary_metrics([0, 0], [0.1, 0.2])["sensitivity"] is None


def test_segmentation_metrics_against_numpy():
    rng = np.random.default_rng(2)
    t = rng.random((6, 32, 32)) > 0.6
    p = rng.random((6, 32, 32)) > 0.5
    t[5] = False
    p[5] = False  # empty vs empty
    m = M.segmentation_metrics(t, p.astype(np.float32), ids=[f"img{i}" for i in range(6)])
    inter = (t & p).sum(axis=(1, 2))
    dice = 2 * inter / (t.sum(axis=(1, 2)) + p.sum(axis=(1, 2)) + 1e-300)
    iou = inter / ((t | p).sum(axis=(1, 2)) + 1e-300)
    dice[5] = iou[5] = 1.0
    np.testing.assert_allclose([r["dice"] for r in m["per_image"]], dice)
    np.testing.assert_allclose([r["iou"] for r in m["per_image"]], iou)
    assert m["mean_dice"] == pytest.approx(dice.mean()) and m["mean_iou"] == pytest.approx(iou.mean())
    assert m["per_image"][0]["id"] == "img0"
    # one empty, the other not: 0
    z = M.segmentation_metrics([np.zeros((4, 4))], [np.ones((4, 4))])
    assert z["mean_dice"] == 0.0 and z["mean_iou"] == 0.0
    # probabilities are thresholded at 0.5; shapes may differ between images
    q = M.segmentation_metrics([np.array([[1, 0]]), np.ones((3, 3), int)], [np.array([[0.7, 0.2]]), np.ones((3, 3))])
    assert q["mean_dice"] == 1.0
    with pytest.raises(ValueError):
        M.segmentation_metrics([np.ones((2, 2))], [np.ones((3, 3))])
    json.dumps(m, allow_nan=False)
