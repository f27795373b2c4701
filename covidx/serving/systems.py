"""TF Serving exports of the multi-model systems (:mod:`covidx.systems`): one SavedModel per system.

Each model of a system keeps its own preprocessing, run in the graph by
:func:`covidx.data.inference.preprocess_bytes`; versions are written by
:func:`covidx.serving.export.write_version` (temporary folder, then rename).
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from covidx.data.inference import encoded_size, preprocess_bytes, preprocess_gray
from covidx.data.io import DEFAULT_MAX_PIXELS
from covidx.data.preprocess import PreprocessConfig
from covidx.layers.cascade import FINAL_CLASSES
from covidx.serving.export import write_version
from covidx.systems.cascade import CascadeSEME
from covidx.systems.two_stage import TwoStagePredictor, foreground


# --- Cascade-SEME ------------------------------------------------------------------------------------
def build_cascade_archive(cascade: CascadeSEME, max_pixels: int | None = None) -> keras.export.ExportArchive:
    """SavedModel endpoints of the cascade.

    ``serving_default(image_bytes: string [B])``: PNG/JPEG bytes; every stage decodes them with its
    own preprocessing (:func:`covidx.data.inference.preprocess_bytes`); stage 2 and the
    segmenter run on the routed images only. ``predict_tensor(images: float32 [B, S1, S1, C1])``:
    images already preprocessed for stage 1; stage 2 and the segmenter apply their own
    preprocessing to its gray plane (CLAHE not repeated when stage 1 applied it).

    Outputs: ``stage1_probabilities`` float32 [B, K1], ``stage2_probability`` float32 [B]
    (:data:`SENTINEL` when not reached), ``reached_stage2`` bool [B], ``class_index`` int64 [B] and
    ``class_name`` string [B] over :data:`FINAL_CLASSES`.
    """
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    c1, c2, cl = cascade.stage1_preprocess, cascade.stage2_preprocess, cascade.lung_preprocess
    names = tf.constant(list(FINAL_CLASSES))
    lung = cascade.lung is not None

    def spec(cfg):
        return tf.TensorSpec([cfg.image_size, cfg.image_size, cfg.channels], tf.float32)

    def finish(out):
        index = tf.cast(out["class_index"], tf.int64)
        return {**out, "class_index": index, "class_name": tf.gather(names, index)}

    def serving_default(image_bytes):
        tf.debugging.assert_greater(tf.size(image_bytes), 0, message="empty batch: send at least one image")
        index = tf.range(tf.size(image_bytes, out_type=tf.int64))  # a bad element is named by its position
        x1 = tf.map_fn(lambda e: preprocess_bytes(e[1], c1, max_pixels, e[0]), (index, image_bytes),
                       fn_output_signature=spec(c1))

        def routed_inputs(idx):
            chosen = tf.gather(image_bytes, idx)
            x2 = tf.map_fn(lambda b: preprocess_bytes(b, c2, max_pixels), chosen, fn_output_signature=spec(c2))
            if not lung:
                return x2, None, None
            xl = tf.map_fn(lambda b: preprocess_bytes(b, cl, max_pixels), chosen, fn_output_signature=spec(cl))
            hw = tf.map_fn(encoded_size, chosen, fn_output_signature=tf.TensorSpec([2], tf.int64))
            return x2, xl, hw

        return finish(cascade.forward(x1, routed_inputs))

    # predict_tensor's pixels already carry stage 1's CLAHE (if any): do not apply it twice.
    c2t = c2 if not c1.clahe_inference else PreprocessConfig.from_dict({**c2.to_dict(), "clahe_inference": False})
    clt = cl if not (lung and c1.clahe_inference) else PreprocessConfig.from_dict({**cl.to_dict(), "clahe_inference": False})

    def predict_tensor(images):
        tf.debugging.assert_greater(tf.shape(images)[0], 0, message="empty batch: send at least one image")
        gray = images[..., :1]

        def routed_inputs(idx):
            chosen = tf.gather(gray, idx)
            x2 = tf.map_fn(lambda g: preprocess_gray(g, c2t), chosen, fn_output_signature=spec(c2))
            if not lung:
                return x2, None, None
            xl = tf.map_fn(lambda g: preprocess_gray(g, clt), chosen, fn_output_signature=spec(cl))
            hw = tf.tile(tf.constant([[c1.image_size, c1.image_size]], tf.int64), [tf.size(idx), 1])
            return x2, xl, hw

        return finish(cascade.forward(images, routed_inputs))

    archive = keras.export.ExportArchive()
    for model in (cascade.stage1, cascade.stage2, cascade.lung):
        if model is not None:
            archive.track(model)
    archive.add_endpoint("serving_default", serving_default,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("predict_tensor", predict_tensor, input_signature=[
        tf.TensorSpec([None, c1.image_size, c1.image_size, c1.channels], tf.float32, name="images")])
    return archive


def export_cascade(cascade_dir, out_dir, version: int | None = None, max_pixels: int | None = None,
                   name: str = "cascade-seme") -> Path:
    """Export a saved cascade to ``out_dir/<name>/<version>/`` (TF Serving layout); returns that folder.

    ``cascade.json`` (plus ``max_pixels`` and ``classes`` = :data:`FINAL_CLASSES`) goes to
    ``assets.extra/covidx.json``.
    """
    cascade = CascadeSEME.load(cascade_dir)
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    meta = {**cascade.config(), "model": name, "classes": list(FINAL_CLASSES), "max_pixels": max_pixels}
    return write_version(build_cascade_archive(cascade, max_pixels), out_dir, name, version, meta)


# --- two-stage classify -> segment ---------------------------------------------------------------------
def build_two_stage_archive(predictor: TwoStagePredictor, max_pixels: int | None = None) -> keras.export.ExportArchive:
    """ExportArchive with ``serving_default(image_bytes: string [None])`` for both stages.

    Outputs: ``probabilities`` float32 [B, K], ``class_index`` int64 [B], ``class_name``
    string [B], ``mask`` uint8 [B, S, S] (1 = lesion, S = the segmenter's input size; all
    zeros where the image was not segmented) and ``segmented`` bool [B].

    Each image is preprocessed in the graph for each model by
    :func:`covidx.data.inference.preprocess_bytes` with that model's configuration.
    The segmenter runs on the whole batch and its output is masked by the routing: a
    per-image conditional (``tf.cond`` inside ``tf.map_fn``) would skip the segmenter for
    normal images, but serialises the batch and complicates the graph, whereas running on
    all and zeroing gives the same answer for every image, which is what matters for
    serving; :class:`TwoStagePredictor` does skip the work in Python.
    """
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    classifier, segmenter = predictor.classifier, predictor.segmenter
    cconf, sconf = predictor.classifier_preprocess, predictor.segmenter_preprocess
    classes = tf.constant(predictor.class_names)
    routed_ids = tf.constant(predictor.segment_indices, tf.int64)

    def serving_default(image_bytes):
        tf.debugging.assert_greater(tf.size(image_bytes), 0, message="empty batch: send at least one image")
        index = tf.range(tf.size(image_bytes, out_type=tf.int64))  # a bad element is named by its position
        cx, sx = tf.map_fn(
            lambda e: (preprocess_bytes(e[1], cconf, max_pixels, e[0]), preprocess_bytes(e[1], sconf, max_pixels, e[0])),
            (index, image_bytes),
            fn_output_signature=(tf.TensorSpec([cconf.image_size, cconf.image_size, cconf.channels], tf.float32),
                                 tf.TensorSpec([sconf.image_size, sconf.image_size, sconf.channels], tf.float32)),
        )
        probs = tf.cast(classifier(cx, training=False), tf.float32)
        index = tf.argmax(probs, axis=-1)
        segmented = tf.reduce_any(tf.equal(index[:, None], routed_ids[None, :]), axis=-1)
        mask = foreground(segmenter(sx, training=False)) * tf.cast(segmented, tf.uint8)[:, None, None]
        return {"probabilities": probs, "class_index": index, "class_name": tf.gather(classes, index),
                "mask": mask, "segmented": segmented}

    archive = keras.export.ExportArchive()
    archive.track(classifier)
    archive.track(segmenter)
    archive.add_endpoint("serving_default", serving_default,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    return archive


def export_two_stage(classifier_run, segmenter_run, out_dir, name: str = "two_stage", version: int | None = None,
                     segment_classes=None, max_pixels: int | None = None) -> Path:
    """Write ``out_dir/<name>/<version>/`` (TF Serving layout) for two runs; returns the version folder.

    ``assets.extra/covidx.json`` records both models' preprocessing and the routing.
    """
    predictor = TwoStagePredictor.from_runs(classifier_run, segmenter_run, segment_classes)
    meta = {
        "classes": predictor.class_names, "segment_classes": list(predictor.segment_classes),
        "classifier_preprocess": predictor.classifier_preprocess.to_dict(),
        "segmenter_preprocess": predictor.segmenter_preprocess.to_dict(),
    }
    return write_version(build_two_stage_archive(predictor, max_pixels), out_dir, name, version, meta)
