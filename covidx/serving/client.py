"""Calling an exported SavedModel the way a TF Serving client does: file bytes in, the signature's outputs out.

Used by ``python -m covidx.predict`` on an export folder, so what it prints is what TF Serving would
answer. DICOM files are sent as a 16-bit PNG of their display pixels (:func:`covidx.data.io.encode_for_serving`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from covidx.data.io import encode_for_serving

META = Path("assets.extra") / "covidx.json"


def find_export(path: str | Path) -> Path | None:
    """The SavedModel folder of an export: the folder itself or its newest numeric version; ``None`` if neither."""
    p = Path(path)
    if (p / "saved_model.pb").is_file():
        return p
    versions = sorted((int(v.name), v) for v in p.glob("*") if v.name.isdigit() and (v / "saved_model.pb").is_file())
    return versions[-1][1] if versions else None


def export_meta(export_dir: Path) -> dict:
    """``assets.extra/covidx.json`` of an export (the run or system configuration), ``{}`` when absent."""
    meta = Path(export_dir) / META
    return json.loads(meta.read_text()) if meta.is_file() else {}


def is_cascade_export(export_dir: Path) -> bool:
    return "stage1_classes" in export_meta(export_dir)


def serve_files(export_dir: Path, paths, batch_size: int = 16, progress: bool = False) -> dict[str, np.ndarray]:
    """Every output of ``serving_default`` for ``paths``, concatenated over batches of ``batch_size``."""
    fn = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    outs = []
    for i in tqdm(range(0, len(paths), batch_size), desc="predicting", unit="batch", disable=not progress):
        out = fn(image_bytes=tf.constant([encode_for_serving(p) for p in paths[i:i + batch_size]]))
        outs.append({k: v.numpy() for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def predict_export(export_dir: Path, paths, batch_size: int = 16, progress: bool = False):
    """``(probabilities (N, K), class names)`` of a single-model export."""
    out = serve_files(export_dir, paths, batch_size, progress)
    probs = out["probabilities"]
    names = export_meta(export_dir).get("classes") or [f"class_{k}" for k in range(probs.shape[1])]
    return probs, list(names)
