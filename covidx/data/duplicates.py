"""Duplicate radiographs across the sources of a run: exact copies and resized / re-encoded copies.

The public COVID-19 collections copy each other (Cohen, Figure1, Actualmed, COVIDx and the
lung-mask sets built on Cohen share images) and Kermany holds byte-identical files under two
names; Roberts et al. 2021 ("Common pitfalls and recommendations for using machine learning to
detect and prognosticate for COVID-19", Nat. Mach. Intell. 3:199) found duplicates across
training and test the most common flaw. Two fingerprints per image:

* **exact**: a BLAKE2b digest of the decoded grayscale pixels (and their shape), so the same
  picture stored as PNG and as a lossless re-save, or under two names, matches;
* **near**: the 256-bit DCT perceptual hash of ``imagehash.phash(hash_size=16)`` (Zauner 2010,
  "Implementation and benchmarking of perceptual image hash functions"): whether each of the 16x16
  lowest DCT frequencies of the image shrunk to 64x64 lies above their median, which resizing and
  JPEG re-encoding leave almost unchanged. Two images are near duplicates when their hashes differ
  in at most :data:`NEAR_DISTANCE` bits. The usual 64-bit hash is too coarse for radiographs, which
  all look alike at 8x8: on real chest X-rays distinct images of different patients come within
  6 of 64 bits by the thousand (1,579 pairs of 5,207 images), while at 256 bits they stay 38 bits or more apart.

Images linked by either relation form one duplicate group (connected components, so a chain
of near copies is one group). :func:`merge_duplicate_groups` folds every group into one split
unit (``group_id``) so that copies never straddle splits.

Fingerprints are cached in an SQLite file keyed by (path, size, mtime) so a second run only
hashes new or changed files: ``$COVIDX_CACHE_DIR/image-hashes-v1.sqlite``, by default under
``$XDG_CACHE_HOME/covidx`` (``~/.cache/covidx``).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from covidx.data.io import ImageReadError, read_image
from covidx.data.sources import IndexReport

# Largest Hamming distance (of 256 bits) between the pHashes of two copies of one image. Measured on 5,207 real
# paediatric radiographs (README, "How covidx keeps patients and duplicates out of two splits"): copies resized to
# 50-150 % and re-encoded as JPEG (quality 50-95) stay within 10 bits of their original (99th percentile 6), while
# no two distinct images of the set come closer than 38 bits; 20 sits between the two with margin on both sides.
NEAR_DISTANCE = 20
PHASH_SIZE = 16  # 16x16 DCT coefficients = 256 bits
CACHE_NAME = "image-hashes-v1.sqlite"  # bump the version when the fingerprints' definition changes


def cache_dir() -> Path:
    """Where the fingerprint cache lives: ``$COVIDX_CACHE_DIR``, else ``$XDG_CACHE_HOME/covidx``, else ``~/.cache/covidx``."""
    if os.environ.get("COVIDX_CACHE_DIR"):
        return Path(os.environ["COVIDX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "covidx"


def fingerprint(path: str | Path) -> tuple[str, str]:
    """(exact digest, 256-bit pHash as 64 hex digits) of one image, both from its decoded grayscale pixels.

    Raises:
        ImageReadError: the file cannot be decoded (the message names it).
    """
    gray = read_image(path)  # float32 [0, 255], the same decode training uses
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(gray.shape, np.int64).tobytes())
    h.update(np.ascontiguousarray(gray).tobytes())
    img = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), mode="L")
    return h.hexdigest(), str(imagehash.phash(img, hash_size=PHASH_SIZE))


class FingerprintCache:
    """SQLite store of fingerprints keyed by path, valid while the file's size and mtime are unchanged."""

    def __init__(self, file: str | Path):
        self.file = Path(file)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.file, timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                        "digest TEXT, phash TEXT)")

    def lookup(self, paths) -> dict:
        stats = {}
        for p in paths:
            try:
                st = os.stat(p)
                stats[p] = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass
        found = {}
        cur = self.db.execute("SELECT path, size, mtime_ns, digest, phash FROM hashes")
        for path, size, mtime, digest, ph in cur:
            if stats.get(path) == (size, mtime):
                found[path] = (digest, ph)
        self._stats = stats
        return found

    def store(self, items: dict):
        rows = [(p, *self._stats[p], d, h) for p, (d, h) in items.items() if p in self._stats]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", rows)

    def close(self):
        self.db.close()


