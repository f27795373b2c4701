"""Squeeze-and-Excitation (Hu, Shen & Sun, "Squeeze-and-Excitation Networks", CVPR 2018, §3).

Used by SE-ResNet50 / SEME-DenseNet169 (Cascade-SEME, Lv et al. 2021, §4.B) and SE-DPN (Cheng et al.).
"""

from __future__ import annotations

import keras
from keras import ops

from covidx.layers.pooling import global_average_pool


@keras.saving.register_keras_serializable(package="covidx")
class SqueezeExcite(keras.layers.Layer):
    """Channel attention: GAP -> FC(C/r) -> ReLU -> FC(C) -> sigmoid -> rescale the input.

    Both FCs carry biases, as in the official SE-ResNet-50 prototxt (1x1 convolutions
    with bias). With ``r = 16`` and ``C = 256`` the block adds ``256*16+16 + 16*256+256``
    parameters.

    Args:
        ratio: reduction ratio ``r`` (16 in the SENet paper).
        min_units: lower bound on the bottleneck width ``C // r``.
        kernel_initializer: initialiser of both FC kernels.
    """

    def __init__(self, ratio: int = 16, min_units: int = 1, kernel_initializer="he_uniform", **kwargs):
        super().__init__(**kwargs)
        self.ratio = int(ratio)
        self.min_units = int(min_units)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        units = max(self.min_units, channels // self.ratio)
        self.squeeze = keras.layers.Dense(
            units, activation="relu", kernel_initializer=self.kernel_initializer, name="reduce"
        )
        self.excite = keras.layers.Dense(
            channels, activation="sigmoid", kernel_initializer=self.kernel_initializer, name="expand"
        )
        self.squeeze.build((input_shape[0], channels))
        self.excite.build((input_shape[0], units))

    def call(self, x):
        s = global_average_pool(x)  # squeeze
        s = self.excite(self.squeeze(s))  # excitation
        return x * ops.cast(s[:, None, None, :], x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "ratio": self.ratio,
            "min_units": self.min_units,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
