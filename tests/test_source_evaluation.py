"""Per-source evaluation and the source-confounding audit, checked against hand computations."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from covidx.evaluation import confounding_audit, per_source_metrics, write_classification_report
from covidx.evaluation.confounding import write_confounding_report

NAMES = ["covid19", "pneumonia", "normal"]


def _one_hot_probs(pred, k=3, seed=0):
    """Probabilities whose arg-max is ``pred``, with some spread so AUCs are not all 1."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 0.3, (len(pred), k))
    p[np.arange(len(pred)), pred] += 0.6
    return p / p.sum(axis=1, keepdims=True)


def _issue_case():
    """The trap of the issue: COVID-19 from one adult source that also holds 17 non-COVID images, 16 of them
    called COVID-19; the paediatric source is classified well."""
    y = np.array([0] * 10 + [1] * 13 + [2] * 4 + [1] * 20 + [2] * 20)
    pred = np.array([0] * 10 + [0] * 13 + [0] * 3 + [2] + [1] * 19 + [2] + [2] * 20)
    sources = np.array(["cohen"] * 27 + ["kermany"] * 40)
    patients = np.array([f"p{i // 2}" for i in range(len(y))])
    return y, _one_hot_probs(pred), sources, patients


def _hand_rates(t, p, c):
    tp = np.sum((t == c) & (p == c))
    fp = np.sum((t != c) & (p == c))
    fn = np.sum((t == c) & (p != c))
    tn = np.sum((t != c) & (p != c))
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    prec = tp / (tp + fp) if tp + fp else (0.0 if tp + fn else None)
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
    return dict(tp=tp, fp=fp, fn=fn, tn=tn, sensitivity=sens, specificity=spec, precision=prec, f1=f1)


def test_per_source_tables_equal_a_hand_computation():
    y, prob, sources, patients = _issue_case()
    pred = prob.argmax(1)
    m = per_source_metrics(y, prob, NAMES, sources, patient_ids=patients, n_bootstrap=200, seed=3)
    assert list(m) == ["cohen", "kermany"]
    for s in ("cohen", "kermany"):
        sel = sources == s
        t, p, pr = y[sel], pred[sel], prob[sel]
        r = m[s]
        assert r["n_samples"] == sel.sum() and r["n_patients"] == len(set(patients[sel]))
        assert r["accuracy"] == pytest.approx(np.mean(t == p))
        for c, name in enumerate(NAMES):
            hand = _hand_rates(t, p, c)
            row = r["per_class"][name]
            assert row["support"] == np.sum(t == c)
            for key in ("tp", "fp", "fn", "tn"):
                assert row[key] == hand[key], (s, name, key)
            for key in ("sensitivity", "specificity", "precision", "f1"):
                assert row[key] == (None if hand[key] is None else pytest.approx(hand[key])), (s, name, key)
            if 0 < np.sum(t == c) < len(t):
                assert row["auc"] == pytest.approx(roc_auc_score(t == c, pr[:, c]))
            else:
                assert row["auc"] is None
            if row["specificity"] is not None:  # a percentile interval of the bootstrap, around the estimate
                lo, hi = row["ci"]["specificity"]
                assert 0 <= lo <= hi <= 1
    # The issue's figures: within the adult source 16 of the 17 non-COVID images are called COVID-19.
    cohen = m["cohen"]["per_class"]["covid19"]
    assert (cohen["fp"], cohen["tn"]) == (16, 1) and cohen["specificity"] == pytest.approx(1 / 17)
    assert m["kermany"]["per_class"]["covid19"]["sensitivity"] is None  # absent there: undefined, not 0
    assert m["kermany"]["absent_classes"] == ["covid19"]


def test_report_writes_per_source_rows_beside_the_pooled_ones(tmp_path):
    y, prob, sources, patients = _issue_case()
    m = write_classification_report(y, prob, NAMES, tmp_path, patient_ids=patients, n_bootstrap=50,
                                    sources=sources, validation={"kind": "external", "source": "cohen"})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["per_source"]["cohen"]["per_class"]["covid19"]["fp"] == 16
    assert saved["validation"] == {"kind": "external", "source": "cohen"}
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["source"], r["class"]) for r in rows] == (
        [("all", c) for c in NAMES] + [("cohen", c) for c in NAMES] + [("kermany", c) for c in NAMES])
    pooled_covid, cohen_covid = rows[0], rows[3]
    assert float(pooled_covid["specificity"]) == pytest.approx(m["per_class"]["covid19"]["specificity"])
    assert int(pooled_covid["fp"]) == 16 and int(pooled_covid["tn"]) == 41  # pooled: 57 negatives, 16 wrong
    assert float(cohen_covid["specificity"]) == pytest.approx(1 / 17)
    assert float(cohen_covid["accuracy"]) == pytest.approx(m["per_source"]["cohen"]["accuracy"])
    assert rows[6]["sensitivity"] == ""  # covid19 within kermany: undefined
    md = (tmp_path / "metrics.md").read_text()
    assert "External validation" in md and "## Per source" in md
    assert "| cohen | covid19 | 10 | 10 | 16 | 0 | 1 |" in md


def test_report_without_sources_is_unchanged(tmp_path):
    y, prob, _, _ = _issue_case()
    write_classification_report(y, prob, NAMES, tmp_path, n_bootstrap=0)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == NAMES and "source" not in rows[0]
    assert "per_source" not in json.loads((tmp_path / "metrics.json").read_text())