def fingerprint_table(table: pd.DataFrame, report: IndexReport | None = None, cache: str | Path | None | bool = True,
                      workers: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Add ``digest`` and ``phash`` columns to ``table``; rows whose image cannot be decoded are reported and dropped.

    ``cache``: ``True`` for the default cache file (:func:`cache_dir`), a path for another, ``False``/``None`` for none.
    Decoding runs in a thread pool (OpenCV and PIL release the GIL).
    """
    paths = [str(Path(p).resolve()) for p in table["path"]]
    store = None
    if cache:
        store = FingerprintCache(cache_dir() / CACHE_NAME if cache is True else cache)
    known = store.lookup(set(paths)) if store else {}
    todo = sorted(set(paths) - set(known))

    def one(p):
        try:
            return fingerprint(p)
        except ImageReadError as e:
            return str(e)

    new, failed = {}, {}
    if todo:
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            results = pool.map(one, todo)
            if progress:
                results = tqdm(results, total=len(todo), desc="hashing images", unit="img")
            for p, r in zip(todo, results):
                (failed if isinstance(r, str) else new)[p] = r
    if store:
        store.store(new)
        store.close()
    known.update(new)
    out = table.copy()
    keep = [p in known for p in paths]
    if report is not None:
        for p, msg in failed.items():
            report.skip(p, msg.partition(": ")[2] or msg)
    out["digest"] = [known[p][0] if p in known else "" for p in paths]
    out["phash"] = [known[p][1] if p in known else "" for p in paths]
    return out.loc[keep].reset_index(drop=True)


def hash_words(phashes) -> np.ndarray:
    """Hex hashes -> (N, words) uint64 array (for XOR + popcount)."""
    if len(phashes) == 0:
        return np.zeros((0, 1), np.uint64)
    raw = np.frombuffer(b"".join(bytes.fromhex(x) for x in phashes), np.uint8).reshape(len(phashes), -1)
    return raw.view(">u8").astype(np.uint64)


def hamming_distances(block: np.ndarray, words: np.ndarray) -> np.ndarray:
    """(len(block), len(words)) Hamming distances between two sets of :func:`hash_words` rows."""
    d = np.zeros((len(block), len(words)), np.uint16)
    for w in range(words.shape[1]):  # one word at a time keeps the temporary small (30,000 hashes: 60 MB)
        d += np.bitwise_count(block[:, None, w] ^ words[None, :, w])
    return d


def hamming_pairs(phashes, max_distance: int, chunk: int = 256) -> list[tuple[int, int, int]]:
    """Every pair ``(i, j, distance)`` with ``i < j`` whose hex hashes differ in at most ``max_distance`` bits."""
    h = hash_words(phashes)
    pairs = []
    for start in range(0, len(h), chunk):
        block = h[start:start + chunk]
        d = hamming_distances(block, h)
        i, j = np.nonzero(d <= max_distance)
        i = i + start
        keep = j > i
        pairs += zip(i[keep].tolist(), j[keep].tolist(), d[i[keep] - start, j[keep]].tolist())
    return pairs


class _UnionFind:
    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, a):
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_groups(table: pd.DataFrame, near_distance: int = NEAR_DISTANCE) -> pd.DataFrame:
    """Rows of ``table`` (with ``digest``/``phash``) that have a copy, one ``dup_group`` number per group.

    Returns a frame with the table's columns plus ``dup_group``, ``kind`` (``exact`` when every member has
    the same pixels, else ``near``), ``cross_source`` and ``conflict`` (members carry different labels),
    ordered cross-source groups first, then by size. ``near_distance < 0`` finds exact copies only.
    """
    n = len(table)
    uf = _UnionFind(n)
    digests = table["digest"].tolist()
    first = {}
    for i, d in enumerate(digests):
        if d in first:
            uf.union(first[d], i)
        else:
            first[d] = i
    if near_distance >= 0 and n:
        for i, j, _ in hamming_pairs(table["phash"].tolist(), near_distance):
            uf.union(i, j)
    roots = np.array([uf.find(i) for i in range(n)])
    sizes = pd.Series(roots).value_counts()
    member = np.isin(roots, sizes.index[sizes > 1])
    out = table.loc[member].copy()
    out["_root"] = roots[member]
    label = "label" if "label" in out.columns else "finding"
    g = out.groupby("_root")
    info = pd.DataFrame({
        "size": g.size(),
        "kind": g["digest"].nunique().map(lambda k: "exact" if k == 1 else "near"),
        "cross_source": g["source"].nunique() > 1,
        "conflict": g[label].nunique() > 1,
    })
    info = info.sort_values(["cross_source", "size"], ascending=[False, False], kind="stable")
    info["dup_group"] = np.arange(len(info))
    out = out.join(info[["dup_group", "kind", "cross_source", "conflict"]], on="_root")
    return out.drop(columns="_root").sort_values(["dup_group", "path"], kind="stable").reset_index(drop=True)


def merge_duplicate_groups(table: pd.DataFrame, groups: pd.DataFrame, report: IndexReport | None = None) -> pd.DataFrame:
    """Set ``group_id`` (the split unit): patients linked by a shared image become one group.

    Every row starts with ``group_id = patient_id``; the patients of each duplicate group are joined
    (transitively), and the group takes the smallest of their ids. Groups whose copies carry different
    labels are reported.
    """
    out = table.copy()
    pids = sorted(set(out["patient_id"]))
    index = {p: i for i, p in enumerate(pids)}
    uf = _UnionFind(len(pids))
    for _, members in groups.groupby("dup_group"):
        ids = [index[p] for p in members["patient_id"].unique() if p in index]
        for a in ids[1:]:
            uf.union(ids[0], a)
    out["group_id"] = [pids[uf.find(index[p])] for p in out["patient_id"]]
    if report is not None and len(groups):
        label = "label" if "label" in groups.columns else "finding"
        for gid, members in groups[groups["conflict"]].groupby("dup_group"):
            labels = ", ".join(f"{Path(p).name}={lab}" for p, lab in zip(members["path"], members[label]))
            report.unmap(f"duplicate group {gid}", f"copies of one image with different labels: {labels}")
    return out


def describe_groups(groups: pd.DataFrame) -> list[str]:
    """Text listing of :func:`duplicate_groups` (cross-source groups first)."""
    lines = []
    label = "label" if "label" in groups.columns else "finding"
    for gid, members in groups.groupby("dup_group", sort=True):
        head = members.iloc[0]
        tags = [head["kind"]] + (["cross-source"] if head["cross_source"] else []) + (
            ["CONFLICTING LABELS"] if head["conflict"] else [])
        lines.append(f"group {gid} ({len(members)} images, {', '.join(tags)}):")
        for _, r in members.iterrows():
            lines.append(f"  {r['source']:<12} {r[label]:<10} {r['patient_id']:<28} {r['path']}")
    return lines
