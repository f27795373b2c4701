"""CLAHE in TensorFlow ops, reproducing OpenCV's ``cv2.createCLAHE(clip, grid).apply``.

Contrast-limited adaptive histogram equalisation (Zuiderveld, "Contrast Limited
Adaptive Histogram Equalization", Graphics Gems IV, 1994): the image is cut into a
grid of tiles; each tile's 256-bin histogram is clipped at a limit, the clipped
excess is spread back over the bins, and the cumulative histogram becomes the
tile's gray-level mapping (LUT); each pixel is mapped through the LUTs of the
four nearest tile centres and bilinearly interpolated.

Training applies CLAHE through OpenCV (:func:`covidx.data.preprocess.clahe_uint8`);
a SavedModel cannot carry an OpenCV call (only TF ops are serialised), so :func:`clahe_tf` re-implements OpenCV's variant of the algorithm
(``modules/imgproc/src/clahe.cpp``, the 8-bit CPU path) with plain TF ops, including
its integer and float32 arithmetic, so a served model sees the same pixels as in
training. OpenCV's specifics reproduced here:

* tiles: when H or W is not a multiple of the grid, *both* axes are padded at the
  bottom/right by ``grid - size % grid`` (a full extra ``grid`` rows or columns on an
  axis that was already divisible) with ``BORDER_REFLECT_101``; histograms come
  from the padded image, the output keeps the original size;
* clip limit: ``max(1, int(clip * tile_area / 256))`` (computed in double), no
  clipping when ``clip <= 0``;
* redistribution: ``excess // 256`` added to every bin, then the residual
  ``excess % 256`` given one each to bins ``0, s, 2s, ...`` with
  ``s = max(256 // residual, 1)``;
* LUT: ``saturate(round(cumsum * (255 / tile_area)))`` in float32;
* interpolation: tile coordinate ``x * (1 / tile_w) - 0.5`` in float32, neighbour
  tiles clamped to the grid, ``(l11 xa1 + l12 xa) ya1 + (l21 xa1 + l22 xa) ya``
  in float32 and rounded half to even (``cvRound``).
"""

from __future__ import annotations

from numbers import Integral
from typing import Union

import tensorflow as tf

__all__ = ["clahe_tf"]

HIST_SIZE = 256  # 8-bit images: one bin per gray level

GridSize = Union[int, tuple[int, int]]


def _grid_size(tile_grid: GridSize) -> tuple[int, int]:
    """``(tiles_x, tiles_y)``; an int means a square grid (OpenCV's ``tileGridSize`` order)."""
    if isinstance(tile_grid, Integral):
        tiles_x = tiles_y = int(tile_grid)
    else:
        tiles_x, tiles_y = (int(t) for t in tile_grid)
    if tiles_x < 1 or tiles_y < 1:
        raise ValueError(f"tile_grid must be positive, got {tile_grid!r}")
    return tiles_x, tiles_y


def _to_levels(images: tf.Tensor) -> tf.Tensor:
    """Gray levels as int32 in [0, 255]; floats are rounded and saturated like ``cv::saturate_cast``."""
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.int32)
    if images.dtype.is_floating:
        return tf.cast(tf.clip_by_value(tf.round(tf.cast(images, tf.float32)), 0.0, 255.0), tf.int32)
    if images.dtype.is_integer:
        return tf.cast(tf.clip_by_value(tf.cast(images, tf.int64), 0, 255), tf.int32)
    raise TypeError(f"clahe_tf needs uint8, integer or float images, got {images.dtype}")


