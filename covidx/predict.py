"""``python -m covidx.predict --checkpoint RUN|FILE.keras|EXPORT_DIR INPUT [--out results.csv]``.

INPUT is an image (PNG, JPEG, DICOM), a folder (searched recursively) or a CSV with a
``path`` column. Prints and writes one row per image: path, the probability of every
class, the predicted label. Unreadable files are reported with the reason and skipped.
``--explain gradcam`` writes a Grad-CAM overlay per image (Keras checkpoints).

A Keras checkpoint is run through the same tf.data preprocessing it was trained
with; an export folder (TF Serving layout) through its ``serving_default``
signature, the way a TF Serving client would call it.
"""

from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from covidx.data.io import IMAGE_EXTENSIONS, ImageReadError, read_image


def list_inputs(target: str | Path) -> list[str]:
    p = Path(target)
    if p.is_dir():
        return [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
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


def find_export(path: str | Path) -> Path | None:
    """The SavedModel folder of an export: the folder itself or its newest numeric version."""
    p = Path(path)
    if (p / "saved_model.pb").is_file():
        return p
    versions = sorted((int(v.name), v) for v in p.glob("*") if v.name.isdigit() and (v / "saved_model.pb").is_file())
    return versions[-1][1] if versions else None


def predict_keras(checkpoint, paths, batch_size=16, progress=True):
    from covidx.runs import load_run, predict_table

    run = load_run(checkpoint)
    table = pd.DataFrame(dict(path=paths))
    table["dicom"] = [p.lower().endswith((".dcm", ".dicom")) for p in paths]
    probs, _ = predict_table(run, table, batch_size, progress)
    return probs, run.class_names, run


def _encoded(path: str) -> bytes:
    """File bytes for the serving signature: PNG/JPEG as they are, DICOM as a 16-bit PNG of its display pixels."""
    import cv2

    from covidx.data.io import is_dicom

    if not is_dicom(path):
        return Path(path).read_bytes()
    img = np.round(read_image(path) * 257.0).astype(np.uint16)
    return cv2.imencode(".png", img)[1].tobytes()


def predict_export(export_dir: Path, paths, batch_size=16, progress=True):
    import tensorflow as tf

    fn = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    probs, names = [], None
    chunks = range(0, len(paths), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="predicting", unit="batch", file=sys.stderr)
    for i in chunks:
        out = fn(image_bytes=tf.constant([_encoded(p) for p in paths[i:i + batch_size]]))
        probs.append(out["probabilities"].numpy())
    import json

    meta = export_dir / "assets.extra" / "covidx.json"
    names = json.loads(meta.read_text())["classes"] if meta.is_file() else [f"class_{k}" for k in range(probs[0].shape[1])]
    return np.concatenate(probs), names


def write_results(path, paths, probs, class_names):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *[f"p_{c}" for c in class_names], "label"])
        for p, row in zip(paths, probs):
            w.writerow([p, *[f"{v:.6f}" for v in row], class_names[int(np.argmax(row))]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m covidx.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="image, folder or CSV with a 'path' column")
    ap.add_argument("--checkpoint", required=True, help="run directory, .keras file or export folder")
    ap.add_argument("--out", default="results.csv", help="CSV of path, probabilities, label")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--explain", choices=("gradcam", "gradcam++"), help="also write an overlay per image")
    ap.add_argument("--overlays", help="folder for overlays (default: next to --out)")
    args = ap.parse_args(argv)
    try:
        paths = list_inputs(args.input)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    good, bad = readable(paths)
    for p, reason in bad:
        print(f"skipped {p}: {reason}", file=sys.stderr)
    if not good:
        print(f"error: no readable image in {args.input}", file=sys.stderr)
        return 2
    progress = len(good) > args.batch_size
    export_dir = find_export(args.checkpoint)
    try:
        if export_dir is not None:
            if args.explain:
                print("error: --explain needs a Keras checkpoint (run directory or .keras), not an export",
                      file=sys.stderr)
                return 2
            probs, names = predict_export(export_dir, good, args.batch_size, progress)
        else:
            probs, names, run = predict_keras(args.checkpoint, good, args.batch_size, progress)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_results(args.out, good, probs, names)
    if len(good) <= 20:
        for p, row in zip(good, probs):
            print(f"{p}: {names[int(np.argmax(row))]}  " + "  ".join(f"{c}={v:.3f}" for c, v in zip(names, row)))
    if args.explain:
        from covidx.explain.cli import write_overlays

        out = Path(args.out)
        folder = Path(args.overlays) if args.overlays else out.with_name(out.stem + "_overlays")
        written = write_overlays(run, good, args.explain, folder, batch_size=args.batch_size)
        print(f"{len(written)} overlays in {folder}")
    print(f"{len(good)} images -> {args.out}" + (f" ({len(bad)} skipped)" if bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
