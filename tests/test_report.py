"""covidx.evaluation.report / plots: every file is written and readable."""

import csv
import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from covidx.evaluation import plots
from covidx.evaluation.report import (
    write_classification_report,
    write_comparison_report,
    write_segmentation_report,
)

NAMES = ["covid19", "bacterial", "viral", "normal"]


def _predictions(n=120, k=4, seed=0, strength=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = strength * np.eye(k)[y] + rng.normal(0, 1, (n, k))
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def _read_png(path):
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image.std() > 0  # something was drawn
    return image


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_classification_report_writes_every_file(tmp_path):
    y, p = _predictions()
    patients = np.arange(len(y)) // 2
    m = write_classification_report(y, p, NAMES, tmp_path / "rep", patient_ids=patients,
                                    model_name="SE-DPN", n_bootstrap=100)
    out = tmp_path / "rep"
    for name in ("metrics.json", "metrics.md", "metrics.csv", "roc.png", "confusion.png", "calibration.png"):
        assert (out / name).is_file(), name
    for name in ("roc.png", "confusion.png", "calibration.png"):
        _read_png(out / name)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["model_name"] == "SE-DPN"
    assert saved["accuracy"] == pytest.approx(m["accuracy"])
    assert saved["n_patients"] == 60
    rows = _read_csv(out / "metrics.csv")
    assert [r["class"] for r in rows] == NAMES
    assert float(rows[0]["f1"]) == pytest.approx(m["per_class"]["covid19"]["f1"])
    assert float(rows[0]["auc_ci_low"]) == pytest.approx(m["per_class"]["covid19"]["ci"]["auc"][0])
    md = (out / "metrics.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Class | Support | Sensitivity")
    for name in NAMES:
        assert any(line.startswith(f"| {name} |") for line in table)
    assert "**Macro average**" in md and "**Accuracy**" in md
    assert f"{m['accuracy']:.3f} [" in md  # accuracy with its CI
    assert "covid19 as the positive class" in md


def test_classification_report_with_absent_class(tmp_path):
    y, p = _predictions(seed=1)
    y[y == 2] = 3
    m = write_classification_report(y, p, NAMES, tmp_path, n_bootstrap=50)
    text = (tmp_path / "metrics.json").read_text()
    json.loads(text)
    assert "NaN" not in text and "Infinity" not in text
    assert m["per_class"]["viral"]["auc"] is None
    rows = _read_csv(tmp_path / "metrics.csv")
    assert len(rows) == len(NAMES) and rows[2]["auc"] == "" and rows[2]["sensitivity"] == ""
    assert "Absent from this split: viral" in (tmp_path / "metrics.md").read_text()
    _read_png(tmp_path / "roc.png")


def test_comparison_report(tmp_path):
    y, p1 = _predictions(seed=2)
    rng = np.random.default_rng(9)
    p2 = 0.5 * p1 + 0.5 * rng.dirichlet(np.ones(4), len(y))
    p3 = rng.dirichlet(np.ones(4), len(y))
    out = write_comparison_report({"DPN": (y, p1), "DPN-SE": (y, p2), "random": (y, p3)}, NAMES, tmp_path)
    assert len(out["rows"]) == 3
    rows = _read_csv(tmp_path / "comparison.csv")
    assert [(r["model_a"], r["model_b"]) for r in rows] == [("DPN", "DPN-SE"), ("DPN", "random"), ("DPN-SE", "random")]
    assert float(rows[1]["delong_macro_p"]) < 0.05
    md = (tmp_path / "comparison.md").read_text()
    assert "McNemar" in md and "DeLong" in md and "F-test" in md
    assert sum(line.startswith("| DPN | random |") for line in md.splitlines()) == 2  # both tables
    _read_png(tmp_path / "roc_comparison.png")


def test_segmentation_report(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.random((4, 32, 32)) > 0.5
    pred = true.copy()
    pred[0] = ~pred[0]  # image 0 completely wrong
    m = write_segmentation_report(true, pred, tmp_path, ids=["a", "b", "c", "d"])
    assert m["per_image"][0]["dice"] == 0.0 and m["per_image"][1]["dice"] == 1.0
    assert m["mean_dice"] == pytest.approx(0.75)
    assert json.loads((tmp_path / "metrics.json").read_text())["mean_iou"] == pytest.approx(0.75)
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "mean"]
    assert float(rows[-1]["dice"]) == pytest.approx(0.75)
    assert "| Mean | 0.7500 | 0.7500 |" in (tmp_path / "metrics.md").read_text()


def test_plots_return_paths_and_create_folders(tmp_path):
    cm = np.array([[5, 1], [2, 7]])
    path = plots.plot_confusion(cm, ["covid19", "viral"], tmp_path / "sub" / "cm.png")
    assert path == str(tmp_path / "sub" / "cm.png")
    image = _read_png(path)
    assert image.shape[1] > image.shape[0]  # counts and normalised side by side
    curves = {"a": {"fpr": [0, 0, 1], "tpr": [0, 1, 1], "auc": 1.0}, "b": None}
    assert plots.plot_roc(curves, tmp_path / "roc.png") == str(tmp_path / "roc.png")
    _read_png(tmp_path / "roc.png")