def _mutual_information_bits(a, b):
    """I(A;B) from the joint frequency table, by hand."""
    mi = 0.0
    for x in set(a):
        for z in set(b):
            pxz = np.mean((a == x) & (b == z))
            if pxz > 0:
                mi += pxz * np.log2(pxz / (np.mean(a == x) * np.mean(b == z)))
    return mi


def test_audit_flags_the_single_source_class_and_the_specificity_collapse(tmp_path):
    y, prob, sources, _ = _issue_case()
    audit = confounding_audit(y, prob, NAMES, sources)
    covid = audit["per_class"]["covid19"]
    assert audit["flagged"] == ["covid19"]
    kinds = {(f["kind"], f["source"]) for f in covid["flags"]}
    assert kinds == {("single_source", "cohen"), ("specificity_collapse", "cohen")}
    assert covid["positives_by_source"] == {"cohen": 10, "kermany": 0} and covid["dominant_share"] == 1.0
    # Source-only predictor: every image scores its source's COVID-19 prevalence.
    score = np.where(sources == "cohen", 10 / 27, 0.0)
    assert covid["source_auc"] == pytest.approx(roc_auc_score(y == 0, score))
    assert covid["mutual_information_bits"] == pytest.approx(_mutual_information_bits(sources, y == 0))
    p = np.mean(y == 0)
    assert covid["information_fraction"] == pytest.approx(
        _mutual_information_bits(sources, y == 0) / -(p * np.log2(p) + (1 - p) * np.log2(1 - p)))
    assert covid["within_source"]["cohen"]["specificity"] == pytest.approx(1 / 17)
    assert covid["pooled"]["specificity"] == pytest.approx(41 / 57)
    text = covid["verdict"]
    assert text.startswith("covid19: FLAGGED.")
    assert "Every covid19 image (10) comes from one source, 'cohen'" in text
    assert "16 of 17 images that are not covid19 were called covid19" in text
    assert "--test-source" in text
    # pneumonia comes from both sources, and the model's pneumonia specificity holds within each.
    assert not audit["per_class"]["pneumonia"]["flagged"]
    assert audit["per_class"]["pneumonia"]["verdict"].startswith("pneumonia: not flagged.")
    files = write_confounding_report(audit, tmp_path, model_name="m")
    assert json.loads((tmp_path / "confounding.json").read_text())["flagged"] == ["covid19"]
    md = (tmp_path / "confounding.md").read_text()
    assert "covid19: FLAGGED" in md and "| covid19 | cohen | 10 | 17 |" in md and files["markdown"].endswith(".md")


def test_audit_clears_a_balanced_design():
    rng = np.random.default_rng(0)
    y = np.tile(np.repeat([0, 1, 2], 10), 2)
    sources = np.repeat(["a", "b"], 30)
    pred = np.where(rng.random(len(y)) < 0.85, y, (y + 1) % 3)  # a decent model, errors spread evenly
    audit = confounding_audit(y, _one_hot_probs(pred), NAMES, sources)
    assert audit["flagged"] == []
    for cls in NAMES:
        r = audit["per_class"][cls]
        assert r["source_auc"] == pytest.approx(0.5) and r["mutual_information_bits"] == pytest.approx(0, abs=1e-12)
        assert r["verdict"].startswith(f"{cls}: not flagged.")


def test_a_class_whose_source_also_holds_the_other_classes_is_not_flagged_for_its_share():
    # Kermany-like: 98 % of pneumonia from one source that also holds every normal image; the source alone
    # says little about pneumonia, the model has to tell pneumonia from normal within it.
    y = np.array([1] * 98 + [2] * 60 + [0] * 20 + [1] * 2)
    sources = np.array(["kermany"] * 158 + ["cohen"] * 22)
    audit = confounding_audit(y, _one_hot_probs(y), NAMES, sources)
    pneumonia = audit["per_class"]["pneumonia"]
    assert pneumonia["dominant_share"] == pytest.approx(0.98) and pneumonia["source_auc"] < 0.7
    assert not pneumonia["flagged"] and "the source says little about pneumonia" in pneumonia["verdict"]
    assert audit["flagged"] == ["covid19"]  # 20 of 22 cohen images are covid19: the source tells it


def test_audit_thresholds_near_single_source_and_small_sources():
    # 19 of 20 covid images from "a" (95 %): flagged at the default share, not at 0.99.
    y = np.array([0] * 19 + [2] * 3 + [0] * 1 + [2] * 20)
    sources = np.array(["a"] * 22 + ["b"] * 21)
    prob = _one_hot_probs(y)
    assert confounding_audit(y, prob, NAMES, sources)["flagged"] == ["covid19"]
    assert "95% of the covid19 images (19 of 20)" in confounding_audit(y, prob, NAMES, sources)["summary"][0]
    assert confounding_audit(y, prob, NAMES, sources, single_source_share=0.99)["flagged"] == []
    # A collapse in a source with fewer than min_negatives other images is not enough evidence.
    y2 = np.array([0] * 10 + [2] * 3 + [0] * 10 + [2] * 30)
    pred2 = np.array([0] * 13 + [0] * 10 + [2] * 30)
    s2 = np.array(["a"] * 13 + ["b"] * 40)
    assert confounding_audit(y2, _one_hot_probs(pred2), NAMES, s2)["flagged"] == []
    assert confounding_audit(y2, _one_hot_probs(pred2), NAMES, s2, min_negatives=3)["flagged"] == ["covid19"]
