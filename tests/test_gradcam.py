"""Grad-CAM / Grad-CAM++ (covidx.explain.gradcam) and the overlay helpers (covidx.explain.overlay).

Models are tiny and built here. Evidence-location tests use hand-set weights,
so where the evidence lies is known exactly; numerics are checked against a
gradient computation written independently below (layers called one by one,
the classifier recomputed by hand) and a NumPy Grad-CAM++ closed form.
"""

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from covidx.explain import gradcam as gc
from covidx.explain.overlay import contact_sheet, overlay_heatmap, save_png
from covidx.layers import ImageNormalization

SIZE = 32
QUADRANTS = {"top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0), "bottom_right": (1, 1)}


@keras.saving.register_keras_serializable(package="covidx_tests")
class QuadrantMask(keras.layers.Layer):
    """Zeroes every position outside one quadrant (fixed, no weights)."""

    def __init__(self, quadrant="top_left", **kwargs):
        super().__init__(**kwargs)
        self.quadrant = quadrant

    def call(self, x):
        h, w = x.shape[1], x.shape[2]
        r, c = QUADRANTS[self.quadrant]
        mask = np.zeros((1, h, w, 1), "float32")
        mask[:, r * h // 2 : (r + 1) * h // 2, c * w // 2 : (c + 1) * w // 2] = 1.0
        return x * mask

    def get_config(self):
        return {**super().get_config(), "quadrant": self.quadrant}


def detector_model(mask_quadrant=None):
    """Bright-spot detector with known evidence.

    conv "detector": channel 0 = local mean - 0.5 (bright), channel 1 = 0.5 - local mean (dark),
    both ReLU; GAP; Dense softmax with class 1 = "bright" (+A0 - A1) and class 0 = "dark".
    With ``mask_quadrant`` only that quadrant reaches the pooling.
    """
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = ImageNormalization("unit", name="normalize")(inp)
    conv = keras.layers.Conv2D(2, 5, padding="same", activation="relu", name="detector")
    x = conv(x)
    if mask_quadrant:
        x = QuadrantMask(mask_quadrant, name="evidence_mask")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    dense = keras.layers.Dense(2, activation="softmax", name="predictions")
    out = dense(x)
    kernel = np.zeros((5, 5, 1, 2), "float32")
    kernel[..., 0, 0], kernel[..., 0, 1] = 1 / 25, -1 / 25
    conv.set_weights([kernel, np.array([-0.5, 0.5], "float32")])
    dense.set_weights([np.array([[-20.0, 20.0], [20.0, -20.0]], "float32"), np.zeros(2, "float32")])
    return keras.Model(inp, out, name="detector_model")


def blob_image(quadrants, rng):
    """Dark noisy background with a bright disc in each given quadrant."""
    img = 60 + rng.normal(0, 5, (SIZE, SIZE))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for q in quadrants:
        r, c = QUADRANTS[q]
        cy, cx = (r + 0.5) * SIZE / 2, (c + 0.5) * SIZE / 2
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 4**2] = 220
    return np.clip(img, 0, 255)[..., None].astype("float32")


def quadrant_share(heatmap, quadrant):
    r, c = QUADRANTS[quadrant]
    h, w = heatmap.shape
    return heatmap[r * h // 2 : (r + 1) * h // 2, c * w // 2 : (c + 1) * w // 2].sum() / heatmap.sum()


def textured_images(n, seed, size=24):
    """Smooth random fields with strong spatial structure (uniform noise makes near-constant features)."""
    rng = np.random.default_rng(seed)
    fields = [cv2.GaussianBlur(rng.normal(0, 1, (size, size)), (0, 0), 2.0) for _ in range(n)]
    return np.stack([np.clip(128 + 400 * f, 0, 255) for f in fields])[..., None].astype("float32")


def small_cnn(nested=False, frozen=False):
    """norm -> conv1 (valid) -> conv2 (valid) -> GAP -> dropout -> Dense softmax; random weights.

    ``nested``: conv1/conv2 live in a sub-model "backbone" called as a layer.
    """
    conv1 = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")
    conv2 = keras.layers.Conv2D(5, 3, activation="relu", name="conv2")
    inp = keras.Input((24, 24, 1), name="image")
    x = ImageNormalization("unit", name="normalize")(inp)
    if nested:
        b_in = keras.Input((24, 24, 1), name="backbone_input")
        backbone = keras.Model(b_in, conv2(conv1(b_in)), name="backbone")
        backbone.trainable = not frozen
        x = backbone(x, training=False)
    else:
        x = conv2(conv1(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name="nested_cnn" if nested else "flat_cnn")


def _layer(model, name):
    for _, layer in gc.iter_layers(model):
        if layer.name == name:
            return layer
    raise KeyError(name)


def manual_gradients(model, images, classes, target="conv1"):
    """Independent computation: call the layers one by one, classifier as x @ W + b (pre-softmax)."""
    norm, conv1, conv2 = (_layer(model, n) for n in ("normalize", "conv1", "conv2"))
    dense = _layer(model, "predictions")
    x = tf.constant(images)
    a1 = conv1(norm(x))
    with tf.GradientTape() as tape:
        tape.watch(a1)
        a2 = conv2(a1)
        pooled = tf.reduce_mean(a2, axis=(1, 2))
        logits = tf.matmul(pooled, dense.kernel) + dense.bias
        score = tf.reduce_sum(tf.gather(logits, classes, batch_dims=1))
    features = a1 if target == "conv1" else a2
    if target == "conv1":
        grads = tape.gradient(score, a1)
    else:
        with tf.GradientTape() as tape2:
            tape2.watch(a2)
            logits2 = tf.matmul(tf.reduce_mean(a2, axis=(1, 2)), dense.kernel) + dense.bias
            s2 = tf.reduce_sum(tf.gather(logits2, classes, batch_dims=1))
        grads = tape2.gradient(s2, a2)
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), model.predict_on_batch(images), atol=1e-5)
    return features.numpy().astype("float64"), grads.numpy().astype("float64"), logits.numpy().astype("float64")


def numpy_cam(weights, features, size):
    cam = np.maximum(np.einsum("nhwk,nk->nhw", features, weights), 0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)  # an all-negative map stays 0
    heat = np.stack([cv2.resize(c.astype("float32"), size[::-1], interpolation=cv2.INTER_LINEAR) for c in cam])
    return cam, heat


def numpy_gradcam_pp_weights(features, grads, logits, classes):
    """Chattopadhyay et al. Eq. 19 written with Y = exp(S) explicitly (exp(S) does not cancel here)."""
    exp_s = np.exp(logits[np.arange(len(classes)), classes])[:, None, None, None]
    d1, d2, d3 = exp_s * grads, exp_s * grads**2, exp_s * grads**3
    denom = 2 * d2 + features.sum(axis=(1, 2), keepdims=True) * d3
    alpha = np.divide(d2, denom, out=np.zeros_like(d2), where=denom != 0)
    return (alpha * np.maximum(d1, 0)).sum(axis=(1, 2))


# ---------------------------------------------------------------------------
# Evidence location
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("quadrant", ["top_left", "bottom_right", "top_right"])
def test_heatmap_follows_the_evidence(quadrant):
    rng = np.random.default_rng(0)
    model = detector_model()
    cam = gc.GradCAM(model, "detector")
    result = cam.explain(blob_image([quadrant], rng)[None], class_index=1)  # class 1 = "bright"
    assert result.class_indices.tolist() == [1]
    assert result.score_kind == "logit"
    heat = result.heatmaps[0]
    assert heat.shape == (SIZE, SIZE) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert quadrant_share(heat, quadrant) > 0.9
    # Explaining the other class puts the mass on the dark background instead.
    other = cam(blob_image([quadrant], rng)[None], class_index=0)[0]
    assert quadrant_share(other, quadrant) < 0.3


@pytest.mark.parametrize("quadrant", ["top_left", "bottom_left"])
def test_masked_model_heatmap_lies_in_the_only_quadrant_it_sees(quadrant):
    """Evidence in all four quadrants, but the score depends on one only (fixed mask before GAP)."""
    model = detector_model(mask_quadrant=quadrant)
    image = blob_image(list(QUADRANTS), np.random.default_rng(1))[None]
    cam = gc.GradCAM(model)  # automatic choice: the last 4-D layer, the mask's output
    assert cam.layer_path == "evidence_mask"
    heat = cam(image, class_index=1)[0]
    assert quadrant_share(heat, quadrant) > 0.95


# ---------------------------------------------------------------------------
# Numerics against an independent computation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("plus_plus", [False, True])
def test_numerics_match_manual_tape(nested, plus_plus):
    model = small_cnn(nested=nested)
    images = textured_images(3, seed=2)
    classes = np.array([0, 2, 1])
    result = gc.GradCAM(model, "conv1", plus_plus=plus_plus).explain(images, class_index=classes)

    features, grads, logits = manual_gradients(model, images, classes)
    if plus_plus:
        weights = numpy_gradcam_pp_weights(features, grads, logits, classes)
    else:
        weights = grads.mean(axis=(1, 2))
    cam, heat = numpy_cam(weights, features, (24, 24))
    assert result.cams.shape == (3, 22, 22) and result.heatmaps.shape == (3, 24, 24)
    assert (cam.max(axis=(1, 2)) > 0).sum() >= 2  # the comparison is not between all-zero maps
    np.testing.assert_allclose(result.cams, cam, atol=1e-5)
    np.testing.assert_allclose(result.heatmaps, heat, atol=1e-4)
    np.testing.assert_array_equal(result.class_indices, classes)
    np.testing.assert_allclose(result.probabilities, model.predict_on_batch(images), atol=1e-5)


def test_batch_equals_one_image_at_a_time_and_predicted_class_default():
    model = small_cnn()
    images = np.random.default_rng(3).uniform(0, 255, (4, 24, 24, 1)).astype("float32")
    cam = gc.GradCAM(model)
    batch = cam.explain(images)
    np.testing.assert_array_equal(batch.class_indices, model.predict_on_batch(images).argmax(-1))
    for i in range(4):
        np.testing.assert_allclose(cam(images[i])[0], batch.heatmaps[i], atol=1e-5)  # (H, W, C) input
    np.testing.assert_allclose(cam(images[0, ..., 0])[0], batch.heatmaps[0], atol=1e-5)  # (H, W) input


def test_batch_after_batch_traces_the_model_once():
    # Tracing is what costs (tens of seconds for the ensemble): explaining a table batch by batch, through new
    # GradCAM objects or gradcam_for_layers calls, must reuse one compiled gradient step per model and layers.
    model = small_cnn()
    images = np.random.default_rng(4).uniform(0, 255, (4, 24, 24, 1)).astype("float32")
    first = gc.GradCAM(model).explain(images[:2])
    step = gc._gradient_step(gc._runner_for(model, [_layer(model, "conv2")]))
    for batch in (images[2:], images[:2]):
        again = gc.GradCAM(model).explain(batch)
        gc.gradcam_for_layers(model, batch, ["conv2"])
    np.testing.assert_allclose(again.heatmaps, first.heatmaps, atol=1e-6)
    assert step.experimental_get_tracing_count() == 1
    other = small_cnn()  # another model gets its own step
    assert gc._runner_for(other, [_layer(other, "conv2")]) is not gc._runner_for(model, [_layer(model, "conv2")])


def test_probability_score_when_head_is_not_softmax():
    inp = keras.Input((24, 24, 1))
    x = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, activation="tanh", name="head")(x)
    model = keras.Model(inp, out)
    cam = gc.GradCAM(model)
    assert cam.score_kind == "probability"
    images = np.random.default_rng(4).uniform(0, 255, (2, 24, 24, 1)).astype("float32")
    feat_model = keras.Model(inp, model.get_layer("conv").output)
    a = feat_model(images)
    with tf.GradientTape() as tape:
        tape.watch(a)
        y = model.get_layer("head")(tf.reduce_mean(a, axis=(1, 2)))[:, 1]
    g = tape.gradient(y, a).numpy()
    _, heat = numpy_cam(g.mean(axis=(1, 2)), a.numpy(), (24, 24))
    np.testing.assert_allclose(cam(images, class_index=1), heat, atol=1e-4)


