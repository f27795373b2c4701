"""Lung-mask geometry for Regional Learning: aligning a segmenter's mask with the image and a model's input.

Cascade-SEME (Lv et al., Med Phys 2021, §4.D and §6.B.2; arXiv 2005.01468 §4.2) trains stage 2
on the target regions ``X_T = X_O · lung_mask``, where the lung fields come from "a trained
U-Net". Real COVID-19 collections ship without lung masks, so this module predicts them:

* :func:`covidx.training.lung_masks.predict_lung_masks` runs a ``lung-unet`` checkpoint (or any 2-class segmenter) over a
  dataset table and writes ``out_dir/<stem>.png`` (0 / 255, **at the image's original size**,
  like a hand-drawn mask), then returns the table with ``mask_path`` filled. The training
  pipeline reads and resizes these files exactly as it does dataset masks
  (:mod:`covidx.data.pipeline`), so a predicted mask and a drawn one are treated alike.
* :func:`covidx.training.lung_masks.attach_lung_masks` is the ``--lung-masks RUN`` helper of ``covidx.train``: it only
  predicts for rows without ``mask_path`` and caches by file stem, so a second run costs nothing.

The mask is the per-pixel argmax of the U-Net's softmax (lung = class 1 of the ``lungs`` task),
brought back to the original size with nearest-neighbour interpolation
(:func:`mask_to_original`). Optional post-processing keeps the two largest connected
components (two lungs, :func:`keep_largest_components`); it is off by default because the
exported cascade (:mod:`covidx.serving.systems`) masks in-graph without it, and training and
serving should see the same masks.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from covidx.data.io import largest_components, unique_stems
from covidx.data.preprocess import PreprocessConfig, crop_tf, resize_tf
from covidx.tasks import LUNG_INDEX


# --- mask geometry (TF ops; also used by the cascade's in-graph Regional Learning input) -----------
def mask_to_original(mask, hw, config: PreprocessConfig):
    """Undo the segmenter's preprocessing geometry: (S, S, 1) mask -> (H, W, 1) at the original size.

    ``stretch``: nearest resize to ``hw``. ``crop``: the segmenter saw the centre crop of the image
    resized with its short side to S, so the mask is placed back into that resized frame (zeros
    outside the crop: no prediction there) and then resized to ``hw`` (nearest).
    """
    hw = tf.cast(hw, tf.int32)
    if config.resize == "crop":
        size = config.image_size
        # Same arithmetic as covidx.data.preprocess.resize_tf / crop_tf, so the crop lands where it was taken.
        hw_f = tf.cast(hw, tf.float32)
        frame = tf.maximum(tf.cast(tf.math.ceil(hw_f * (size / tf.reduce_min(hw_f))), tf.int32), size)
        oy, ox = (frame[0] - size) // 2, (frame[1] - size) // 2
        mask = tf.image.pad_to_bounding_box(mask, oy, ox, frame[0], frame[1])
    return tf.image.resize(mask, hw, method="nearest")


def mask_for_model(mask, config: PreprocessConfig):
    """(H, W, 1) mask at the original size -> (S, S, 1) aligned with a model's input.

    Mirrors the training pipeline (:func:`covidx.data.pipeline.make_dataset`): nearest resize
    with the model's resize mode, then the centre crop in ``crop`` mode.
    """
    mask = resize_tf(mask, config.image_size, config.resize, method="nearest")
    if config.resize == "crop":
        mask = crop_tf(mask, config.image_size)
    return tf.ensure_shape(mask, [config.image_size, config.image_size, mask.shape[-1]])


def argmax_mask(probabilities, lung_index: int = LUNG_INDEX):
    """Per-pixel softmax (..., H, W, K) -> float32 (..., H, W, 1) in {0, 1}: 1 where lung is the argmax."""
    return tf.cast(tf.equal(tf.argmax(probabilities, axis=-1), lung_index), tf.float32)[..., None]


def keep_largest_components(mask: np.ndarray, n: int = 2) -> np.ndarray:
    """uint8 {0, 1}: the ``n`` largest 8-connected components of a binary (H, W) mask (two lungs)."""
    return largest_components(mask, n).astype(np.uint8)


# --- file names -------------------------------------------------------------------------------------
def mask_filenames(paths) -> list[str]:
    """``<stem>.png`` per image (:func:`covidx.data.io.unique_stems`: stems that occur more than once get a
    hash of their path), so a cached mask belongs to one image whatever else is predicted with it."""
    return [f"{s}.png" for s in unique_stems(paths)]
