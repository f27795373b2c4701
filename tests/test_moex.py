"""MomentExchange (MoEx with PONO, Cascade-SEME §4.A eqs. 2-3) against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidx.layers.moex import MomentExchange, exchange_moments, pono_moments
from covidx.training.moex import moex_interpolated_loss


def _numpy_pono(x, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    std = np.sqrt(x.var(axis=-1, ddof=1, keepdims=True) + eps)  # unbiased, as torch .var
    return mean, std


def _numpy_exchange(x, perm, eps=1e-5):
    mean, std = _numpy_pono(x.astype("float64"), eps)
    return (x - mean) / std * std[perm] + mean[perm]


@pytest.fixture
def features():
    # Channel means/scales differ per sample so that exchanged moments are visible.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 6, 8)) * rng.uniform(0.5, 3, size=(4, 1, 1, 1)) + rng.normal(size=(4, 1, 1, 1))
    return x.astype("float32")


def test_pono_moments_use_unbiased_channel_variance(features):
    mean, std = (keras.ops.convert_to_numpy(t) for t in pono_moments(features))
    ref_mean, ref_std = _numpy_pono(features.astype("float64"))
    assert mean.shape == std.shape == (4, 5, 6, 1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=1e-5)
    # The biased estimator would differ by a factor sqrt(C/(C-1)) ~ 1.07 for C = 8.
    assert not np.allclose(std, np.sqrt(features.var(axis=-1, keepdims=True) + 1e-5), rtol=1e-3)


def test_exchange_with_fixed_permutation_matches_numpy(features):
    perm = np.array([2, 0, 3, 1])
    out = keras.ops.convert_to_numpy(exchange_moments(features, perm))
    np.testing.assert_allclose(out, _numpy_exchange(features, perm), rtol=1e-4, atol=1e-4)
    # Every sample now carries its partner's PONO moments (eq. 2).
    out_mean, out_std = _numpy_pono(out.astype("float64"))
    ref_mean, ref_std = _numpy_pono(features.astype("float64"))
    np.testing.assert_allclose(out_mean, ref_mean[perm], atol=1e-4)
    np.testing.assert_allclose(out_std, ref_std[perm], rtol=1e-3)


def test_exchange_computes_in_float32_and_keeps_dtype(features):
    out = exchange_moments(tf.constant(features, tf.float16), np.array([1, 0, 3, 2]))
    assert out.dtype == tf.float16
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(out).astype("float32"),
        _numpy_exchange(features.astype("float16").astype("float32"), [1, 0, 3, 2]),
        rtol=1e-2, atol=2e-2,
    )


def test_identity_at_inference(features):
    layer = MomentExchange(probability=1.0, seed=1)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(features, training=False)), features)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(features)), features)
    assert not bool(layer.last_applied)
    np.testing.assert_array_equal(layer.last_permutation, np.arange(4))
    assert float(layer.last_lambda) == 1.0


def test_probability_zero_is_identity_in_training(features):
    layer = MomentExchange(probability=0.0, seed=1)
    for _ in range(3):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(features, training=True)), features)
        assert float(layer.last_lambda) == 1.0


def test_training_exchanges_with_the_exposed_permutation(features):
    layer = MomentExchange(probability=1.0, lam=0.9, seed=3)
    out = keras.ops.convert_to_numpy(layer(features, training=True))
    perm = keras.ops.convert_to_numpy(layer.last_permutation)
    assert sorted(perm) == [0, 1, 2, 3]
    assert bool(layer.last_applied) and np.isclose(float(layer.last_lambda), 0.9)
    np.testing.assert_allclose(out, _numpy_exchange(features, perm), rtol=1e-4, atol=1e-4)


def test_one_coin_flip_per_batch(features):
    layer = MomentExchange(probability=0.5, lam=0.7, seed=5)
    applied = []
    for _ in range(30):
        out = keras.ops.convert_to_numpy(layer(features, training=True))
        perm = keras.ops.convert_to_numpy(layer.last_permutation)
        if bool(layer.last_applied):
            np.testing.assert_allclose(out, _numpy_exchange(features, perm), rtol=1e-4, atol=1e-4)
            assert np.isclose(float(layer.last_lambda), 0.7)
        else:  # the whole batch passes unchanged
            np.testing.assert_array_equal(out, features)
            np.testing.assert_array_equal(perm, np.arange(4))
            assert float(layer.last_lambda) == 1.0
        applied.append(bool(layer.last_applied))
    assert 5 < sum(applied) < 25


def test_seeded_layers_draw_the_same_permutations(features):
    a, b = MomentExchange(seed=7), MomentExchange(seed=7)
    perms_a, perms_b = [], []
    for _ in range(4):
        a(features, training=True)
        b(features, training=True)
        perms_a.append(keras.ops.convert_to_numpy(a.last_permutation))
        perms_b.append(keras.ops.convert_to_numpy(b.last_permutation))
    np.testing.assert_array_equal(perms_a, perms_b)
    assert len({tuple(p) for p in perms_a}) > 1  # a fresh permutation every call


def test_state_is_readable_inside_a_graph_trace(features):
    layer = MomentExchange(seed=11)

    @tf.function
    def step(x):
        out = layer(x, training=True)
        return out, layer.last_permutation, layer.last_lambda

    for _ in range(2):  # the traced function draws a new permutation per call
        out, perm, lam = (keras.ops.convert_to_numpy(t) for t in step(tf.constant(features)))
        np.testing.assert_allclose(out, _numpy_exchange(features, perm), rtol=1e-4, atol=1e-4)
        assert np.isclose(lam, 0.9)


def test_config_round_trip_and_validation():
    layer = MomentExchange(probability=0.25, lam=0.5, epsilon=1e-3, seed=2, name="moex")
    clone = MomentExchange.from_config(layer.get_config())
    assert (clone.probability, clone.lam, clone.epsilon, clone.seed, clone.name) == (0.25, 0.5, 1e-3, 2, "moex")
    with pytest.raises(ValueError):
        MomentExchange(probability=1.5)
    with pytest.raises(ValueError):
        MomentExchange()(np.zeros((2, 3, 3, 1), "float32"))  # one channel has no variance


def test_label_mixing_loss_by_hand():
    rng = np.random.default_rng(2)
    y = np.eye(3, dtype="float32")[[0, 2, 1, 1, 0]]
    logits = rng.normal(size=(5, 3))
    p = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype("float32")
    perm = np.array([3, 0, 4, 2, 1])
    w = np.array([1.0, 2.0, 0.5, 1.0, 3.0], "float32")
    ce = lambda t: -(t * np.log(p)).sum(axis=1)  # noqa: E731
    ce_a, ce_b = ce(y), ce(y[perm])
    lam = 0.9
    expected = lam * ce_a.mean() + (1 - lam) * ce_b.mean()
    got = float(moex_interpolated_loss(y, p, perm, lam))
    assert np.isclose(got, expected, rtol=1e-5)
    weighted = lam * (w * ce_a).mean() + (1 - lam) * (w[perm] * ce_b).mean()
    assert np.isclose(float(moex_interpolated_loss(y, p, perm, lam, w)), weighted, rtol=1e-5)
    # lambda = 1 (no exchange in this batch) is plain cross-entropy.
    assert np.isclose(float(moex_interpolated_loss(y, p, perm, 1.0)), ce_a.mean(), rtol=1e-5)