# ---------------------------------------------------------------------------
# Nested sub-models and save/reload
# ---------------------------------------------------------------------------


def test_nested_backbone_matches_flat_model_and_survives_reload(tmp_path):
    nested = small_cnn(nested=True, frozen=True)  # frozen: no trainable variables to watch
    flat = small_cnn(nested=False)
    flat.set_weights(nested.get_weights())
    images = np.random.default_rng(5).uniform(0, 255, (3, 24, 24, 1)).astype("float32")

    cam_nested = gc.GradCAM(nested)
    assert cam_nested.layer_path == "backbone/conv2"  # automatic, found inside the sub-model
    assert not cam_nested._runner.flat and gc.GradCAM(flat)._runner.flat
    heat = cam_nested(images)
    np.testing.assert_allclose(heat, gc.GradCAM(flat, "conv2")(images), atol=1e-5)

    classes = nested.predict_on_batch(images).argmax(-1)
    features, grads, _ = manual_gradients(nested, images, classes, target="conv2")
    np.testing.assert_allclose(heat, numpy_cam(grads.mean(axis=(1, 2)), features, (24, 24))[1], atol=1e-4)

    path = tmp_path / "nested.keras"
    nested.save(path)
    reloaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(reloaded.predict_on_batch(images), nested.predict_on_batch(images), atol=1e-6)
    for layer in ("conv1", "backbone/conv2", None):
        for plus_plus in (False, True):
            np.testing.assert_allclose(
                gc.GradCAM(reloaded, layer, plus_plus)(images), gc.GradCAM(nested, layer, plus_plus)(images), atol=1e-5
            )


