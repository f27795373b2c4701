"""Cascade-SEME as one functional Keras model (Lv et al., Med Phys 2021, §4 and Fig. 2).

``create_model("cascade-seme")`` / :func:`build_cascade_model`: all stages share one input; the static
graph computes stage 2 for the whole batch and :class:`covidx.layers.CascadeGate` (eq. 1) discards the
unrouted rows; serializable (no Lambda). The Python system that runs stage 2 only on the routed images,
calibrates ``Th_vir`` and explains both stages is :mod:`covidx.systems.cascade`; its TF Serving export
is :mod:`covidx.serving.systems`. Both give the same answers as this model (``tests/test_systems_cascade.py``).

Training is per stage (``python -m covidx.train`` cannot train ``cascade-seme``, see
:data:`TRAINING_HINT`); ``python -m covidx.cascade`` assembles trained runs.
"""


from __future__ import annotations

from typing import Sequence

import keras

from covidx.layers.cascade import CascadeGate, LungMasking, class_maps
from covidx.models.registry import Preset, get_spec, register_model
from covidx.models.resnet import NORMALIZATION, STAGE1
from covidx.tasks import LUNG_INDEX, STAGE1_CLASSES, STAGE2_CLASSES

DEFAULT_THRESHOLD = 1.0 / 3.0  # uncalibrated: the uniform viral probability of a 3-way softmax

TRAINING_HINT = (
    "cascade-seme is not trained as one network; train its stages, then assemble them:\n"
    "  python -m covidx.train --model seme-resnet50        # stage 1 (task stage1)\n"
    "  python -m covidx.train --model lung-unet            # optional: lung masks (task lungs)\n"
    "  python -m covidx.train --model seme-densenet169     # stage 2 (task stage2, Regional Learning)\n"
    "  python -m covidx.cascade --stage1 RUN --stage2 RUN [--lung RUN] --out DIR"
)


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
