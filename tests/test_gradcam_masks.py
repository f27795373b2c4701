"""Grad-CAM -> lesion masks (ensemble paper Sec. III-B, Fig. 5, automated) and import of hand-drawn masks."""

import cv2
import keras
import numpy as np
import pandas as pd
from skimage.filters import threshold_otsu

from covidx.data import load_source
from covidx.data.io import read_mask
from covidx.explain.masks import heatmap_to_mask, import_masks, write_gradcam_masks
from covidx.layers import ImageNormalization
from tests.helpers import write_image, write_mask


def blob_heatmap(size=64, center=(20, 40), sigma=6.0, noise=0.05, seed=0):
    yy, xx = np.mgrid[:size, :size]
    g = np.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * sigma**2))
    rng = np.random.default_rng(seed)
    return np.clip(g + noise * rng.random((size, size)), 0, 1) / (1 + noise)


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_otsu_largest_component_recovers_blob():
    heat = blob_heatmap()
    # a second, smaller hot spot that the largest-component rule must drop
    heat[55:59, 5:9] = 0.95
    mask = heatmap_to_mask(heat)
    # Independent reference: scikit-image Otsu on the same 0..255 quantisation, then the blob alone.
    h8 = np.rint(heat * 255).astype(np.uint8)
    t = threshold_otsu(h8)
    ref = h8 > t
    ref[50:, :15] = False
    assert mask.dtype == bool
    assert iou(mask, ref) > 0.9
    assert not mask[55:59, 5:9].any()
    # keep_components=None keeps both regions
    assert heatmap_to_mask(heat, keep_components=None)[55:59, 5:9].all()
    # fixed threshold and min_area
    fixed = heatmap_to_mask(heat, threshold=0.5, keep_components=None, min_area=20)
    assert not fixed[55:59, 5:9].any() and fixed[20, 40]
    assert not heatmap_to_mask(np.zeros((8, 8))).any()


def test_lung_restriction_keeps_largest_region_inside_lungs():
    heat = blob_heatmap(center=(32, 32), sigma=10)
    lung = np.zeros((64, 64), np.uint8)
    lung[:, 36:] = 1
    mask = heatmap_to_mask(heat, lung_mask=lung)
    assert mask.any() and not mask[:, :36].any()
    np.testing.assert_array_equal(mask, heatmap_to_mask(heat) & (lung > 0))
    # a lung mask of another size is resized (nearest)
    big = cv2.resize(lung * 255, (128, 128), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(heatmap_to_mask(heat, lung_mask=big), mask)


def tiny_classifier(size=32):
    """Conv net whose class 0 score is the activation of one conv channel: Grad-CAM lights bright squares."""
    inp = keras.Input((size, size, 1), name="image")
    x = ImageNormalization("unit", name="normalize")(inp)
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation="softmax", dtype="float32", name="predictions")(x)
    model = keras.Model(inp, out)
    k = np.zeros((3, 3, 1, 2), np.float32)
    k[1, 1, 0, 0] = 1.0
    model.get_layer("conv").set_weights([k, np.array([-0.5, 0.0], np.float32)])
    model.get_layer("predictions").set_weights([np.array([[5.0, 0, 0], [0, 0, 0]], np.float32), np.zeros(3, np.float32)])
    return model


def test_write_gradcam_masks_layout_is_loadable(tmp_path):
    rows = []
    for i, (finding, box) in enumerate([("covid19", (4, 6, 16, 18)), ("pneumonia", (20, 22, 34, 36)),
                                        ("normal", None)]):
        img = np.full((40, 48), 60, np.uint8)
        if box:
            y0, x0, y1, x1 = box
            img[y0:y1, x0:x1] = 250
        p = tmp_path / "src" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(p), img)
        lung = tmp_path / "lungs" / f"img{i}.png"
        write_mask(lung, size=(40, 48), box=(0, 0, 40, 48))
        rows.append(dict(path=str(p), finding=finding, mask_path=str(lung)))
    table = pd.DataFrame(rows)
    out = tmp_path / "out"
    manifest = write_gradcam_masks(tiny_classifier(), table, out, class_names=["covid19", "pneumonia", "normal"])
    assert sorted(manifest["stem"]) == ["img0", "img1"]  # the normal image gets no mask
    assert manifest["lung_restricted"].all()
    assert (out / "manifest.csv").is_file()
    loaded, report = load_source(out, "masks")
    assert len(loaded) == 2 and (loaded["lesion_path"] != "").all()
    # Mask of the COVID-19 image: at the original size, covering its bright square.
    m = read_mask(out / "lesions" / "img0.png", shape=(40, 48)).astype(bool)
    square = np.zeros((40, 48), bool)
    square[4:16, 6:18] = True
    assert iou(m, square) > 0.6
    written = cv2.imread(str(out / "lesions" / "img0.png"), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(written)) == {0, 255}


def test_import_masks_reports_wrong_size_and_nonbinary(tmp_path):
    write_image(tmp_path / "img" / "a.png", size=(40, 48), seed=1)
    write_image(tmp_path / "img" / "b.png", size=(40, 48), seed=2)
    write_image(tmp_path / "img" / "c.png", size=(40, 48), seed=3)
    write_mask(tmp_path / "m" / "a.png", size=(40, 48))
    write_mask(tmp_path / "m" / "b.png", size=(20, 24), box=(2, 2, 10, 10))  # wrong size
    soft = np.zeros((40, 48), np.uint8)
    soft[10:20, 10:20] = 200
    soft[20:22, 10:20] = 90
    cv2.imwrite(str(tmp_path / "m" / "c.png"), soft)  # anti-aliased drawing
    result = import_masks(tmp_path / "m", tmp_path / "img", out_dir=tmp_path / "out")
    assert result.pairs["stem"].tolist() == ["a"]
    reasons = dict(result.problems)
    assert "differs from image 48x40" in reasons[str(tmp_path / "m" / "b.png")]
    assert "not binary" in reasons[str(tmp_path / "m" / "c.png")]
    loaded, _ = load_source(tmp_path / "out", "masks")
    assert len(loaded) == 1
    lenient = import_masks(tmp_path / "m", tmp_path / "img", out_dir=tmp_path / "out2", allow_nonbinary=True)
    assert sorted(lenient.pairs["stem"]) == ["a", "c"]
    c = read_mask(tmp_path / "out2" / "lesions" / "c.png")
    assert c[10:20, 10:20].all() and not c[20:22].any()
