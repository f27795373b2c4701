"""Input-pipeline throughput: covidx's tf.data pipeline vs a plain sequential Python loop.

Work per image (both sides): read a JPEG from disk, decode to gray, resize to 512x512,
CLAHE on 40 % of images (clip 2, 8x8 tiles), random rotation ±30° (the Cascade-SEME
training recipe). The sequential loops are what the reference PyTorch repositories do
with ``num_workers=0``, one image after another: with PIL as torchvision's ImageFolder
loader and transforms do (``Image.open().convert()``, ``resize``, ``rotate``; CLAHE
through OpenCV as the Cascade-SEME code does), and with OpenCV throughout, the faster
of the two (run with OpenCV's own threading off, ``cv2.setNumThreads(1)``, and with its
default threads).

Usage: ``python benchmarks/pipeline.py [--images 200] [--source-size 1500]`` (prints figures; run by hand).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def make_jpegs(folder: Path, n: int, size: int) -> list[str]:
    """Radiograph-sized JPEGs (SYNTHETIC: procedural images from covidx.data.synthetic)."""
    from covidx.data.synthetic import generate_xray

    rng = np.random.default_rng(0)
    paths = []
    base = [generate_xray(f, size=size, rng=rng).image for f in ("normal", "covid19", "viral", "bacterial")]
    for i in range(n):
        img = np.clip(base[i % 4].astype(np.int16) + rng.integers(-3, 4, base[0].shape), 0, 255).astype(np.uint8)
        p = folder / f"img{i:04d}.jpeg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(str(p))
    return paths


def sequential(paths, size=512, clahe_prob=0.4, rotation=30.0, seed=0) -> float:
    rng = np.random.default_rng(seed)
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    t0 = time.perf_counter()
    for p in paths:
        img = cv2.imread(p, cv2.IMREAD_GRAYSCALE)
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        if rng.random() < clahe_prob:
            img = clahe.apply(img)
        m = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), rng.uniform(-rotation, rotation), 1.0)
        img = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
        _ = img.astype(np.float32)
    return len(paths) / (time.perf_counter() - t0)


def sequential_pil(paths, size=512, clahe_prob=0.4, rotation=30.0, seed=0) -> float:
    from PIL import Image

    rng = np.random.default_rng(seed)
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as f:
            img = f.convert("L").resize((size, size), Image.BILINEAR)  # PIL antialiases when shrinking
        if rng.random() < clahe_prob:
            img = Image.fromarray(clahe.apply(np.asarray(img)))
        img = img.rotate(rng.uniform(-rotation, rotation), resample=Image.BILINEAR)
        _ = np.asarray(img, np.float32)
    return len(paths) / (time.perf_counter() - t0)


def tfdata(paths, epochs=3, batch=16):
    from covidx.data import PreprocessConfig, make_dataset

    table = pd.DataFrame(dict(path=paths, finding="normal", patient_id=[f"p{i}" for i in range(len(paths))],
                              source="bench", split="train", mask_path="", lesion_path="", label="normal",
                              label_index=0))
    cfg = PreprocessConfig(image_size=512, channels=1, clahe_prob=0.4, augment="cascade")
    ds = make_dataset(table, "stage1", cfg, training=True, batch_size=batch, cache=True)
    rates = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = sum(int(x.shape[0]) for x, _, _ in ds)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--source-size", type=int, default=2000, help="side of the JPEGs on disk (real CXRs: 1000-3000)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        paths = make_jpegs(Path(d), args.images, args.source_size)
        # Warm the page cache so both sides read from memory.
        for p in paths:
            Path(p).read_bytes()
        cv2.setNumThreads(1)
        seq_pil = sequential_pil(paths)
        seq1 = sequential(paths)
        cv2.setNumThreads(-1)
        seq_mt = sequential(paths)
        rates = tfdata(paths)
    print(f"machine: {os.cpu_count()} cores; {args.images} JPEGs of {args.source_size}x{args.source_size} -> 512x512")
    print(f"sequential loop, PIL (torchvision way) : {seq_pil:8.1f} images/s")
    print(f"sequential loop, OpenCV 1 thread      : {seq1:8.1f} images/s")
    print(f"sequential loop, OpenCV default threads: {seq_mt:8.1f} images/s")
    print(f"tf.data first epoch (decode+cache)     : {rates[0]:8.1f} images/s  ({rates[0] / seq_pil:.2f}x the PIL loop,"
          f" {rates[0] / seq1:.2f}x the 1-thread OpenCV loop, {rates[0] / seq_mt:.2f}x the default-thread one)")
    cached = float(np.mean(rates[1:]))
    print(f"tf.data cached epochs                  : {cached:8.1f} images/s  ({cached / rates[0]:.1f}x the first epoch)")


if __name__ == "__main__":
    main()
