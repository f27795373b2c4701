"""covidx's Conv2D with bfloat16 kernel gradients as im2col^T · dy, and its DepthwiseConv2D with float32 kernel
gradients, checked against NumPy and Keras' layers."""

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from covidx.layers.convolution import (SMALL_MAP, DepthwiseConv2D, fp32_depthwise_grad_applies, im2col,
                                      matmul_grad_applies)
from covidx.layers.grouped_conv import Conv2D, GroupedConv2D, fast_convolutions
from covidx.precision import inference_copy, precision_scope

CASES = [  # (map size, kernel, stride, padding, bias)
    (8, 1, 2, "same", True), (4, 3, 1, "same", True), (7, 3, 2, "same", False),
    (8, 3, 2, "valid", True), (5, 3, 1, "valid", True), (6, 5, 1, "same", False),
]


def _patches(x, dy, k, s, padding):
    """(i, j, the input rows and columns that kernel tap (i, j) meets, one per output position)."""
    n, h, w, _ = x.shape
    oh, ow = dy.shape[1:3]
    if padding == "same":
        pad_h, pad_w = max((oh - 1) * s + k - h, 0), max((ow - 1) * s + k - w, 0)
        x = np.pad(x, [(0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)])
    for i in range(k):
        for j in range(k):
            yield i, j, x[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :]


def _numpy_kernel_grad(x, dy, k, s, padding):
    """dL/dW[i, j, c, o] = sum over n, oh, ow of x_padded[n, oh*s + i, ow*s + j, c] * dy[n, oh, ow, o]."""
    grad = np.zeros((k, k, x.shape[-1], dy.shape[-1]))
    for i, j, patch in _patches(x, dy, k, s, padding):
        grad[i, j] = np.einsum("nhwc,nhwo->co", patch, dy)
    return grad


def _numpy_depthwise_kernel_grad(x, dy, k, s, padding, multiplier):
    """dL/dW[i, j, c, m] = sum over n, oh, ow of x_padded[n, oh*s + i, ow*s + j, c] * dy[n, oh, ow, c*M + m]."""
    dy = dy.reshape(*dy.shape[:3], x.shape[-1], multiplier)
    grad = np.zeros((k, k, x.shape[-1], multiplier))
    for i, j, patch in _patches(x, dy, k, s, padding):
        grad[i, j] = np.einsum("nhwc,nhwcm->cm", patch, dy)
    return grad


