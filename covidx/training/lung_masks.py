"""Lung masks for Regional Learning, predicted by a trained lung U-Net.

Cascade-SEME (Lv et al., Med Phys 2021, §4.D and §6.B.2; arXiv 2005.01468 §4.2) trains stage 2 on the
target regions ``X_T = X_O · lung_mask``, where the lung fields come from "a trained U-Net". Real
COVID-19 collections ship without lung masks, so these are predicted:

* :func:`predict_lung_masks` runs a ``lung-unet`` checkpoint (or any 2-class segmenter) over a dataset
  table and writes ``out_dir/<stem>.png`` (0 / 255, at the image's original size, like a drawn mask),
  returning the table with ``mask_path`` filled; the training pipeline reads these files exactly as it
  reads dataset masks.
* :func:`attach_lung_masks` is ``covidx.train --lung-masks RUN``: it predicts only for rows without a
  ``mask_path`` and caches by file name, so a second run costs nothing.

The geometry (segmenter size -> original size, argmax) is :mod:`covidx.data.lung_masks`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tensorflow as tf

from covidx.data.inference import preprocess_gray
from covidx.data.io import decode_tf, dicom_flags
from covidx.data.lung_masks import argmax_mask, keep_largest_components, mask_filenames, mask_to_original
from covidx.data.preprocess import PreprocessConfig
from covidx.runs import Run, load_run
from covidx.tasks import LUNG_INDEX


def resolve_segmenter(lung, preprocess: PreprocessConfig | None = None):
    """``(model, PreprocessConfig)`` from a Run, a run directory / ``.keras`` file or a Keras model.

    A bare model without ``preprocess`` gets :meth:`PreprocessConfig.for_model` (the lung U-Net preset's
    ``stretch`` resize).
    """
    if isinstance(lung, (str, Path)):
        lung = load_run(lung)
    if isinstance(lung, Run):
        return lung.model, preprocess or lung.preprocess
    return lung, preprocess or PreprocessConfig.for_model(lung)


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

    ds = tf.data.Dataset.from_tensor_slices((paths, table["dicom"].astype(bool).tolist() if "dicom" in table else dicom_flags(paths)))
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
