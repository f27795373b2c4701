"""Augmentation presets named after the papers, applied per image with stateless seeds.

Geometric transforms get one random draw per image and apply it identically to
the image (bilinear) and its masks (nearest), so lung and lesion masks stay
aligned. Photometric transforms touch the image only. Images are float32
``(H, W, 1)`` in [0, 255]; masks uint8 ``(H, W, K)``.

Presets (``Preset.augment`` / ``--augment``):

``none``     nothing.
``light``    rotation ±10°, zoom ±10 %, translation ±5 %, horizontal flip (baselines).
``cascade``  rotation ±30° (Cascade-SEME, Lv et al. 2021, §6.A.3: "randomly rotate ... ±30°").
``se-dpn``   the paper's Fig. 1 step 3 after its random 224 crop: horizontal and vertical flip,
             rotation ±30°, scale 0.9–1.1 (affine values of the authors' code, ChengBo5/covid19-X-ray).
``mag-sd``   MAG-SD Table 2, each applied with probability 0.5 as the official code's RandomApply:
             brightness factor U(0.5, 1.0), contrast factor U(0.7, 1.0), random resized crop (area
             0.6–1, aspect 3/4–4/3) back to the input size, rotation ±120°, horizontal and vertical flips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class AugmentSpec:
    rotation: float = 0.0  # max degrees, uniform in [-r, r]
    zoom: tuple[float, float] = (1.0, 1.0)  # scale range
    translate: float = 0.0  # fraction of size
    hflip: bool = False
    vflip: bool = False
    brightness: tuple[float, float] | None = None  # multiplicative factor range
    contrast: tuple[float, float] | None = None  # factor range around the image mean
    resized_crop: tuple[float, float] | None = None  # area fraction range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    apply_prob: float = 1.0  # probability of each transform


PRESETS = {
    "none": AugmentSpec(),
    "light": AugmentSpec(rotation=10, zoom=(0.9, 1.1), translate=0.05, hflip=True),
    "cascade": AugmentSpec(rotation=30),
    "se-dpn": AugmentSpec(rotation=30, zoom=(0.9, 1.1), hflip=True, vflip=True),
    "mag-sd": AugmentSpec(rotation=120, hflip=True, vflip=True, brightness=(0.5, 1.0), contrast=(0.7, 1.0),
                          resized_crop=(0.6, 1.0), apply_prob=0.5),
}


def get_augment(name: str) -> AugmentSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown augmentation preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def _u(seed, i, lo, hi):
    """The i-th independent uniform draw of an image's seed."""
    return tf.random.stateless_uniform([], seed=tf.random.experimental.stateless_fold_in(seed, i), minval=lo, maxval=hi)


def _coin(seed, i, p):
    return _u(seed, i, 0.0, 1.0) < p


def _affine_matrix(h, w, angle, scale, tx, ty, hflip, vflip):
    """Output->input projective transform (ImageProjectiveTransformV3 convention) about the centre."""
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    fx = tf.where(hflip, -1.0, 1.0)
    fy = tf.where(vflip, -1.0, 1.0)
    a0, a1 = cos * fx, -sin * fy
    b0, b1 = sin * fx, cos * fy
    a2 = cx - a0 * cx - a1 * cy - tx
    b2 = cy - b0 * cx - b1 * cy - ty
    return tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])


def _transform(img, matrix, interpolation):
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=img[None], transforms=matrix[None], output_shape=tf.shape(img)[:2], fill_value=0.0,
        interpolation=interpolation, fill_mode="CONSTANT",
    )
    return out[0]


def augment_image(image, masks, spec: AugmentSpec, seed):
    """Apply ``spec`` to one image (H, W, 1) float32 and its masks (H, W, K) uint8 with a stateless ``seed``.

    Returns the transformed ``(image, masks)``; ``seed`` is an int64 tensor of shape [2].
    """
    seed = tf.cast(seed, tf.int64)
    p = spec.apply_prob
    has_masks = masks.shape[-1] != 0  # a (H, W, 0) tensor: nothing to keep aligned
    size = tf.shape(image)[:2]
    h, w = tf.cast(size[0], tf.float32), tf.cast(size[1], tf.float32)

    if spec.resized_crop is not None:
        area = _u(seed, 1, *spec.resized_crop)
        logr = _u(seed, 2, math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]))
        ratio = tf.exp(logr)
        ch = tf.minimum(tf.sqrt(area / ratio), 1.0)
        cw = tf.minimum(tf.sqrt(area * ratio), 1.0)
        y0 = _u(seed, 3, 0.0, 1.0) * (1.0 - ch)
        x0 = _u(seed, 4, 0.0, 1.0) * (1.0 - cw)
        box = tf.where(_coin(seed, 5, p), tf.stack([y0, x0, y0 + ch, x0 + cw]), tf.constant([0.0, 0.0, 1.0, 1.0]))
        image = tf.image.crop_and_resize(image[None], box[None], [0], size)[0]
        if has_masks:
            masks = tf.cast(tf.image.crop_and_resize(tf.cast(masks, tf.float32)[None], box[None], [0], size,
                                                     method="nearest")[0], masks.dtype)

    angle = tf.constant(0.0)
    if spec.rotation:
        r = math.radians(spec.rotation)
        angle = tf.where(_coin(seed, 6, p), _u(seed, 7, -r, r), 0.0)
    scale = tf.constant(1.0)
    if spec.zoom != (1.0, 1.0):
        scale = tf.where(_coin(seed, 8, p), _u(seed, 9, *spec.zoom), 1.0)
    tx = ty = tf.constant(0.0)
    if spec.translate:
        tx = tf.where(_coin(seed, 10, p), _u(seed, 11, -spec.translate, spec.translate) * w, 0.0)
        ty = tf.where(_coin(seed, 10, p), _u(seed, 12, -spec.translate, spec.translate) * h, 0.0)
    hflip = _coin(seed, 13, 0.5) if spec.hflip else tf.constant(False)
    vflip = _coin(seed, 14, 0.5) if spec.vflip else tf.constant(False)
    if spec.rotation or spec.zoom != (1.0, 1.0) or spec.translate or spec.hflip or spec.vflip:
        m = _affine_matrix(h, w, angle, scale, tx, ty, hflip, vflip)
        image = _transform(image, m, "BILINEAR")
        if has_masks:
            masks = tf.cast(_transform(tf.cast(masks, tf.float32), m, "NEAREST"), masks.dtype)

    if spec.brightness is not None:
        image = image * tf.where(_coin(seed, 15, p), _u(seed, 16, *spec.brightness), 1.0)
    if spec.contrast is not None:
        mean = tf.reduce_mean(image)
        image = (image - mean) * tf.where(_coin(seed, 17, p), _u(seed, 18, *spec.contrast), 1.0) + mean
    return tf.clip_by_value(image, 0.0, 255.0), masks