def _against_keras(reference, layer, x, atol):
    """``layer`` and Keras' ``reference`` (given its weights) on ``x``: the output and the gradients of a weighted sum
    (input, kernel, bias) agree; returns ``layer``'s ``[y, dx, dkernel(, dbias)]`` and the sum's weights (= dL/dy).
    The bias gradient is checked here against the NumPy sum of dL/dy."""
    reference.build(x.shape)
    layer.build(x.shape)
    layer.set_weights(reference.get_weights())
    results = []
    for conv in (reference, layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = conv(x)
            weights = tf.reshape(tf.cast(tf.range(tf.size(y)) % 7 - 3, tf.float32), y.shape)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
        results.append([y] + tape.gradient(loss, [x] + conv.trainable_weights))
    for got, expected in zip(results[1], results[0]):
        np.testing.assert_allclose(np.float32(got), np.float32(expected), rtol=2e-2, atol=atol)
    if layer.use_bias:
        np.testing.assert_allclose(results[1][3].numpy(), weights.numpy().sum(axis=(0, 1, 2)), rtol=1e-2, atol=1e-2)
    return results[1], weights.numpy().astype(np.float64)


def _bf16(x):
    return tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy().astype(np.float64)


@pytest.mark.parametrize("size, k, s, padding, bias", CASES)
def test_gradients_equal_numpy_and_keras_conv2d(size, k, s, padding, bias):
    rng = np.random.default_rng(size * 10 + k)
    x = tf.constant(rng.normal(size=(3, size, size, 8)).astype("float32"))
    with precision_scope("bf16"):
        reference = keras.layers.Conv2D(6, k, strides=s, padding=padding, use_bias=bias,
                                        bias_initializer="random_normal")
        layer = Conv2D(6, k, strides=s, padding=padding, use_bias=bias)
    assert matmul_grad_applies(layer, tf.cast(x, tf.bfloat16))
    grads, dy = _against_keras(reference, layer, x, atol=2e-2)
    np.testing.assert_allclose(grads[2].numpy(), _numpy_kernel_grad(_bf16(x), dy, k, s, padding), rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("k, s, padding", [(1, 1, "SAME"), (1, 2, "VALID"), (3, 1, "SAME"), (3, 2, "SAME"),
                                           (3, 2, "VALID"), (5, 3, "SAME")])
def test_im2col_equals_extract_patches(k, s, padding):
    x = tf.constant(np.random.default_rng(k + s).normal(size=(2, 9, 7, 3)).astype("float32"))
    expected = tf.image.extract_patches(x, [1, k, k, 1], [1, s, s, 1], [1, 1, 1, 1], padding)
    np.testing.assert_array_equal(im2col(x, (k, k), (s, s), padding).numpy(), expected.numpy())


def test_kernel_gradient_is_a_matmul_only_where_it_is_faster():
    with precision_scope("bf16"):
        pointwise, small, large = Conv2D(4, 1), Conv2D(4, 3, padding="same"), \
            Conv2D(4, 3, strides=2, padding="same")
    side = int(np.sqrt(SMALL_MAP))
    assert matmul_grad_applies(pointwise, tf.zeros((1, 32, 32, 4), tf.bfloat16))
    assert matmul_grad_applies(small, tf.zeros((1, side, side, 4), tf.bfloat16))
    assert not matmul_grad_applies(small, tf.zeros((1, side + 1, side, 4), tf.bfloat16))  # a larger map: oneDNN's
    assert matmul_grad_applies(large, tf.zeros((1, 2 * side, 2 * side, 4), tf.bfloat16))  # stride 2: 8x8 outputs
    assert not matmul_grad_applies(pointwise, tf.zeros((1, 8, 8, 4), tf.float32))  # float32: oneDNN's kernel

    with precision_scope("bf16"):
        layer = Conv2D(4, 1)
    ops = [op.type for op in _weight_gradient_ops(layer, tf.zeros((2, 8, 8, 4)))]
    assert "MatMul" in ops and "Conv2DBackpropFilter" not in ops


def _weight_gradient_ops(layer, x):
    """The operations of the graph computing ``layer``'s weight gradients on ``x`` (built here)."""
    layer.build(x.shape)

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            y = layer(x)
        return tape.gradient(y, layer.trainable_weights)

    return grads.get_concrete_function(x).graph.get_operations()


@pytest.mark.parametrize("size, k, s, padding, multiplier, bias", [
    (8, 5, 1, "same", 1, False), (9, 5, 2, "same", 2, True), (8, 5, 2, "valid", 1, True), (6, 7, 1, "same", 1, False)])
def test_depthwise_gradients_equal_numpy_and_keras(size, k, s, padding, multiplier, bias):
    rng = np.random.default_rng(size * 10 + k + s)
    x = tf.constant(rng.normal(size=(3, size, size, 4)).astype("float32"))
    with precision_scope("bf16"):
        reference = keras.layers.DepthwiseConv2D(k, strides=s, padding=padding, depth_multiplier=multiplier,
                                                 use_bias=bias, bias_initializer="random_normal")
        layer = DepthwiseConv2D(k, strides=s, padding=padding, depth_multiplier=multiplier, use_bias=bias)
    assert fp32_depthwise_grad_applies(layer, tf.cast(x, tf.bfloat16))
    grads, dy = _against_keras(reference, layer, x, atol=5e-2)
    expected = _numpy_depthwise_kernel_grad(_bf16(x), dy, k, s, padding, multiplier)
    np.testing.assert_allclose(grads[2].numpy(), expected, rtol=1e-2, atol=5e-2)


def test_depthwise_kernel_gradient_in_float32_only_for_large_bfloat16_kernels():
    with precision_scope("bf16"):
        five, three = DepthwiseConv2D(5, padding="same"), DepthwiseConv2D(3, padding="same")
    x = tf.zeros((2, 8, 8, 4), tf.bfloat16)
    assert fp32_depthwise_grad_applies(five, x)
    assert not fp32_depthwise_grad_applies(three, x)  # oneDNN's bfloat16 kernel is fast for 3x3
    assert not fp32_depthwise_grad_applies(five, tf.zeros((2, 8, 8, 4)))  # float32 anyway
    ops = _weight_gradient_ops(five, tf.zeros((2, 8, 8, 4)))
    assert [op.inputs[0].dtype for op in ops if op.type == "DepthwiseConv2dNativeBackpropFilter"] == [tf.float32]
    assert [op.inputs[0].dtype for op in ops if op.type == "DepthwiseConv2dNative"] == [tf.bfloat16]


def _entries(path):
    with h5py.File(path, "r") as f:
        names = []
        f.visit(names.append)
    return names


def test_swapped_network_trains_saves_reloads_and_infers_as_keras_conv2d(tmp_path):
    keras.utils.set_random_seed(0)
    with precision_scope("bf16"):
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = GroupedConv2D(8, 3, groups=2, padding="same", name="grouped")(keras.layers.ReLU()(h))
        h = keras.layers.Conv2D(6, 1, activation="relu", name="c2")(h)
        h = keras.layers.DepthwiseConv2D(5, padding="same", name="dw")(h)
        outputs = keras.layers.Dense(3, activation="softmax", dtype="float32")(keras.layers.GlobalAveragePooling2D()(h))
        net = keras.Model(inputs, outputs)
    net.save_weights(tmp_path / "keras.weights.h5")
    assert fast_convolutions(net) is net
    assert all(type(net.get_layer(name)) is Conv2D for name in ("c1", "grouped", "c2"))
    assert type(net.get_layer("dw")) is DepthwiseConv2D
    net.save_weights(tmp_path / "covidx.weights.h5")  # entries named after the class: the same names
    assert _entries(tmp_path / "covidx.weights.h5") == _entries(tmp_path / "keras.weights.h5")
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    y = keras.utils.to_categorical([0, 1, 2, 0], 3)
    net.compile(optimizer="adam", loss="categorical_crossentropy")
    before = net.get_layer("c1").kernel.numpy().copy()
    net.fit(x, y, epochs=2, verbose=0)
    assert not np.allclose(before, net.get_layer("c1").kernel.numpy())
    net.save(tmp_path / "net.keras")
    again = keras.models.load_model(tmp_path / "net.keras", safe_mode=True, compile=False)
    assert type(again.get_layer("c2")) is Conv2D and type(again.get_layer("dw")) is DepthwiseConv2D
    np.testing.assert_allclose(again.predict(x, verbose=0), net.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    copy = inference_copy(again, "bf16")
    assert [type(copy.get_layer(name)) for name in ("grouped", "c2", "dw")] == [
        Conv2D, keras.layers.Conv2D, keras.layers.DepthwiseConv2D]
    assert type(copy.get_layer("bn")) is keras.layers.Conv2D  # c1 + bn folded into a plain convolution
    np.testing.assert_allclose(copy.predict(x, verbose=0), net.predict(x, verbose=0), atol=3e-2)
