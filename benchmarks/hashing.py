"""Duplicate-image fingerprints: throughput, and the near-duplicate threshold measured on real radiographs.

    python benchmarks/hashing.py DATA [--layout kermany] [--copies 300] [--workers 2]

1. Fingerprints (decode + BLAKE2b of the pixels + pHash) every image of DATA without the cache,
   prints images/s and the extrapolation to COVIDx's ~30,000 images; then reads them again through
   a fresh cache (second-run cost).
2. Threshold: pHash Hamming distances between every pair of distinct images of DATA (the low tail
   says how close different radiographs come), and between ``--copies`` images and copies of
   themselves resized to 50-150 % and re-encoded as JPEG at quality 50-95 (how far a copy drifts).
3. Duplicate groups found at the chosen threshold (exact / near), and files whose patient could not
   be read from the file name.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

import cv2
import imagehash
import numpy as np
from PIL import Image

from covidx.data.duplicates import (NEAR_DISTANCE, duplicate_groups, fingerprint, fingerprint_table,
                                    hamming_distances, hash_words)
from covidx.data.io import read_image
from covidx.data.sources import load_sources

COVIDX_IMAGES = 30_000


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--layout")
    ap.add_argument("--copies", type=int, default=300)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)

    table, report = load_sources([args.data], [args.layout] if args.layout else None)
    print(f"{len(table)} images, {table.patient_id.nunique()} patients; patient unreadable from the file name: "
          f"{len(report.no_patient)}")
    for p, r in report.no_patient[:20]:
        print(f"  {p}: {r}")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fp = fingerprint_table(table, cache=False, workers=args.workers)
        dt = time.perf_counter() - t0
        rate = len(fp) / dt
        print(f"\nfingerprinting, {args.workers} threads, no cache: {len(fp)} images in {dt:.1f} s = {rate:.0f} img/s; "
              f"~{COVIDX_IMAGES} images (COVIDx) at this rate: {COVIDX_IMAGES / rate / 60:.1f} min "
              "(full-size originals decode slower than 224x224 JPEGs)")
        cache = Path(tmp) / "cache.sqlite"
        fingerprint_table(table, cache=cache, workers=args.workers)
        t0 = time.perf_counter()
        fingerprint_table(table, cache=cache, workers=args.workers)
        dt2 = time.perf_counter() - t0
        print(f"second run through the cache: {dt2:.2f} s ({len(fp) / dt2:.0f} img/s)")
        t0 = time.perf_counter()
        groups = duplicate_groups(fp)
        print(f"pairwise search over {len(fp)} hashes: {time.perf_counter() - t0:.2f} s")

        # Distances between distinct images (all pairs), at 256 bits and with the usual 64-bit pHash.
        words = hash_words(fp.phash.tolist())
        with ThreadPoolExecutor(args.workers) as pool:
            p64 = list(pool.map(lambda p: str(imagehash.phash(Image.fromarray(
                np.clip(np.rint(read_image(p)), 0, 255).astype(np.uint8)))), fp.path))
        words64 = hash_words(p64)
        cols = np.arange(len(words))
        hist, hist64 = np.zeros(257, np.int64), np.zeros(65, np.int64)
        for s in range(0, len(words), 512):
            upper = cols[None, :] > cols[s:s + 512, None]  # each pair once
            hist += np.bincount(hamming_distances(words[s:s + 512], words)[upper], minlength=257)
            hist64 += np.bincount(hamming_distances(words64[s:s + 512], words64)[upper], minlength=65)
        total = int(hist.sum())
        cum, cum64 = np.cumsum(hist), np.cumsum(hist64)
        print(f"\npHash distance between all {total:,} pairs of images (exact copies included):")
        for t in (0, 2, 4, 6, 8, 10):
            print(f"  64-bit pHash  <= {t:3d} bits: {cum64[t]:>9,} pairs ({100 * cum64[t] / total:.4f} %)")
        for t in (0, 10, 20, 30, 32, 40, 48, 64):
            print(f"  256-bit pHash <= {t:3d} bits: {cum[t]:>9,} pairs ({100 * cum[t] / total:.4f} %)")
        print(f"  closest pair of distinct 256-bit hashes: {int(np.nonzero(hist[1:])[0][0]) + 1} bits")

        # Distances between images and their resized / re-encoded copies.
        rng = np.random.default_rng(0)
        sample = rng.choice(len(fp), size=min(args.copies, len(fp)), replace=False)
        drift = []
        for k, idx in enumerate(sample):
            src = cv2.imread(fp.path.iloc[idx], cv2.IMREAD_UNCHANGED)
            scale = rng.uniform(0.5, 1.5)
            quality = int(rng.integers(50, 96))
            size = (max(8, int(src.shape[1] * scale)), max(8, int(src.shape[0] * scale)))
            copy = cv2.resize(src, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
            out = Path(tmp) / f"copy{k}.jpg"
            cv2.imwrite(str(out), copy, [cv2.IMWRITE_JPEG_QUALITY, quality])
            drift.append(bin(int(fingerprint(out)[1], 16) ^ int(fp.phash.iloc[idx], 16)).count("1"))  # 256 bits
        drift = np.array(drift)
        print(f"\npHash distance original -> resized (50-150 %) + JPEG (q 50-95) copy, {len(drift)} images: "
              f"median {np.median(drift):.0f}, 99th pct {np.percentile(drift, 99):.0f}, 99.9th pct "
              f"{np.percentile(drift, 99.9):.1f}, max {drift.max()} (of 256); within {NEAR_DISTANCE} bits: "
              f"{100 * (drift <= NEAR_DISTANCE).mean():.1f} %")

    kinds = groups.groupby("dup_group")["kind"].first().value_counts()
    print(f"\nduplicate groups at <= {NEAR_DISTANCE} bits: {groups.dup_group.nunique()} "
          f"({kinds.get('exact', 0)} exact, {kinds.get('near', 0)} near), {len(groups)} images; "
          f"with conflicting labels: {groups.loc[groups.conflict, 'dup_group'].nunique()}; "
          f"spanning several patients: {(groups.groupby('dup_group').patient_id.nunique() > 1).sum()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
