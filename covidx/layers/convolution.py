"""A convolution's kernel gradient as one matrix product: the same computation, faster on oneDNN CPUs.

The gradient of a convolution's kernel is ``dW = im2col(x)^T · dy``: the input's patches (one row per
output position, ``kh * kw * in`` columns in the kernel's ``(kh, kw, in)`` order) times the output
gradient (one row per output position, ``out`` columns). TensorFlow computes it with oneDNN's
backward-weights convolution, which on CPUs with AMX runs bfloat16 far below its matrix units when the
reduction (batch x output positions) is short and the channels many: the deep stages of a ResNet at the
128 px of the quick recipe. Measured with ``python benchmarks/training_kernels.py`` on a 2-core Xeon
with AMX-BF16, bfloat16, milliseconds (median of 20):

=================================================  =========================  ======================
gradient of the kernel of                          oneDNN backward-weights    im2col + one matmul
=================================================  =========================  ======================
1x1, 1024 -> 2048, stride 2, 8x8 input (conv5)     13.8                       3.2
3x3, 512 -> 512, 4x4 (conv5 at 128 px)             10.7                       2.2
3x3, 512 -> 512, 7x7, batch 8 (conv5 at 224 px)    6.3                        2.6
3x3, 256 -> 256, 8x8 (conv4 at 128 px)             3.5                        2.2
3x3, 256 -> 256, 14x14, batch 8 (conv4 at 224 px)  2.5                        2.9
3x3, 128 -> 128, 16x16 (conv3 at 128 px)           1.7                        2.8
1x1, 64 -> 256, 32x32 (conv2 at 128 px)            2.3                        1.2
=================================================  =========================  ======================

(batch 16 unless said). A SEME-ResNet50 training step at 128 px, batch 16, went from 1.00 to 0.88 CPU
seconds (30.4 to 34.0 images/s; with :class:`~covidx.training.optimizers.FusedAdam` in both).

So a 1x1 kernel's gradient is always the product (its im2col is the input itself, strided), and a
larger kernel's only on maps of at most :data:`SMALL_MAP` output positions, where its im2col (``kh * kw``
shifted slices) is small; larger maps keep oneDNN's kernel, which wins there. The input's gradient
stays oneDNN's (``Conv2DBackpropInput``), the forward pass is the same ``Conv2D`` + ``BiasAdd``, and
the bias gradient is a product with a row of ones (accumulated in float32 inside oneDNN, where Eigen's
``BiasAddGrad`` reduces bfloat16 element by element).

covidx's :class:`~covidx.layers.grouped_conv.Conv2D` computes its gradient this way where
:func:`matmul_grad_applies`; :func:`~covidx.layers.grouped_conv.fast_convolutions` swaps it into a built
model for training (as :func:`covidx.precision.fused_batch_norms` does for BN), and inference copies
turn its ungrouped layers back into Keras' ``Conv2D`` (:mod:`covidx.precision`), since the custom
gradient's identity op would stand between a convolution and the activation oneDNN fuses into it.

Depthwise convolutions (EfficientNetB0's, in the ensemble) have the opposite problem: oneDNN's bfloat16
backward-weights kernel is fine for 3x3 but slow for 5x5, slower than the same gradient in float32
including the casts of the input and the output gradient there and of the result back. Measured with
``python benchmarks/training_kernels.py --model ensemble`` on a 2-core Xeon with AMX-BF16, batch 16,
EfficientNetB0's 5x5 layers at 128 px, milliseconds (median of 20):

===============================  ===================  =====================
5x5 depthwise kernel gradient    oneDNN in bfloat16   float32 (with casts)
===============================  ===================  =====================
32x32x144, stride 2 (block3a)    14.6                 4.0
16x16x240 (block3b)              19.1                 4.1
8x8x480 (block5a)                13.7                 2.8
8x8x672 (block5b-c)              17.0                 3.8
8x8x672, stride 2 (block6a)      10.0                 2.5
4x4x1152 (block6b-d)             14.3                 3.7
===============================  ===================  =====================

while for 3x3 the bfloat16 kernel is as fast or faster (0.3-2.2 ms against 0.5-3.1). An ensemble training
step (128 px, batch 16, bfloat16) went from 2.32 to 2.15 CPU seconds (13.3 to 14.3 images/s).

So :class:`DepthwiseConv2D` computes a bfloat16 layer's kernel gradient in float32 where the kernel is
larger than 3x3 (:func:`fp32_depthwise_grad_applies`); its forward pass and input gradient stay oneDNN's
bfloat16 kernels. (The same sums as shifted multiply-reduces or one einsum measured slower still, 13-84 ms:
a depthwise kernel gradient is one small reduction per channel, not a matrix product.)
"""

from __future__ import annotations

import keras
import tensorflow as tf

SMALL_MAP = 64  # output positions per image up to which a k x k (k > 1) kernel's gradient is im2col + matmul


