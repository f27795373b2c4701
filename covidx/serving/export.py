"""SavedModel export in TF Serving's layout: ``OUT/<model_name>/<version>/saved_model.pb`` + ``variables/``.

Signatures:

``serving_default``  ``image_bytes``: string ``[None]`` (PNG or JPEG bytes; REST clients send
                     ``{"instances": [{"b64": "..."}]}``). The whole preprocessing runs in the graph.
                     Returns ``probabilities`` float32 ``[None, K]``, ``class_index`` int64 ``[None]``,
                     ``class_name`` string ``[None]``.
``predict_tensor``   ``images``: float32 ``[None, S, S, C]`` pixels in [0, 255], already preprocessed.
                     Same outputs.

Segmenters (lung U-Net, FC-DenseNet103) return ``probabilities`` ``[None, S, S, K]`` and ``mask``
uint8 ``[None, S, S]`` (the per-pixel class) instead.

Bad requests (not PNG/JPEG, truncated, an empty batch, an image over ``max_pixels`` or the aspect-ratio bound)
fail with ``InvalidArgument`` and a message saying which element (``image_bytes[i]: reason``) and why; nothing
crashes or hangs. The run's ``config.json`` goes to ``assets.extra/covidx.json`` and its model card
(:mod:`covidx.model_card`) to ``assets.extra/MODEL_CARD.md`` (TF Serving ignores that folder).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from covidx.data.inference import preprocess_bytes
from covidx.data.io import DEFAULT_MAX_PIXELS
from covidx.model_card import CARD_NAME, card_text
from covidx.runs import Run, load_run


def next_version(base: Path) -> int:
    versions = [int(p.name) for p in base.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def serving_name(run: Run) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run.name)


def build_archive(run: Run, max_pixels: int = DEFAULT_MAX_PIXELS) -> keras.export.ExportArchive:
    model, config = run.model, run.preprocess
    classes = tf.constant(run.class_names)
    size, channels = config.image_size, config.channels

    segmenter = len(model.outputs[0].shape) == 4

    def outputs(images):
        probs = model(images, training=False)
        probs = probs[0] if isinstance(probs, (list, tuple)) else probs
        probs = tf.cast(probs, tf.float32)
        index = tf.argmax(probs, axis=-1)
        if segmenter:  # per-pixel softmax: the class map is the answer
            return {"probabilities": probs, "mask": tf.cast(index, tf.uint8)}
        return {"probabilities": probs, "class_index": index, "class_name": tf.gather(classes, index)}

    def serving_default(image_bytes):
        tf.debugging.assert_greater(tf.size(image_bytes), 0, message="empty batch: send at least one image")
        index = tf.range(tf.size(image_bytes, out_type=tf.int64))  # a bad element is named by its position
        images = tf.map_fn(lambda e: preprocess_bytes(e[1], config, max_pixels, e[0]), (index, image_bytes),
                           fn_output_signature=tf.TensorSpec([size, size, channels], tf.float32))
        return outputs(images)

    def predict_tensor(images):
        tf.debugging.assert_greater(tf.shape(images)[0], 0, message="empty batch: send at least one image")
        return outputs(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serving_default,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("predict_tensor", predict_tensor,
                         input_signature=[tf.TensorSpec([None, size, size, channels], tf.float32, name="images")])
    return archive


def write_version(archive: keras.export.ExportArchive, out_dir, name: str, version: int | None, meta: dict,
                  extra_files: dict[str, str] | None = None) -> Path:
    """Write ``archive`` as ``out_dir/<name>/<version>/`` (next free version when ``None``) with
    ``meta`` in ``assets.extra/covidx.json`` and ``extra_files`` (file name -> text, e.g. the model
    card) beside it; returns the version folder."""
    base = Path(out_dir) / name
    base.mkdir(parents=True, exist_ok=True)
    version = version or next_version(base)
    target = base / str(version)
    if target.exists():
        raise FileExistsError(f"{target} exists: choose another --version or leave it out to increment")
    tmp = base / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    archive.write_out(str(tmp), verbose=False)
    extra = tmp / "assets.extra"
    extra.mkdir(exist_ok=True)
    (extra / "covidx.json").write_text(json.dumps(meta, indent=2))
    for file_name, text in (extra_files or {}).items():
        (extra / file_name).write_text(text)
    tmp.rename(target)  # TF Serving never sees a half-written version
    return target


def export(checkpoint, out_dir, version: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
           name: str | None = None, precision: str | None = None) -> Path:
    """Export a run (or ``.keras`` file) to ``out_dir/<name>/<version>/``; returns that version folder.

    ``precision`` computes the exported network in fp32 / bf16 / fp16 / auto (:mod:`covidx.precision`);
    inputs and outputs stay float32 either way. ``None`` keeps the run's own precision.
    """
    run = load_run(checkpoint, precision=precision, inference=True)
    return write_version(build_archive(run, max_pixels), out_dir, name or serving_name(run), version,
                         {**run.config.to_dict(), "max_pixels": max_pixels, "precision": precision},
                         {CARD_NAME: card_text(run.directory, run.config.to_dict())})
