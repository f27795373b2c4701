"""Runs on disk: the Regional-Learning flag and scoring on the lung region X_T = X_O · M."""

import json

import cv2
import keras
import numpy as np
import pandas as pd

from covidx.runs import load_run, lung_region_input, predict_table
from tests.helpers import make_run, write_image, write_mask


def mean_model():
    """Softmax of (mean intensity, -mean intensity) / 50: the output says how much image it saw."""
    inp = keras.Input((32, 32, 1), name="image")
    x = keras.layers.GlobalAveragePooling2D()(inp)
    out = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    net = keras.Model(inp, out)
    net.get_layer("predictions").set_weights([np.array([[0.02, -0.02]], np.float32), np.zeros(2, np.float32)])
    return net


def test_regional_run_is_scored_on_the_lung_region(tmp_path):
    rows = []
    for i in range(3):
        img, mask = tmp_path / f"x{i}.png", tmp_path / f"m{i}.png"
        write_image(img, size=(32, 32), seed=i)
        write_mask(mask, size=(32, 32), box=(4 + i, 2, 20 + i, 14))
        rows.append(dict(path=str(img), mask_path=str(mask), lesion_path="", label_index=0))
    table = pd.DataFrame(rows)
    run_dir, net, _ = make_run(tmp_path / "run", net=mean_model(), size=32, classes=["covid19", "viral"],
                               task="stage2")
    run = load_run(run_dir)
    assert not run.regional and not lung_region_input(run, table)

    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "trainer": "regional"}))
    run = load_run(run_dir)
    assert run.regional and lung_region_input(run, table)
    assert not lung_region_input(run, table.assign(mask_path=["", rows[1]["mask_path"], rows[2]["mask_path"]]))

    full, _ = predict_table(run, table)
    region, _ = predict_table(run, table, lung_region=True)
    x = np.stack([cv2.imread(p, 0) for p in table.path]).astype(np.float32)
    m = np.stack([cv2.imread(p, 0) > 127 for p in table.mask_path])
    np.testing.assert_allclose(full, np.asarray(net(x[..., None])), atol=1e-5)
    np.testing.assert_allclose(region, np.asarray(net((x * m)[..., None])), atol=1e-5)
    assert not np.allclose(full, region)
