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

The reader contract (:func:`check_image`), the same on every path (indexing, ``--verify``, the tf.data
pipeline's Python decoder, predict, the export client; the exported graph repeats it in TF ops):

* the size is read from the header (PNG IHDR, JPEG SOF, BMP and TIFF through Pillow's header parsers,
  DICOM Rows/Columns) before anything is decoded;
* an image over the pixel limit (``--max-pixels``, :data:`DEFAULT_MAX_PIXELS` unless a command sets
  another with :func:`set_max_pixels`) is refused with its size, so no decoder allocates more than
  the limit;
* an image whose long side exceeds :data:`MAX_ASPECT_RATIO` times its short side is refused: a crop-mode
  resize scales the short side to the model size S, so without this bound a 10000 x 1 sliver would
  become a 2,240,000 x 224 tensor; with it no resize allocates more than ``MAX_ASPECT_RATIO * S * S``
  values;
* 16-bit samples are scaled by their significant bits: the PNG ``sBIT`` chunk when present (as
  DICOM's BitsStored), else the bits the image's maximum needs (at least 8), so 12-bit data stored in a
  16-bit PNG is not read as a near-black image (:func:`sample_bits`).
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from PIL import BmpImagePlugin, JpegImagePlugin, TiffImagePlugin

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
DICOM_EXTENSIONS = {".dcm", ".dicom"}
DEFAULT_MAX_PIXELS = 50_000_000  # about 7000 x 7000: larger than any CR/DX detector
MAX_ASPECT_RATIO = 10.0  # radiographs are about 1:1.2 (14 x 17 in detectors); 10:1 is no radiograph
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


def check_file(path: str | Path, limit: int | None = None) -> str | None:
    """Cheap index-time check (magic bytes, completeness, header size against the pixel limit and the
    aspect-ratio bound; nothing decoded). Returns ``None`` when the file looks like a usable image, else
    the reason."""
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
    try:
        header = read_header(p)
    except ImageReadError as e:
        return str(e).split(": ", 1)[-1]
    return size_problem(header.width, header.height, limit)


def is_dicom(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in DICOM_EXTENSIONS or (p.is_file() and sniff_format(p) == "dicom")


def read_dicom(path: str | Path) -> np.ndarray:
    """DICOM pixel data as float32 [0, 255], display-ready (see module docstring)."""
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


_MAX_PIXELS = [DEFAULT_MAX_PIXELS]  # the process-wide limit; a command's --max-pixels sets it


def set_max_pixels(limit: int | None) -> int:
    """Set the pixel limit every reader of this process applies (``None``: :data:`DEFAULT_MAX_PIXELS`);
    returns it. Commands call it with their ``--max-pixels``."""
    _MAX_PIXELS[0] = int(limit) if limit else DEFAULT_MAX_PIXELS
    return _MAX_PIXELS[0]


def max_pixels() -> int:
    """The pixel limit in force (see :func:`set_max_pixels`)."""
    return _MAX_PIXELS[0]


@dataclass(frozen=True)
class ImageHeader:
    """What an image file says about itself before it is decoded."""

    format: str  # png, jpeg, bmp, tiff, dicom
    width: int
    height: int
    bit_depth: int = 8  # bits per stored sample
    significant_bits: int | None = None  # PNG sBIT / DICOM BitsStored, when the file states it


def _png_header(head: bytes) -> ImageHeader:
    """IHDR (PNG spec 11.2.2) and sBIT (11.3.3.4, before the first IDAT) from the file's first bytes."""
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise ValueError("no IHDR chunk")
    width, height = struct.unpack(">II", head[16:24])
    depth = head[24]
    sbit, pos = None, 8
    while pos + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[pos:pos + 8])
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"sBIT" and pos + 9 <= len(head):
            sbit = head[pos + 8]  # gray: one byte; RGB(A): red first (radiographs are gray in every channel)
            break
        pos += 12 + length
    return ImageHeader("png", width, height, depth, sbit)


def _pillow_header(fmt: str, path) -> ImageHeader:
    # Pillow's plugin classes parse the header only (pixels are read on .load(), which is never called);
    # used directly, not through Image.open, so that our limit and message apply, not Pillow's own.
    plugin = {"jpeg": JpegImagePlugin.JpegImageFile, "bmp": BmpImagePlugin.BmpImageFile,
              "tiff": TiffImagePlugin.TiffImageFile}[fmt]
    with open(path, "rb") as f:
        im = plugin(f)
        width, height = im.size
        depth = 16 if im.mode.startswith("I;16") or im.mode in ("I", "F") else 8
    return ImageHeader(fmt, width, height, depth)


def read_header(path: str | Path) -> ImageHeader:
    """The header of an image file (no pixel is decoded).

    Raises:
        ImageReadError: with the path, when the format is unknown or the header is broken.
    """
    fmt = sniff_format(path)
    if fmt is None and Path(path).suffix.lower() in DICOM_EXTENSIONS:
        fmt = "dicom"
    try:
        if fmt == "png":
            with open(path, "rb") as f:
                return _png_header(f.read(65536))
        if fmt in ("jpeg", "bmp", "tiff"):
            return _pillow_header(fmt, path)
        if fmt == "dicom":
            ds = pydicom.dcmread(str(path), force=True, stop_before_pixels=True)
            return ImageHeader("dicom", int(ds.Columns), int(ds.Rows), int(ds.get("BitsAllocated", 16)),
                               int(ds.get("BitsStored", 0)) or None)
    except ImageReadError:
        raise
    except Exception as e:  # each parser raises its own types for a broken header
        raise ImageReadError(f"{path}: broken {fmt.upper()} header ({type(e).__name__}: {e})") from None
    raise ImageReadError(f"{path}: not an image (unknown file signature)")


def size_problem(width: int, height: int, limit: int | None = None) -> str | None:
    """Why an image of ``width`` x ``height`` is refused (pixel limit, aspect-ratio bound), or ``None``."""
    limit = limit or max_pixels()
    if width <= 0 or height <= 0:
        return f"empty image ({width}x{height})"
    if width * height > limit:
        return (f"{width}x{height} = {width * height:,} pixels exceeds the pixel limit of {limit:,} "
                f"(--max-pixels)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"{width}x{height} is no radiograph: aspect ratio over {MAX_ASPECT_RATIO:g}:1 "
                f"(a resize would allocate up to {max(width, height) / min(width, height):,.0f} times the model size)")
    return None


def check_image(path: str | Path, limit: int | None = None) -> ImageHeader:
    """The reader contract: the file exists, is complete, has a readable header and a size within the
    pixel limit and the aspect-ratio bound. Returns the header; raises :class:`ImageReadError` naming
    the path and the reason. Nothing is decoded."""
    reason = check_file(path, limit)
    if reason is not None:
        raise ImageReadError(f"{path}: {reason}")
    return read_header(path)


def sample_bits(image: np.ndarray, header: ImageHeader | None = None) -> int:
    """Significant bits of a 16-bit image: the file's own statement (PNG sBIT, DICOM BitsStored) when
    present, else the bits its maximum needs, at least 8 (12-bit data in a 16-bit PNG -> 12)."""
    if header is not None and header.significant_bits and 1 <= header.significant_bits <= 16:
        return int(header.significant_bits)
    peak = int(np.max(image)) if image.size else 0
    return int(min(16, max(8, peak.bit_length())))


def read_image(path: str | Path, limit: int | None = None) -> np.ndarray:
    """Read any supported radiograph as a float32 (H, W) array in [0, 255] (the contract of
    :func:`check_image` first).

    Raises:
        ImageReadError: with the path and the reason (missing, empty, truncated, not an image, too large).
    """
    header = check_image(path, limit)
    if header.format == "dicom":
        return read_dicom(path)
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{path}: cannot be decoded as an image")
    return to_gray_float(img, sample_bits(img, header) if img.dtype == np.uint16 else 8)


def bit_depth_note(path: str | Path) -> str | None:
    """How a 16-bit file's samples are scaled to [0, 255] (``None`` for 8-bit files): for ``--verify``."""
    header = read_header(path)
    if header.bit_depth != 16 or header.format == "dicom":
        return None
    if header.significant_bits:
        return f"16-bit {header.format.upper()}, sBIT {header.significant_bits}: scaled by 2^{header.significant_bits}-1"
    img = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    bits = sample_bits(img)
    return f"16-bit {header.format.upper()}, no sBIT: scaled as {bits}-bit data (its maximum needs {bits} bits)"


def to_gray_float(img: np.ndarray, bits: int = 16) -> np.ndarray:
    """OpenCV-decoded array (8/16-bit, gray/BGR/BGRA) -> float32 gray [0, 255]; 16-bit samples are scaled
    by ``bits`` significant bits (see :func:`sample_bits`), values above clipped."""
    if img.dtype == np.uint16:
        img = np.minimum(img.astype(np.float32) * (255.0 / (2 ** bits - 1)), 255.0)
    else:
        img = img.astype(np.float32)
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
    """File bytes for a bytes-only SavedModel signature, after the reader contract (:func:`check_image`):
    PNG/JPEG as they are, DICOM, TIFF and BMP as a 16-bit PNG of their gray pixels (the export decodes PNG
    and JPEG only)."""
    if check_image(path).format in ("png", "jpeg"):
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


MIN_RADIOGRAPH_SIDE = 64  # smaller than any detector readout or thumbnail a model should be trusted on


def radiograph_warnings(path: str | Path) -> list[str]:
    """Why an input does not look like a radiograph (empty when it does): a binary mask (two values cover
    nearly every pixel), a colour photograph (channels differ), a tiny image. For ``predict``'s ``warning``
    column; the prediction is still made."""
    header = check_image(path)
    out = []
    if min(header.width, header.height) < MIN_RADIOGRAPH_SIDE:
        out.append(f"tiny image ({header.width}x{header.height})")
    if header.format == "dicom":
        gray = read_dicom(path)
    else:
        raw = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise ImageReadError(f"{path}: cannot be decoded as an image")
        if raw.ndim == 3 and raw.shape[-1] >= 3:
            c = raw[..., :3].astype(np.float32)
            spread = float(np.mean(np.max(c, -1) - np.min(c, -1)) / (np.iinfo(raw.dtype).max / 255.0))
            if spread > 10.0:  # mean channel spread in 8-bit levels: gray X-rays saved as RGB have ~0
                out.append("colour image (radiographs are gray)")
        gray = to_gray_float(raw, sample_bits(raw, header) if raw.dtype == np.uint16 else 8)
    values, counts = np.unique(np.round(gray).astype(np.int32), return_counts=True)
    if np.sort(counts)[-2:].sum() >= 0.98 * gray.size:
        out.append(f"looks like a mask ({min(len(values), 2)} values cover {np.sort(counts)[-2:].sum() / gray.size:.0%} "
                   f"of the pixels)")
    return out


PATH_COLUMNS = ("path", "mask_path", "lesion_path")


def resolve_paths(table: pd.DataFrame, base: str | Path | None = None) -> pd.DataFrame:
    """``table`` with the file columns (:data:`PATH_COLUMNS`) absolute: relative entries are joined to
    ``base`` (default: the current folder). Split files are written this way, so a run is evaluated the
    same from any folder."""
    base = Path(base) if base is not None else Path.cwd()
    table = table.copy()
    for col in PATH_COLUMNS:
        if col in table:
            table[col] = [str(Path(v) if Path(v).is_absolute() else (base / v).resolve()) if v else v
                          for v in table[col].astype(str)]
    return table


def missing_files_message(paths, where: str, hint: str = "") -> str | None:
    """One message for every listed file that does not exist (count and the first three), else ``None``."""
    paths = [p for p in paths if p]
    missing = [p for p in paths if not Path(p).exists()]
    if not missing:
        return None
    return (f"{where}: {len(missing)} of {len(paths)} files do not exist, e.g. {', '.join(missing[:3])}"
            + (f"; {hint}" if hint else ""))


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
    """:func:`decodes_in_python` per path (DICOM and TIFF: the pipeline reads them with :func:`read_image`)."""
    return [decodes_in_python(p) for p in paths]


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


def _read_numpy(path):
    path = path.item() if isinstance(path, np.ndarray) else path  # numpy_function passes a 0-d array
    return read_image(path.decode() if isinstance(path, bytes) else str(path))


def decodes_in_python(path: str | Path) -> bool:
    """Formats TF cannot decode (DICOM, TIFF): the pipeline reads them with :func:`read_image` through
    :func:`tf.numpy_function`."""
    return is_dicom(path) or (Path(path).is_file() and sniff_format(path) == "tiff")


def png_sample_bits_tf(data, img16):
    """TF op, the graph's :func:`sample_bits` for PNG bytes decoded as uint16: 8 for 8-bit PNGs (decoded
    x257), else sBIT when the header states it, else the bits the maximum needs (at least 8)."""
    import tensorflow as tf

    depth = tf.io.decode_raw(tf.strings.substr(data, 24, 1), tf.uint8)[0]
    head = tf.strings.split(data, sep="IDAT", maxsplit=1)[0]  # sBIT comes before the first IDAT
    parts = tf.strings.split(head, sep="sBIT", maxsplit=1)
    stated = tf.cond(tf.size(parts) > 1,
                     lambda: tf.cast(tf.io.decode_raw(tf.strings.substr(parts[-1], 0, 1), tf.uint8)[0], tf.int32),
                     lambda: tf.constant(0))
    peak = tf.cast(tf.reduce_max(img16), tf.int32)
    needed = tf.maximum(8, tf.cast(tf.math.ceil(tf.math.log(tf.cast(peak, tf.float32) + 1.0) / tf.math.log(2.0)), tf.int32))
    sixteen = tf.where((stated >= 1) & (stated <= 16), stated, tf.minimum(needed, 16))
    return tf.where(depth == 16, sixteen, 16)  # an 8-bit PNG read as uint16 spans the full 16 bits


def encoded_size(data, max_pixels: int | None = None, index=None):
    """TF op: (height, width) int64 from a PNG or JPEG header without decoding, after the contract of
    :func:`check_image`: InvalidArgument with the reason (not PNG/JPEG, truncated, over the pixel limit,
    over the aspect-ratio bound), prefixed ``image_bytes[i]:`` when ``index`` (the element's position in
    the request batch) is given."""
    import tensorflow as tf

    limit = max_pixels or _MAX_PIXELS[0]
    where = "image" if index is None else tf.strings.format("image_bytes[{}]", index)

    def require(cond, reason):
        return tf.debugging.Assert(cond, [tf.strings.join([where, ": ", reason])])

    n = tf.strings.length(data)
    is_png = tf.equal(tf.strings.substr(data, 0, 4), b"\x89PNG")
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    # A PNG has at least signature + IHDR (33 bytes) before any data; shorter bytes are not an image.
    check = require(tf.logical_and(tf.logical_or(is_png, is_jpeg), n >= 33), "not a PNG or JPEG image")
    with tf.control_dependencies([check]):  # fail with our message before any decoder sees the bytes
        tail = tf.strings.substr(data, tf.maximum(n - 12, 0), tf.minimum(n, 12))
        complete = tf.where(is_png, tf.size(tf.strings.split(tail, sep="IEND")) > 1,
                            tf.strings.substr(data, tf.maximum(n - 2, 0), 2) == b"\xff\xd9")
        check = require(complete, "truncated image (no PNG IEND / JPEG end-of-image marker)")

    def png():
        ihdr = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.uint8), tf.int64)
        w = ((ihdr[0] * 256 + ihdr[1]) * 256 + ihdr[2]) * 256 + ihdr[3]
        h = ((ihdr[4] * 256 + ihdr[5]) * 256 + ihdr[6]) * 256 + ihdr[7]
        return tf.stack([h, w])

    def jpeg():
        return tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)

    with tf.control_dependencies([check]):
        hw = tf.cond(is_png, png, jpeg)
    short, long = tf.reduce_min(hw), tf.reduce_max(hw)
    checks = [
        require(short > 0, "empty image"),
        require(hw[0] * hw[1] <= limit, f"image exceeds the pixel limit of {limit} pixels"),
        require(tf.cast(long, tf.float64) <= MAX_ASPECT_RATIO * tf.cast(short, tf.float64),
                f"no radiograph: aspect ratio over {MAX_ASPECT_RATIO:g}:1"),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(hw)


def decode_bytes_tf(data):
    """TF op: encoded PNG (8/16-bit) / JPEG / BMP / GIF bytes -> float32 (H, W, 1) gray [0, 255]; 16-bit
    PNG samples scaled by their significant bits (:func:`png_sample_bits_tf`, as :func:`read_image`)."""
    import tensorflow as tf

    def png():
        # Decoding as uint16 reads 8-bit PNGs scaled by 257, so one path serves both depths.
        img = tf.io.decode_png(data, channels=0, dtype=tf.uint16)
        bits = png_sample_bits_tf(data, img)
        scale = 255.0 / (tf.cast(tf.bitwise.left_shift(1, bits), tf.float32) - 1.0)
        return tf.minimum(tf.cast(img, tf.float32) * scale, 255.0)

    def other():
        img = tf.io.decode_image(data, channels=0, expand_animations=False, dtype=tf.uint8)
        return tf.cast(img, tf.float32)

    img = tf.cond(tf.strings.substr(data, 0, 4) == b"\x89PNG", png, other)
    img = _gray_tf(img)
    img.set_shape([None, None, 1])
    return img


def decode_tf(path, in_python):
    """TF op: file path -> float32 (H, W, 1) gray [0, 255]. ``in_python`` (scalar bool tensor, see
    :func:`decodes_in_python`) reads DICOM and TIFF with :func:`read_image`, contract included."""
    import tensorflow as tf

    def numpy_read():
        img = tf.numpy_function(_read_numpy, [path], tf.float32, stateful=False)
        return tf.expand_dims(img, -1)

    img = tf.cond(in_python, numpy_read, lambda: decode_bytes_tf(tf.io.read_file(path)))
    img.set_shape([None, None, 1])
    return img


def _gray_tf(img):
    import tensorflow as tf

    def luma():
        return tf.reduce_sum(img[..., :3] * tf.constant(LUMA, tf.float32), axis=-1, keepdims=True)

    return tf.cond(tf.shape(img)[-1] >= 3, luma, lambda: img[..., :1])