def test_sequential_backbone_nested():
    backbone = keras.Sequential(
        [keras.Input((24, 24, 1)), keras.layers.Conv2D(4, 3, activation="relu", name="s_conv1"),
         keras.layers.Conv2D(4, 3, activation="relu", name="s_conv2")],
        name="seq_backbone",
    )
    inp = keras.Input((24, 24, 1))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inp))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="predictions")(x))
    images = np.random.default_rng(6).uniform(0, 255, (2, 24, 24, 1)).astype("float32")
    cam = gc.GradCAM(model)
    assert cam.layer_path == "seq_backbone/s_conv2"
    feats = backbone(images)
    with tf.GradientTape() as tape:
        tape.watch(feats)
        dense = model.get_layer("predictions")
        logits = tf.matmul(tf.reduce_mean(feats, axis=(1, 2)), dense.kernel) + dense.bias
        s = tf.reduce_sum(logits[:, 1])
    g = tape.gradient(s, feats).numpy()
    _, heat = numpy_cam(g.mean(axis=(1, 2)), feats.numpy(), (24, 24))
    np.testing.assert_allclose(cam(images, class_index=1), heat, atol=1e-4)


def test_two_branch_model_layers_and_combination():
    """Two nested backbones concatenated (the ensemble's shape): one map per branch, then combined."""

    def branch(name, filters):
        b_in = keras.Input((24, 24, 1))
        y = keras.layers.Conv2D(filters, 3, activation="relu", name="conv")(b_in)
        return keras.Model(b_in, y, name=name)

    inp = keras.Input((24, 24, 1))
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"gap_{n}")(branch(n, f)(inp)) for n, f in (("a", 3), ("b", 4))]
    x = keras.layers.Concatenate(name="concat")(pooled)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="predictions")(x))
    images = np.random.default_rng(7).uniform(0, 255, (2, 24, 24, 1)).astype("float32")

    with pytest.raises(ValueError, match="ambiguous"):
        gc.GradCAM(model, "conv")
    results = gc.gradcam_for_layers(model, images, ["a/conv", "b/conv"], class_index=2)
    assert list(results) == ["a/conv", "b/conv"]
    for path, res in results.items():
        np.testing.assert_allclose(res.heatmaps, gc.GradCAM(model, path)(images, class_index=2), atol=1e-5)
    maps = [r.heatmaps for r in results.values()]
    mean = (maps[0] + maps[1]) / 2
    np.testing.assert_allclose(gc.combine_heatmaps(maps), mean / mean.max(axis=(1, 2), keepdims=True), atol=1e-6)
    weighted = gc.combine_heatmaps(maps, weights=[3, 1], normalize=False)
    np.testing.assert_allclose(weighted, 0.75 * maps[0] + 0.25 * maps[1], atol=1e-6)
    with pytest.raises(ValueError):
        gc.combine_heatmaps(maps, weights=[1.0])


