"""Two-stage system of the concatenated-ensemble paper: classify, then segment the sick.

Hasan et al., Sec. III (Fig. 2) and V: "The segmentation model will activate only when the
classification model classifies an X-ray image as COVID-19 or pneumonia"; the predicted
mask is superimposed on the input image (Fig. 10). The classifier is normally the
``ensemble`` (:mod:`covidx.models.ensemble`) and the segmenter ``fc-densenet103``
(:mod:`covidx.models.tiramisu`) trained on Grad-CAM masks (:mod:`covidx.explain.masks`);
any covidx classifier / two-class segmenter pair works.

Each model keeps its own preprocessing (size, channels, CLAHE) from its run, applied with
the TF ops of :mod:`covidx.data.inference`, the same code the exported graph runs
(:func:`covidx.serving.systems.export_two_stage`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from covidx.data.inference import gray_input, preprocess_gray
from covidx.data.io import unique_stems
from covidx.data.preprocess import PreprocessConfig
from covidx.explain.gradcam import GradCAM
from covidx.explain.overlay import display_gray, overlay_heatmap, overlay_mask, save_png
from covidx.explain.runs import registered_layer
from covidx.precision import inference_copy
from covidx.runs import as_run
from covidx.systems.folder import read_folder, write_folder

FORMAT = "covidx-two-stage/1"
# Classes routed to the segmenter: "COVID-19 or pneumonia" (ensemble paper Sec. III); with a 4-class or
# stage classifier, pneumonia is its bacterial and viral classes.
SEGMENTED_CLASSES = ("covid19", "pneumonia", "bacterial", "viral")


def segmented_classes(class_names) -> list[str]:
    """The classifier's classes whose images go to the segmenter (all but ``normal`` in covidx's tasks)."""
    routed = [c for c in class_names if c in SEGMENTED_CLASSES]
    if not routed:
        raise ValueError(f"the classifier's classes {list(class_names)} include none of {list(SEGMENTED_CLASSES)}: "
                         "nothing would be segmented")
    return routed


def foreground(probabilities) -> tf.Tensor:
    """Per-pixel class map -> uint8 mask, 1 = lesion (class index 1 of the ``lesions`` task)."""
    return tf.cast(tf.equal(tf.argmax(probabilities, axis=-1), 1), tf.uint8)


def _as_list(images) -> list:
    """A batch array (N, H, W[, C]) or any sequence of images -> a list of single images."""
    if isinstance(images, np.ndarray) or tf.is_tensor(images):
        return list(np.asarray(images, np.float32))
    return list(images)


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
        segmenter: covidx two-class segmenter (per-pixel softmax, background / lesion). Both run (and save)
            as their inference copies (:func:`covidx.precision.inference_copy`).
        class_names: the classifier's class names, in output order.
        segment_classes: classes whose images are segmented (paper: COVID-19 and pneumonia).
        classifier_preprocess, segmenter_preprocess: each model's :class:`PreprocessConfig`;
            default: stretch to the model's input size and channels.
    """

    def __init__(self, classifier: keras.Model, segmenter: keras.Model, class_names: Sequence[str],
                 segment_classes: Sequence[str] = ("covid19", "pneumonia"),
                 classifier_preprocess: PreprocessConfig | None = None,
                 segmenter_preprocess: PreprocessConfig | None = None):
        self.classifier, self.segmenter = inference_copy(classifier), inference_copy(segmenter)
        self.class_names = list(class_names)
        if len(self.class_names) != classifier.outputs[0].shape[-1]:
            raise ValueError(f"{len(self.class_names)} class names for {classifier.outputs[0].shape[-1]} outputs")
        unknown = [c for c in segment_classes if c not in self.class_names]
        if unknown:
            raise ValueError(f"segment_classes {unknown} are not classifier classes {self.class_names}")
        self.segment_classes = tuple(segment_classes)
        self.segment_indices = [self.class_names.index(c) for c in segment_classes]
        if len(segmenter.outputs[0].shape) != 4:
            raise ValueError(f"{segmenter.name} is not a segmenter (output {segmenter.outputs[0].shape}, expected "
                             "per-pixel probabilities)")
        self.classifier_preprocess = classifier_preprocess or PreprocessConfig.for_model(classifier)
        self.segmenter_preprocess = segmenter_preprocess or PreprocessConfig.for_model(segmenter)

    @classmethod
    def from_runs(cls, classifier_run, segmenter_run, segment_classes=None) -> "TwoStagePredictor":
        """Load both runs (directories or ``.keras`` files; ``safe_mode=True``) with their preprocessing.
        ``segment_classes`` defaults to :func:`segmented_classes` of the classifier."""
        c, s = as_run(classifier_run), as_run(segmenter_run)
        return cls(c.model, s.model, c.class_names, segment_classes or segmented_classes(c.class_names),
                   c.preprocess, s.preprocess)

    def _inputs(self, grays, config: PreprocessConfig) -> tf.Tensor:
        return tf.stack([preprocess_gray(g, config) for g in grays])

    def predict(self, images, batch_size: int = 16) -> TwoStageResult:
        """Run both stages on images: paths, PNG/JPEG bytes, arrays of any size (gray or RGB), or a batch array."""
        grays = [gray_input(im) for im in _as_list(images)]
        if not grays:
            raise ValueError("no images")
        probs = np.concatenate([
            np.asarray(self.classifier(self._inputs(grays[i:i + batch_size], self.classifier_preprocess),
                                       training=False), np.float32)
            for i in range(0, len(grays), batch_size)
        ])
        index = probs.argmax(axis=-1)
        routed = np.flatnonzero(np.isin(index, self.segment_indices))
        masks: list = [None] * len(grays)
        overlays: list = [None] * len(grays)
        for start in range(0, len(routed), batch_size):
            chunk = routed[start:start + batch_size]
            x = self._inputs([grays[i] for i in chunk], self.segmenter_preprocess)
            m = foreground(self.segmenter(x, training=False)).numpy()
            for j, i in enumerate(chunk):
                masks[i] = m[j]
                overlays[i] = overlay_mask(x[j].numpy(), m[j])
        return TwoStageResult(probs, index, [self.class_names[i] for i in index], masks, overlays)

    def explain(self, images, out_dir=None, method: str = "gradcam", batch_size: int = 16) -> list[dict]:
        """Grad-CAM of the classifier's decision for every image, next to the lesion mask of the images it
        sent to the segmenter (ensemble paper Figs. 9-10). One record per image: ``classifier``
        ``{"class_name", "heatmap", "input"}`` and ``mask`` (None when not segmented); with ``out_dir``,
        ``<index>_<stem>_gradcam.png`` overlays."""
        if method not in ("gradcam", "gradcam++"):
            raise ValueError(f"the two-stage system is explained with gradcam or gradcam++, not {method!r}")
        images = _as_list(images)
        cam = GradCAM(self.classifier, registered_layer(self.classifier, self.classifier.name), plus_plus=method == "gradcam++")
        result = self.predict(images, batch_size)
        records = []
        for start in range(0, len(images), batch_size):
            x = self._inputs([gray_input(im) for im in images[start:start + batch_size]], self.classifier_preprocess)
            r = cam.explain(x)
            records += [{"classifier": {"class_name": self.class_names[int(c)], "heatmap": h, "input": display_gray(im)},
                         "mask": result.masks[start + j]}
                        for j, (c, h, im) in enumerate(zip(r.class_indices, r.heatmaps, x.numpy()))]
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            for i, (image, record) in enumerate(zip(images, records)):
                stem = Path(image).stem if isinstance(image, (str, Path)) else "image"
                path = out / f"{i:04d}_{stem}_{method.replace('++', 'pp')}.png"
                save_png(path, overlay_heatmap(record["classifier"]["input"], record["classifier"]["heatmap"]))
                record["classifier"]["overlay"] = str(path)
        return records

    # -- persistence --
    def config(self) -> dict:
        return {"format": FORMAT, "classes": self.class_names, "segment_classes": list(self.segment_classes),
                "preprocess": {"classifier": self.classifier_preprocess.to_dict(),
                               "segmenter": self.segmenter_preprocess.to_dict()}}

    def save(self, directory: str | Path) -> Path:
        """Write ``classifier.keras``, ``segmenter.keras`` and ``two_stage.json``."""
        return write_folder(directory, {"classifier": self.classifier, "segmenter": self.segmenter},
                            "two_stage.json", self.config())

    @classmethod
    def load(cls, directory: str | Path) -> "TwoStagePredictor":
        """Load a :meth:`save` directory (``safe_mode=True``)."""
        cfg, model = read_folder(directory, "two_stage.json", "write one with TwoStagePredictor.save")
        pre = {k: PreprocessConfig.from_dict(v) for k, v in cfg["preprocess"].items()}
        return cls(model("classifier"), model("segmenter"), cfg["classes"], cfg["segment_classes"],
                   pre["classifier"], pre["segmenter"])


