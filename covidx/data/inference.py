"""The inference preprocessing as TF ops only, for exported graphs and multi-model systems (no OpenCV,
no py_function).

It repeats :func:`covidx.data.pipeline.make_dataset`'s evaluation path step for
step (decode -> gray -> resize -> round to uint8 -> centre crop -> CLAHE ->
channels); ``tests/test_export.py`` checks the two agree on the same files.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from covidx.data.clahe import clahe_tf
from covidx.data.io import decode_bytes_tf, decode_tf, decodes_in_python, encoded_size, to_channels, to_gray_array
from covidx.data.preprocess import PreprocessConfig, crop_tf, resize_tf

def preprocess_bytes(data, config: PreprocessConfig, max_pixels: int, index=None):
    """One encoded image -> float32 (S, S, C) exactly as the evaluation pipeline prepares it. ``index`` (its
    position in the request batch) goes into the InvalidArgument message of a bad image."""
    hw = encoded_size(data, max_pixels, index)  # the reader contract: header, pixel limit, aspect-ratio bound
    with tf.control_dependencies([hw]):
        img = decode_bytes_tf(data)
    return preprocess_gray(img, config)


def preprocess_gray(img, config: PreprocessConfig):
    """float32 (H, W, 1) gray [0, 255] -> the model input (S, S, C)."""
    img = resize_tf(img, config.image_size, config.resize)
    img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
    if config.resize == "crop":
        img = crop_tf(img, config.image_size)
    if config.clahe_inference:
        img = tf.cast(clahe_tf(tf.cast(img, tf.float32), config.clahe_clip, config.clahe_grid), tf.uint8)
    img = tf.cast(img, tf.float32)
    img = to_channels(img, config.channels)
    return tf.ensure_shape(img, [config.image_size, config.image_size, config.channels])


def gray_input(image):
    """Any image a system accepts -> float32 (H, W, 1) gray tensor in [0, 255].

    A file path (PNG, JPEG, DICOM; read as the tf.data pipeline reads it), encoded PNG/JPEG bytes
    (decoded as the export decodes them) or an array (H, W), (H, W, 1) or RGB (H, W, 3).
    """
    if isinstance(image, (str, Path)):
        return decode_tf(tf.constant(str(image)), tf.constant(decodes_in_python(image)))
    if isinstance(image, bytes):
        return decode_bytes_tf(tf.constant(image))
    return tf.constant(to_gray_array(image)[..., None])
