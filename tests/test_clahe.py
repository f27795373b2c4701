"""clahe_tf (TF ops) against OpenCV's cv2.createCLAHE(...).apply on the same uint8 images."""

import cv2
import numpy as np
import pytest
import tensorflow as tf

from covidx.data.clahe import clahe_tf


def smooth_image(rng, h, w):
    """Random smooth texture: coarse noise upsampled bicubically, levels 20..220."""
    coarse = rng.normal(size=(h // 8 + 2, w // 8 + 2)).astype(np.float32)
    x = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    x = (x - x.min()) / (x.max() - x.min() + 1e-6)
    return (20 + 200 * x).astype(np.uint8)


def radiograph_like(rng, h, w):
    """Real-looking gradients: bright mediastinum/edges, two darker elliptical lungs, slight noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 90 + 60 * (y / h) + 40 * np.abs(x / w - 0.5)
    for cx in (0.3, 0.7):
        lung = ((x / w - cx) / 0.16) ** 2 + ((y / h - 0.5) / 0.33) ** 2
        img -= 55 * np.clip(1.0 - lung, 0.0, 1.0) ** 0.5
    img += rng.normal(0, 3, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def image_set(h, w, seed=0):
    """Smooth, radiograph-like, constant, and noise images (noise forces clipping and a residual)."""
    rng = np.random.default_rng(seed)
    return [smooth_image(rng, h, w), radiograph_like(rng, h, w), np.full((h, w), 117, np.uint8),
            rng.integers(0, 256, (h, w)).astype(np.uint8)]


def opencv_clahe(img, clip, grid):
    tiles = (grid, grid) if isinstance(grid, int) else grid
    return cv2.createCLAHE(clipLimit=float(clip), tileGridSize=tiles).apply(img)


def opencv_mismatches(images, clip, grid, out):
    """Descriptions of every image where ``out`` differs from OpenCV (clahe_tf aims at exact equality)."""
    problems = []
    for img, got in zip(images, out):
        diff = np.abs(got[..., 0].astype(np.int32) - opencv_clahe(img, clip, grid).astype(np.int32))
        if diff.max() > 0:
            problems.append(f"{img.shape} clip={clip} grid={grid}: max |diff| {diff.max()} "
                            f"on {np.mean(diff > 0):.4%} of pixels")
    return problems


def assert_same_as_opencv(images, clip, grid, out):
    assert not opencv_mismatches(images, clip, grid, out)


@pytest.mark.parametrize("size", [(32, 32), (97, 131), (256, 256)])
def test_matches_opencv(size):
    """Every clip limit x grid of the brief, on smooth, radiograph-like, constant and noise images."""
    images = image_set(*size)
    batch = np.stack(images)[..., None]
    problems = []
    for clip in (1.0, 2.0, 4.0, 40.0):
        for grid in (2, 4, 8):
            out = clahe_tf(batch, clip, grid).numpy()
            assert out.dtype == np.float32 and out.shape == batch.shape
            problems += opencv_mismatches(images, clip, grid, out)
    assert not problems, "\n".join(problems)


SPECIAL_CASES = [
    ((96, 131), 2.0, 8),       # H divisible, W not: OpenCV still pads H by a whole grid (tile 13, not 12)
    ((131, 96), 3.0, 8),
    ((5, 3), 2.0, 8),          # padding longer than the image: BORDER_REFLECT_101 keeps reflecting
    ((1, 7), 2.0, 4),
    ((61, 47), 0.0, 4),        # clip <= 0: no clipping at all
    ((64, 80), 2.5, (4, 2)),   # non-square grid, OpenCV's (tiles_x, tiles_y) order
    ((45, 200), 0.3, 16),      # limit clamps at 1 pixel per bin
]


def test_matches_opencv_special_cases():
    problems = []
    for size, clip, grid in SPECIAL_CASES:
        images = image_set(*size, seed=1)
        problems += opencv_mismatches(images, clip, grid, clahe_tf(np.stack(images)[..., None], clip, grid).numpy())
    assert not problems, "\n".join(problems)


def test_single_image_float_input_and_batch_consistency():
    images = image_set(97, 131, seed=2)
    batch = clahe_tf(np.stack(images)[..., None].astype(np.float32), 2.0, 8).numpy()
    for i, img in enumerate(images):
        single = clahe_tf(tf.constant(img[..., None]), 2.0, 8)  # uint8 (H, W, 1)
        assert single.dtype == tf.float32 and single.shape == (97, 131, 1)
        np.testing.assert_array_equal(single.numpy(), batch[i])
    assert np.array_equal(batch, np.round(batch)) and batch.min() >= 0 and batch.max() <= 255
    # Fractional floats are rounded to the nearest level first, as cv::saturate_cast does.
    jitter = np.stack(images)[..., None].astype(np.float32) + 0.3
    np.testing.assert_array_equal(clahe_tf(jitter, 2.0, 8).numpy(), batch)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="gray channel"):
        clahe_tf(tf.zeros([2, 8, 8, 3]))
    with pytest.raises(ValueError, match="expects"):
        clahe_tf(tf.zeros([8, 8]))
    with pytest.raises(ValueError, match="positive"):
        clahe_tf(tf.zeros([8, 8, 1]), tile_grid=0)


class ClaheModule(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
    def __call__(self, images):
        return clahe_tf(images, clip_limit=4.0, tile_grid=4)


def test_dynamic_shape_tf_function_and_saved_model(tmp_path):
    module = ClaheModule()
    graph = module.__call__.get_concrete_function().graph
    op_types = {op.type for op in graph.get_operations()}
    assert not op_types & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}, op_types

    cases = [image_set(97, 131, seed=3), image_set(64, 48, seed=4)]  # two sizes, one trace
    before = [module(np.stack(c)[..., None].astype(np.float32)).numpy() for c in cases]
    for images, out in zip(cases, before):
        assert_same_as_opencv(images, 4.0, 4, out)

    tf.saved_model.save(module, str(tmp_path / "clahe"))
    reloaded = tf.saved_model.load(str(tmp_path / "clahe"))
    for images, out in zip(cases, before):
        np.testing.assert_array_equal(reloaded(tf.constant(np.stack(images)[..., None], tf.float32)).numpy(), out)
