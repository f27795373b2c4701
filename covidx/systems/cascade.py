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
(:mod:`covidx.data.lung_masks`), so a stage 2 trained on
:func:`covidx.training.lung_masks.attach_lung_masks` masks sees
the same regions at inference.

Three ways to run it, equal on the same images (``tests/test_systems_cascade.py``):

* :class:`CascadeSEME` (here): each stage with its own preprocessing
  (:func:`covidx.data.inference.preprocess_gray`); stage 2 and the segmenter run only on the
  routed images; ``predict`` / ``explain`` / ``save`` / ``load`` / ``from_runs``.
* ``create_model("cascade-seme")`` (:mod:`covidx.models.cascade`): one functional Keras model.
* :func:`covidx.serving.systems.export_cascade`: a TF Serving SavedModel whose ``serving_default``
  takes PNG/JPEG bytes and runs stage 2 only on the routed subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from covidx.data.inference import gray_input, preprocess_gray
from covidx.data.lung_masks import argmax_mask, mask_for_model, mask_to_original
from covidx.data.pipeline import make_dataset
from covidx.data.preprocess import PreprocessConfig
from covidx.explain.gradcam import GradCAM
from covidx.explain.overlay import display_gray, overlay_heatmap, save_png
from covidx.explain.runs import registered_layer
from covidx.layers.cascade import FINAL_CLASSES, SENTINEL, CascadeGate, class_maps
from covidx.models.cascade import build_cascade_model
from covidx.models.resnet import STAGE1
from covidx.precision import inference_copy
from covidx.runs import as_run
from covidx.systems.folder import read_folder, write_folder
from covidx.tasks import LUNG_INDEX, STAGE1_CLASSES, STAGE2_CLASSES

REFERENCES = ("all", "viral")
FORMAT = "covidx-cascade-seme/1"


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


# --- the system ---------------------------------------------------------------------------------
@dataclass
class CascadePrediction:
    """Per-image outputs of :meth:`CascadeSEME.predict` (rows in input order)."""

    stage1_probabilities: np.ndarray  # float32 (N, K1)
    stage2_probability: np.ndarray  # float32 (N,): P(COVID-19) from stage 2, SENTINEL when not reached
    reached_stage2: np.ndarray  # bool (N,): Vir_n > Th_vir
    class_index: np.ndarray  # int (N,) over FINAL_CLASSES
    class_name: list[str]

    def to_frame(self, stage1_classes: Sequence[str] = STAGE1_CLASSES):
        df = pd.DataFrame(self.stage1_probabilities, columns=[f"p_{c}" for c in stage1_classes])
        df["reached_stage2"] = self.reached_stage2
        df["p_covid19_stage2"] = self.stage2_probability
        df["label"] = self.class_name
        return df


class CascadeSEME:
    """Cascade-SEME (§4, Fig. 2): stage 1 -> ``Vir_n > Th_vir`` -> stage 2 (on the lung region).

    Args:
        stage1, stage2: trained Keras classifiers (pixels in [0, 255] -> softmax); the cascade runs and saves
            their inference copies (:func:`covidx.precision.inference_copy`), as it does the lung segmenter's.
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
        # Every path (predict, explain, the export, save) runs each stage's inference copy: BN folded into
        # its convolutions, the others one fused kernel; outputs equal the checkpoint's within float rounding.
        self.stage1, self.stage2 = inference_copy(stage1), inference_copy(stage2)
        self.lung = None if lung_segmenter is None else inference_copy(lung_segmenter)
        self.stage1_classes, self.stage2_classes = tuple(stage1_classes), tuple(stage2_classes)
        self.gate = CascadeGate(threshold, *class_maps(self.stage1_classes, self.stage2_classes), name="cascade_gate")
        self.stage1_preprocess = stage1_preprocess or PreprocessConfig.for_model(stage1)
        self.stage2_preprocess = stage2_preprocess or PreprocessConfig.for_model(stage2)
        self.lung_preprocess = None if lung_segmenter is None else (lung_preprocess or PreprocessConfig.for_model(lung_segmenter))
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
            grays = [gray_input(im) for im in images[start:start + batch_size]]

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
        if method not in ("gradcam", "gradcam++"):
            raise ValueError(f"the cascade is explained with gradcam or gradcam++, not {method!r}")
        cam1, cam2 = (GradCAM(model, registered_layer(model, name), plus_plus=method == "gradcam++")
                      for model, name in ((self.stage1, "seme-resnet50"), (self.stage2, "seme-densenet169")))
        images = list(images)
        records = []
        for start in range(0, len(images), batch_size):
            grays = [gray_input(im) for im in images[start:start + batch_size]]
            x1 = tf.stack([preprocess_gray(g, self.stage1_preprocess) for g in grays])
            r1 = cam1.explain(x1)
            p1 = tf.cast(self.stage1(x1, training=False), tf.float32)
            routed = self.gate.route(p1).numpy()
            batch = [{"stage1": {"class_name": self.stage1_classes[int(c)], "heatmap": h, "input": display_gray(x)},
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
                    batch[i]["stage2"] = {"class_name": self.stage2_classes[int(c)], "heatmap": h, "input": display_gray(x)}
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
        return write_folder(directory, {"stage1": self.stage1, "stage2": self.stage2, "lung": self.lung},
                            "cascade.json", self.config())

    @classmethod
    def load(cls, directory: str | Path) -> "CascadeSEME":
        """Load a :meth:`save` directory (``safe_mode=True``: no pickles, no Lambda)."""
        cfg, model = read_folder(directory, "cascade.json", "write one with python -m covidx.cascade")
        pre = {k: None if v is None else PreprocessConfig.from_dict(v) for k, v in cfg["preprocess"].items()}
        return cls(model("stage1"), model("stage2"), cfg["threshold"], cfg["stage1_classes"],
                   cfg["stage2_classes"], model("lung") if pre["lung"] is not None else None,
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
        r1, r2 = as_run(stage1_run), as_run(stage2_run)
        rl = None if lung_run is None else as_run(lung_run)
        stage1 = inference_copy(r1.model)  # calibrated on the network the cascade runs
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
            p = stage1_viral_probabilities(stage1, ds, viral_index, reference)
            if p.size == 0:
                raise ValueError(f"no {reference!r} images in the {split!r} split of {r1.directory}")
            threshold = float(np.mean(p, dtype=np.float64))
            calibration = {"method": "eq. 1: mean stage-1 P(viral)", "reference": reference, "split": split,
                           "size": int(p.size), "value": threshold, "stage1_run": str(r1.directory)}
        calibration["runs"] = {"stage1": str(r1.checkpoint), "stage2": str(r2.checkpoint),
                               "lung": None if rl is None else str(rl.checkpoint)}
        return cls(stage1, r2.model, threshold, r1.class_names, r2.class_names,
                   None if rl is None else rl.model, r1.preprocess, r2.preprocess,
                   None if rl is None else rl.preprocess, calibration)
