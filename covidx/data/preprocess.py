"""The one preprocessing definition shared by training, evaluation, predict and export.

:class:`PreprocessConfig` is written into every run's ``config.json``; whatever
reads a checkpoint rebuilds the same preprocessing from it, so training and inference cannot drift apart.
Order: decode to gray -> resize (``stretch``, or ``crop``: short side to size then
a centre crop, a random one in training) -> CLAHE (with probability
``clahe_prob`` in training, always when ``clahe_inference``) -> augmentation
(training) -> model channels. Normalisation is the model's first layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np
import tensorflow as tf


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224
    channels: int = 1
    resize: str = "stretch"  # "stretch" | "crop"
    clahe_prob: float = 0.0
    clahe_inference: bool = False
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    augment: str = "none"

    def __post_init__(self):
        if self.resize not in ("stretch", "crop"):
            raise ValueError(f"resize must be 'stretch' or 'crop', not {self.resize!r}")
        if not 0.0 <= self.clahe_prob <= 1.0:
            raise ValueError("clahe_prob must be in [0, 1]")

    @classmethod
    def from_preset(cls, preset, **overrides) -> "PreprocessConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in preset.to_dict().items() if k in fields}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def for_model(cls, model) -> "PreprocessConfig":
        """What a bare model (no run folder, no ``config.json``) expects at inference: ``stretch`` to its
        square input size, its channels, no CLAHE. A run's own configuration always wins over this."""
        _, h, w, c = model.inputs[0].shape
        if h is None or w is None or h != w:
            raise ValueError(f"{model.name}: input {h}x{w} has no fixed square size; pass its PreprocessConfig")
        return cls(image_size=int(h), channels=int(c))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def clahe_uint8(image: np.ndarray, clip: float = 2.0, grid: int = 8) -> np.ndarray:
    """OpenCV CLAHE (Zuiderveld 1994) on a uint8 gray image; the reference implementation."""
    img = np.asarray(image)
    squeeze = img.ndim == 3
    out = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(int(grid), int(grid))).apply(
        img[..., 0] if squeeze else img
    )
    return out[..., None] if squeeze else out


def resize_tf(image, size: int, mode: str, method="bilinear"):
    """Resize (H, W, C): ``stretch`` to size x size, or ``crop`` mode's short side to ``size`` (aspect kept).

    Shrinking uses area averaging (OpenCV's INTER_AREA; radiographs are usually 5-10x the model
    input and plain bilinear sampling would alias) and enlarging bilinear interpolation; masks
    pass ``method="nearest"``.
    """
    if mode == "stretch":
        target = tf.constant([size, size])
    else:
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        target = tf.cast(tf.math.ceil(hw * (size / tf.reduce_min(hw))), tf.int32)
        target = tf.maximum(target, size)
    if method == "nearest":
        return tf.image.resize(image, target, method="nearest")
    shrink = tf.reduce_all(tf.shape(image)[:2] >= target)
    return tf.cond(shrink, lambda: tf.image.resize(image, target, method="area"),
                   lambda: tf.image.resize(image, target, method=method))


def crop_tf(stacked, size: int, seed=None):
    """Centre crop (``seed is None``) or stateless random crop of a (H, W, C) tensor to size x size."""
    hw = tf.shape(stacked)[:2]
    if seed is None:
        oy, ox = (hw[0] - size) // 2, (hw[1] - size) // 2
    else:
        oy = tf.random.stateless_uniform([], seed, 0, hw[0] - size + 1, dtype=tf.int32)
        ox = tf.random.stateless_uniform([], seed + [0, 1], 0, hw[1] - size + 1, dtype=tf.int32)
    return stacked[oy:oy + size, ox:ox + size]
