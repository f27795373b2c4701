"""tf.data pipeline: shapes, dtypes, ranges, CLAHE against OpenCV, mask alignment, bad files."""

import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from covidx.data import PreprocessConfig, balanced_class_weights, make_dataset, select_task
from covidx.data.augment import PRESETS, augment_image
from covidx.data.preprocess import clahe_uint8
from tests.helpers import write_image


def make_table(tmp_path, n=8, size=(64, 80), masks=False):
    rows = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        img = np.zeros(size, np.uint8)
        img[:] = 40 + (20 * i) % 160
        img[10:30, 20:50] = 250  # a bright block, also the mask
        cv2.imwrite(str(p), img)
        m = ""
        if masks:
            mask = np.zeros(size, np.uint8)
            mask[10:30, 20:50] = 255
            m = str(tmp_path / f"mask{i}.png")
            cv2.imwrite(m, mask)
        rows.append(dict(path=str(p), finding=["covid19", "normal"][i % 2], patient_id=f"p{i}", source="t",
                         split="train", mask_path=m, lesion_path=m))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_dtypes_ranges_and_labels(tmp_path, channels):
    t = select_task(make_table(tmp_path), "4class")
    cfg = PreprocessConfig(image_size=32, channels=channels)
    x, y, w = next(iter(make_dataset(t, "4class", cfg, batch_size=8)))
    assert x.shape == (8, 32, 32, channels) and x.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255.0
    assert y.shape == (8, 4) and np.array_equal(np.argmax(y, 1), t.label_index.to_numpy())
    np.testing.assert_array_equal(w.numpy(), 1.0)
    if channels == 3:
        np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_class_weights_become_sample_weights(tmp_path):
    t = select_task(make_table(tmp_path, n=6), "4class")
    t = pd.concat([t, t[t.finding == "normal"].assign(path=t.path.iloc[1])], ignore_index=True)  # 3 covid, 6 normal
    cw = balanced_class_weights(t.label_index, 4)
    np.testing.assert_allclose(cw, [9 / (2 * 3), 0, 0, 9 / (2 * 6)])
    _, y, w = next(iter(make_dataset(t, "4class", PreprocessConfig(image_size=16), batch_size=9, class_weights=cw)))
    np.testing.assert_allclose(w.numpy(), cw[np.argmax(y, 1)])


def test_clahe_matches_opencv_on_the_same_image(tmp_path):
    t = select_task(make_table(tmp_path, n=2), "4class")
    cfg = PreprocessConfig(image_size=64, channels=1, clahe_inference=True, clahe_clip=3.0, clahe_grid=4)
    x, _, _ = next(iter(make_dataset(t, "4class", cfg, batch_size=2)))
    plain, _, _ = next(iter(make_dataset(t, "4class", PreprocessConfig(image_size=64), batch_size=2)))
    ref = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(plain.numpy()[0, ..., 0].astype(np.uint8))
    np.testing.assert_array_equal(x.numpy()[0, ..., 0], ref)
    np.testing.assert_array_equal(clahe_uint8(plain.numpy()[0, ..., 0].astype(np.uint8), 3.0, 4), ref)


def test_clahe_probability_in_training(tmp_path):
    t = select_task(make_table(tmp_path, n=40), "4class")
    base = PreprocessConfig(image_size=32)
    plain = np.concatenate([b[0].numpy() for b in make_dataset(t, "4class", base, batch_size=40, shuffle=False)])
    for p, lo, hi in [(0.0, 0, 0), (1.0, 40, 40), (0.4, 8, 24)]:
        cfg = PreprocessConfig(image_size=32, clahe_prob=p)
        out = np.concatenate([b[0].numpy() for b in make_dataset(t, "4class", cfg, training=True, batch_size=40,
                                                                  shuffle=False)])
        changed = int((np.abs(out - plain).reshape(40, -1).max(1) > 0).sum())
        assert lo <= changed <= hi, (p, changed)


