"""Reading radiographs from disk: PNG (8/16-bit), JPEG, BMP/TIFF and DICOM.

Two readers with one behaviour:

* :func:`read_image` (NumPy/OpenCV/pydicom) for predict, verification and notebooks;
* :func:`decode_tf` (TF ops, DICOM through :func:`tf.numpy_function`) for the
  tf.data pipeline.

Both return a single-channel float32 image in [0, 255]: covidx treats every
radiograph as grayscale (an RGB JPEG of an X-ray carries no extra information,
and colour differences between sources are a shortcut a model should not see);
models that want three channels get the gray plane repeated
(:func:`to_channels`).

DICOM follows the display pipeline of DICOM PS3.4 (pydicom does not apply it for you):
modality LUT (rescale slope/intercept) -> VOI LUT or window centre/width ->
invert MONOCHROME1 (or PresentationLUTShape INVERSE) -> min-max to [0, 255].
"""

from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
DICOM_EXTENSIONS = {".dcm", ".dicom"}
DEFAULT_MAX_PIXELS = 50_000_000  # about 7000 x 7000: larger than any CR/DX detector
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 (as cv2.COLOR_RGB2GRAY), kept in float here and in decode_bytes_tf


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names the file and the reason."""


def sniff_format(path: str | Path) -> str | None:
    """File format from the magic bytes: ``png``, ``jpeg``, ``dicom``, ``bmp``, ``tiff`` or ``None``."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def check_file(path: str | Path) -> str | None:
    """Cheap index-time check. Returns ``None`` when the file looks like an image, else the reason."""
    p = Path(path)
    if not p.exists():
        return "file does not exist"
    if not p.is_file():
        return "not a regular file"
    size = p.stat().st_size
    if size == 0:
        return "zero-byte file"
    fmt = sniff_format(p)
    if fmt is None:
        if p.suffix.lower() in DICOM_EXTENSIONS:
            return None  # DICOM without the preamble: pydicom decides (force=True)
        return "not an image (unknown file signature)"
    if fmt == "jpeg":
        with open(p, "rb") as f:
            f.seek(max(0, size - 2))
            if f.read(2) != b"\xff\xd9":
                return "truncated JPEG (no end-of-image marker)"
    if fmt == "png":
        with open(p, "rb") as f:
            f.seek(max(0, size - 12))
            if b"IEND" not in f.read(12):
                return "truncated PNG (no IEND chunk)"
    return None


