"""Segmentation losses and metrics for the lung U-Net and FC-DenseNet103.

Conventions (same as the batches of :mod:`covidx.training.trainers`): ``y_true`` is an
integer class map ``(B, H, W)`` or ``(B, H, W, 1)``; ``y_pred`` is the model's per-pixel
softmax ``(B, H, W, C)``. Losses return one value per image ``(B,)`` so that per-image
``sample_weight`` works with Keras' reduction; metrics accept per-image ``(B,)`` or
per-pixel ``(B, H, W)`` weights.

The ensemble paper trains FC-DenseNet103 with a region-based objective and reports Dice and
IoU (Sec. IV-D); the cascade paper reports mean IoU of its lung U-Net (Sec. 6.B.2). Soft Dice
follows Milletari et al. (V-Net, 3DV 2016, Eq. 1 with the squares dropped):
``Dice_c = (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)`` over the pixels of one image.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops


def _class_map(y_true):
    """Integer class map ``(B, H, W)`` from ``(B, H, W)`` or ``(B, H, W, 1)`` labels."""
    if len(y_true.shape) == 4:
        if y_true.shape[-1] != 1:
            raise ValueError(f"y_true must be an integer class map (B, H, W[, 1]), got shape {y_true.shape}")
        y_true = ops.squeeze(y_true, axis=-1)
    return ops.cast(y_true, "int32")


@keras.saving.register_keras_serializable(package="covidx")
def pixel_cross_entropy(y_true, y_pred):
    """Sparse categorical cross-entropy on softmax probabilities, averaged over the pixels of each image."""
    y_pred = ops.cast(y_pred, "float32")
    ce = ops.sparse_categorical_crossentropy(_class_map(y_true), y_pred, from_logits=False)
    return ops.mean(ce, axis=(1, 2))


@keras.saving.register_keras_serializable(package="covidx")
def dice_loss(y_true, y_pred, smooth: float = 1.0, include_background: bool = True):
    """Soft Dice loss per image: ``1 - mean_c Dice_c`` on softmax probabilities.

    Args:
        y_true: integer class map ``(B, H, W)`` or ``(B, H, W, 1)``.
        y_pred: softmax probabilities ``(B, H, W, C)``.
        smooth: added to numerator and denominator; it keeps a class that is absent from both
            target and prediction at Dice 1 (no gradient blow-up on lesion-free images).
        include_background: average over all classes (default) or over classes 1.. only.

    Returns:
        ``(B,)`` losses in [0, 1].
    """
    y_pred = ops.cast(y_pred, "float32")
    num_classes = y_pred.shape[-1]
    target = ops.one_hot(_class_map(y_true), num_classes, dtype="float32")
    if not include_background:
        target, y_pred = target[..., 1:], y_pred[..., 1:]
    intersection = ops.sum(target * y_pred, axis=(1, 2))
    denominator = ops.sum(target, axis=(1, 2)) + ops.sum(y_pred, axis=(1, 2))
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - ops.mean(dice, axis=-1)


@keras.saving.register_keras_serializable(package="covidx")
def dice_cross_entropy_loss(
    y_true,
    y_pred,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    smooth: float = 1.0,
    include_background: bool = True,
):
    """``dice_weight * dice_loss + ce_weight * pixel_cross_entropy`` per image.

    Cross-entropy gives dense per-pixel gradients early in training; Dice counters the
    foreground/background imbalance of small lesions.
    """
    dice = dice_loss(y_true, y_pred, smooth=smooth, include_background=include_background)
    return dice_weight * dice + ce_weight * pixel_cross_entropy(y_true, y_pred)


@keras.saving.register_keras_serializable(package="covidx")
class PixelCrossEntropy(keras.losses.Loss):
    """Loss class of :func:`pixel_cross_entropy`."""

    def __init__(self, name: str = "pixel_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return pixel_cross_entropy(y_true, y_pred)


@keras.saving.register_keras_serializable(package="covidx")
class DiceCrossEntropyLoss(keras.losses.Loss):
    """Weighted soft Dice + pixel cross-entropy (:func:`dice_cross_entropy_loss`).

    ``ce_weight=0`` gives the pure Dice loss (:class:`DiceLoss`).
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        smooth: float = 1.0,
        include_background: bool = True,
        name: str = "dice_cross_entropy",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.smooth = float(smooth)
        self.include_background = bool(include_background)

    def call(self, y_true, y_pred):
        dice = dice_loss(y_true, y_pred, smooth=self.smooth, include_background=self.include_background)
        if not self.ce_weight:
            return self.dice_weight * dice
        return self.dice_weight * dice + self.ce_weight * pixel_cross_entropy(y_true, y_pred)

    def get_config(self):
        return {
            **super().get_config(),
            "dice_weight": self.dice_weight,
            "ce_weight": self.ce_weight,
            "smooth": self.smooth,
            "include_background": self.include_background,
        }


