"""Cascade-SEME inference: stage 1 -> Th_vir gate -> stage 2 on the lung region.

Lv et al., "A Cascade-SEME network for COVID-19 detection in chest x-ray images", Med Phys
2021 (doi 10.1002/mp.14711), §4 and Fig. 2; arXiv 2005.01468, Fig. 1 and §3.

Decision rule (§4, eq. 1), implemented once in :class:`CascadeGate`:

1. Stage 1 (SEME-ResNet50, task ``stage1``) gives ``[Bac_n, Nor_n, Vir_n]`` for image ``n``.
2. ``Th_vir = average(Σ Vir_n)`` (eq. 1), the mean viral probability of stage 1 over a
   reference set (:func:`calibrate_threshold`).
3. "Only images associated to values greater than this threshold are sent to the second
   network": routed iff ``Vir_n > Th_vir`` (strict).
4. Stage 2 (SEME-DenseNet169, task ``stage2``) performs "a fine-grained screening to identify
   COVID-19 cases out of all viral pneumonia ones": every routed image is labelled
   ``covid19`` or ``viral`` by stage 2's argmax, whatever stage 1's argmax was.
5. Eq. 1 is "the threshold of the final viral classes": an image that is not routed is not
   viral in the cascade and takes the larger of ``Bac_n`` and ``Nor_n``. (This differs from
   stage 1's argmax only when ``Vir_n`` is largest yet ``<= Th_vir``, possible when
   ``Th_vir > 1/3``.)

Final labels: ``bacterial, normal, viral, covid19`` (:data:`FINAL_CLASSES`). An image that did
not reach stage 2 has stage-2 probability :data:`SENTINEL` (-1).

Reference set of eq. 1. The paper averages "all the output results of the first network
according to the category" over the pictures ``n`` input to it, without naming the set.
``reference="all"`` (default) averages ``Vir_n`` over every image of stage 1's **training**
split: "all the output results", "according to the category" read as per output column; the
test split would leak. ``reference="viral"`` averages over the training images labelled viral
only (the other reading: the network's mean confidence on true viral images, a stricter gate).

Regional Learning at inference (§4.D, arXiv §4.2 "only the double-lung images were
retained"): when a lung segmenter is given, stage 2 sees ``X_T = X_O · M`` with ``M`` the
argmax mask of the lung U-Net. The mask goes through the same geometry as a mask file in
training: segmenter size -> original size -> stage 2's resize/crop
(:mod:`covidx.data.lung_masks`), so a stage 2 trained on :func:`attach_lung_masks` masks sees
the same regions at inference.

Three ways to run it, equal on the same images (``tests/test_cascade.py``):

* :class:`CascadeSEME` (Python): each stage with its own preprocessing
  (:func:`covidx.serving.preprocess.preprocess_gray`); stage 2 and the segmenter run only
  on the routed images; ``save`` / ``load`` / ``from_runs``.
* ``create_model("cascade-seme")`` / :func:`build_cascade_model`: one functional Keras model
  (all stages share one input; the static graph computes stage 2 for the whole batch and
  the gate discards the unrouted rows), serializable (no Lambda).
* :func:`export_cascade`: a TF Serving SavedModel whose ``serving_default`` takes PNG/JPEG
  bytes and runs stage 2 only on the routed subset.

Training is per stage (``python -m covidx.train`` cannot train ``cascade-seme``, see
:data:`TRAINING_HINT`); ``python -m covidx.cascade`` assembles trained runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from covidx.data.io import LUMA, decode_bytes_tf, decode_tf, is_dicom
from covidx.data.lung_masks import LUNG_INDEX, argmax_mask, default_preprocess, mask_for_model, mask_to_original
from covidx.data.preprocess import PreprocessConfig
from covidx.models.registry import Preset, get_spec, register_model
from covidx.models.resnet import NORMALIZATION, STAGE1
from covidx.serving.preprocess import encoded_size, preprocess_bytes, preprocess_gray

STAGE1_CLASSES = ("bacterial", "normal", "viral")  # task "stage1"
STAGE2_CLASSES = ("covid19", "viral")  # task "stage2"
FINAL_CLASSES = ("bacterial", "normal", "viral", "covid19")
SENTINEL = -1.0  # stage-2 probability of an image that did not reach stage 2
DEFAULT_THRESHOLD = 1.0 / 3.0  # uncalibrated: the uniform viral probability of a 3-way softmax
REFERENCES = ("all", "viral")
FORMAT = "covidx-cascade-seme/1"

TRAINING_HINT = (
    "cascade-seme is not trained as one network; train its stages, then assemble them:\n"
    "  python -m covidx.train --model seme-resnet50        # stage 1 (task stage1)\n"
    "  python -m covidx.train --model lung-unet            # optional: lung masks (task lungs)\n"
    "  python -m covidx.train --model seme-densenet169     # stage 2 (task stage2, Regional Learning)\n"
    "  python -m covidx.cascade --stage1 RUN --stage2 RUN [--lung RUN] --out DIR"
)


def class_maps(stage1_classes: Sequence[str], stage2_classes: Sequence[str]):
    """``(viral_index, covid_index, stage1_to_final, stage2_to_final)`` for the gate.

    Stage 1 classifies among bacterial / normal / viral and must have ``viral``; stage 2 among
    covid19 / viral and must have ``covid19`` (tasks ``stage1`` / ``stage2``; order free).
    """
    for stage, classes, allowed, needed in (("stage 1", stage1_classes, STAGE1_CLASSES, "viral"),
                                            ("stage 2", stage2_classes, STAGE2_CLASSES, "covid19")):
        if needed not in classes or not set(classes) <= set(allowed) or len(set(classes)) != len(classes):
            raise ValueError(f"{stage} classes {tuple(classes)} must be distinct classes among {allowed} "
                             f"including {needed!r} (task {'stage1' if stage == 'stage 1' else 'stage2'})")
    return (
        list(stage1_classes).index("viral"),
        list(stage2_classes).index("covid19"),
        [FINAL_CLASSES.index(c) for c in stage1_classes],
        [FINAL_CLASSES.index(c) for c in stage2_classes],
    )


# --- in-graph pieces ------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="covidx")
class CascadeGate(keras.layers.Layer):
    """The cascade's decision (§4, eq. 1): ``Vir_n > Th_vir`` routes image ``n`` to stage 2.

    Inputs ``[stage1_probabilities (B, K1), stage2_probabilities (B, K2)]``; stage-2 rows of
    unrouted images are ignored (they may hold anything). Returns ``(stage2_probability (B,),
    reached_stage2 bool (B,), class_index int32 (B,))``: P(COVID-19) or :data:`SENTINEL`,
    and the final label over :data:`FINAL_CLASSES` (stage 2's argmax when routed, else the
    larger non-viral stage-1 class; module docstring, steps 3-5).
    """

    def __init__(self, threshold: float, viral_index: int = 2, covid_index: int = 0,
                 stage1_to_final: Sequence[int] = (0, 1, 2), stage2_to_final: Sequence[int] = (3, 2), **kwargs):
        kwargs.setdefault("dtype", "float32")  # a probability threshold compares in float32 under any policy
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.viral_index = int(viral_index)
        self.covid_index = int(covid_index)
        self.stage1_to_final = [int(i) for i in stage1_to_final]
        self.stage2_to_final = [int(i) for i in stage2_to_final]

    def route(self, stage1_probabilities):
        """bool (B,): ``Vir_n > Th_vir``."""
        viral = ops.cast(stage1_probabilities, "float32")[:, self.viral_index]
        return ops.greater(viral, ops.cast(self.threshold, "float32"))

    def call(self, inputs):
        p1, p2 = (ops.cast(p, "float32") for p in inputs)
        routed = self.route(p1)
        p_covid = ops.where(routed, p2[:, self.covid_index], ops.cast(SENTINEL, "float32"))
        # Not routed: not viral (eq. 1 is the threshold of the final viral class), so the viral
        # column is excluded from the argmax (probabilities are >= 0, so -1 never wins).
        is_viral = ops.equal(ops.arange(len(self.stage1_to_final)), self.viral_index)
        final1 = ops.take(ops.convert_to_tensor(self.stage1_to_final, "int32"),
                          ops.argmax(ops.where(is_viral[None, :], -1.0, p1), axis=-1))
        final2 = ops.take(ops.convert_to_tensor(self.stage2_to_final, "int32"), ops.argmax(p2, axis=-1))
        return p_covid, routed, ops.where(routed, final2, final1)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold, "viral_index": self.viral_index,
                "covid_index": self.covid_index, "stage1_to_final": self.stage1_to_final,
                "stage2_to_final": self.stage2_to_final}


@keras.saving.register_keras_serializable(package="covidx")
class LungMasking(keras.layers.Layer):
    """Regional Learning's target region ``X_T = X_O · M`` (§4.D), M = argmax lung mask.

    Inputs ``[image (B, H, W, C), segmenter softmax (B, H, W, K)]``; pixels whose argmax is not
    ``lung_index`` become 0.
    """

    def __init__(self, lung_index: int = LUNG_INDEX, **kwargs):
        super().__init__(**kwargs)
        self.lung_index = int(lung_index)

    def call(self, inputs):
        image, probabilities = inputs
        mask = ops.cast(ops.equal(ops.argmax(probabilities, axis=-1), self.lung_index), image.dtype)
        return image * mask[..., None]

    def get_config(self):
        return {**super().get_config(), "lung_index": self.lung_index}


def build_cascade_model(
    stage1: keras.Model,
    stage2: keras.Model,
    threshold: float,
    lung: keras.Model | None = None,
    stage1_classes: Sequence[str] = STAGE1_CLASSES,
    stage2_classes: Sequence[str] = STAGE2_CLASSES,
    lung_index: int = LUNG_INDEX,
    name: str = "cascade_seme",
) -> keras.Model:
    """The whole cascade as one functional model over a shared input ``image`` (pixels in [0, 255]).

    Outputs a dict: ``stage1_probabilities`` (B, K1), ``stage2_probability`` (B,) with the
    sentinel, ``reached_stage2`` bool (B,), ``class_index`` int32 (B,) over :data:`FINAL_CLASSES`.
    The sub-models must share the input shape. Stage 2 runs on the whole batch (a static graph
    has no data-dependent batch); :class:`CascadeGate` discards the unrouted rows.
    """
    models = [m for m in (stage1, stage2, lung) if m is not None]
    shape = tuple(stage1.inputs[0].shape[1:])
    for m in models[1:]:
        if tuple(m.inputs[0].shape[1:]) != shape:
            raise ValueError(f"the in-graph cascade needs one input shape: {stage1.name} takes {shape}, "
                             f"{m.name} takes {tuple(m.inputs[0].shape[1:])}; use CascadeSEME for mixed sizes")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"sub-model names must be unique inside the cascade, got {names}")
    viral_index, covid_index, to_final1, to_final2 = class_maps(stage1_classes, stage2_classes)

    image = keras.Input(shape, name="image")
    p1 = stage1(image)
    region = LungMasking(lung_index, name="regional_input")([image, lung(image)]) if lung is not None else image
    p2 = stage2(region)
    p_covid, routed, index = CascadeGate(threshold, viral_index, covid_index, to_final1, to_final2,
                                         name="cascade_gate")([p1, p2])
    outputs = {"stage1_probabilities": p1, "stage2_probability": p_covid, "reached_stage2": routed,
               "class_index": index}
    return keras.Model(image, outputs, name=name)


CASCADE_PRESET = Preset(
    task="stage1",  # the gate's input classes; the final labels are FINAL_CLASSES
    image_size=512,  # §6.A.2: both SEME networks at 512 x 512
    channels=1,  # grayscale, trained from scratch (§5.A)
    normalization=NORMALIZATION,
    trainer="standard",  # never trained as a whole (TRAINING_HINT)
    paper=STAGE1.paper,
)


@register_model("cascade-seme", CASCADE_PRESET, kind="cascade",
                description="Cascade-SEME: SEME-ResNet50 -> Th_vir gate -> SEME-DenseNet169 on the U-Net lung region")
def build_cascade_seme(
    num_classes: int,
    input_shape,
    weights=None,
    normalization: str = NORMALIZATION,
    threshold: float = DEFAULT_THRESHOLD,
    lung: bool = True,
    stage1_kwargs: dict | None = None,
    stage2_kwargs: dict | None = None,
    lung_kwargs: dict | None = None,
) -> keras.Model:
    """Fresh SEME-ResNet50 + SEME-DenseNet169 (+ lung U-Net) joined by :func:`build_cascade_model`.

    ``threshold`` defaults to 1/3, **uncalibrated** (no trained stage 1 exists yet); a trained
    cascade comes from ``CascadeSEME.from_runs(...).to_keras_model()``. The ``*_kwargs`` go to
    the registered builders (reduced test copies).
    """
    if weights is not None:
        raise ValueError("cascade-seme has no weights file of its own: build a trained cascade with "
                         "CascadeSEME.from_runs(...) or CascadeSEME.load(DIR), then .to_keras_model()")
    if num_classes != len(STAGE1_CLASSES):
        raise ValueError(f"cascade-seme's gate reads stage 1's {len(STAGE1_CLASSES)} classes, got num_classes={num_classes}")
    def fresh(registered: str, classes: int, model_name: str, kwargs: dict | None):
        # The registered builder with its variant's kwargs (se=True, moex=True, ...), under a unique name.
        spec = get_spec(registered)
        return spec.builder(num_classes=classes, input_shape=tuple(input_shape), weights=None,
                            normalization=normalization, name=model_name, **{**spec.builder_kwargs, **(kwargs or {})})

    stage1 = fresh("seme-resnet50", len(STAGE1_CLASSES), "stage1_seme_resnet50", stage1_kwargs)
    stage2 = fresh("seme-densenet169", len(STAGE2_CLASSES), "stage2_seme_densenet169", stage2_kwargs)
    segmenter = fresh("lung-unet", 2, "lung_unet", lung_kwargs) if lung else None
    return build_cascade_model(stage1, stage2, threshold, segmenter)


# --- eq. 1: Th_vir ------------------------------------------------------------------------------
def _labelled_batches(data, labels, batch_size: int):
    """``(images, class indices or None)`` batches from an array or a dataset of ``(x, y[, w])``."""
    if isinstance(data, np.ndarray) or tf.is_tensor(data):
        x = np.asarray(data, np.float32)
        lab = None if labels is None else np.asarray(labels).reshape(-1)
        if lab is not None and len(lab) != len(x):
            raise ValueError(f"{len(lab)} labels for {len(x)} images")
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], None if lab is None else lab[i:i + batch_size]
        return
    if labels is not None:
        raise ValueError("labels= is for image arrays; a dataset brings its own (x, y) batches")
    for batch in data:
        x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        x = x["image"] if isinstance(x, dict) else x
        if y is not None:
            y = np.asarray(y)
            y = y.argmax(-1) if y.ndim == 2 else y.reshape(-1)
        yield x, y


def stage1_viral_probabilities(stage1_model, images_or_dataset, viral_index: int, reference: str = "all",
                               labels=None, batch_size: int = 16) -> np.ndarray:
    """``Vir_n`` of stage 1 for every image of the reference set (``all`` or the ``viral``-labelled ones)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    out = []
    for x, y in _labelled_batches(images_or_dataset, labels, batch_size):
        p = np.asarray(stage1_model(x, training=False), np.float32)[:, viral_index]
        if reference == "viral":
            if y is None:
                raise ValueError("reference='viral' needs labels (labels= or (x, y) batches)")
            p = p[y == viral_index]
        out.append(p)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def calibrate_threshold(stage1_model, images_or_dataset, viral_index: int, reference: str = "all",
                        labels=None) -> float:
    """``Th_vir = average(Σ Vir_n)`` (eq. 1): stage 1's mean viral probability over a reference set.

    Args:
        stage1_model: the stage-1 classifier (softmax over e.g. bacterial / normal / viral).
        images_or_dataset: preprocessed images ``(N, S, S, C)`` in [0, 255], or a dataset / iterable
            of ``x`` or ``(x, y[, w])`` batches (``y`` one-hot or indices; ``x`` may be ``{"image": ...}``).
        viral_index: column of the viral class in stage 1's output.
        reference: ``"all"`` (every image given, the default) or ``"viral"`` (only images labelled
            ``viral_index``); see the module docstring for the paper's wording.
        labels: class indices of ``images`` when ``reference="viral"`` and images is an array.
    """
    p = stage1_viral_probabilities(stage1_model, images_or_dataset, viral_index, reference, labels)
    if p.size == 0:
        raise ValueError(f"the reference set ({reference!r}) is empty: Th_vir is undefined")
    return float(np.mean(p, dtype=np.float64))