def is_dicom(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in DICOM_EXTENSIONS or (p.is_file() and sniff_format(p) == "dicom")


def read_dicom(path: str | Path) -> np.ndarray:
    """DICOM pixel data as float32 [0, 255], display-ready (see module docstring)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(str(path), force=True)
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageReadError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour DICOM (rare for CR/DX): RGB order
        arr = arr[..., :3].astype(np.float32) @ np.asarray(LUMA, np.float32)
    elif arr.ndim == 3:  # multi-frame: first frame
        arr = arr[0]
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds, index=0)
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    inverse = getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1"
    if getattr(ds, "PresentationLUTShape", "") == "INVERSE":
        inverse = not inverse
    if inverse:
        arr = 255.0 - arr
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """Read any supported radiograph as a float32 (H, W) array in [0, 255].

    Raises:
        ImageReadError: with the path and the reason (missing, empty, truncated, not an image).
    """
    reason = check_file(path)
    if reason is not None:
        raise ImageReadError(f"{path}: {reason}")
    if is_dicom(path):
        return read_dicom(path)
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{path}: cannot be decoded as an image")
    return to_gray_float(img)


def to_gray_float(img: np.ndarray) -> np.ndarray:
    """OpenCV-decoded array (8/16-bit, gray/BGR/BGRA) -> float32 gray [0, 255]."""
    scale = 255.0 / 65535.0 if img.dtype == np.uint16 else 1.0
    img = img.astype(np.float32) * scale
    if img.ndim == 3 and img.shape[-1] >= 3:
        b, g, r = img[..., 0], img[..., 1], img[..., 2]
        return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
    if img.ndim == 3:
        return img[..., 0]
    return img


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Binary mask (uint8 0/1) from a mask image: values > 127 are foreground.

    Lung-mask sets code "unlabelled" as 127 and lung as 255; both 255 and 1-coded
    masks are accepted (a mask whose maximum is 1 is taken as 0/1 coded).
    """
    m = read_image(path)
    fg = m > 127 if m.max() > 1.0 else m > 0.5
    if shape is not None and fg.shape != tuple(shape):
        raise ImageReadError(f"{path}: mask size {fg.shape[1]}x{fg.shape[0]} differs from its image {shape[1]}x{shape[0]}")
    return fg.astype(np.uint8)


def largest_components(mask: np.ndarray, keep: int | None = None, min_area: int = 1) -> np.ndarray:
    """bool (H, W): the ``keep`` largest 8-connected foreground components of ``mask`` (all when ``None``)
    with at least ``min_area`` pixels; ties keep the lower label (OpenCV's raster order)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((np.asarray(mask) > 0).astype(np.uint8),
                                                               connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the background
    order = [i + 1 for i in np.argsort(-areas, kind="stable") if areas[i] >= max(min_area, 1)]
    return np.isin(labels, order[:keep] if keep else order)


def to_channels(gray, channels: int):
    """Repeat a (..., H, W, 1) gray image to ``channels`` (1 or 3). Works on NumPy and TF tensors."""
    if channels == 1:
        return gray
    if channels != 3:
        raise ValueError(f"models take 1 or 3 channels, got {channels}")
    import tensorflow as tf

    if isinstance(gray, np.ndarray):
        return np.repeat(gray, 3, axis=-1)
    return tf.repeat(gray, 3, axis=-1)


def encode_for_serving(path: str | Path) -> bytes:
    """File bytes for a bytes-only SavedModel signature: PNG/JPEG as they are, DICOM as a 16-bit PNG of its
    display pixels (the export decodes PNG and JPEG only)."""
    if not is_dicom(path):
        return Path(path).read_bytes()
    img = np.round(read_image(path) * 257.0).astype(np.uint16)
    return cv2.imencode(".png", img)[1].tobytes()


# ---------------------------------------------------------------------------- input files


def list_inputs(target: str | Path) -> list[str]:
    """The images a command was pointed at: a folder (recursively, by extension), a CSV with a ``path``
    column (relative paths resolved against the CSV's folder) or one file."""
    p = Path(target)
    if p.is_dir():
        return [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.suffix.lower() == ".csv":
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
        if "path" not in df.columns:
            raise ValueError(f"{p}: the CSV needs a 'path' column")
        return [str((p.parent / v) if not Path(v).is_absolute() else v) for v in df["path"]]
    return [str(p)]


def readable(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split into readable files and (path, reason) of the rest (full decode, in threads)."""
    def check(path):
        try:
            read_image(path)
            return None
        except ImageReadError as e:
            return str(e).split(": ", 1)[-1]

    with ThreadPoolExecutor(4) as pool:
        reasons = list(pool.map(check, paths))
    good = [p for p, r in zip(paths, reasons) if r is None]
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    return good, bad


def unique_stems(paths) -> list[str]:
    """An output name per input: its file stem, or ``<stem>-<8 hex of sha1(path)>`` for stems that occur more
    than once. Depends on the path alone, not on which other files come with it, so it can key a cache."""
    stems = [Path(p).stem for p in paths]
    counts = Counter(stems)
    return [s if counts[s] == 1 else f"{s}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
            for s, p in zip(stems, paths)]


def dicom_flags(paths) -> list[bool]:
    """:func:`is_dicom` per path (the pipeline's ``dicom`` column)."""
    return [is_dicom(p) for p in paths]


def to_gray_array(image) -> np.ndarray:
    """An array (H, W), (H, W, 1) or RGB (H, W, 3) -> float32 (H, W) gray, RGB weighted by :data:`LUMA`."""
    a = np.asarray(image, np.float32)
    if a.ndim == 3 and a.shape[-1] == 3:
        a = a @ np.asarray(LUMA, np.float32)  # RGB order
    elif a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"an image array must be (H, W), (H, W, 1) or (H, W, 3), got {a.shape}")
    return a


# ---------------------------------------------------------------------------- TF side


def _dicom_numpy(path):
    path = path.item() if isinstance(path, np.ndarray) else path  # numpy_function passes a 0-d array
    return read_dicom(path.decode() if isinstance(path, bytes) else str(path))


def decode_bytes_tf(data):
    """TF op: encoded PNG (8/16-bit) / JPEG / BMP / GIF bytes -> float32 (H, W, 1) gray [0, 255]."""
    import tensorflow as tf

    def png():
        # Decoding as uint16 reads 8-bit PNGs scaled by 257, so one path serves both depths.
        img = tf.io.decode_png(data, channels=0, dtype=tf.uint16)
        return tf.cast(img, tf.float32) * (255.0 / 65535.0)

    def other():
        img = tf.io.decode_image(data, channels=0, expand_animations=False, dtype=tf.uint8)
        return tf.cast(img, tf.float32)

    img = tf.cond(tf.strings.substr(data, 0, 4) == b"\x89PNG", png, other)
    img = _gray_tf(img)
    img.set_shape([None, None, 1])
    return img


def decode_tf(path, dicom):
    """TF op: file path -> float32 (H, W, 1) gray [0, 255]. ``dicom`` is a scalar bool tensor."""
    import tensorflow as tf

    def dcm():
        img = tf.numpy_function(_dicom_numpy, [path], tf.float32, stateful=False)
        return tf.expand_dims(img, -1)

    img = tf.cond(dicom, dcm, lambda: decode_bytes_tf(tf.io.read_file(path)))
    img.set_shape([None, None, 1])
    return img


def _gray_tf(img):
    import tensorflow as tf

    def luma():
        return tf.reduce_sum(img[..., :3] * tf.constant(LUMA, tf.float32), axis=-1, keepdims=True)

    return tf.cond(tf.shape(img)[-1] >= 3, luma, lambda: img[..., :1])