@keras.saving.register_keras_serializable(package="covidx")
class DiceLoss(DiceCrossEntropyLoss):
    """Soft Dice loss (:func:`dice_loss`)."""

    def __init__(self, smooth: float = 1.0, include_background: bool = True, name: str = "dice", **kwargs):
        super().__init__(1.0, 0.0, smooth, include_background, name=name, **kwargs)

    def get_config(self):
        config = super().get_config()
        del config["dice_weight"], config["ce_weight"]
        return config


LOSSES = {
    "dice": DiceLoss,
    "dice_ce": DiceCrossEntropyLoss,
    "dice_cross_entropy": DiceCrossEntropyLoss,
    "ce": PixelCrossEntropy,
    "cross_entropy": PixelCrossEntropy,
}


def segmentation_loss(name: str, **kwargs) -> keras.losses.Loss:
    """Loss object by name: ``dice``, ``dice_ce`` (``dice_cross_entropy``) or ``ce`` (``cross_entropy``)."""
    try:
        cls = LOSSES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown segmentation loss {name!r}; choose one of {', '.join(LOSSES)}") from None
    return cls(**kwargs)


class _OverlapMetric(keras.metrics.Metric):
    """Accumulates per-class intersection, predicted and true pixel counts over a dataset.

    Predictions are hard (argmax of the softmax); counts are summed over every pixel seen
    (dataset-level score, as Keras' ``MeanIoU``), then averaged over ``class_ids``.
    """

    def __init__(self, class_ids: Sequence[int] = (1,), name: str | None = None, dtype=None, **kwargs):
        super().__init__(name=name, dtype=dtype, **kwargs)
        self.class_ids = tuple(int(c) for c in class_ids)
        if not self.class_ids:
            raise ValueError("class_ids must name at least one class")
        n = len(self.class_ids)
        self.intersection = self.add_variable((n,), initializer="zeros", name="intersection")
        self.predicted = self.add_variable((n,), initializer="zeros", name="predicted")
        self.actual = self.add_variable((n,), initializer="zeros", name="actual")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = _class_map(y_true)
        predicted = ops.argmax(y_pred, axis=-1)
        ids = ops.convert_to_tensor(self.class_ids, "int32")
        true_hot = ops.cast(ops.equal(labels[..., None], ids), "float32")  # (B, H, W, n)
        pred_hot = ops.cast(ops.equal(ops.cast(predicted, "int32")[..., None], ids), "float32")
        hits = true_hot * pred_hot
        if sample_weight is not None:
            weight = ops.cast(sample_weight, "float32")
            while len(weight.shape) < 4:  # (B,) per image or (B, H, W) per pixel -> (B, H, W, 1)
                weight = ops.expand_dims(weight, -1)
            true_hot, pred_hot, hits = true_hot * weight, pred_hot * weight, hits * weight
        axes = (0, 1, 2)
        self.intersection.assign_add(ops.sum(hits, axis=axes))
        self.predicted.assign_add(ops.sum(pred_hot, axis=axes))
        self.actual.assign_add(ops.sum(true_hot, axis=axes))

    def reset_state(self):
        for v in (self.intersection, self.predicted, self.actual):
            v.assign(ops.zeros_like(v))

    def get_config(self):
        return {**super().get_config(), "class_ids": list(self.class_ids)}


@keras.saving.register_keras_serializable(package="covidx")
class DiceCoefficient(_OverlapMetric):
    """Dice = 2|P∩G| / (|P| + |G|) of the argmax mask, averaged over ``class_ids`` (default: foreground 1).

    A class absent from both prediction and target over everything seen scores 1.
    """

    def __init__(self, class_ids: Sequence[int] = (1,), name: str = "dice", **kwargs):
        super().__init__(class_ids, name=name, **kwargs)

    def result(self):
        denominator = self.predicted + self.actual
        dice = ops.where(denominator > 0, 2.0 * self.intersection / ops.maximum(denominator, 1e-12), 1.0)
        return ops.mean(dice)


@keras.saving.register_keras_serializable(package="covidx")
class IoUScore(_OverlapMetric):
    """IoU (Jaccard) = |P∩G| / |P∪G| of the argmax mask, averaged over ``class_ids``.

    The default ``class_ids=(1,)`` is the foreground IoU; ``class_ids=(0, 1)`` is the mean
    IoU over both classes (Keras ``MeanIoU``; the cascade paper's "mean-IoU").
    """

    def __init__(self, class_ids: Sequence[int] = (1,), name: str = "iou", **kwargs):
        super().__init__(class_ids, name=name, **kwargs)

    def result(self):
        union = self.predicted + self.actual - self.intersection
        iou = ops.where(union > 0, self.intersection / ops.maximum(union, 1e-12), 1.0)
        return ops.mean(iou)