# ---------------------------------------------------------------------------
# Layer choice and errors
# ---------------------------------------------------------------------------


def test_automatic_layer_is_last_4d_layer():
    model = small_cnn()
    assert gc.candidate_layers(model) == ["normalize", "conv1", "conv2"]
    assert gc.GradCAM(model).layer_path == "conv2"
    assert gc.find_target_layer(model, model.get_layer("conv1"))[0] == "conv1"


def test_automatic_layer_passes_over_a_trailing_pooling_layer():
    inp = keras.Input((24, 24, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="last_conv")(inp)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="predictions")(x))
    assert gc.candidate_layers(model)[-1] == "pool"
    assert gc.GradCAM(model).layer_path == "last_conv"
    assert gc.GradCAM(model, "pool").layer_path == "pool"  # still reachable by name


def test_automatic_layer_on_a_covidx_baseline():
    from covidx.models.baseline import build_application_classifier

    model = build_application_classifier("mobilenetv2", 3, (64, 64, 3))
    cam = gc.GradCAM(model)
    assert cam.layer_path == "out_relu" and cam._runner.flat and cam.score_kind == "logit"
    heat = cam(np.random.default_rng(8).uniform(0, 255, (2, 64, 64, 3)))
    assert heat.shape == (2, 64, 64) and np.isfinite(heat).all() and heat.max() <= 1.0


