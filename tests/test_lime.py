"""LIME (covidx.explain.lime) on a model whose evidence is known: the mean of one image quadrant.

64x64 images, 200 samples: a few seconds per explanation.
"""

import math

import cv2
import keras
import numpy as np
import pytest

from covidx.explain.lime import explain_lime, quickshift_segments, render_lime, slic_segments

SIZE = 64
HALF = SIZE // 2
QUADRANTS = {"top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0), "bottom_right": (1, 1)}


def quadrant_model(quadrant):
    """Class 1 iff the mean of ``quadrant`` is bright: crop -> GAP -> Dense(2, softmax).

    logit_1 = 0.04 * (mean - 128) = -logit_0, built from standard layers only.
    """
    r, c = QUADRANTS[quadrant]
    crop = ((r * HALF, (1 - r) * HALF), (c * HALF, (1 - c) * HALF))
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Cropping2D(crop, name="crop")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    dense = keras.layers.Dense(2, activation="softmax", name="predictions")
    out = dense(x)
    dense.set_weights([np.array([[-0.04, 0.04]], "float32"), np.array([0.04 * 128, -0.04 * 128], "float32")])
    return keras.Model(inp, out)


def xray_like(quadrant, seed=0):
    """Gray textured image (structures for SLIC to follow) with one bright quadrant."""
    rng = np.random.default_rng(seed)
    img = 70 + cv2.GaussianBlur(rng.normal(0, 1, (SIZE, SIZE)), (0, 0), 3) * 120
    r, c = QUADRANTS[quadrant]
    img[r * HALF : (r + 1) * HALF, c * HALF : (c + 1) * HALF] += 130
    return np.clip(img, 0, 255)[..., None].astype("float32")


def in_quadrant_fraction(segments, segment_ids, quadrant):
    r, c = QUADRANTS[quadrant]
    region = np.zeros(segments.shape, bool)
    region[r * HALF : (r + 1) * HALF, c * HALF : (c + 1) * HALF] = True
    return [region[segments == s].mean() for s in segment_ids]


class CountingModel:
    """Callable wrapper recording the batch sizes the model sees."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, x):
        assert x.shape[1:] == (SIZE, SIZE, 1) and x.dtype == np.float32  # back to the model's 1 channel
        self.batches.append(len(x))
        return self.model.predict_on_batch(x)


@pytest.mark.parametrize("quadrant", ["top_left", "bottom_right"])
def test_top_positive_segments_lie_where_the_model_looks(quadrant):
    model = quadrant_model(quadrant)
    image = xray_like(quadrant)
    result = explain_lime(model, image, num_samples=200, n_segments=25, top_k=3)

    assert result.class_index == 1  # bright quadrant -> class 1 predicted
    np.testing.assert_allclose(result.probabilities, model.predict_on_batch(image[None])[0], atol=1e-6)
    assert len(result.positive_segments) == 3
    assert min(in_quadrant_fraction(result.segments, result.positive_segments, quadrant)) > 0.8
    np.testing.assert_array_equal(result.positive_mask, np.isin(result.segments, result.positive_segments))
    # Superpixels the model never sees carry (almost) no weight compared with the evidence.
    outside = [w for s, w in result.weights.items() if in_quadrant_fraction(result.segments, [s], quadrant)[0] < 0.2]
    assert max(abs(w) for w in outside) < 0.2 * result.weights[result.positive_segments[0]]
    # weights are data: one entry per superpixel, ranked positives first
    assert set(result.weights) == set(np.unique(result.segments).tolist())
    ranked = [result.weights[s] for s in result.positive_segments]
    assert ranked == sorted(ranked, reverse=True)


def test_explaining_the_other_class_flips_the_sign():
    model = quadrant_model("top_left")
    image = xray_like("top_left", seed=1)
    result = explain_lime(model, image, num_samples=200, n_segments=25, top_k=3, class_index=0)
    assert result.class_index == 0
    assert min(in_quadrant_fraction(result.segments, result.negative_segments, "top_left")) > 0.8
    assert result.negative_mask.any() and not (result.negative_mask & result.positive_mask).any()
    # min_weight drops the near-zero superpixels the model never sees from the masks
    strict = explain_lime(model, image, num_samples=200, n_segments=25, top_k=3, class_index=0, min_weight=0.05)
    assert strict.negative_segments == result.negative_segments and strict.positive_segments == []
    assert strict.weights == result.weights


@pytest.mark.parametrize("batch_size", [64, 50])
def test_batch_size_is_honoured(batch_size):
    counting = CountingModel(quadrant_model("top_left"))
    result = explain_lime(counting, xray_like("top_left")[..., 0], num_samples=200, batch_size=batch_size, n_segments=16)
    assert len(counting.batches) == math.ceil(200 / batch_size)
    assert sum(counting.batches) == 200 and max(counting.batches) == batch_size
    assert result.num_samples == 200


def test_reproducible_with_random_state():
    model = quadrant_model("top_right")
    image = xray_like("top_right", seed=2)
    a = explain_lime(model, image, num_samples=100, n_segments=16, random_state=3)
    b = explain_lime(model, image, num_samples=100, n_segments=16, random_state=3)
    assert a.weights == b.weights


def test_segmentations_give_contiguous_labels():
    image = xray_like("top_left")
    slic = slic_segments(image, n_segments=25)
    assert slic.shape == (SIZE, SIZE) and slic.min() == 0
    np.testing.assert_array_equal(np.unique(slic), np.arange(slic.max() + 1))
    assert 10 <= slic.max() + 1 <= 40
    # more segments requested -> more segments returned
    assert slic_segments(image, n_segments=64).max() > slic.max()
    quick = quickshift_segments(image)
    np.testing.assert_array_equal(np.unique(quick), np.arange(quick.max() + 1))


def test_render_writes_red_positive_blue_negative_png(tmp_path):
    model = quadrant_model("top_left")
    image = xray_like("top_left")
    result = explain_lime(model, image, num_samples=200, n_segments=25, top_k=3)
    # give the render a negative region too (the model has no negative evidence)
    result.negative_segments = [int(result.segments[-1, -1])]
    result.negative_mask = result.segments == result.negative_segments[0]
    path = tmp_path / "lime" / "fig7.png"
    rgb = render_lime(image, result, path)
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)
    assert rgb.shape == (SIZE, SIZE, 3)
    red = rgb[result.positive_mask].astype(int)
    blue = rgb[result.negative_mask].astype(int)
    assert (red[:, 0] > red[:, 2]).all() and (blue[:, 2] > blue[:, 0]).all()
    untouched = ~(result.positive_mask | result.negative_mask)
    np.testing.assert_array_equal(rgb[untouched][:, 0], np.rint(image[..., 0][untouched]).astype(np.uint8))