def test_masks_follow_the_geometric_augmentation(tmp_path):
    t = select_task(make_table(tmp_path, n=8, masks=True), "lesions")
    cfg = PreprocessConfig(image_size=64, augment="mag-sd")
    x, y, _ = next(iter(make_dataset(t, "lesions", cfg, training=True, batch_size=8, seed=3)))
    assert y.shape == (8, 64, 64) and y.dtype == tf.int32
    x, y = x.numpy()[..., 0], y.numpy()
    assert set(np.unique(y)) <= {0, 1}
    for img, m in zip(x, y):
        if m.sum() < 20:
            continue
        inside = img[m == 1].mean()
        outside = img[(m == 0) & (img > 0)].mean()
        assert inside > outside + 40  # the bright block moved with its mask


def test_augment_image_rotation_is_shared_by_mask():
    img = np.zeros((32, 32, 1), np.float32)
    img[4:12, 4:12] = 255
    mask = (img > 0).astype(np.uint8)
    out, m = augment_image(tf.constant(img), tf.constant(mask), PRESETS["cascade"], tf.constant([1, 2], tf.int64))
    out, m = out.numpy(), m.numpy()
    assert not np.array_equal(out, img)  # it rotated
    assert ((out[..., 0] > 127) == (m[..., 0] == 1)).mean() > 0.97


def test_crop_mode_random_in_training_centre_in_evaluation(tmp_path):
    write_image(tmp_path / "wide.png", size=(40, 80), seed=1)
    t = pd.DataFrame([dict(path=str(tmp_path / "wide.png"), finding="normal", patient_id="p", source="t",
                           split="", mask_path="", lesion_path="")] * 6)
    t = select_task(t, "4class")
    cfg = PreprocessConfig(image_size=20, resize="crop")
    evals = [b[0].numpy() for b in make_dataset(t, "4class", cfg, batch_size=6)][0]
    assert evals.shape == (6, 20, 20, 1)
    assert all(np.array_equal(evals[0], e) for e in evals)  # centre crop: all equal
    import tensorflow as tf2
    full = tf2.image.resize(tf2.constant(cv2.imread(str(tmp_path / "wide.png"), 0)[..., None], tf2.float32),
                            [20, 40], method="area").numpy()
    np.testing.assert_allclose(evals[0], np.round(np.clip(full[:, 10:30], 0, 255)), atol=1)
    cfg_train = PreprocessConfig(image_size=20, resize="crop", augment="none")
    trains = next(iter(make_dataset(t.assign(path=t.path), "4class", cfg_train, training=True, batch_size=6)))[0].numpy()
    assert len({trains[i].tobytes() for i in range(6)}) > 1  # random crops differ


def test_training_randomness_repeats_for_a_seed_and_changes_per_epoch(tmp_path):
    t = select_task(make_table(tmp_path, n=4), "4class")
    cfg = PreprocessConfig(image_size=32, augment="light")
    ds1 = make_dataset(t, "4class", cfg, training=True, batch_size=4, seed=7, shuffle=False)
    ds2 = make_dataset(t, "4class", cfg, training=True, batch_size=4, seed=7, shuffle=False)
    e1, e2 = next(iter(ds1))[0].numpy(), next(iter(ds1))[0].numpy()
    np.testing.assert_array_equal(e1, next(iter(ds2))[0].numpy())
    assert not np.array_equal(e1, e2)


@pytest.mark.parametrize("cache", [True, False])
def test_every_epoch_is_a_uniform_permutation_of_a_class_ordered_table(tmp_path, cache):
    # Folder layouts list one class after the other; with more images than a bounded shuffle buffer holds
    # (it had 2,048), epochs began with the first class and ended with the last.
    two = select_task(make_table(tmp_path, n=2, size=(4, 4)), "4class")  # covid19, normal
    n = 1500
    t = pd.concat([two.iloc[[0]]] * n + [two.iloc[[1]]] * n, ignore_index=True)
    ds = make_dataset(t, "4class", PreprocessConfig(image_size=4), training=True, batch_size=100, seed=3,
                      cache=cache)
    epochs = [np.concatenate([np.argmax(b[1].numpy(), 1) for b in ds]) for _ in range(2)]
    covid = t.label_index.iloc[0]
    for labels in epochs:
        assert len(labels) == 2 * n and (labels == covid).sum() == n
        quarters = (labels.reshape(4, -1) == covid).mean(1)  # share of the first class in each quarter
        np.testing.assert_allclose(quarters, 0.5, atol=0.06)
    assert not np.array_equal(epochs[0], epochs[1])