# --- Python cascade ---------------------------------------------------------------------------------
def to_gray(image):
    """An image for :meth:`CascadeSEME.predict` -> float32 (H, W, 1) tensor in [0, 255].

    Accepts a file path (PNG, JPEG, DICOM; read as the tf.data pipeline reads it), encoded
    PNG/JPEG bytes (decoded as the export decodes them) or an array (H, W), (H, W, 1) or RGB (H, W, 3).
    """
    if isinstance(image, (str, Path)):
        return decode_tf(tf.constant(str(image)), tf.constant(is_dicom(image)))
    if isinstance(image, bytes):
        return decode_bytes_tf(tf.constant(image))
    a = np.asarray(image, np.float32)
    if a.ndim == 3 and a.shape[-1] == 3:
        a = a @ np.asarray(LUMA, np.float32)  # RGB order, as covidx.data.io
    elif a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"an image array must be (H, W), (H, W, 1) or (H, W, 3), got {a.shape}")
    return tf.constant(a[..., None])


def _display(x) -> np.ndarray:
    """A model input (S, S, C) in [0, 255] as a uint8 gray image."""
    return np.clip(np.asarray(x)[..., 0], 0, 255).astype(np.uint8)


@dataclass
class CascadePrediction:
    """Per-image outputs of :meth:`CascadeSEME.predict` (rows in input order)."""

    stage1_probabilities: np.ndarray  # float32 (N, K1)
    stage2_probability: np.ndarray  # float32 (N,): P(COVID-19) from stage 2, SENTINEL when not reached
    reached_stage2: np.ndarray  # bool (N,): Vir_n > Th_vir
    class_index: np.ndarray  # int (N,) over FINAL_CLASSES
    class_name: list[str]

    def to_frame(self, stage1_classes: Sequence[str] = STAGE1_CLASSES):
        import pandas as pd

        df = pd.DataFrame(self.stage1_probabilities, columns=[f"p_{c}" for c in stage1_classes])
        df["reached_stage2"] = self.reached_stage2
        df["p_covid19_stage2"] = self.stage2_probability
        df["label"] = self.class_name
        return df


