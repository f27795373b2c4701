"""The default run's configuration learns: at a smaller scale, on generated data, well above chance."""

import csv
import json

import keras
import numpy as np
import pytest

from covidx.training.engine import DEFAULT_RUN, TrainConfig, train
from covidx.training.callbacks import TimeBudget
from covidx.training.report import _dice_per_image, plot_learning_curves


@pytest.mark.slow
def test_default_run_configuration_learns_well_above_chance(tmp_path):
    # DEFAULT_RUN as `python -m covidx.train` uses it, with a third of the patients to fit the suite.
    # Steps matter more than images here: ~180 steps of 32 (the full default run makes 350).
    cfg = TrainConfig(**{**DEFAULT_RUN, "synthetic_patients": 320, "epochs": 12, "out": str(tmp_path), "verbose": 0})
    run = train(cfg)
    figures = {f["split"]: f for f in json.loads((run / "end_of_run.json").read_text())}
    test = figures["test"]
    assert test["n"] >= 100
    assert test["beat_chance"], test["line"]  # macro AUC's patient-bootstrap 95 % CI above 0.5
    assert test["macro_auc"] > 0.8 and test["accuracy"] > 0.5, test["line"]  # chance: 0.5 and 0.25
    assert (run / "curves.png").stat().st_size > 10_000
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_learning_curves_plot_every_quantity(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,accuracy,auc,learning_rate,loss,val_accuracy,val_auc,val_loss\n"
                       "0,0.3,0.6,0.001,1.3,0.25,0.5,1.4\n1,0.6,0.8,0.0005,0.9,0.5,0.75,1.0\n")
    path = plot_learning_curves(history, tmp_path / "curves.png", "t")
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[1] > 2.5 * img.shape[0]  # three panels side by side: loss, accuracy, auc


def test_dice_per_image_matches_numpy():
    rng = np.random.default_rng(0)
    pred, true = rng.random((5, 8, 8)) > 0.5, rng.random((5, 8, 8)) > 0.3
    want = [2 * (p & t).sum() / (p.sum() + t.sum()) for p, t in zip(pred, true)]
    np.testing.assert_allclose(_dice_per_image(pred, true), want)
    assert _dice_per_image(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool))[0] == 1.0  # both empty


def test_time_budget_stops_training_and_reports(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = np.zeros((64, 3), "float32"), np.zeros(64, "int32")
    budget = TimeBudget(0.0, clock="wall", batch_size=8, run_dir=tmp_path)
    hist = model.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[budget])
    assert len(hist.history["loss"]) == 1 and budget.steps == 1  # stopped after its first batch
    stats = json.loads((tmp_path / "budget.json").read_text())
    assert stats["exhausted"] and stats["images"] == 8 and stats["wall_s"] > 0
    with pytest.raises(ValueError, match="unknown clock"):
        TimeBudget(1.0, clock="gpu")


@pytest.mark.slow
def test_segmenter_run_ends_with_dice_against_marking_every_pixel(tmp_path):
    cfg = TrainConfig(model="lung-unet", task="lungs", synthetic_patients=16, synthetic_size=64, image_size=32,
                      epochs=1, batch_size=4, out=str(tmp_path), verbose=0, recipe="quick",
                      model_kwargs={"base_filters": 4, "depth": 2})
    run = train(cfg)
    (val,) = json.loads((run / "end_of_run.json").read_text())
    assert val["kind"] == "segmentation" and val["split"] == "val" and val["n"] > 0
    # Marking every pixel scores 2p / (1 + p) per image, p = lung fraction: between 0 and 1 for real lungs.
    assert 0.2 < val["trivial_dice"] < 0.8 and 0.0 <= val["dice"] <= 1.0
    assert val["beat_chance"] == (val["ci"][0] > 0) and "beat chance" in val["line"]
    assert (run / "curves.png").is_file()