def test_corrupt_image_is_skipped_by_the_pipeline(tmp_path):
    t = select_task(make_table(tmp_path, n=4), "4class")
    open(t.path[2], "wb").write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    xs = [b[0] for b in make_dataset(t, "4class", PreprocessConfig(image_size=16), batch_size=2)]
    assert sum(int(x.shape[0]) for x in xs) == 3


def test_lung_mask_inputs_for_regional_learning(tmp_path):
    t = select_task(make_table(tmp_path, n=2, masks=True), "4class")
    x, y, _ = next(iter(make_dataset(t, "4class", PreprocessConfig(image_size=32), batch_size=2, lung_masks=True)))
    assert set(x) == {"image", "lung_mask"} and x["lung_mask"].shape == (2, 32, 32, 1)
    assert set(np.unique(x["lung_mask"].numpy())) == {0.0, 1.0}


def test_composed_warp_matches_direct_flip_and_crop():
    """The single composed warp equals the transforms done directly with NumPy / OpenCV."""
    from covidx.data.augment import AugmentSpec

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 48, 1), dtype=np.uint8)
    mask = (img > 128).astype(np.uint8)
    flip = AugmentSpec(hflip=True)
    for s in range(20):  # a seed that flips and one that does not
        out, m = augment_image(tf.constant(img), tf.constant(mask), flip, tf.constant([s, 0], tf.int64))
        out, m = out.numpy(), m.numpy()
        if not np.array_equal(out, img.astype(np.float32)):
            np.testing.assert_array_equal(out, img[:, ::-1].astype(np.float32))
            np.testing.assert_array_equal(m, mask[:, ::-1])
            break
    else:
        raise AssertionError("no seed flipped")

    # A resized crop of a quarter of the area, square, on a linear ramp: bilinear sampling of a linear
    # function is exact, so the output is the ramp at half the slope, offset by the box's corner.
    yy, xx = np.mgrid[:48, :48]
    ramp = (2 * xx + 3 * yy).astype(np.uint8)[..., None]
    crop = AugmentSpec(resized_crop=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    out, _ = augment_image(tf.constant(ramp), tf.constant(mask[..., :0]), crop, tf.constant([3, 4], tf.int64))
    out = out.numpy()[..., 0]
    design = np.stack([xx.ravel(), yy.ravel(), np.ones(48 * 48)], 1)
    (a, b, c), *_ = np.linalg.lstsq(design, out.ravel(), rcond=None)
    np.testing.assert_allclose([a, b], [1.0, 1.5], atol=0.01)
    corner = c + 2 * 0.25 + 3 * 0.25  # c = 2 (X0 - 0.25) + 3 (Y0 - 0.25) for the box corner (X0, Y0)
    assert 0 <= corner <= 2 * 24 + 3 * 24  # the box lies inside the image
    assert np.abs(out.ravel() - design @ [a, b, c]).max() <= 1.0  # linear everywhere: no padding, one interpolation


def test_a_mask_of_another_size_than_its_image_lands_on_the_image_grid(tmp_path):
    t = select_task(make_table(tmp_path, n=2, size=(64, 80), masks=True), "lungs")
    small = np.zeros((32, 40), np.uint8)  # the same region at half the image's size (a mask saved downscaled)
    small[5:15, 10:25] = 255
    cv2.imwrite(t.loc[0, "mask_path"], small)
    _, y, _ = next(iter(make_dataset(t, "lungs", PreprocessConfig(image_size=64, resize="stretch"),
                                     batch_size=2)))
    want = cv2.resize(small, (64, 64), interpolation=cv2.INTER_NEAREST_EXACT) > 127
    np.testing.assert_array_equal(y.numpy()[0] == 1, want)