def test_missing_or_wrong_layer_gives_clear_error():
    model = small_cnn(nested=True)
    with pytest.raises(ValueError, match="no layer named 'conv9'") as err:
        gc.GradCAM(model, "conv9")
    assert "backbone/conv1" in str(err.value) and "backbone/conv2" in str(err.value)
    with pytest.raises(ValueError, match="not a 4-D feature map"):
        gc.GradCAM(model, "gap")
    with pytest.raises(ValueError, match="out of range"):
        gc.GradCAM(model)(np.zeros((1, 24, 24, 1)), class_index=3)


# ---------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------


def test_overlay_blend_png_and_contact_sheet(tmp_path):
    import matplotlib

    rng = np.random.default_rng(9)
    gray = rng.uniform(0, 255, (16, 20))
    heat = rng.uniform(0, 1, (8, 10)).astype("float32")
    out = overlay_heatmap(gray, heat, alpha=0.4)
    big = cv2.resize(heat, (20, 16), interpolation=cv2.INTER_LINEAR)
    jet = np.rint(matplotlib.colormaps["jet"](np.clip(big, 0, 1))[..., :3] * 255)
    expected = np.rint(0.6 * np.rint(gray)[..., None] + 0.4 * jet)
    assert out.dtype == np.uint8 and out.shape == (16, 20, 3)
    np.testing.assert_allclose(out, expected, atol=1)
    np.testing.assert_array_equal(overlay_heatmap(gray[..., None], big, alpha=0.0), np.repeat(np.rint(gray)[..., None], 3, -1))

    png = save_png(tmp_path / "sub" / "overlay.png", out)
    back = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, out)

    sheet = contact_sheet([gray, out, out], ["x-ray", "cam", "cam 2"], tmp_path / "sheet.png", cols=2)
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    with pytest.raises(ValueError):
        contact_sheet([gray], ["a", "b"], tmp_path / "bad.png")
