"""Decoding: 8/16-bit PNG, RGB/RGBA, JPEG, DICOM (MONOCHROME1, rescale, window), bad files."""

import numpy as np
import pytest
import tensorflow as tf

from covidx.data.io import ImageReadError, check_file, decode_tf, read_image, read_mask
from tests.helpers import write_image


def tf_read(path, dicom=False):
    return decode_tf(tf.constant(str(path)), tf.constant(dicom)).numpy()[..., 0]


def test_png_8_and_16_bit_agree_between_numpy_and_tf(tmp_path):
    img8 = write_image(tmp_path / "a.png", seed=1)
    img16 = write_image(tmp_path / "b.png", seed=2, dtype=np.uint16)
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), img8, atol=1e-4)
    np.testing.assert_allclose(tf_read(tmp_path / "a.png"), img8, atol=1e-3)
    expected16 = img16.astype(np.float32) * 255 / 65535
    np.testing.assert_allclose(read_image(tmp_path / "b.png"), expected16, atol=1e-3)
    np.testing.assert_allclose(tf_read(tmp_path / "b.png"), expected16, atol=1e-3)


@pytest.mark.parametrize("channels", [3, 4])
def test_colour_is_converted_to_gray_identically(tmp_path, channels):
    bgr = write_image(tmp_path / "c.png", seed=3, channels=channels)
    b, g, r = (bgr[..., i].astype(np.float32) for i in range(3))
    expected = 0.299 * r + 0.587 * g + 0.114 * b
    np.testing.assert_allclose(read_image(tmp_path / "c.png"), expected, atol=1e-3)
    np.testing.assert_allclose(tf_read(tmp_path / "c.png"), expected, atol=1e-3)


def test_jpeg(tmp_path):
    write_image(tmp_path / "d.jpg", value=100)
    np.testing.assert_allclose(tf_read(tmp_path / "d.jpg"), 100, atol=2)
    np.testing.assert_allclose(read_image(tmp_path / "d.jpg"), tf_read(tmp_path / "d.jpg"), atol=2)


def write_dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_monochrome1_is_inverted_and_rescaled(tmp_path):
    ramp = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (8, 1))
    write_dicom(tmp_path / "m2.dcm", ramp)
    write_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1", slope=2.0, intercept=-10)
    m2, m1 = read_image(tmp_path / "m2.dcm"), read_image(tmp_path / "m1.dcm")
    assert m2[0, 0] == 0 and m2[0, -1] == pytest.approx(255)
    np.testing.assert_allclose(m1, 255 - m2, atol=1e-3)  # linear rescale + inversion
    np.testing.assert_allclose(tf_read(tmp_path / "m1.dcm", dicom=True), m1, atol=1e-4)


def test_dicom_window_is_applied(tmp_path):
    ramp = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (8, 1))
    write_dicom(tmp_path / "w.dcm", ramp, window=(2000, 1000))
    out = read_image(tmp_path / "w.dcm")
    assert out[0, 0] == 0 and out[0, -1] == pytest.approx(255)
    # everything under centre - width/2 is black, above centre + width/2 white
    assert (out[0, ramp[0] <= 1400] == 0).all() and (out[0, ramp[0] >= 2600] == pytest.approx(255))
    assert 0 < out[0, ramp[0] == 2000][0] < 255


def test_bad_files_are_named_with_a_reason(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    write_image(tmp_path / "t.jpg", seed=1)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    assert check_file(tmp_path / "zero.png") == "zero-byte file"
    assert "not an image" in check_file(tmp_path / "text.png")
    assert "truncated JPEG" in check_file(tmp_path / "trunc.jpg")
    assert check_file(tmp_path / "missing.png") == "file does not exist"
    with pytest.raises(ImageReadError, match="trunc.jpg: truncated"):
        read_image(tmp_path / "trunc.jpg")


def test_mask_binarisation_and_size_check(tmp_path):
    import cv2

    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:6] = 255
    m[6:8, 6:8] = 127  # "unlabelled" in lung-mask sets: background
    cv2.imwrite(str(tmp_path / "m.png"), m)
    out = read_mask(tmp_path / "m.png")
    assert out.sum() == 9 and out.dtype == np.uint8
    with pytest.raises(ImageReadError, match="differs from its image"):
        read_mask(tmp_path / "m.png", shape=(20, 20))
