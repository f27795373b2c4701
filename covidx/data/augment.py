"""Augmentation presets named after the papers, applied per image with stateless seeds.

Geometric transforms get one random draw per image, are composed into one matrix
and applied in one OpenCV warp, identically to the image (bilinear) and its masks
(nearest), so lung and lesion masks stay aligned. Photometric transforms touch the
image only. Images are uint8 or float32 ``(H, W, 1)`` in [0, 255]; masks uint8
``(H, W, K)``.

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

import cv2
import numpy as np
import tensorflow as tf

from covidx.data.preprocess import clahe_uint8


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


def _about_centre(h, w, angle, scale, tx, ty, hflip, vflip):
    """Output->input 3x3 matrix of a rotation/scale/flip about the image centre plus a shift (pixels)."""
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    fx = tf.where(hflip, -1.0, 1.0)
    fy = tf.where(vflip, -1.0, 1.0)
    a0, a1 = cos * fx, -sin * fy
    b0, b1 = sin * fx, cos * fy
    a2 = cx - a0 * cx - a1 * cy - tx
    b2 = cy - b0 * cx - b1 * cy - ty
    return tf.reshape(tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0, 1.0]), [3, 3])


def _crop_box(h, w, box):
    """Output->input 3x3 matrix that resizes the box (y0, x0, y1, x1; fractions of the image) to the full
    output (pixel-centre convention, like torchvision's RandomResizedCrop)."""
    sy, sx = box[2] - box[0], box[3] - box[1]
    return tf.reshape(tf.stack([sx, 0.0, box[1] * w + 0.5 * sx - 0.5,
                                0.0, sy, box[0] * h + 0.5 * sy - 0.5,
                                0.0, 0.0, 1.0]), [3, 3])


def _opencv_numpy(image, masks, matrix, clahe, clip, grid):
    """The pipeline's one OpenCV call per image: CLAHE (when ``clahe``), then one warp for all geometric
    transforms, bilinear for the image and nearest for the masks; ``matrix`` maps output to input pixels
    (WARP_INVERSE_MAP), the identity skips the warp.

    OpenCV's warpAffine is ~5x faster than ImageProjectiveTransformV3 on a 512x512 image (0.5 vs 2.4 ms
    on this project's CPU) and releases the GIL, so tf.data's parallel map runs it on every core; one
    call instead of two halves the Python-call overhead (~0.5 ms each). That decides the cached-epoch
    throughput (benchmarks/pipeline.py).
    """
    if clahe:
        image = clahe_uint8(image, float(clip), int(grid))
    if np.array_equal(matrix, np.eye(3, dtype=matrix.dtype)):
        return image, masks
    h, w = image.shape[:2]
    m = np.asarray(matrix[:2], np.float64)
    flags = cv2.WARP_INVERSE_MAP
    image = cv2.warpAffine(image, m, (w, h), flags=flags | cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=0).reshape(image.shape)
    if masks.shape[-1]:
        masks = cv2.warpAffine(masks, m, (w, h), flags=flags | cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=0).reshape(masks.shape)
    return image, masks


def opencv_stage(image, masks, matrix=None, clahe=False, clip: float = 2.0, grid: int = 8):
    """TF wrapper of :func:`_opencv_numpy`: optional CLAHE (a bool tensor or Python bool) and the
    geometric warp (``matrix`` 3x3 from :func:`geometric_matrix`, ``None`` for none) in one call."""
    if matrix is None:
        matrix = tf.eye(3)
    out = tf.numpy_function(_opencv_numpy, [image, masks, matrix, clahe, clip, grid], [image.dtype, masks.dtype],
                            stateful=False)
    return tf.ensure_shape(out[0], image.shape), tf.ensure_shape(out[1], masks.shape)


def has_geometry(spec: AugmentSpec) -> bool:
    return bool(spec.resized_crop is not None or spec.rotation or spec.zoom != (1.0, 1.0) or spec.translate
                or spec.hflip or spec.vflip)


def has_photometric(spec: AugmentSpec) -> bool:
    return spec.brightness is not None or spec.contrast is not None


def geometric_matrix(spec: AugmentSpec, seed, size):
    """The preset's geometric transforms for one image, drawn from ``seed`` (stateless, so runs repeat) and
    composed into one 3x3 output->input matrix (resized crop, rotation, scale, shift, flips), so an image
    is interpolated once however many transforms the preset has. ``size`` is (H, W); ``None`` when the
    preset has no geometric transform."""
    if not has_geometry(spec):
        return None
    seed = tf.cast(seed, tf.int64)
    p = spec.apply_prob
    h, w = tf.cast(size[0], tf.float32), tf.cast(size[1], tf.float32)

    matrix = None
    if spec.resized_crop is not None:
        area = _u(seed, 1, *spec.resized_crop)
        ratio = tf.exp(_u(seed, 2, math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])))
        ch = tf.minimum(tf.sqrt(area / ratio), 1.0)
        cw = tf.minimum(tf.sqrt(area * ratio), 1.0)
        y0 = _u(seed, 3, 0.0, 1.0) * (1.0 - ch)
        x0 = _u(seed, 4, 0.0, 1.0) * (1.0 - cw)
        box = tf.where(_coin(seed, 5, p), tf.stack([y0, x0, y0 + ch, x0 + cw]), tf.constant([0.0, 0.0, 1.0, 1.0]))
        matrix = _crop_box(h, w, box)

    r = math.radians(spec.rotation)
    angle = tf.where(_coin(seed, 6, p), _u(seed, 7, -r, r), 0.0) if spec.rotation else tf.constant(0.0)
    scale = tf.where(_coin(seed, 8, p), _u(seed, 9, *spec.zoom), 1.0) if spec.zoom != (1.0, 1.0) else tf.constant(1.0)
    tx = ty = tf.constant(0.0)
    if spec.translate:
        tx = tf.where(_coin(seed, 10, p), _u(seed, 11, -spec.translate, spec.translate) * w, 0.0)
        ty = tf.where(_coin(seed, 10, p), _u(seed, 12, -spec.translate, spec.translate) * h, 0.0)
    hflip = _coin(seed, 13, 0.5) if spec.hflip else tf.constant(False)
    vflip = _coin(seed, 14, 0.5) if spec.vflip else tf.constant(False)
    about = _about_centre(h, w, angle, scale, tx, ty, hflip, vflip)
    return about if matrix is None else matrix @ about  # output -> rotated frame -> crop box -> input


def photometric(image, spec: AugmentSpec, seed):
    """The preset's intensity transforms on a float32 image in [0, 255] (the image only, never masks)."""
    seed = tf.cast(seed, tf.int64)
    p = spec.apply_prob
    if spec.brightness is not None:
        image = image * tf.where(_coin(seed, 15, p), _u(seed, 16, *spec.brightness), 1.0)
    if spec.contrast is not None:
        mean = tf.reduce_mean(image)
        image = (image - mean) * tf.where(_coin(seed, 17, p), _u(seed, 18, *spec.contrast), 1.0) + mean
    return tf.clip_by_value(image, 0.0, 255.0)


def augment_image(image, masks, spec: AugmentSpec, seed):
    """Apply ``spec`` to one image (H, W, 1), uint8 or float32 in [0, 255], and its masks (H, W, K) uint8
    with a stateless ``seed`` (int64, shape [2]); returns ``(float32 image, masks)``. The pipeline runs
    the same three steps with CLAHE folded into the OpenCV call."""
    matrix = geometric_matrix(spec, seed, tf.shape(image)[:2])
    if matrix is not None:
        image, masks = opencv_stage(image, masks, matrix)
    return photometric(tf.cast(image, tf.float32), spec, seed), masks
