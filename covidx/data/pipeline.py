"""tf.data input pipeline over a dataset table (see :mod:`covidx.data.sources`).

Per image: read + decode (PNG 8/16-bit, JPEG, DICOM) -> gray -> resize -> uint8 ->
**cache** (decoded, resized images; in memory or a cache file) -> [random or centre
crop] -> CLAHE (probability) -> augmentation -> model channels; then batch,
per-sample class weights, prefetch. Maps run one call per CPU core in parallel: tf.data's
autotuner is switched off because on this project's 2-core machine it settled, at random per
run, on 1 to 1.4 instead of 2 cores for a whole epoch (benchmarks/pipeline.py; see ``parallel_calls``).
Randomness is stateless, drawn per image and epoch from ``seed``, so runs repeat.
Masks (lung, lesion) are read, resized, cached, cropped and augmented with their
image (nearest-neighbour), so they stay aligned.

Batches follow the trainer contract (:mod:`covidx.training.trainers`):
``(image, y, sample_weight)`` or ``({"image", "lung_mask"}, y, sample_weight)``.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import tensorflow as tf

from covidx.data.augment import geometric_matrix, get_augment, has_photometric, opencv_stage, photometric
from covidx.data.io import decode_bytes_tf, decode_tf, dicom_flags, to_channels
from covidx.data.preprocess import PreprocessConfig, crop_tf, resize_tf
from covidx.tasks import Task, get_task

_FILE_CACHE_BUFFER = 2048  # decoded images held for reshuffling a cache file's fixed order


def default_parallel_calls() -> int:
    """The CPU cores this process may use (the container's limit, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def balanced_class_weights(labels, num_classes: int) -> np.ndarray:
    """``n / (K * n_c)`` per class (scikit-learn's "balanced"); absent classes get weight 0."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def _read_mask_tf(path, hw):
    """Mask file -> uint8 (h, w, 1) in {0, 1} at ``hw`` (the resized image's size; nearest neighbour, so a
    mask the size of its image lands exactly where the image's pixels do); empty string -> all zeros."""
    def read():
        m = decode_bytes_tf(tf.io.read_file(path))
        m = tf.image.resize(tf.cast(m > 127.0, tf.uint8), hw, method="nearest")
        return tf.cast(m, tf.uint8)

    return tf.cond(tf.strings.length(path) > 0, read, lambda: tf.zeros(tf.concat([hw, [1]], 0), tf.uint8))


def make_dataset(
    table: pd.DataFrame,
    task: str | Task,
    config: PreprocessConfig,
    training: bool = False,
    batch_size: int = 32,
    class_weights=None,
    lung_masks: bool = False,
    cache: bool | str = True,
    shuffle: bool | None = None,
    seed: int = 0,
    drop_remainder: bool = False,
    ignore_errors: bool = True,
    parallel_calls: int | None = None,
) -> tf.data.Dataset:
    """Build the dataset for ``table`` (already filtered by :func:`covidx.data.splits.select_task`).

    Args:
        class_weights: per-class weights (array of length K) turned into per-sample weights.
        lung_masks: yield ``{"image", "lung_mask"}`` inputs (Regional Learning).
        cache: ``True`` for an in-memory cache of decoded, resized images; a path for a cache file;
            ``False`` for none.
        shuffle: a new uniform permutation of the whole table every epoch (default: when ``training``).
            Tables come ordered (by folder, so by class): a bounded shuffle buffer would start every epoch
            with the first classes and end it with the last ones.
        ignore_errors: skip (and log) an image that fails to decode instead of stopping the run;
            files are also checked when the table is built.
        parallel_calls: images decoded / augmented at once (default: the usable CPU cores).
    """
    task = get_task(task) if isinstance(task, str) else task
    segmentation = task.kind == "segmentation"
    spec = get_augment(config.augment) if training else get_augment("none")
    shuffle = training if shuffle is None else shuffle
    size, crop = config.image_size, config.resize == "crop"

    paths = table["path"].astype(str).tolist()
    dicom = dicom_flags(paths)  # DICOM and TIFF are read in Python (read_image), the rest by TF ops
    labels = table["label_index"].astype(int).tolist()
    target_masks = (table[task.mask_column].astype(str).tolist() if segmentation else [""] * len(paths))
    lung = table["mask_path"].astype(str).tolist() if lung_masks else [""] * len(paths)
    if lung_masks and not all(lung):
        missing = [p for p, m in zip(paths, lung) if not m][:3]
        raise ValueError(f"Regional Learning needs a lung mask for every image; missing for e.g. {missing}")

    with_masks = segmentation or lung_masks
    n_masks = 2 if with_masks else 0
    ds = tf.data.Dataset.from_tensor_slices(
        {"index": np.arange(len(paths), dtype=np.int64), "path": paths, "dicom": dicom, "label": labels,
         "target": target_masks, "lung": lung}
    )

    any_dicom = any(dicom)

    def load(e):
        # Without DICOM/TIFF files the graph holds no Python (pydicom/OpenCV) call at all.
        decoded = decode_tf(e["path"], e["dicom"]) if any_dicom else decode_bytes_tf(tf.io.read_file(e["path"]))
        img = resize_tf(decoded, size, config.resize)
        hw = tf.shape(img)[:2]
        if with_masks:
            masks = tf.concat([_read_mask_tf(e["target"], hw), _read_mask_tf(e["lung"], hw)], axis=-1)
        else:  # classification without Regional Learning: no mask work at all
            masks = tf.zeros(tf.concat([hw, [0]], 0), tf.uint8)
        img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
        return {"index": e["index"], "image": img, "masks": masks, "label": e["label"]}

    parallel = parallel_calls or default_parallel_calls()
    file_cache = isinstance(cache, str) and cache != ""
    if shuffle and (not cache or file_cache):
        # Before decoding the buffer holds file names, so the whole table fits in it. (A cache file keeps the
        # order of the epoch that wrote it: this permutes it once, the buffer below reshuffles it locally.)
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
    if ignore_errors:
        ds = ds.ignore_errors(log_warning=True)
    if cache:
        ds = ds.cache(cache if isinstance(cache, str) else "")
    if shuffle and cache:
        # After an in-memory cache the buffer holds the cached tensors themselves (shared, not copied), so it
        # takes the whole table: a uniform permutation every epoch. A cache file's images would be copied in.
        ds = ds.shuffle(_FILE_CACHE_BUFFER if file_cache else len(paths), seed=seed, reshuffle_each_iteration=True)

    # One int64 pair per image and epoch: stateless randomness, fresh each epoch, repeatable across runs.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds)
    weights = tf.constant(np.ones(task.num_classes) if class_weights is None else class_weights, tf.float32)

    def prepare(e, seed_i):
        img, masks = e["image"], e["masks"]
        if crop:
            stacked = tf.concat([img, masks], axis=-1)
            stacked = crop_tf(stacked, size, tf.random.experimental.stateless_fold_in(seed_i, 101) if training else None)
            img, masks = stacked[..., :1], stacked[..., 1:]
        # CLAHE (with probability in training) and the geometric augmentation: one OpenCV call.
        random_clahe = training and config.clahe_prob > 0
        if random_clahe:
            use_clahe = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed_i, 202)) < config.clahe_prob
        else:
            use_clahe = tf.constant(bool(config.clahe_inference))
        aug_seed = tf.random.experimental.stateless_fold_in(seed_i, 303)
        matrix = geometric_matrix(spec, aug_seed, [size, size])
        if matrix is not None or random_clahe or config.clahe_inference:
            img, masks = opencv_stage(img, masks, matrix, use_clahe, config.clahe_clip, config.clahe_grid)
        if has_photometric(spec):
            img = photometric(tf.cast(img, tf.float32), spec, aug_seed)
        img = tf.ensure_shape(img, [size, size, 1])  # uint8 unless photometric: cast and channels per batch
        masks = tf.ensure_shape(masks, [size, size, n_masks])
        if segmentation:
            y = tf.cast(masks[..., 0], tf.int32)
        else:
            y = tf.one_hot(e["label"], task.num_classes)
        inputs = {"image": img, "lung_mask": tf.cast(masks[..., 1:], tf.float32)} if lung_masks else img
        return inputs, y, tf.gather(weights, e["label"])

    ds = ds.map(prepare, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    def finish(inputs, y, w):  # one cast per batch, and a 4x (12x for RGB models) smaller batch copy
        image = inputs["image"] if lung_masks else inputs
        image = to_channels(tf.cast(image, tf.float32), config.channels)
        return ({**inputs, "image": image} if lung_masks else image), y, w

    ds = ds.map(finish, num_parallel_calls=parallel, deterministic=True)
    options = tf.data.Options()
    options.autotune.enabled = False  # fixed parallelism; see the module docstring
    return ds.prefetch(2).with_options(options)
