"""MAG-SD attention layers against independent NumPy computations (arXiv 2012.02278 §3.2)."""

import keras
import numpy as np
import pytest

from covidx.layers.attention import AttentionPooling, MultiscaleAttention

RNG = np.random.default_rng(0)


def _np_avg_pool(a, k):
    b, h, w, m = a.shape
    return a.reshape(b, h // k, k, w // k, k, m).mean(axis=(2, 4))


def _randomize_bn(norm, m):
    gamma, beta = RNG.uniform(0.5, 1.5, m), RNG.normal(size=m)
    mean, var = RNG.normal(size=m), RNG.uniform(0.5, 2.0, m)
    norm.set_weights([w.astype("float32") for w in (gamma, beta, mean, var)])
    return gamma, beta, mean, var


@pytest.mark.parametrize("training", [False, True])
def test_multiscale_attention_matches_numpy(training):
    m = 5
    f3 = RNG.normal(size=(2, 2, 2, 16)).astype("float32")  # "layer4"
    f2 = RNG.normal(size=(2, 4, 4, 8)).astype("float32")  # "layer3": 2x2 average pool
    f1 = RNG.normal(size=(2, 8, 8, 4)).astype("float32")  # "layer2": 4x4 average pool
    layer = MultiscaleAttention(num_maps=m)
    out = keras.ops.convert_to_numpy(layer([f3, f2, f1], training=training))
    assert out.shape == (2, 2, 2, m)

    expected = np.zeros((2, 2, 2, m))
    for f, conv, norm, k in zip((f3, f2, f1), layer.convs, layer.norms, (1, 2, 4)):
        assert not conv.use_bias and norm.epsilon == 1e-3
        gamma, beta, mean, var = _randomize_bn(norm, m)
        kernel = RNG.normal(size=(1, 1, f.shape[-1], m)).astype("float32")
        conv.set_weights([kernel])
        z = np.einsum("bhwc,cm->bhwm", f.astype(np.float64), kernel[0, 0])
        if training:  # batch statistics (biased variance), as BatchNorm in training mode
            mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
        a = np.maximum((z - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0.0)
        expected += _np_avg_pool(a, k)
    out = keras.ops.convert_to_numpy(layer([f3, f2, f1], training=training))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_multiscale_attention_rejects_non_integer_ratio():
    with pytest.raises(ValueError, match="integer multiple"):
        MultiscaleAttention(4)([np.zeros((1, 2, 2, 3), "float32"), np.zeros((1, 3, 3, 3), "float32")])


def test_attention_pooling_matches_numpy():
    b, h, w, c, m = 2, 3, 3, 6, 4
    features = RNG.normal(size=(b, h, w, c)).astype("float32")
    attention = RNG.uniform(0, 2, size=(b, h, w, m)).astype("float32")
    out = keras.ops.convert_to_numpy(AttentionPooling()([features, attention]))

    expected = np.zeros((b, m * c))
    for i in range(b):
        # part feature maps PF_j = A_j * f3 (Eq. 1), GAP over positions, concatenated map by map
        matrix = np.stack([(attention[i, :, :, j : j + 1] * features[i]).mean(axis=(0, 1)) for j in range(m)])
        v = matrix.reshape(-1).astype(np.float64)
        v = np.sign(v) * np.sqrt(np.abs(v) + 1e-12)
        expected[i] = 100.0 * v / np.linalg.norm(v)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 100.0, rtol=1e-5)

    gap = keras.ops.convert_to_numpy(AttentionPooling("gap")([features, attention]))
    gmp = keras.ops.convert_to_numpy(AttentionPooling("gmp")([features, attention]))
    np.testing.assert_allclose(gap, features.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gmp, features.max(axis=(1, 2)), rtol=1e-6)


def test_attention_pooling_full_size_feature_dim():
    layer = AttentionPooling()
    assert layer.compute_output_shape(((None, 7, 7, 2048), (None, 7, 7, 32))) == (None, 65536)
    out = layer([np.ones((1, 7, 7, 2048), "float32"), np.ones((1, 7, 7, 32), "float32")])
    assert out.shape == (1, 65536)
    assert AttentionPooling("gap").compute_output_shape(((None, 7, 7, 2048), (None, 7, 7, 32))) == (None, 2048)


def test_layers_config_round_trip():
    for layer in (MultiscaleAttention(7, epsilon=1e-4, name="att"), AttentionPooling("gmp", scale=10.0, name="pool")):
        clone = layer.__class__.from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
    with pytest.raises(ValueError):
        AttentionPooling("mean")
