"""Global average pooling as one pooling kernel (the squeeze of Squeeze-and-Excitation, SENet §3.1)."""

from __future__ import annotations

import functools

import tensorflow as tf
from keras import ops

# The probe map: 65,536 values in [0, 1). A kernel summing in 16 bits, even over 16 or 32 vector lanes,
# loses most of it (bfloat16 keeps 8 significant bits, float16 11 and overflows at 65,504).
_PROBE_SIDE = 256


@functools.lru_cache(maxsize=None)
def pools_in_wide_precision(dtype: str) -> bool:
    """Whether this machine's average-pooling kernel for ``dtype`` accumulates in a wider type.

    oneDNN's (TensorFlow's x86 default) sums a bfloat16 map in float32; Eigen's, which runs instead for
    float16, with oneDNN turned off (``TF_ENABLE_ONEDNN_OPTS=0``) or on CPUs oneDNN's bfloat16 kernels do
    not cover, sums in the 16-bit type and returns nonsense for a large map (mean 0.5 for a 128x128 map
    of 0.5-mean values: ~0). Checked once per dtype against a float32 mean, on a map as large as a
    512 px network's first stage (256 x 256), where a 16-bit sum is far off.
    """
    if dtype == "float32" or dtype == "float64":
        return True
    with tf.init_scope():  # eagerly, also while a graph is being traced
        values = tf.cast(tf.random.stateless_uniform((1, _PROBE_SIDE, _PROBE_SIDE, 1), (0, 0)), dtype)
        pooled = tf.nn.avg_pool2d(values, _PROBE_SIDE, _PROBE_SIDE, "VALID")
        error = tf.abs(tf.cast(tf.reshape(pooled, ()), "float32") - tf.reduce_mean(tf.cast(values, "float32")))
        return float(error) < 0.01  # rounding the mean (~0.5) to bfloat16 alone costs up to 0.002


def global_average_pool(x, keepdims: bool = False):
    """Mean of ``x`` (NHWC) over height and width, as one average pooling over the whole map.

    Equal to ``ops.mean(x, axis=(1, 2))`` up to float rounding, and cheaper on a CPU: oneDNN's pooling
    kernel reads the map once in its own dtype, where Keras' ``ops.mean`` runs a slower reduction and, for a
    16-bit map, first casts the whole map to float32 and back (4x128x128x256 map, 2 cores of an AMX Xeon:
    float32 2.0 ms against 9.3, bfloat16 1.3 ms against 9.5 plus the casts; SEME-ResNet50 inference at
    512 px in bfloat16 1.5x faster). Where the pooling kernel would sum in 16 bits
    (:func:`pools_in_wide_precision`), the map is pooled in float32. A map whose height or width is
    unknown until run time falls back to ``ops.mean``.
    """
    height, width = x.shape[1], x.shape[2]
    if height is None or width is None:
        return ops.mean(x, axis=(1, 2), keepdims=keepdims)
    dtype = x.dtype if isinstance(x.dtype, str) else x.dtype.name
    pooled = x if pools_in_wide_precision(dtype) else tf.cast(x, "float32")
    pooled = tf.cast(tf.nn.avg_pool2d(pooled, (height, width), (height, width), "VALID"), dtype)
    return pooled if keepdims else ops.squeeze(pooled, axis=(1, 2))
