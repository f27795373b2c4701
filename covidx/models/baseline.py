"""keras.applications baselines: a backbone built on the covidx input, GAP, dropout, softmax head.

These are the reference points every paper model is compared with, and the
default model of ``python -m covidx.train``. The backbone is built on the outer
input tensor (``input_tensor=``) rather than nested as a sub-model, so its
layers are part of one flat graph and Grad-CAM can reach any of them
(a nested backbone breaks ``keras.Model(inputs, layer.output)`` in Keras 3).
"""

from __future__ import annotations

import keras
import numpy as np

from covidx.layers import ImageNormalization
from covidx.layers.normalization import IMAGENET_MEAN, IMAGENET_STD, track_batch_statistics
from covidx.models.registry import Preset, register_model
from covidx.weights import resolve_weights

# arch -> (application, its pixel normalisation, its last convolutional feature map for Grad-CAM)
APPLICATIONS = {
    "mobilenetv2": (keras.applications.MobileNetV2, "symmetric", "out_relu"),
    "resnet50": (keras.applications.ResNet50, "caffe", "conv5_block3_out"),
    "densenet121": (keras.applications.DenseNet121, "imagenet", "relu"),
    "densenet169": (keras.applications.DenseNet169, "imagenet", "relu"),
    "efficientnetb0": (keras.applications.EfficientNetB0, "raw", "top_activation"),
}


def efficientnet_std_fix(x, name: str):
    """Input scaling that reproduces keras.applications' ImageNet EfficientNet normalisation.

    EfficientNet's ImageNet ``Normalization`` layer stores the RGB standard deviations as
    its variance, so keras.applications adds ``Rescaling(1 / sqrt(std))`` after it, but only
    when called with ``weights="imagenet"`` (which would download); with a local file path
    that layer is missing (tensorflow#49930). The same correction is applied before the
    backbone instead: with ``y = s x + 255 mean (1 - s)``, ``s = 1 / sqrt(std)`` per channel, the
    backbone's ``(y / 255 - mean) / sqrt(std)`` equals the intended ``(x / 255 - mean) / std``.
    """
    # keras.applications' IMAGENET_STDDEV_RGB and the mean stored in the file are the
    # usual ImageNet statistics.
    scale = [float(1.0 / np.sqrt(s)) for s in IMAGENET_STD]
    offset = [float(255.0 * m * (1.0 - c)) for m, c in zip(IMAGENET_MEAN, scale)]
    return keras.layers.Rescaling(scale=scale, offset=offset, name=name)(x)


def build_application_classifier(
    arch: str,
    num_classes: int,
    input_shape,
    weights=None,
    normalization=None,
    dropout: float = 0.2,
    name: str | None = None,
):
    """keras.applications ``arch`` without top -> GAP -> dropout -> Dense(softmax)."""
    app, default_norm, _ = APPLICATIONS[arch]
    path = resolve_weights(arch, weights)
    if path is not None and input_shape[-1] != 3:
        raise ValueError(f"ImageNet weights for {arch} need 3-channel input, got {input_shape[-1]}")
    inputs = keras.Input(input_shape, name="image")
    x = ImageNormalization(normalization or default_norm, name="normalize")(inputs)
    if arch == "efficientnetb0" and path is not None:
        x = efficientnet_std_fix(x, "normalize_std")
    backbone = app(include_top=False, weights=path, input_tensor=x)
    if path is None:
        track_batch_statistics(backbone.layers)  # from scratch: BN statistics that follow training
    x = keras.layers.GlobalAveragePooling2D(name="gap")(backbone.output)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name or f"baseline_{arch}")


def _register(arch, preset):
    def builder(num_classes, input_shape, weights=None, normalization=None, **kwargs):
        return build_application_classifier(arch, num_classes, input_shape, weights, normalization, **kwargs)

    builder.__name__ = f"baseline_{arch}"
    register_model(
        f"baseline-{arch}",
        preset,
        description=f"keras.applications {arch} + GAP + softmax (baseline)",
        gradcam_layer=APPLICATIONS[arch][2],
    )(builder)


_BASE = Preset(
    task="4class", image_size=224, channels=3, optimizer="adam", learning_rate=1e-3,
    batch_size=32, epochs=30, augment="light", schedule="cosine",
)
for _arch, (_, _norm, _) in APPLICATIONS.items():
    _register(_arch, _BASE.replace(normalization=_norm))
