"""The reader contract on every path: header-first pixel limit, aspect-ratio bound, TIFF/BMP end to end,
16-bit PNG significant bits (sBIT, else the image's range). Files are made in the test."""

import struct
import zlib

import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from covidx.data.inference import preprocess_bytes
from covidx.data.io import (DEFAULT_MAX_PIXELS, ImageReadError, bit_depth_note, check_file, check_image,
                            decode_bytes_tf, encode_for_serving, read_header, read_image, readable)
from covidx.data.pipeline import make_dataset
from covidx.data.preprocess import PreprocessConfig
from covidx.tasks import get_task


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path, width=50_000, height=50_000):
    """A few hundred bytes whose IHDR claims width x height 8-bit gray pixels (IDAT holds a few rows only)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 2, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def png16(path, pixels: np.ndarray, sbit: int | None = None):
    """A 16-bit gray PNG written by OpenCV, with an sBIT chunk inserted after IHDR when ``sbit`` is given."""
    data = cv2.imencode(".png", pixels.astype(np.uint16))[1].tobytes()
    if sbit is not None:
        end_ihdr = 8 + 8 + 13 + 4
        data = data[:end_ihdr] + chunk(b"sBIT", bytes([sbit])) + data[end_ihdr:]
    path.write_bytes(data)
    return path


def test_pixel_bomb_is_refused_from_the_header_on_every_path(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 10_000
    assert read_header(bomb).width == 50_000
    reason = check_file(bomb)
    assert "exceeds the pixel limit" in reason and "50000x50000" in reason
    with pytest.raises(ImageReadError, match=r"bomb\.png: 50000x50000"):
        read_image(bomb)
    with pytest.raises(ImageReadError, match="bomb.png"):
        encode_for_serving(bomb)
    good, bad = readable([str(bomb)])
    assert not good and "pixel limit" in bad[0][1]
    with pytest.raises(tf.errors.InvalidArgumentError, match="pixel limit"):
        preprocess_bytes(tf.constant(bomb.read_bytes()), PreprocessConfig(image_size=32), DEFAULT_MAX_PIXELS)
    # A smaller limit applies to ordinary images too.
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((40, 40), np.uint8))
    assert "pixel limit of 1,000" in check_file(tmp_path / "small.png", limit=1000)


def test_sliver_is_refused_before_any_resize(tmp_path):
    cv2.imwrite(str(tmp_path / "sliver.png"), np.full((1, 10_000), 128, np.uint8))
    assert "aspect ratio" in check_file(tmp_path / "sliver.png")
    with pytest.raises(ImageReadError, match="sliver.png: 10000x1 is no radiograph"):
        read_image(tmp_path / "sliver.png")
    config = PreprocessConfig(image_size=32, resize="crop")
    with pytest.raises(tf.errors.InvalidArgumentError, match="aspect ratio"):
        preprocess_bytes(tf.constant((tmp_path / "sliver.png").read_bytes()), config, DEFAULT_MAX_PIXELS)
    cv2.imwrite(str(tmp_path / "ok.png"), np.full((40, 300), 128, np.uint8))  # 7.5:1 passes
    assert check_file(tmp_path / "ok.png") is None


@pytest.mark.parametrize("ext", [".tif", ".bmp"])
def test_tiff_and_bmp_work_in_the_pipeline_and_for_the_export(tmp_path, ext):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 20), dtype=np.uint8)
    path = tmp_path / f"x{ext}"
    assert cv2.imwrite(str(path), img)
    assert check_file(path) is None
    np.testing.assert_array_equal(read_image(path), img.astype(np.float32))
    table = pd.DataFrame({"path": [str(path)], "label_index": [0], "mask_path": [""], "lesion_path": [""]})
    config = PreprocessConfig(image_size=24, resize="stretch")
    x, _, _ = next(iter(make_dataset(table, get_task("3class"), config, cache=False, ignore_errors=False)))
    expected = cv2.resize(img, (24, 24), interpolation=cv2.INTER_LINEAR)  # 20 -> 24 wide: enlarging
    assert x.shape == (1, 24, 24, 1)
    assert np.abs(x.numpy()[0, ..., 0] - expected).mean() < 2.0
    served = encode_for_serving(path)  # converted to PNG: the export decodes PNG and JPEG only
    assert served.startswith(b"\x89PNG")
    np.testing.assert_allclose(decode_bytes_tf(tf.constant(served)).numpy()[..., 0], img, atol=0.01)


def test_16_bit_tiff_is_scaled_by_its_range(tmp_path):
    img = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))  # 12-bit data
    cv2.imwrite(str(tmp_path / "t.tif"), img)
    out = read_image(tmp_path / "t.tif")
    np.testing.assert_allclose(out, img * 255.0 / 4095, atol=1e-3)


@pytest.mark.parametrize("sbit", [None, 12, 10])
def test_12_bit_data_in_a_16_bit_png_is_not_black(tmp_path, sbit):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 4096 if sbit != 10 else 1024, (16, 12)).astype(np.uint16)
    img[0, 0] = 4095 if sbit != 10 else 1023
    path = png16(tmp_path / "p.png", img, sbit)
    bits = sbit or 12
    expected = img.astype(np.float32) * 255.0 / (2 ** bits - 1)
    np.testing.assert_allclose(read_image(path), expected, atol=1e-3)
    np.testing.assert_allclose(decode_bytes_tf(tf.constant(path.read_bytes())).numpy()[..., 0], expected, atol=1e-2)
    assert read_header(path).significant_bits == sbit
    note = bit_depth_note(path)
    assert (f"sBIT {sbit}" in note) if sbit else ("scaled as 12-bit" in note)


def test_sbit_states_more_bits_than_used(tmp_path):
    """A 16-bit PNG that says 16 significant bits is taken at its word, however dark."""
    img = np.full((8, 8), 4095, np.uint16)
    path = png16(tmp_path / "dark.png", img, 16)
    np.testing.assert_allclose(read_image(path), 4095 * 255.0 / 65535, atol=1e-3)
    np.testing.assert_allclose(decode_bytes_tf(tf.constant(path.read_bytes())).numpy(), 4095 * 255.0 / 65535, atol=1e-2)


def test_check_image_returns_the_header(tmp_path):
    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((30, 40), 90, np.uint8))
    h = check_image(tmp_path / "a.jpg")
    assert (h.format, h.width, h.height) == ("jpeg", 40, 30)


def test_a_bad_element_of_a_serving_batch_is_named_by_its_index(tmp_path):
    from covidx.serving.export import export
    from tests.helpers import make_run, write_image

    run, _, _ = make_run(tmp_path / "run")
    sig = tf.saved_model.load(str(export(run, tmp_path / "e"))).signatures["serving_default"]
    for i in range(3):
        write_image(tmp_path / f"g{i}.png", seed=i)
    good = [(tmp_path / f"g{i}.png").read_bytes() for i in range(3)]
    cv2.imwrite(str(tmp_path / "sliver.png"), np.zeros((1, 500), np.uint8))
    truncated = good[0][:-20]
    cases = {1: b"not an image at all, just some text", 2: (tmp_path / "sliver.png").read_bytes(), 0: truncated}
    for bad_at, bad in cases.items():
        batch = list(good)
        batch[bad_at] = bad
        with pytest.raises(tf.errors.InvalidArgumentError, match=rf"image_bytes\[{bad_at}\]: "):
            sig(image_bytes=tf.constant(batch))
    assert sig(image_bytes=tf.constant(good))["probabilities"].shape[0] == 3
