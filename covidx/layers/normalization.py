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

# tf.nn.fused_batch_norm raises a smaller epsilon to this; InferenceBatchNormalization falls back below it.
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
class InferenceBatchNormalization(keras.layers.BatchNormalization):
    """``BatchNormalization`` whose inference is one fused kernel, in the input's own dtype.

    At inference BN is one per-channel affine ``x * scale + shift`` (``scale = gamma / sqrt(var + eps)``,
    ``shift = beta - mean * scale``). Keras computes it as separate element-wise operations, each a pass over
    the feature map, and upcasts bfloat16/float16 inputs to float32 first (which training needs: batch moments
    of low-precision activations lose the mean or overflow). Here a 4-D channels-last input goes through
    TensorFlow's ``FusedBatchNormV3`` (oneDNN on CPUs), with the statistics in float32 and the feature map in
    its own dtype, as PyTorch's eval-mode BN and autocast do: no float32 copy of a bf16 map, one pass over it
    instead of two or more.

    Training, masks, other layouts and an epsilon below the fused kernel's floor (1.001e-5) take the parent's
    path; weights and config are the parent's, so a checkpoint's BN layers load into it as they are.
    :func:`covidx.precision.with_precision` swaps it in for inference.
    """

    def call(self, inputs, training=None, mask=None):
        axis = self.axis if self.axis >= 0 else self.axis + len(inputs.shape)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if ((training and self.trainable) or mask is not None or len(inputs.shape) != 4 or axis != 3
                or self.epsilon < FUSED_BN_MIN_EPSILON or dtype not in ("float32", "bfloat16", "float16")):
            return super().call(inputs, training=training, mask=mask)
        mean = ops.cast(self.moving_mean, "float32")
        scale = ops.cast(self.gamma, "float32") if self.scale else ops.ones_like(mean)
        offset = ops.cast(self.beta, "float32") if self.center else ops.zeros_like(mean)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(inputs, scale, offset, mean=mean,
                                                   variance=ops.cast(self.moving_variance, "float32"),
                                                   epsilon=self.epsilon, is_training=False)
        return y
