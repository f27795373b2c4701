"""SqueezeExcite (Hu et al., SENet §3; Cascade-SEME §4.B) against a NumPy computation."""

import keras
import numpy as np
import pytest

from covidx.layers.squeeze_excite import SqueezeExcite


def _numpy_se(x, w1, b1, w2, b2):
    z = x.mean(axis=(1, 2))  # squeeze: global average pool
    h = np.maximum(z @ w1 + b1, 0.0)  # FC C -> C/r, ReLU
    s = 1.0 / (1.0 + np.exp(-(h @ w2 + b2)))  # FC C/r -> C, sigmoid
    return x * s[:, None, None, :]  # channel-wise rescale


def test_squeeze_excite_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4, 32)).astype("float32")
    layer = SqueezeExcite(ratio=8)
    layer.build(x.shape)
    # Non-zero biases so that a missing bias term would show.
    w1, w2 = (rng.normal(scale=0.5, size=s).astype("float32") for s in ((32, 4), (4, 32)))
    b1, b2 = (rng.normal(scale=0.5, size=s).astype("float32") for s in ((4,), (32,)))
    layer.squeeze.set_weights([w1, b1])
    layer.excite.set_weights([w2, b2])
    out = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(out, _numpy_se(x, w1, b1, w2, b2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "channels, ratio, expected",
    [
        (256, 16, 256 * 16 + 16 + 16 * 256 + 256),  # SE-ResNet-50 conv2 (prototxt: 256 -> 16 -> 256)
        (2048, 16, 2048 * 128 + 128 + 128 * 2048 + 2048),
        (8, 16, 8 * 1 + 1 + 1 * 8 + 8),  # C // r < 1 -> min_units = 1
    ],
)
def test_squeeze_excite_parameter_count(channels, ratio, expected):
    layer = SqueezeExcite(ratio=ratio)
    layer.build((None, 7, 7, channels))
    assert layer.count_params() == expected


def test_squeeze_excite_reloads(tmp_path):
    inputs = keras.Input((6, 6, 16))
    model = keras.Model(inputs, SqueezeExcite(ratio=4, name="se")(inputs))
    path = tmp_path / "se.keras"
    model.save(path)
    restored = keras.models.load_model(path, safe_mode=True)
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 16)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))
    assert restored.get_layer("se").get_config()["ratio"] == 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_global_average_pool_is_the_mean_in_every_dtype(dtype):
    """On a first-stage-sized map, where a pooling kernel that sums in 16 bits is off by ~0.5."""
    import tensorflow as tf

    from covidx.layers.pooling import global_average_pool

    x = np.random.default_rng(0).uniform(0, 1, (2, 128, 96, 3)).astype("float32")
    xt = tf.cast(x, dtype)
    expected = np.asarray(tf.cast(xt, "float32")).mean(axis=(1, 2))  # the mean of the values pooled
    out = global_average_pool(xt)
    assert out.dtype == dtype and tuple(out.shape) == (2, 3)
    np.testing.assert_allclose(np.asarray(tf.cast(out, "float32")), expected, atol={"float32": 1e-6}.get(dtype, 4e-3))
    assert tuple(global_average_pool(xt, keepdims=True).shape) == (2, 1, 1, 3)
    # Traced with the height and width unknown: the mean, the same values.
    fn = tf.function(global_average_pool, input_signature=[tf.TensorSpec((None, None, None, 3), dtype)])
    np.testing.assert_allclose(np.asarray(tf.cast(fn(xt), "float32")), expected, atol=4e-3)


def test_global_average_pool_gradient_is_one_over_the_area():
    import tensorflow as tf

    from covidx.layers.pooling import global_average_pool

    x = tf.constant(np.random.default_rng(1).normal(size=(2, 5, 7, 4)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(global_average_pool(x) * np.arange(1, 5, dtype="float32"))
    grad = np.asarray(tape.gradient(y, x))
    np.testing.assert_allclose(grad, np.broadcast_to(np.arange(1, 5) / 35.0, x.shape), rtol=1e-6)