def _reflect_101(index: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Source index of ``index`` under BORDER_REFLECT_101 (``gfedcb|abcdefgh|gfedcba``).

    Written as a periodic fold rather than ``tf.pad(mode="REFLECT")`` because OpenCV
    keeps reflecting when the padding is longer than the image (e.g. a 3-pixel
    side with an 8-tile grid), where ``tf.pad`` fails.
    """
    period = tf.maximum(2 * (size - 1), 1)
    folded = index % period
    return tf.where(folded < size, folded, period - folded)


def _tile_pairs(length: tf.Tensor, tile: tf.Tensor, tiles: int):
    """Per pixel along one axis: which pair of neighbouring tiles, and the pair's weights.

    OpenCV's float32 arithmetic: tile centres sit at ``(t + 0.5) * tile``, so the tile
    coordinate is ``x * (1 / tile) - 0.5``; ``t = floor`` of it lies in ``[-1, tiles - 1]``
    and the pair is ``(max(t, 0), min(t + 1, tiles - 1))`` (the border tile twice beyond
    the outer centres). Returns ``pair = t + 1`` in ``[0, tiles]`` and the weights
    ``1 - a`` and ``a`` of the first and second tile, ``a = coordinate - t``.
    """
    inv_tile = tf.constant(1.0, tf.float32) / tf.cast(tile, tf.float32)
    coord = tf.cast(tf.range(length), tf.float32) * inv_tile - 0.5
    first = tf.floor(coord)
    weight = coord - first
    pair = tf.clip_by_value(tf.cast(first, tf.int32) + 1, 0, tiles)
    return pair, 1.0 - weight, weight


def _pair_tables(lut: tf.Tensor, tiles_x: int, tiles_y: int) -> tf.Tensor:
    """``(B, tiles_y + 1, tiles_x + 1, 256, 4)`` uint8: the four LUT values of every tile pair.

    Order ``[l11, l12, l21, l22]`` = (first row: first, second column; second row: ...),
    so interpolation needs a single gather of 4 bytes per pixel instead of four
    scalar gathers (the costly part on CPU).
    """
    def pairs(tiles):
        p = tf.range(tiles + 1)
        return tf.maximum(p - 1, 0), tf.minimum(p, tiles - 1)

    (y1, y2), (x1, x2) = pairs(tiles_y), pairs(tiles_x)
    rows = [tf.gather(lut, y, axis=1) for y in (y1, y2)]
    return tf.stack([tf.gather(r, x, axis=2) for r in rows for x in (x1, x2)], axis=-1)


def clahe_tf(images, clip_limit: float = 2.0, tile_grid: GridSize = 8) -> tf.Tensor:
    """OpenCV-exact CLAHE (Zuiderveld 1994) with TensorFlow ops only, for exported graphs.

    Args:
        images: ``(B, H, W, 1)`` batch or a single ``(H, W, 1)`` image of gray levels
            0..255 (uint8, or float rounded to the nearest level); H, W and B may be
            unknown at trace time.
        clip_limit: OpenCV's ``clipLimit`` (contrast limit relative to a uniform
            histogram); ``<= 0`` disables clipping.
        tile_grid: tiles per side, or ``(tiles_x, tiles_y)`` as OpenCV's ``tileGridSize``.

    Returns:
        float32 tensor of the input's shape holding integer levels 0..255, equal to
        ``cv2.createCLAHE(clip_limit, (tiles_x, tiles_y)).apply`` on the uint8 image.
    """
    images = tf.convert_to_tensor(images)
    rank = images.shape.rank
    if rank == 3:
        return clahe_tf(images[tf.newaxis], clip_limit, tile_grid)[0]
    if rank != 4:
        raise ValueError(f"clahe_tf expects (B, H, W, 1) or (H, W, 1) images, got shape {images.shape}")
    if images.shape[-1] not in (None, 1):
        raise ValueError(f"clahe_tf works on one gray channel, got {images.shape[-1]} channels")
    tiles_x, tiles_y = _grid_size(tile_grid)
    num_tiles = tiles_x * tiles_y

    with tf.name_scope("clahe"):
        levels = _to_levels(images)[..., 0]  # (B, H, W) int32
        shape = tf.shape(levels)
        batch, height, width = shape[0], shape[1], shape[2]

        # Tile geometry: OpenCV pads both axes as soon as one is not divisible.
        indivisible = tf.logical_or(height % tiles_y != 0, width % tiles_x != 0)
        pad_h = tf.where(indivisible, tiles_y - height % tiles_y, 0)
        pad_w = tf.where(indivisible, tiles_x - width % tiles_x, 0)
        tile_h = (height + pad_h) // tiles_y
        tile_w = (width + pad_w) // tiles_x
        tile_area = tile_h * tile_w

        # Histograms: one bincount over (image, tile, level) ids of the padded image.
        rows = tf.range(height + pad_h)
        cols = tf.range(width + pad_w)
        padded = tf.cond(
            indivisible,
            lambda: tf.gather(tf.gather(levels, _reflect_101(rows, height), axis=1), _reflect_101(cols, width), axis=2),
            lambda: levels)
        # Bin id = (image * num_tiles + tile) * 256 + level, built from per-axis parts.
        bin_of_image = tf.range(batch) * (num_tiles * HIST_SIZE)
        bin_of_row = (rows // tile_h) * (tiles_x * HIST_SIZE)
        bin_of_col = (cols // tile_w) * HIST_SIZE
        bin_id = bin_of_image[:, None, None] + bin_of_row[None, :, None] + bin_of_col[None, None, :] + padded
        bins = batch * num_tiles * HIST_SIZE
        hist = tf.math.bincount(tf.reshape(bin_id, [-1]), minlength=bins, maxlength=bins, dtype=tf.int32)
        hist = tf.reshape(hist, [batch, num_tiles, HIST_SIZE])

        if clip_limit > 0:
            # Integer limit as OpenCV: truncation of clip * area / 256 in double, at least 1.
            limit = tf.cast(tf.cast(tile_area, tf.float64) * float(clip_limit) / HIST_SIZE, tf.int32)
            limit = tf.maximum(limit, 1)
            excess = tf.reduce_sum(tf.nn.relu(hist - limit), axis=-1, keepdims=True)
            redist_batch = excess // HIST_SIZE
            residual = excess - redist_batch * HIST_SIZE
            # The residual goes one pixel each to bins 0, step, 2*step, ... (residual of them).
            step = tf.maximum(HIST_SIZE // tf.maximum(residual, 1), 1)
            level = tf.range(HIST_SIZE)
            gets_one = tf.logical_and(level % step == 0, level // step < residual)
            hist = tf.minimum(hist, limit) + redist_batch + tf.cast(gets_one, tf.int32)

        # LUT = saturate(round(cdf * 255 / area)), float32 as OpenCV's lutScale.
        lut_scale = tf.constant(HIST_SIZE - 1, tf.float32) / tf.cast(tile_area, tf.float32)
        cdf = tf.cast(tf.cumsum(hist, axis=-1), tf.float32)
        lut = tf.clip_by_value(tf.round(cdf * lut_scale), 0.0, 255.0)

        # Bilinear interpolation between the four nearest tile LUTs (original pixels only).
        tables = _pair_tables(tf.cast(tf.reshape(lut, [batch, tiles_y, tiles_x, HIST_SIZE]), tf.uint8),
                              tiles_x, tiles_y)
        pair_y, ya1, ya = _tile_pairs(height, tile_h, tiles_y)  # each (H,)
        pair_x, xa1, xa = _tile_pairs(width, tile_w, tiles_x)   # each (W,)
        pairs_per_image = (tiles_y + 1) * (tiles_x + 1)
        index = (tf.range(batch)[:, None, None] * pairs_per_image + (pair_y * (tiles_x + 1))[None, :, None]
                 + pair_x[None, None, :]) * HIST_SIZE + levels
        l11, l12, l21, l22 = (tf.cast(v, tf.float32)
                              for v in tf.unstack(tf.gather(tf.reshape(tables, [-1, 4]), index), axis=-1))
        ya1, ya = ya1[:, None], ya[:, None]
        # Same operations in the same order as OpenCV, so float32 rounding (and ties) agree.
        result = (l11 * xa1 + l12 * xa) * ya1 + (l21 * xa1 + l22 * xa) * ya
        result = tf.clip_by_value(tf.round(result), 0.0, 255.0)  # tf.round: half to even, as cvRound
        return tf.ensure_shape(result[..., tf.newaxis], images.shape)
