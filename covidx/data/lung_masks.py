"""Lung masks for Regional Learning, predicted by a trained lung U-Net.

Cascade-SEME (Lv et al., Med Phys 2021, §4.D and §6.B.2; arXiv 2005.01468 §4.2) trains stage 2
on the target regions ``X_T = X_O · lung_mask``, where the lung fields come from "a trained
U-Net". Real COVID-19 collections ship without lung masks, so this module predicts them:

* :func:`predict_lung_masks` runs a ``lung-unet`` checkpoint (or any 2-class segmenter) over a
  dataset table and writes ``out_dir/<stem>.png`` (0 / 255, **at the image's original size**,
  like a hand-drawn mask), then returns the table with ``mask_path`` filled. The training
  pipeline reads and resizes these files exactly as it does dataset masks
  (:mod:`covidx.data.pipeline`), so a predicted mask and a drawn one are treated alike.
* :func:`attach_lung_masks` is the ``--lung-masks RUN`` helper of ``covidx.train``: it only
  predicts for rows without ``mask_path`` and caches by file stem, so a second run costs nothing.

The mask is the per-pixel argmax of the U-Net's softmax (lung = class 1 of the ``lungs`` task),
brought back to the original size with nearest-neighbour interpolation
(:func:`mask_to_original`). Optional post-processing keeps the two largest connected
components (two lungs, :func:`keep_largest_components`); it is off by default because the
exported cascade (:mod:`covidx.models.cascade`) masks in-graph without it, and training and
serving should see the same masks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tensorflow as tf

from covidx.data.io import decode_tf
from covidx.data.preprocess import PreprocessConfig, crop_tf, resize_tf
from covidx.serving.preprocess import preprocess_gray  # the inference preprocessing, TF ops only

LUNG_INDEX = 1  # class index of "lung" in the ``lungs`` task (background, lung)


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
    """Keep the ``n`` largest 8-connected foreground components of a binary (H, W) mask (two lungs)."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count - 1 <= n:  # label 0 is the background
        return binary
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.argsort(-areas, kind="stable")[:n]
    return np.isin(labels, keep).astype(np.uint8)


# --- predicting and writing masks -------------------------------------------------------------------
def mask_filenames(paths) -> list[str]:
    """``<stem>.png`` per image; stems that occur more than once get ``-<8 hex of sha1(path)>``."""
    stems = [Path(p).stem for p in paths]
    counts = pd.Series(stems).value_counts()
    return [
        f"{s}.png" if counts[s] == 1 else f"{s}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}.png"
        for s, p in zip(stems, paths)
    ]


def default_preprocess(model) -> PreprocessConfig:
    """Inference preprocessing of a bare model: ``stretch`` to its (square) input size, no CLAHE."""
    _, h, w, c = model.inputs[0].shape
    if h is None or w is None or h != w:
        raise ValueError(f"{model.name}: input {h}x{w} has no fixed square size; pass a PreprocessConfig")
    return PreprocessConfig(image_size=int(h), channels=int(c))


def resolve_segmenter(lung, preprocess: PreprocessConfig | None = None):
    """``(model, PreprocessConfig)`` from a Run, a run directory / ``.keras`` file or a Keras model.

    A bare model without ``preprocess`` gets :func:`default_preprocess` (the lung U-Net preset's
    ``stretch`` resize).
    """
    from covidx.runs import Run, load_run

    if isinstance(lung, (str, Path)):
        lung = load_run(lung)
    if isinstance(lung, Run):
        return lung.model, preprocess or lung.preprocess
    return lung, preprocess or default_preprocess(lung)


def _is_dicom_column(table: pd.DataFrame) -> list[bool]:
    if "dicom" in table:
        return table["dicom"].astype(bool).tolist()
    return [str(p).lower().endswith((".dcm", ".dicom")) for p in table["path"]]


def predict_lung_masks(
    lung_run_or_model,
    table: pd.DataFrame,
    out_dir: str | Path,
    batch_size: int = 8,
    keep_largest: int | None = None,
    preprocess: PreprocessConfig | None = None,
    lung_index: int = LUNG_INDEX,
    filenames: list[str] | None = None,
) -> pd.DataFrame:
    """Predict a lung mask for every row of ``table`` and write ``out_dir/<stem>.png``.

    Args:
        lung_run_or_model: a lung U-Net run (directory, ``.keras`` file or :class:`covidx.runs.Run`)
            or a Keras segmenter mapping pixels in [0, 255] to a per-pixel softmax.
        table: rows with ``path`` (and optionally ``dicom``).
        out_dir: where the masks go (created).
        keep_largest: keep only this many largest connected components (2 = two lungs); ``None`` keeps all.
        preprocess: the segmenter's preprocessing; default: the run's, or stretch to its input size.
        lung_index: class index of the lung in the segmenter's output.
        filenames: mask file name per row; default :func:`mask_filenames` of the table's paths.

    Returns:
        A copy of ``table`` whose ``mask_path`` holds the written files. Masks are uint8 PNGs,
        0 (background) / 255 (lung), of the image's original height and width.
    """
    model, config = resolve_segmenter(lung_run_or_model, preprocess)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = table.copy()
    paths = table["path"].astype(str).tolist()
    names = list(filenames) if filenames is not None else mask_filenames(paths)
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} file names for {len(paths)} rows")

    def load(path, dicom):
        img = decode_tf(path, dicom)
        return preprocess_gray(img, config), tf.shape(img)[:2]

    ds = tf.data.Dataset.from_tensor_slices((paths, _is_dicom_column(table)))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)
    written, i = [], 0
    for x, hws in ds.prefetch(tf.data.AUTOTUNE):
        masks = argmax_mask(model(x, training=False), lung_index)
        for mask, hw in zip(masks, hws):
            full = mask_to_original(mask, hw, config).numpy()[..., 0]
            if keep_largest:
                full = keep_largest_components(full, keep_largest)
            target = out_dir / names[i]
            if not cv2.imwrite(str(target), (full > 0).astype(np.uint8) * 255):
                raise OSError(f"{target}: could not write the mask")
            written.append(str(target))
            i += 1
    table["mask_path"] = written
    return table


def attach_lung_masks(
    table: pd.DataFrame,
    lung_checkpoint,
    cache_dir: str | Path,
    batch_size: int = 8,
    keep_largest: int | None = None,
) -> pd.DataFrame:
    """Fill ``mask_path`` where it is missing (Regional Learning needs one per image).

    Rows that already have a ``mask_path`` (drawn masks) keep it. For the others a mask cached in
    ``cache_dir/<stem>.png`` (see :func:`mask_filenames`) is reused; only the remaining rows are
    predicted with ``lung_checkpoint`` (a lung U-Net run or ``.keras`` file, loaded only when
    something is left to predict). Returns a new table.
    """
    table = table.copy()
    if "mask_path" not in table:
        table["mask_path"] = ""
    current = table["mask_path"].fillna("").astype(str)
    missing = current == ""
    cache_dir = Path(cache_dir)
    names = pd.Series(mask_filenames(table["path"].astype(str).tolist()), index=table.index)
    cached = missing & names.map(lambda n: (cache_dir / n).is_file())
    current[cached] = names[cached].map(lambda n: str(cache_dir / n))
    todo = missing & ~cached
    if todo.any():
        # The full table's names, so a row's cache key does not depend on which rows are predicted together.
        predicted = predict_lung_masks(lung_checkpoint, table[todo], cache_dir, batch_size, keep_largest,
                                       filenames=names[todo].tolist())
        current[todo] = predicted["mask_path"]
    table["mask_path"] = current
    return table