def segment_files(predictor: TwoStagePredictor, paths, mask_dir, batch_size: int = 16, progress: bool = True):
    """Classify image files, segment the sick, write a mask and an overlay per segmented image.

    Returns ``(probabilities (N, K), segmented (N,) bool, mask paths, overlay paths)`` (empty strings for
    images that were not segmented). Masks are 0/255 PNGs (255 = lesion); with the segmenter's ``stretch``
    resize they are brought back to the image's own size (nearest neighbour) and the overlay is drawn on
    the original image, with ``crop`` they cover the centre crop the segmenter saw, at its input size.
    """
    stretch = predictor.segmenter_preprocess.resize == "stretch"
    mask_dir = Path(mask_dir)
    mask_dir.mkdir(parents=True, exist_ok=True)
    stems = unique_stems(paths)
    probs = np.zeros((len(paths), len(predictor.class_names)), np.float32)
    segmented = np.zeros(len(paths), bool)
    mask_paths, overlay_paths = [""] * len(paths), [""] * len(paths)
    chunks = range(0, len(paths), batch_size)
    for start in tqdm(chunks, desc="predicting", unit="batch", disable=not progress):
        index = list(range(start, min(start + batch_size, len(paths))))
        grays = [gray_input(paths[i]) for i in index]
        result = predictor.predict(grays, batch_size)
        for j, i in enumerate(index):
            probs[i] = result.probabilities[j]
            mask = result.masks[j]
            if mask is None:
                continue
            overlay = result.overlays[j]
            if stretch:
                image = grays[j].numpy()[..., 0]
                mask = cv2.resize(mask, image.shape[::-1], interpolation=cv2.INTER_NEAREST)
                overlay = overlay_mask(image, mask)
            segmented[i] = True
            mask_paths[i] = str(save_png(mask_dir / f"{stems[i]}_mask.png", mask * 255))
            overlay_paths[i] = str(save_png(mask_dir / f"{stems[i]}_overlay.png", overlay))
    return probs, segmented, mask_paths, overlay_paths
