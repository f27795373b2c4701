"""Two-stage system of the concatenated-ensemble paper: classify, then segment the sick.

Hasan et al., Sec. III (Fig. 2) and V: "The segmentation model will activate only when the
classification model classifies an X-ray image as COVID-19 or pneumonia"; the predicted
mask is superimposed on the input image (Fig. 10). The classifier is normally the
``ensemble`` (:mod:`covidx.models.ensemble`) and the segmenter ``fc-densenet103``
(:mod:`covidx.models.tiramisu`) trained on Grad-CAM masks (:mod:`covidx.explain.masks`);
any covidx classifier / two-class segmenter pair works.

Each model keeps its own preprocessing (size, channels, CLAHE) from its run, applied with
the TF ops of :mod:`covidx.serving.preprocess`, the same code the exported graph runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from covidx.data.io import LUMA
from covidx.data.preprocess import PreprocessConfig
from covidx.explain.overlay import as_rgb_uint8
from covidx.serving.preprocess import preprocess_bytes, preprocess_gray

RED = (255, 0, 0)


def overlay_mask(image, mask, color=RED, alpha: float = 0.4) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` with ``color`` blended at ``alpha`` where ``mask`` is set (paper Fig. 10)."""
    base = as_rgb_uint8(image).astype(np.float64)
    m = np.asarray(mask, bool)
    if m.shape != base.shape[:2]:
        raise ValueError(f"mask shape {m.shape} does not match image {base.shape[:2]}")
    out = base.copy()
    out[m] = (1.0 - alpha) * base[m] + alpha * np.asarray(color, np.float64)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _gray_batch(images) -> np.ndarray:
    """(N, H, W, 1) float32 gray in [0, 255] from (N, H, W), (N, H, W, 1) or (N, H, W, 3)."""
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected a batch (N, H, W[, 1|3]) of [0, 255] pixels, got shape {np.shape(images)}")
    if x.shape[-1] == 3:  # the pipeline works on gray (covidx.data.io.to_gray_float); RGB input is luma
        x = (x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2])[..., None]
    return x


def _prepare(gray: np.ndarray, config: PreprocessConfig) -> tf.Tensor:
    return tf.stack([preprocess_gray(tf.constant(g), config) for g in gray])


def _foreground(probabilities) -> tf.Tensor:
    """Per-pixel class map -> uint8 mask, 1 = lesion (class index 1 of the ``lesions`` task)."""
    return tf.cast(tf.equal(tf.argmax(probabilities, axis=-1), 1), tf.uint8)


@dataclass
class TwoStageResult:
    """Per image: probabilities (N, K), class_index (N,), class_name, and mask / overlay or ``None``.

    ``masks[i]``: (S, S) uint8 {0, 1} at the segmenter's input size, ``None`` when image ``i``
    was not routed to the segmenter; ``overlays[i]``: (S, S, 3) uint8 red overlay or ``None``.
    """

    probabilities: np.ndarray
    class_index: np.ndarray
    class_name: list[str]
    masks: list
    overlays: list

    @property
    def segmented(self) -> np.ndarray:
        return np.array([m is not None for m in self.masks])


class TwoStagePredictor:
    """Classifier, then the segmenter on the images classified as ``segment_classes``.

    Args:
        classifier: covidx classifier (softmax output), [0, 255] pixels.
        segmenter: covidx two-class segmenter (per-pixel softmax, background / lesion).
        class_names: the classifier's class names, in output order.
        segment_classes: classes whose images are segmented (paper: COVID-19 and pneumonia).
        classifier_preprocess, segmenter_preprocess: each model's :class:`PreprocessConfig`;
            default: stretch to the model's input size and channels.
    """

    def __init__(self, classifier: keras.Model, segmenter: keras.Model, class_names: Sequence[str],
                 segment_classes: Sequence[str] = ("covid19", "pneumonia"),
                 classifier_preprocess: PreprocessConfig | None = None,
                 segmenter_preprocess: PreprocessConfig | None = None):
        self.classifier, self.segmenter = classifier, segmenter
        self.class_names = list(class_names)
        if len(self.class_names) != classifier.outputs[0].shape[-1]:
            raise ValueError(f"{len(self.class_names)} class names for {classifier.outputs[0].shape[-1]} outputs")
        unknown = [c for c in segment_classes if c not in self.class_names]
        if unknown:
            raise ValueError(f"segment_classes {unknown} are not classifier classes {self.class_names}")
        self.segment_classes = tuple(segment_classes)
        self.segment_indices = [self.class_names.index(c) for c in segment_classes]
        self.classifier_preprocess = classifier_preprocess or _default_config(classifier)
        self.segmenter_preprocess = segmenter_preprocess or _default_config(segmenter)

    @classmethod
    def from_runs(cls, classifier_run, segmenter_run, segment_classes=("covid19", "pneumonia")) -> "TwoStagePredictor":
        """Load both runs (directories or ``.keras`` files; ``safe_mode=True``) with their preprocessing."""
        from covidx.runs import Run, load_run

        c = classifier_run if isinstance(classifier_run, Run) else load_run(classifier_run)
        s = segmenter_run if isinstance(segmenter_run, Run) else load_run(segmenter_run)
        return cls(c.model, s.model, c.class_names, segment_classes, c.preprocess, s.preprocess)

    def predict(self, images, batch_size: int = 16) -> TwoStageResult:
        """Run both stages on a batch of [0, 255] images (any size; gray or RGB)."""
        gray = _gray_batch(images)
        probs = np.concatenate([
            np.asarray(self.classifier(_prepare(gray[i:i + batch_size], self.classifier_preprocess), training=False),
                       np.float32)
            for i in range(0, len(gray), batch_size)
        ])
        index = probs.argmax(axis=-1)
        routed = np.flatnonzero(np.isin(index, self.segment_indices))
        masks: list = [None] * len(gray)
        overlays: list = [None] * len(gray)
        for start in range(0, len(routed), batch_size):
            chunk = routed[start:start + batch_size]
            x = _prepare(gray[chunk], self.segmenter_preprocess)
            m = _foreground(self.segmenter(x, training=False)).numpy()
            for j, i in enumerate(chunk):
                masks[i] = m[j]
                overlays[i] = overlay_mask(x[j].numpy(), m[j])
        return TwoStageResult(probs, index, [self.class_names[i] for i in index], masks, overlays)


