"""Lung masks for Regional Learning: original-size masks from a segmenter, geometry, post-processing, caching."""

import json

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from scipy import ndimage

from covidx.data import lung_masks as lm
from covidx.training import lung_masks as tlm
from covidx.data.preprocess import PreprocessConfig

LUNG_LEVEL = 103.28  # the fixed segmenter below calls a pixel lung when its value exceeds this


def threshold_segmenter(size=32):
    """Fixed-weight 2-class segmenter: lung where the pixel value > LUNG_LEVEL (1x1 conv + softmax)."""
    inp = keras.Input((size, size, 1), name="image")
    conv = keras.layers.Conv2D(2, 1, name="logits")
    out = keras.layers.Softmax(name="predictions")(conv(inp))
    model = keras.Model(inp, out, name="threshold_lung")
    conv.set_weights([np.array([0.0, 20.0 / 255.0], np.float32).reshape(1, 1, 1, 2), np.array([0.0, -8.1], np.float32)])
    return model


def half_image(path, h, w):
    """Left half bright (lung for the segmenter), right half dark."""
    img = np.full((h, w), 30, np.uint8)
    img[:, : w // 2] = 210
    cv2.imwrite(str(path), img)
    return img


def test_predict_lung_masks_at_original_size(tmp_path):
    sizes = [(40, 48), (64, 50), (33, 71)]
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(str(tmp_path / "img" / f"case{i}.png"))
        (tmp_path / "img").mkdir(exist_ok=True)
        half_image(paths[-1], h, w)
    table = pd.DataFrame({"path": paths, "label": "viral", "mask_path": ""})
    out = tlm.predict_lung_masks(threshold_segmenter(), table, tmp_path / "masks", batch_size=2)
    assert table["mask_path"].eq("").all()  # the input table is not modified
    for (h, w), path, mask_path in zip(sizes, paths, out["mask_path"]):
        assert mask_path == str(tmp_path / "masks" / f"{path.rsplit('/', 1)[1][:-4]}.png")
        m = cv2.imread(mask_path, cv2.IMREAD_UNCHANGED)
        assert m.shape == (h, w) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
        # Away from the edge (resampling blurs two columns at most), left = lung, right = background.
        assert (m[:, : w // 2 - 2] == 255).all() and (m[:, w // 2 + 2:] == 0).all()

    # The same through a run directory (config.json + best.keras), as covidx.train writes it.
    run = tmp_path / "run"
    run.mkdir()
    threshold_segmenter().save(run / "best.keras")
    (run / "config.json").write_text(json.dumps({"model": "lung-unet", "task": "lungs", "classes": ["background", "lung"],
                                                 "preprocess": PreprocessConfig(image_size=32).to_dict()}))
    again = tlm.predict_lung_masks(run, table, tmp_path / "masks2")
    for a, b in zip(out["mask_path"], again["mask_path"]):
        np.testing.assert_array_equal(cv2.imread(a, 0), cv2.imread(b, 0))


def test_mask_geometry_stretch_and_crop_match_numpy():
    hw = (30, 45)
    mask = np.zeros((20, 20, 1), np.float32)
    mask[5:12, 3:17] = 1.0

    def nearest(a, out_h, out_w):  # TF2 nearest: source = floor((dst + 0.5) * in / out)
        rows = np.minimum(np.floor((np.arange(out_h) + 0.5) * np.float32(a.shape[0] / out_h)).astype(int), a.shape[0] - 1)
        cols = np.minimum(np.floor((np.arange(out_w) + 0.5) * np.float32(a.shape[1] / out_w)).astype(int), a.shape[1] - 1)
        return a[rows][:, cols]

    stretch = PreprocessConfig(image_size=20, resize="stretch")
    got = lm.mask_to_original(tf.constant(mask), hw, stretch).numpy()
    np.testing.assert_array_equal(got, nearest(mask, *hw))
    back = lm.mask_for_model(tf.constant(got), stretch).numpy()
    np.testing.assert_array_equal(back, nearest(got, 20, 20))

    # crop: short side 30 -> 20, frame 20 x ceil(45 * 20/30) = 20 x 30, centre crop columns 5..25.
    crop = PreprocessConfig(image_size=20, resize="crop")
    got = lm.mask_to_original(tf.constant(mask), hw, crop).numpy()
    frame = np.zeros((20, 30, 1), np.float32)
    frame[:, 5:25] = mask
    np.testing.assert_array_equal(got, nearest(frame, *hw))
    assert got[:, :6].sum() == 0 and got[:, -6:].sum() == 0  # outside the crop the segmenter saw nothing


def test_keep_largest_components_matches_scipy():
    rng = np.random.default_rng(0)
    mask = (rng.random((60, 70)) > 0.8).astype(np.uint8)
    mask[5:25, 5:20] = 1  # left lung
    mask[10:40, 40:60] = 1  # right lung
    got = lm.keep_largest_components(mask, 2)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    keep = 1 + np.argsort(-sizes, kind="stable")[:2]
    np.testing.assert_array_equal(got, np.isin(labels, keep).astype(np.uint8))
    assert got.sum() < mask.sum() and got[15, 10] == 1 and got[20, 50] == 1
    two = np.zeros((10, 10), np.uint8)
    two[1:3, 1:3] = two[6:9, 6:9] = 1
    np.testing.assert_array_equal(lm.keep_largest_components(two, 2), two)  # nothing to remove


def test_attach_lung_masks_fills_only_missing_rows_and_caches(tmp_path):
    paths = []
    for i, (h, w) in enumerate([(40, 48), (36, 52), (50, 50)]):
        paths.append(str(tmp_path / f"x{i}.png"))
        half_image(paths[-1], h, w)
    # A stem occurring twice (different folders) must not share a cache file.
    (tmp_path / "other").mkdir()
    paths.append(str(tmp_path / "other" / "x0.png"))
    img = np.full((44, 44), 30, np.uint8)
    img[:, 30:] = 220  # lung on the right this time
    cv2.imwrite(paths[-1], img)
    drawn = str(tmp_path / "drawn.png")
    cv2.imwrite(drawn, np.zeros((36, 52), np.uint8))
    table = pd.DataFrame({"path": paths, "mask_path": ["", drawn, np.nan, ""]})

    run = tmp_path / "lung.keras"
    threshold_segmenter().save(run)
    cache = tmp_path / "cache"
    out = tlm.attach_lung_masks(table, run, cache)
    assert out.loc[1, "mask_path"] == drawn  # an existing mask is kept
    written = sorted(p.name for p in cache.iterdir())
    assert len(written) == 3 and "x2.png" in written  # only the three missing rows were predicted
    m0, m3 = cv2.imread(out.loc[0, "mask_path"], 0), cv2.imread(out.loc[3, "mask_path"], 0)
    assert out.loc[0, "mask_path"] != out.loc[3, "mask_path"]
    assert m0.shape == (40, 48) and m0[:, :20].min() == 255 and m3.shape == (44, 44) and m3[:, 33:].min() == 255

    # Second call: everything is cached, so the (now missing) checkpoint is never loaded.
    run.unlink()
    again = tlm.attach_lung_masks(table, run, cache)
    pd.testing.assert_frame_equal(again, out)
    with pytest.raises(FileNotFoundError):
        tlm.attach_lung_masks(pd.DataFrame({"path": [paths[0]], "mask_path": [""]}), run, tmp_path / "empty")
