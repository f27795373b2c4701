"""In-graph pixel normalisation, so that a model carries its own preprocessing.

Every covidx model takes float pixels in [0, 255] (grayscale or RGB, as its
preset says) and normalises them with :class:`ImageNormalization` as its first
layer. Training, ``covidx.predict`` and the TF Serving export then feed the same
tensor and cannot disagree about scaling (the most reported failure of chest
X-ray model code, see torchxrayvision#89 and COVID-Net#102).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# keras.applications "caffe" mode: BGR order, mean subtraction on 0..255.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

MODES = ("imagenet", "caffe", "symmetric", "unit", "zscore", "raw")

# tf.nn.fused_batch_norm raises a smaller epsilon to this; FusedBatchNormalization falls back below it.
FUSED_BN_MIN_EPSILON = 1.001e-5

# PyTorch's BatchNorm momentum 0.1 in Keras' convention (moving = momentum * moving + (1 - momentum) * batch).
TORCH_BN_MOMENTUM = 0.9


def track_batch_statistics(layers, momentum: float = TORCH_BN_MOMENTUM) -> int:
    """Set the moving-average momentum of every ``BatchNormalization`` among ``layers``; returns how many.

    keras.applications builds its BN layers with momentum 0.99 (0.999 in MobileNetV2): from scratch,
    the moving statistics then stay near their initial values for hundreds of steps while the
    weights move fast, so validation and inference see a different network than training (seen:
    MAG-SD's validation AUC at 0.50 while its training AUC rose to 0.75). 0.9 follows training
    within tens of steps. Call before the model is first traced (the momentum is read at trace time).
    """
    count = 0
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            count += 1
    return count


@keras.saving.register_keras_serializable(package="covidx")
class ImageNormalization(keras.layers.Layer):
    """Normalise [0, 255] pixels the way a backbone expects.

    Modes:
        ``imagenet`` (a.k.a. keras "torch"): ``(x/255 - mean) / std`` with ImageNet statistics;
        ``caffe``: RGB -> BGR and ImageNet mean subtraction, no scaling (VGG, keras ResNet);
        ``symmetric``: ``x/127.5 - 1`` (range [-1, 1]);
        ``unit``: ``x/255`` (range [0, 1]);
        ``zscore``: per-image standardisation ``(x - mean(x)) / std(x)`` (MAG-SD);
        ``raw``: identity (EfficientNet normalises inside its own graph).

    For 1-channel input the ImageNet statistics are averaged over RGB.
    """

    def __init__(self, mode: str = "imagenet", epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}; choose one of {MODES}")
        self.mode = mode
        self.epsilon = epsilon

    def _stats(self, channels: int):
        if self.mode == "imagenet":
            mean, std = [m * 255.0 for m in IMAGENET_MEAN], [s * 255.0 for s in IMAGENET_STD]
        else:  # caffe
            mean, std = list(CAFFE_MEAN_BGR), [1.0, 1.0, 1.0]
        if channels == 1:
            mean, std = [sum(mean) / 3.0], [sum(std) / 3.0]
        elif channels != 3:
            raise ValueError(f"{self.mode!r} normalisation needs 1 or 3 channels, got {channels}")
        return mean, std

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode in ("imagenet", "caffe"):
            channels = x.shape[-1]
            if self.mode == "caffe" and channels == 3:
                x = ops.flip(x, axis=-1)
            mean, std = self._stats(channels)
            return (x - ops.convert_to_tensor(mean, x.dtype)) / ops.convert_to_tensor(std, x.dtype)
        if self.mode == "symmetric":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "zscore":
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            std = ops.std(x, axis=(1, 2, 3), keepdims=True)
            return (x - mean) / ops.maximum(std, self.epsilon)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="covidx")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``BatchNormalization`` as TensorFlow's fused kernel, in training and at inference, in the input's dtype.

    Keras computes BN as separate element-wise operations, each a pass over the feature map: in training
    the batch moments, the affine and, in the backward pass, the gradient of each; at inference the affine
    ``x * scale + shift``. It also upcasts bfloat16/float16 feature maps to float32 first. Here a 4-D
    channels-last input goes through ``FusedBatchNormV3`` (oneDNN on CPUs) forward and
    ``FusedBatchNormGradV3`` backward: one kernel each, in the feature map's own dtype, with the statistics
    and their accumulation in float32, as PyTorch's BN does (eval mode and autocast included).

    Training normalises with the batch mean and biased variance and updates the moving statistics as the
    parent does (``momentum * moving + (1 - momentum) * batch``, biased batch variance: the kernel's
    Bessel-corrected variance is scaled back by ``(n - 1) / n``). Masks, other layouts, an epsilon below
    the kernel's floor (1.001e-5), batch renormalisation and cross-replica (``synchronized``) statistics
    take the parent's path. Weights and config are the parent's, so a checkpoint's BN layers load into it
    as they are. Swapped in by :func:`covidx.precision.fused_batch_norms` (training) and
    :func:`covidx.precision.inference_copy` (every inference path).
    """

    def _fused(self, inputs, mask) -> bool:
        axis = self.axis if self.axis >= 0 else self.axis + len(inputs.shape)
        return (mask is None and len(inputs.shape) == 4 and axis == 3 and self.epsilon >= FUSED_BN_MIN_EPSILON
                and not self.renorm and not self.synchronized
                and keras.backend.standardize_dtype(inputs.dtype) in ("float32", "bfloat16", "float16"))

    def call(self, inputs, training=None, mask=None):
        if not self._fused(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        ones = ops.ones(self.moving_mean.shape, "float32")
        scale = ops.cast(self.gamma, "float32") if self.scale else ones
        offset = ops.cast(self.beta, "float32") if self.center else ops.zeros_like(ones)
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(inputs, scale, offset, epsilon=self.epsilon,
                                                                 is_training=True)
            n = ops.cast(ops.size(inputs) // ops.shape(inputs)[-1], "float32")
            variance = variance * ops.maximum(n - 1.0, 0.0) / n
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return y
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(inputs, scale, offset, mean=ops.cast(self.moving_mean, "float32"),
                                                   variance=ops.cast(self.moving_variance, "float32"),
                                                   epsilon=self.epsilon, is_training=False)
        return y