def _padding(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
    """Rows (or columns) padded before and after, as TensorFlow's ``SAME`` / ``VALID`` pad them."""
    if padding == "VALID":
        return 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def im2col(x, kernel_size: tuple[int, int], strides: tuple[int, int], padding: str):
    """``[N, out_h, out_w, kh * kw * C]`` patches of the NHWC tensor ``x``, in a ``(kh, kw, C)`` kernel's
    order: ``kh * kw`` strided slices of the padded input, concatenated (``x`` itself, strided, for 1x1)."""
    (kh, kw), (sh, sw) = kernel_size, strides
    h, w = x.shape[1], x.shape[2]
    top, bottom = _padding(h, kh, sh, padding)
    left, right = _padding(w, kw, sw, padding)
    out_h, out_w = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    if top or bottom or left or right:
        x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    slices = [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
              for i in range(kh) for j in range(kw)]
    return slices[0] if len(slices) == 1 else tf.concat(slices, axis=-1)


def conv2d(x, kernel, bias, strides: tuple[int, int], padding: str):
    """``conv2d(x, kernel) + bias`` (NHWC, ``bias`` may be None) with the kernel's gradient as
    ``im2col(x)^T · dy`` (module docstring) and the input's as TensorFlow's."""
    padding = padding.upper()
    kh, kw, cin, cout = kernel.shape
    tf_strides = [1, strides[0], strides[1], 1]

    @tf.custom_gradient
    def conv(x, kernel, *bias):
        y = tf.nn.conv2d(x, kernel, tf_strides, padding)
        if bias:
            y = tf.nn.bias_add(y, bias[0])

        def grad(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                                strides=tf_strides, padding=padding)
            rows = tf.reshape(dy, (-1, cout))
            cols = tf.reshape(im2col(x, (kh, kw), strides, padding), (-1, kh * kw * cin))
            dkernel = tf.reshape(tf.matmul(cols, rows, transpose_a=True), (kh, kw, cin, cout))
            if not bias:
                return dx, dkernel
            dbias = tf.reshape(tf.matmul(tf.ones((1, tf.shape(rows)[0]), rows.dtype), rows), (cout,))
            return dx, dkernel, dbias

        return y, grad

    # Variables read here, not inside: the custom gradient is with respect to the (cast) values.
    tensors = [tf.convert_to_tensor(v) for v in (x, kernel, bias) if v is not None]
    return conv(*tensors)


def matmul_grad_applies(conv: keras.layers.Conv2D, inputs) -> bool:
    """Whether ``conv``'s kernel gradient on ``inputs`` is faster as im2col + matmul (module docstring):
    bfloat16 compute, no groups or dilation, channels-last, static spatial size, and a 1x1 kernel or at most
    :data:`SMALL_MAP` output positions per image."""
    if (conv.groups != 1 or tuple(conv.dilation_rate) != (1, 1) or conv.data_format != "channels_last"
            or len(inputs.shape) != 4 or None in inputs.shape[1:3]
            or keras.backend.standardize_dtype(inputs.dtype) != "bfloat16"):
        return False
    if tuple(conv.kernel_size) == (1, 1):
        return True
    out = [-(-n // s) if conv.padding == "same" else (n - k) // s + 1
           for n, k, s in zip(inputs.shape[1:3], conv.kernel_size, conv.strides)]
    return out[0] * out[1] <= SMALL_MAP


def depthwise_conv2d(x, kernel, strides: tuple[int, int], padding: str):
    """``depthwise_conv2d(x, kernel)`` (NHWC, depth multiplier ``kernel.shape[3]``) with the kernel's gradient
    computed in float32 (module docstring) and the input's as TensorFlow's, in ``x``'s dtype."""
    padding = padding.upper()
    tf_strides = [1, strides[0], strides[1], 1]

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.depthwise_conv2d(x, kernel, tf_strides, padding)

        def grad(dy):
            dx = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
                input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=tf_strides, padding=padding)
            dkernel = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                input=tf.cast(x, tf.float32), filter_sizes=tf.shape(kernel), out_backprop=tf.cast(dy, tf.float32),
                strides=tf_strides, padding=padding)
            return dx, tf.cast(dkernel, kernel.dtype)

        return y, grad

    return conv(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel))


def fp32_depthwise_grad_applies(conv: keras.layers.DepthwiseConv2D, inputs) -> bool:
    """Whether ``conv``'s kernel gradient on ``inputs`` is faster in float32 (module docstring): bfloat16
    compute, channels-last, no dilation, and a kernel larger than 3x3."""
    return (max(conv.kernel_size) > 3 and tuple(conv.dilation_rate) == (1, 1)
            and conv.data_format == "channels_last" and len(inputs.shape) == 4
            and keras.backend.standardize_dtype(inputs.dtype) == "bfloat16")


@keras.saving.register_keras_serializable(package="covidx")
class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` whose bfloat16 kernel gradient is computed in float32 where
    :func:`fp32_depthwise_grad_applies` (module docstring). Its outputs, weights and config are Keras'; named
    like Keras' class (registered as ``covidx>DepthwiseConv2D``) so that weights files load either way, as
    :class:`covidx.layers.grouped_conv.Conv2D`. :func:`~covidx.layers.grouped_conv.fast_convolutions` swaps it
    into what covidx trains; inference copies turn it back into Keras' (:mod:`covidx.precision`)."""

    def call(self, inputs):
        if not fp32_depthwise_grad_applies(self, inputs):
            return super().call(inputs)
        y = depthwise_conv2d(inputs, self.kernel, tuple(self.strides), self.padding)
        if self.use_bias:
            y = tf.nn.bias_add(y, self.bias)
        return self.activation(y) if self.activation is not None else y