def _default_config(model: keras.Model) -> PreprocessConfig:
    shape = model.inputs[0].shape
    if shape[1] is None:
        raise ValueError(f"{model.name}: input size is not fixed; pass its PreprocessConfig")
    return PreprocessConfig(image_size=int(shape[1]), channels=int(shape[-1]))


# ---------------------------------------------------------------------------
# TF Serving export
# ---------------------------------------------------------------------------


def build_two_stage_archive(predictor: TwoStagePredictor, max_pixels: int | None = None) -> keras.export.ExportArchive:
    """ExportArchive with ``serving_default(image_bytes: string [None])`` for both stages.

    Outputs: ``probabilities`` float32 [B, K], ``class_index`` int64 [B], ``class_name``
    string [B], ``mask`` uint8 [B, S, S] (1 = lesion, S = the segmenter's input size; all
    zeros where the image was not segmented) and ``segmented`` bool [B].

    Each image is preprocessed in the graph for each model by
    :func:`covidx.serving.preprocess.preprocess_bytes` with that model's configuration.
    The segmenter runs on the whole batch and its output is masked by the routing: a
    per-image conditional (``tf.cond`` inside ``tf.map_fn``) would skip the segmenter for
    normal images, but serialises the batch and complicates the graph, whereas running on
    all and zeroing gives the same answer for every image, which is what matters for
    serving; :class:`TwoStagePredictor` does skip the work in Python.
    """
    from covidx.serving.export import DEFAULT_MAX_PIXELS

    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    classifier, segmenter = predictor.classifier, predictor.segmenter
    cconf, sconf = predictor.classifier_preprocess, predictor.segmenter_preprocess
    classes = tf.constant(predictor.class_names)
    routed_ids = tf.constant(predictor.segment_indices, tf.int64)

    def serving_default(image_bytes):
        tf.debugging.assert_greater(tf.size(image_bytes), 0, message="empty batch: send at least one image")
        cx, sx = tf.map_fn(
            lambda b: (preprocess_bytes(b, cconf, max_pixels), preprocess_bytes(b, sconf, max_pixels)),
            image_bytes,
            fn_output_signature=(tf.TensorSpec([cconf.image_size, cconf.image_size, cconf.channels], tf.float32),
                                 tf.TensorSpec([sconf.image_size, sconf.image_size, sconf.channels], tf.float32)),
        )
        probs = tf.cast(classifier(cx, training=False), tf.float32)
        index = tf.argmax(probs, axis=-1)
        segmented = tf.reduce_any(tf.equal(index[:, None], routed_ids[None, :]), axis=-1)
        mask = _foreground(segmenter(sx, training=False)) * tf.cast(segmented, tf.uint8)[:, None, None]
        return {"probabilities": probs, "class_index": index, "class_name": tf.gather(classes, index),
                "mask": mask, "segmented": segmented}

    archive = keras.export.ExportArchive()
    archive.track(classifier)
    archive.track(segmenter)
    archive.add_endpoint("serving_default", serving_default,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    return archive


def export_two_stage(classifier_run, segmenter_run, out_dir, name: str = "two_stage", version: int | None = None,
                     segment_classes=("covid19", "pneumonia"), max_pixels: int | None = None) -> Path:
    """Write ``out_dir/<name>/<version>/`` (TF Serving layout) for two runs; returns the version folder.

    ``assets.extra/covidx.json`` records both models' preprocessing and the routing.
    """
    from covidx.serving.export import write_version

    predictor = TwoStagePredictor.from_runs(classifier_run, segmenter_run, segment_classes)
    meta = {
        "classes": predictor.class_names, "segment_classes": list(predictor.segment_classes),
        "classifier_preprocess": predictor.classifier_preprocess.to_dict(),
        "segmenter_preprocess": predictor.segmenter_preprocess.to_dict(),
    }
    return write_version(build_two_stage_archive(predictor, max_pixels), out_dir, name, version, meta)