class CascadeSEME:
    """Cascade-SEME (§4, Fig. 2): stage 1 -> ``Vir_n > Th_vir`` -> stage 2 (on the lung region).

    Args:
        stage1, stage2: trained Keras classifiers (pixels in [0, 255] -> softmax).
        threshold: ``Th_vir`` (:func:`calibrate_threshold`).
        stage1_classes, stage2_classes: their output classes (tasks ``stage1`` / ``stage2``).
        lung_segmenter: optional lung U-Net; stage 2 then sees ``image · argmax mask`` (§4.D).
        stage1_preprocess, stage2_preprocess, lung_preprocess: each model's
            :class:`PreprocessConfig` (a run's ``config.json``); default ``stretch`` to its input size.
        calibration: how ``threshold`` was obtained (saved in ``cascade.json``).
    """

    def __init__(self, stage1, stage2, threshold: float, stage1_classes: Sequence[str] = STAGE1_CLASSES,
                 stage2_classes: Sequence[str] = STAGE2_CLASSES, lung_segmenter=None,
                 stage1_preprocess: PreprocessConfig | None = None,
                 stage2_preprocess: PreprocessConfig | None = None,
                 lung_preprocess: PreprocessConfig | None = None,
                 calibration: dict | None = None, lung_index: int = LUNG_INDEX):
        self.stage1, self.stage2, self.lung = stage1, stage2, lung_segmenter
        self.stage1_classes, self.stage2_classes = tuple(stage1_classes), tuple(stage2_classes)
        self.gate = CascadeGate(threshold, *class_maps(self.stage1_classes, self.stage2_classes), name="cascade_gate")
        self.stage1_preprocess = stage1_preprocess or default_preprocess(stage1)
        self.stage2_preprocess = stage2_preprocess or default_preprocess(stage2)
        self.lung_preprocess = None if lung_segmenter is None else (lung_preprocess or default_preprocess(lung_segmenter))
        self.calibration = dict(calibration or {"method": "given", "value": float(threshold)})
        self.lung_index = int(lung_index)

    @property
    def threshold(self) -> float:
        return self.gate.threshold

    # -- the shared forward pass (eager in predict, traced in the export) --
    def regional_input(self, x2, x_lung, hw):
        """Stage 2's input ``X_T = X_O · M``: ``x2`` (n, S2, S2, C2), the segmenter's input ``x_lung``
        and the original sizes ``hw`` (n, 2); the mask goes segmenter size -> original -> stage 2."""
        masks = argmax_mask(self.lung(x_lung, training=False), self.lung_index)
        s2 = self.stage2_preprocess.image_size

        def align(args):
            mask, size = args
            return mask_for_model(mask_to_original(mask, size, self.lung_preprocess), self.stage2_preprocess)

        masks = tf.map_fn(align, (masks, hw), fn_output_signature=tf.TensorSpec([s2, s2, 1], tf.float32))
        return x2 * masks

    def forward(self, x1, routed_inputs: Callable):
        """Stage 1 on ``x1``; ``routed_inputs(indices) -> (x2, x_lung, hw)`` prepares the routed images
        only, and stage 2 (and the segmenter) run on those alone. Returns a dict of tensors."""
        p1 = tf.cast(self.stage1(x1, training=False), tf.float32)
        idx = tf.where(self.gate.route(p1))[:, 0]
        k2 = len(self.stage2_classes)

        def run_stage2():
            x2, x_lung, hw = routed_inputs(idx)
            if self.lung is not None:
                x2 = self.regional_input(x2, x_lung, hw)
            return tf.cast(self.stage2(x2, training=False), tf.float32)

        p2_routed = tf.cond(tf.size(idx) > 0, run_stage2, lambda: tf.zeros([0, k2], tf.float32))
        # Unrouted rows stay 0; the gate ignores them.
        p2 = tf.scatter_nd(idx[:, None], p2_routed, tf.stack([tf.shape(p1, out_type=tf.int64)[0], k2]))
        p_covid, routed, index = self.gate([p1, p2])
        return {"stage1_probabilities": p1, "stage2_probability": p_covid, "reached_stage2": routed,
                "class_index": index}

    def predict(self, images, batch_size: int = 16) -> CascadePrediction:
        """Run the cascade on images (paths, PNG/JPEG bytes or arrays of any size; see :func:`to_gray`)."""
        images = list(images)
        if not images:
            raise ValueError("no images")
        c1, c2, cl = self.stage1_preprocess, self.stage2_preprocess, self.lung_preprocess
        parts = []
        for start in range(0, len(images), batch_size):
            grays = [to_gray(im) for im in images[start:start + batch_size]]

            def routed_inputs(idx, grays=grays):
                chosen = [grays[i] for i in idx.numpy()]
                x2 = tf.stack([preprocess_gray(g, c2) for g in chosen])
                if self.lung is None:
                    return x2, None, None
                return (x2, tf.stack([preprocess_gray(g, cl) for g in chosen]),
                        tf.stack([tf.shape(g)[:2] for g in chosen]))

            x1 = tf.stack([preprocess_gray(g, c1) for g in grays])
            parts.append({k: v.numpy() for k, v in self.forward(x1, routed_inputs).items()})
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return CascadePrediction(out["stage1_probabilities"], out["stage2_probability"], out["reached_stage2"],
                                 out["class_index"], [FINAL_CLASSES[i] for i in out["class_index"]])

    def explain(self, images, out_dir=None, method: str = "gradcam", batch_size: int = 16) -> list[dict]:
        """Grad-CAM (``method="gradcam++"``: Grad-CAM++) of both stages, as the paper's Figs. 11, 13 and 16.

        Stage 1 is explained on every image, stage 2 on the images routed to it and on the input it
        decides from (the lung region ``X_T`` when a segmenter is set), each for its predicted class at
        the registered target layer of ``seme-resnet50`` / ``seme-densenet169`` (the last 4-D layer for
        other networks). Returns one record per image: ``stage1`` and ``stage2`` (``None`` when the image
        did not reach stage 2), each ``{"class_name", "heatmap" (S, S) in [0, 1], "input" (S, S) uint8}``;
        with ``out_dir``, also writes ``<index>_<stem>_stage1.png`` and ``..._stage2.png`` overlays.
        """
        from covidx.explain.cli import registered_layer
        from covidx.explain.gradcam import GradCAM
        from covidx.explain.overlay import overlay_heatmap, save_png

        if method not in ("gradcam", "gradcam++"):
            raise ValueError(f"the cascade is explained with gradcam or gradcam++, not {method!r}")
        cam1, cam2 = (GradCAM(model, registered_layer(model, name), plus_plus=method == "gradcam++")
                      for model, name in ((self.stage1, "seme-resnet50"), (self.stage2, "seme-densenet169")))
        images = list(images)
        records = []
        for start in range(0, len(images), batch_size):
            grays = [to_gray(im) for im in images[start:start + batch_size]]
            x1 = tf.stack([preprocess_gray(g, self.stage1_preprocess) for g in grays])
            r1 = cam1.explain(x1)
            p1 = tf.cast(self.stage1(x1, training=False), tf.float32)
            routed = self.gate.route(p1).numpy()
            batch = [{"stage1": {"class_name": self.stage1_classes[int(c)], "heatmap": h, "input": _display(x)},
                      "stage2": None} for c, h, x in zip(r1.class_indices, r1.heatmaps, x1.numpy())]
            idx = np.flatnonzero(routed)
            if idx.size:
                chosen = [grays[i] for i in idx]
                x2 = tf.stack([preprocess_gray(g, self.stage2_preprocess) for g in chosen])
                if self.lung is not None:
                    x_lung = tf.stack([preprocess_gray(g, self.lung_preprocess) for g in chosen])
                    x2 = self.regional_input(x2, x_lung, tf.stack([tf.shape(g)[:2] for g in chosen]))
                r2 = cam2.explain(x2)
                for i, c, h, x in zip(idx, r2.class_indices, r2.heatmaps, x2.numpy()):
                    batch[i]["stage2"] = {"class_name": self.stage2_classes[int(c)], "heatmap": h, "input": _display(x)}
            records.extend(batch)
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            for i, (image, record) in enumerate(zip(images, records)):
                stem = Path(image).stem if isinstance(image, (str, Path)) else "image"
                for stage in ("stage1", "stage2"):
                    if record[stage] is not None:
                        path = out / f"{i:04d}_{stem}_{stage}.png"
                        save_png(path, overlay_heatmap(record[stage]["input"], record[stage]["heatmap"]))
                        record[stage]["overlay"] = str(path)
        return records

    def to_keras_model(self, name: str = "cascade_seme") -> keras.Model:
        """The in-graph cascade (:func:`build_cascade_model`) of these trained stages."""
        return build_cascade_model(self.stage1, self.stage2, self.threshold, self.lung, self.stage1_classes,
                                   self.stage2_classes, self.lung_index, name)

    # -- persistence --
    def config(self) -> dict:
        return {
            "format": FORMAT, "threshold": self.threshold, "stage1_classes": list(self.stage1_classes),
            "stage2_classes": list(self.stage2_classes), "final_classes": list(FINAL_CLASSES),
            "sentinel": SENTINEL, "lung_index": self.lung_index, "calibration": self.calibration,
            "preprocess": {"stage1": self.stage1_preprocess.to_dict(), "stage2": self.stage2_preprocess.to_dict(),
                           "lung": None if self.lung is None else self.lung_preprocess.to_dict()},
            "paper": STAGE1.paper,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``stage1.keras``, ``stage2.keras``, ``lung.keras`` (if any) and ``cascade.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.stage1.save(d / "stage1.keras")
        self.stage2.save(d / "stage2.keras")
        (d / "lung.keras").unlink(missing_ok=True)
        if self.lung is not None:
            self.lung.save(d / "lung.keras")
        (d / "cascade.json").write_text(json.dumps(self.config(), indent=2))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "CascadeSEME":
        """Load a :meth:`save` directory (``safe_mode=True``: no pickles, no Lambda)."""
        import covidx.layers  # noqa: F401  (registers the custom layers)
        import covidx.models  # noqa: F401

        d = Path(directory)
        if not (d / "cascade.json").is_file():
            raise FileNotFoundError(f"{d}: no cascade.json (write one with python -m covidx.cascade)")
        cfg = json.loads((d / "cascade.json").read_text())

        def model(name):
            return keras.models.load_model(d / name, compile=False, safe_mode=True)

        pre = {k: None if v is None else PreprocessConfig.from_dict(v) for k, v in cfg["preprocess"].items()}
        return cls(model("stage1.keras"), model("stage2.keras"), cfg["threshold"], cfg["stage1_classes"],
                   cfg["stage2_classes"], model("lung.keras") if pre["lung"] is not None else None,
                   pre["stage1"], pre["stage2"], pre["lung"], cfg.get("calibration"), cfg.get("lung_index", LUNG_INDEX))

    @classmethod
    def from_runs(cls, stage1_run, stage2_run, lung_run=None, reference: str = "all", split: str = "train",
                  threshold: float | None = None, batch_size: int = 16) -> "CascadeSEME":
        """Assemble trained runs (:func:`covidx.runs.load_run`) and calibrate ``Th_vir`` (eq. 1).

        The threshold is stage 1's mean viral probability over the images of its ``split``
        (default: the training split of its ``split.csv``), all of them or only the viral-labelled
        ones (``reference``), through the run's own evaluation preprocessing. ``threshold`` skips
        the calibration.
        """
        from covidx.data import make_dataset
        from covidx.runs import Run, load_run

        r1, r2 = (r if isinstance(r, Run) else load_run(r) for r in (stage1_run, stage2_run))
        rl = None if lung_run is None else (lung_run if isinstance(lung_run, Run) else load_run(lung_run))
        viral_index = class_maps(r1.class_names, r2.class_names)[0]
        if threshold is not None:
            calibration = {"method": "given", "value": float(threshold)}
        else:
            table = r1.split_table()
            if table is None:
                raise ValueError(f"{r1.checkpoint}: no split.csv next to it to calibrate Th_vir; pass threshold=")
            table = table[table["split"] == split]
            if table.empty:
                raise ValueError(f"{r1.directory}/split.csv has no {split!r} rows to calibrate Th_vir")
            ds = make_dataset(table, r1.task, r1.preprocess, batch_size=batch_size, cache=False, ignore_errors=False)
            p = stage1_viral_probabilities(r1.model, ds, viral_index, reference)
            if p.size == 0:
                raise ValueError(f"no {reference!r} images in the {split!r} split of {r1.directory}")
            threshold = float(np.mean(p, dtype=np.float64))
            calibration = {"method": "eq. 1: mean stage-1 P(viral)", "reference": reference, "split": split,
                           "size": int(p.size), "value": threshold, "stage1_run": str(r1.directory)}
        calibration["runs"] = {"stage1": str(r1.checkpoint), "stage2": str(r2.checkpoint),
                               "lung": None if rl is None else str(rl.checkpoint)}
        return cls(r1.model, r2.model, threshold, r1.class_names, r2.class_names,
                   None if rl is None else rl.model, r1.preprocess, r2.preprocess,
                   None if rl is None else rl.preprocess, calibration)


# --- TF Serving export --------------------------------------------------------------------------------
def build_cascade_archive(cascade: CascadeSEME, max_pixels: int | None = None) -> keras.export.ExportArchive:
    """SavedModel endpoints of the cascade.

    ``serving_default(image_bytes: string [B])``: PNG/JPEG bytes; every stage decodes them with its
    own preprocessing (:func:`covidx.serving.preprocess.preprocess_bytes`); stage 2 and the
    segmenter run on the routed images only. ``predict_tensor(images: float32 [B, S1, S1, C1])``:
    images already preprocessed for stage 1; stage 2 and the segmenter apply their own
    preprocessing to its gray plane (CLAHE not repeated when stage 1 applied it).

    Outputs: ``stage1_probabilities`` float32 [B, K1], ``stage2_probability`` float32 [B]
    (:data:`SENTINEL` when not reached), ``reached_stage2`` bool [B], ``class_index`` int64 [B] and
    ``class_name`` string [B] over :data:`FINAL_CLASSES`.
    """
    from covidx.serving.export import DEFAULT_MAX_PIXELS

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
        x1 = tf.map_fn(lambda b: preprocess_bytes(b, c1, max_pixels), image_bytes, fn_output_signature=spec(c1))

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
    from covidx.serving.export import DEFAULT_MAX_PIXELS, write_version

    cascade = CascadeSEME.load(cascade_dir)
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    meta = {**cascade.config(), "model": name, "classes": list(FINAL_CLASSES), "max_pixels": max_pixels}
    return write_version(build_cascade_archive(cascade, max_pixels), out_dir, name, version, meta)


# --- CLI ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """``python -m covidx.cascade --stage1 RUN --stage2 RUN [--lung RUN] --out DIR``."""
    ap = argparse.ArgumentParser(prog="python -m covidx.cascade",
                                 description="Assemble trained Cascade-SEME stages and calibrate Th_vir (eq. 1).")
    ap.add_argument("--stage1", required=True, help="stage-1 run (seme-resnet50, task stage1): directory or .keras")
    ap.add_argument("--stage2", required=True, help="stage-2 run (seme-densenet169, task stage2)")
    ap.add_argument("--lung", help="lung U-Net run: stage 2 then sees the lung region (Regional Learning)")
    ap.add_argument("--out", required=True, help="cascade directory to write")
    ap.add_argument("--reference", choices=REFERENCES, default="all",
                    help="images averaged for Th_vir: all of the split (default) or only the viral ones")
    ap.add_argument("--split", default="train", help="split of stage 1's split.csv used for Th_vir (default train)")
    ap.add_argument("--threshold", type=float, help="use this Th_vir instead of calibrating")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--export", metavar="DIR", help="also export for TF Serving to DIR/cascade-seme/<version>/")
    args = ap.parse_args(argv)
    try:
        cascade = CascadeSEME.from_runs(args.stage1, args.stage2, args.lung, args.reference, args.split,
                                        args.threshold, args.batch_size)
        out = cascade.save(args.out)
        cal = cascade.calibration
        how = (f"mean P(viral) of {cal['size']} {cal['reference']!r} {cal['split']!r} images"
               if "size" in cal else "given")
        print(f"cascade written to {out.resolve()}\n  Th_vir = {cascade.threshold:.6f} ({how})")
        if args.export:
            print(f"  exported {export_cascade(out, args.export)}")
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
