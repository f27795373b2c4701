"""GroupedConv2D (covidx.layers.grouped_conv): the fast formulation of DPN's grouped convolutions.

Checked against an independent NumPy grouped convolution and against Keras' own ``Conv2D(groups=...)``
(the reference formulation, XLA per layer): outputs, gradients, weights layout, a DPN built with
either, and a safe-mode reload.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidx.layers import GroupedConv2D
from covidx.layers import grouped_conv
from covidx.models import dpn


def numpy_grouped_conv(x, kernel, stride, groups):
    """NHWC grouped cross-correlation with 'valid' padding, by explicit loops over the window."""
    b, h, w, cin = x.shape
    kh, kw, cg, cout = kernel.shape
    og = cout // groups
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((b, ho, wo, cout), np.float64)
    for g in range(groups):
        xg = x[..., g * cg:(g + 1) * cg].astype(np.float64)
        kg = kernel[..., g * og:(g + 1) * og].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]
                out[..., g * og:(g + 1) * og] += np.einsum("bhwc,co->bhwo", patch, kg[i, j])
    return out


@pytest.fixture(params=["native", "per-group"])
def formulation(request, monkeypatch):
    """Run each test with the direct grouped kernel and with the per-group fallback."""
    if request.param == "per-group":
        monkeypatch.setattr(grouped_conv, "native_grouped_conv_supported", lambda *a, **k: False)
    else:
        assert grouped_conv.native_grouped_conv_supported("float32")  # TF x86 (oneDNN) and GPUs
    return request.param


@pytest.mark.parametrize("stride", [1, 2])
def test_matches_numpy_and_keras_conv2d(formulation, stride):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 8)).astype("float32")
    fast = GroupedConv2D(12, 3, strides=stride, groups=4, use_bias=False)
    ref = keras.layers.Conv2D(12, 3, strides=stride, groups=4, use_bias=False)
    fast.build(x.shape)
    ref.build(x.shape)
    assert [w.shape for w in fast.weights] == [w.shape for w in ref.weights] == [(3, 3, 2, 12)]
    ref.set_weights(fast.get_weights())
    expected = numpy_grouped_conv(x, fast.get_weights()[0], stride, 4)
    np.testing.assert_allclose(np.asarray(fast(x)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(fast(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)

    xt = tf.constant(x)
    grads = []
    for layer in (fast, ref):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt)
            loss = tf.reduce_sum(y * y)
        grads.append(tape.gradient(loss, [xt, layer.kernel]))
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_same_padding_and_bias_and_groups_one():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 6, 6, 4)).astype("float32")
    fast = GroupedConv2D(4, 3, padding="same", groups=2, bias_initializer="ones")
    ref = keras.layers.Conv2D(4, 3, padding="same", groups=2, bias_initializer="ones")
    fast.build(x.shape)
    ref.build(x.shape)
    ref.set_weights(fast.get_weights())
    np.testing.assert_allclose(np.asarray(fast(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)
    plain = GroupedConv2D(3, 1)
    assert plain(x).shape == (1, 6, 6, 3)


def tiny_config():
    return dpn.dpn_config("dpn92", k_sec=(2, 1, 1, 1)).scaled(0.25)


def test_dpn_equals_keras_conv2d_reference(monkeypatch, tmp_path):
    """A DPN with GroupedConv2D has the reference (Keras Conv2D) DPN's parameters and outputs."""
    fast = dpn.build_dpn(4, (64, 64, 3), config=tiny_config(), se=True)
    assert any(isinstance(layer, GroupedConv2D) for layer in fast.layers)
    monkeypatch.setattr(dpn, "GroupedConv2D", keras.layers.Conv2D)
    ref = dpn.build_dpn(4, (64, 64, 3), config=tiny_config(), se=True)
    assert not any(isinstance(layer, GroupedConv2D) for layer in ref.layers)
    assert fast.count_params() == ref.count_params()
    assert [w.shape for w in fast.weights] == [w.shape for w in ref.weights]
    path = tmp_path / "fast.weights.h5"
    fast.save_weights(path)
    ref.load_weights(path)  # the same layout: the file of one loads into the other
    x = np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(fast(x, training=False)), np.asarray(ref(x, training=False)),
                               rtol=1e-4, atol=1e-5)

    saved = tmp_path / "fast.keras"
    fast.save(saved)
    reloaded = keras.models.load_model(saved, safe_mode=True)
    assert isinstance(reloaded.get_layer("conv3_1_c3x3_b_conv"), GroupedConv2D)
    np.testing.assert_allclose(np.asarray(reloaded(x)), np.asarray(fast(x)), rtol=1e-6, atol=1e-6)
