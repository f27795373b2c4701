"""MAG-SD infection localisation from attention maps and its IoU (Li et al. 2021, §4.4.6, Eq. 12).

The attention maps come from the trained network (:func:`covidx.models.magsd.attention_view`); the
same upsampling and box extraction serve attention-guided augmentation in training
(:mod:`covidx.training.magsd`).
"""

from __future__ import annotations

import tensorflow as tf

from covidx.training.magsd import mask_boxes, upsample_maps


def localize(attention_maps, image_size, threshold: float = 0.5, relative: bool = True):
    """Infection localisation from attention (§4.4.6): upsampled map, mask and enclosing box.

    Args:
        attention_maps: ``(B, h, w, M)`` (averaged over the M maps, the code's evaluation-mode map) or ``(B, h, w)``.
        image_size: ``(H, W)`` to upsample to (bilinear, half-pixel centres).
        threshold: mask = upsampled map ``>= threshold * max`` (``relative=True``, max of the upsampled
            map) or ``>= threshold`` (``relative=False``; the code's localize.py uses absolute 0.75 / 0.85).

    Returns:
        ``(maps (B, H, W) float32, masks (B, H, W) bool, boxes (B, 4) int32 [y0, x0, y1, x1))``; the box
        encloses the whole mask (the paper's "enclosing the localisation masks with rectangles"), all
        zeros for an empty mask.
    """
    a = tf.cast(attention_maps, tf.float32)
    if a.shape.rank == 4:
        a = tf.reduce_mean(a, axis=-1)
    up = upsample_maps(a, image_size)
    thr = threshold * tf.reduce_max(up, axis=(1, 2), keepdims=True) if relative else threshold
    mask = up >= thr
    boxes, nonempty = mask_boxes(mask)
    return up, mask, tf.where(nonempty[:, None], boxes, 0)


def boxes_to_masks(boxes, image_size):
    """Boolean masks ``(B, H, W)`` of boxes ``[y0, x0, y1, x1)``."""
    boxes = tf.cast(boxes, tf.int32)
    rows = tf.range(image_size[0])[None, :]
    cols = tf.range(image_size[1])[None, :]
    in_y = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 2:3])
    in_x = (cols >= boxes[:, 1:2]) & (cols < boxes[:, 3:4])
    return in_y[:, :, None] & in_x[:, None, :]


def box_iou(boxes_a, boxes_b):
    """IoU (Eq. 12) of paired boxes ``[y0, x0, y1, x1)`` -> ``(B,)``; 0 when both are empty."""
    a = tf.cast(boxes_a, tf.float32)
    b = tf.cast(boxes_b, tf.float32)
    ih = tf.maximum(tf.minimum(a[:, 2], b[:, 2]) - tf.maximum(a[:, 0], b[:, 0]), 0.0)
    iw = tf.maximum(tf.minimum(a[:, 3], b[:, 3]) - tf.maximum(a[:, 1], b[:, 1]), 0.0)
    inter = ih * iw
    area = lambda z: tf.maximum(z[:, 2] - z[:, 0], 0.0) * tf.maximum(z[:, 3] - z[:, 1], 0.0)  # noqa: E731
    union = area(a) + area(b) - inter
    return tf.math.divide_no_nan(inter, union)


def mask_iou(masks_a, masks_b):
    """IoU (Eq. 12) of paired boolean masks ``(B, H, W)`` -> ``(B,)``; 0 when both are empty."""
    a, b = tf.cast(masks_a, tf.bool), tf.cast(masks_b, tf.bool)
    inter = tf.reduce_sum(tf.cast(a & b, tf.float32), axis=(1, 2))
    union = tf.reduce_sum(tf.cast(a | b, tf.float32), axis=(1, 2))
    return tf.math.divide_no_nan(inter, union)
