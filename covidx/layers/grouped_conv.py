"""covidx's ``Conv2D``: Keras' layer, fast on CPUs in training too. Two cases differ from Keras':

* ``groups > 1`` (DPN's 3x3 group-32 convolutions), below.
* Ungrouped layers computing in bfloat16 take their kernel gradient as one matrix product where
  oneDNN's backward-weights kernel is slow (:mod:`covidx.layers.convolution`); what covidx trains has
  every ``keras.layers.Conv2D`` swapped for this class (:func:`fast_convolutions`).

Grouped convolutions: Keras 3's TensorFlow backend wraps every grouped convolution
(``Conv2D(groups > 1)``) in a separate ``tf.function(jit_compile=True)``, because TensorFlow's
plain Eigen CPU kernels reject ``feature_group_count > 1``. XLA's CPU emitter has no fast path for
grouped convolutions, and its gradient is far worse. Measured with ``benchmarks/grouped_conv.py`` on a
2-core AMD EPYC (Zen 5) under load from other jobs, one 3x3 group-32 convolution of DPN-92's conv3
(batch 8, 28x28, 192 channels, 6 per group), milliseconds:

==========================  =========  ===================
formulation                 forward    forward + backward
==========================  =========  ===================
Keras (XLA per layer)       389        42,300
TF/oneDNN grouped Conv2D    63         147
32 per-group Conv2D+concat  20         30
==========================  =========  ===================

and at conv4 of a 128-px batch of 16 (8x8, 384 channels): 50 | 12,363 (Keras), 13 | 14 (oneDNN),
18 | 30 (per group). TensorFlow's x86 builds
route ``Conv2D`` through oneDNN (``TF_ENABLE_ONEDNN_OPTS``, on by default), which supports groups
natively in both directions, and cuDNN does on GPUs. So :class:`GroupedConv2D` calls
``tf.nn.convolution`` with the grouped kernel directly, without XLA; where the runtime cannot (oneDNN
disabled and no GPU), it falls back to the same computation written as one convolution per group
and a concatenation, which every backend supports.

It is a :class:`keras.layers.Conv2D` in every other respect: same weights (``kernel`` of shape
``(kh, kw, in_channels / groups, filters)``, same order), same config plus nothing, so a network
built with it has the parameter count and outputs of the ``Conv2D`` one, and the weights of either
load into the other.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import tensorflow as tf

from covidx.layers.convolution import DepthwiseConv2D, conv2d, matmul_grad_applies

_NATIVE_SUPPORT: dict[str, bool] = {}


def native_grouped_conv_supported(dtype="float32") -> bool:
    """Whether ``tf.nn.convolution`` runs a grouped kernel (forward and gradients) here without XLA.

    Probed once per dtype on a tiny input and checked against the per-group formulation (a runtime
    that accepts the op but computes it wrongly counts as unsupported). The probe runs eagerly in a
    thread of its own: the caller may be tracing a graph, and ``tf.init_scope`` would also pause the
    gradient tape the probe needs.
    """
    dtype = tf.as_dtype(dtype).name
    if dtype not in _NATIVE_SUPPORT:
        with ThreadPoolExecutor(1) as pool:
            _NATIVE_SUPPORT[dtype] = pool.submit(_probe, dtype).result()
    return _NATIVE_SUPPORT[dtype]


def _probe(dtype: str) -> bool:
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((1, 5, 5, 4)), dtype=dtype)
    k = tf.constant(rng.standard_normal((3, 3, 2, 4)), dtype=dtype)
    results = []
    try:
        for conv in (lambda: tf.nn.convolution(x, k, 1, "SAME"), lambda: split_grouped_conv(x, k, 1, "SAME", 2)):
            with tf.GradientTape() as tape:
                tape.watch([x, k])
                y = conv()
                loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
            results.append([y, *tape.gradient(loss, [x, k])])
    except (tf.errors.OpError, ValueError, TypeError):
        return False
    tol = 1e-3 if dtype == "float32" else 0.1
    return all(
        a is not None and b is not None and np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
        for a, b in zip(*results)
    )


def split_grouped_conv(x, kernel, strides, padding: str, groups: int, dilations=1):
    """The grouped convolution as ``groups`` ordinary convolutions and a concatenation (NHWC)."""
    xs = tf.split(x, groups, axis=-1)
    ks = tf.split(kernel, groups, axis=-1)
    return tf.concat(
        [tf.nn.convolution(a, b, strides, padding, dilations=dilations) for a, b in zip(xs, ks)], axis=-1
    )


@keras.saving.register_keras_serializable(package="covidx")
class Conv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with ``groups > 1`` computed without per-layer XLA, and bfloat16 kernel gradients
    as one matmul where :func:`~covidx.layers.convolution.matmul_grad_applies` (see module docstring).

    Channels-last only (covidx's layout). Its outputs are ``Conv2D``'s. Exported as
    :data:`GroupedConv2D`. The class is *named* ``Conv2D`` (registered as ``covidx>Conv2D``) because
    Keras names a layer's entries in a ``.weights.h5`` file after its class: with the same name, a
    weights file of a network built with ``keras.layers.Conv2D`` loads into one built with this layer
    and vice versa.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.data_format != "channels_last":
            raise ValueError("GroupedConv2D supports data_format='channels_last' only")

    def call(self, inputs):
        if not matmul_grad_applies(self, inputs):
            return super().call(inputs)
        y = conv2d(inputs, self.kernel, self.bias if self.use_bias else None, tuple(self.strides), self.padding)
        return self.activation(y) if self.activation is not None else y

    def convolution_op(self, inputs, kernel):
        if self.groups == 1 or keras.backend.backend() != "tensorflow":
            return super().convolution_op(inputs, kernel)
        padding = self.padding.upper()
        if native_grouped_conv_supported(kernel.dtype):
            return tf.nn.convolution(inputs, kernel, self.strides, padding, dilations=self.dilation_rate)
        return split_grouped_conv(inputs, kernel, self.strides, padding, self.groups, self.dilation_rate)


GroupedConv2D = Conv2D


def fast_convolutions(model: keras.Model) -> keras.Model:
    """Make every ``keras.layers.Conv2D`` in ``model`` (nested models and sublayers included) covidx's
    :class:`Conv2D`, and every ``keras.layers.DepthwiseConv2D`` covidx's
    :class:`~covidx.layers.convolution.DepthwiseConv2D`, in place, and return ``model``: what covidx trains, for
    their bfloat16 kernel gradients (:mod:`covidx.layers.convolution`). A layer keeps its weights, state, config
    and, since each class has Keras' name, the names of its entries in weights files; only ``call`` differs, so
    changing the class is the whole swap. Swap before the model is compiled or called."""
    swaps = {keras.layers.Conv2D: Conv2D, keras.layers.DepthwiseConv2D: DepthwiseConv2D}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer) in swaps:
            layer.__class__ = swaps[type(layer)]
    return model
