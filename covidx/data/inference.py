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
from covidx.data.io import decode_bytes_tf, decode_tf, is_dicom, to_channels, to_gray_array
from covidx.data.preprocess import PreprocessConfig, crop_tf, resize_tf

PNG_MAGIC = b"\x89PNG"
JPEG_MAGIC = b"\xff\xd8\xff"


def encoded_size(data):
    """(height, width) from a PNG or JPEG header without decoding; InvalidArgument for other bytes."""
    magic4 = tf.strings.substr(data, 0, 4)
    is_png = tf.equal(magic4, PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), JPEG_MAGIC)
    # A PNG has at least signature + IHDR (33 bytes) before any data; shorter bytes are not an image.
    long_enough = tf.strings.length(data) >= 33
    check = tf.debugging.Assert(tf.logical_and(tf.logical_or(is_png, is_jpeg), long_enough),
                                ["request bytes are not a PNG or JPEG image"])

    def png():
        ihdr = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.uint8), tf.int64)
        w = ((ihdr[0] * 256 + ihdr[1]) * 256 + ihdr[2]) * 256 + ihdr[3]
        h = ((ihdr[4] * 256 + ihdr[5]) * 256 + ihdr[6]) * 256 + ihdr[7]
        return tf.stack([h, w])

    def jpeg():
        return tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)

    with tf.control_dependencies([check]):  # fail with our message before any decoder sees the bytes
        return tf.cond(is_png, png, jpeg)


def preprocess_bytes(data, config: PreprocessConfig, max_pixels: int):
    """One encoded image -> float32 (S, S, C) exactly as the evaluation pipeline prepares it."""
    hw = encoded_size(data)
    check = tf.debugging.assert_less_equal(
        hw[0] * hw[1], tf.constant(max_pixels, tf.int64),
        message=f"image exceeds the configured pixel limit of {max_pixels} pixels",
    )
    with tf.control_dependencies([check]):
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
        return decode_tf(tf.constant(str(image)), tf.constant(is_dicom(image)))
    if isinstance(image, bytes):
        return decode_bytes_tf(tf.constant(image))
    return tf.constant(to_gray_array(image)[..., None])
