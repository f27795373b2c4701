"""The Cascade-SEME decision as serializable layers (Lv et al., Med Phys 2021, §4, eq. 1 and §4.D).

:class:`CascadeGate` is eq. 1's routing written once; the Python system
(:mod:`covidx.systems.cascade`), the in-graph model (:mod:`covidx.models.cascade`) and the TF Serving
export (:mod:`covidx.serving.systems`) all call it. :class:`LungMasking` is Regional Learning's
``X_T = X_O · M``.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from covidx.tasks import CASCADE_CLASSES, LUNG_INDEX, STAGE1_CLASSES, STAGE2_CLASSES

FINAL_CLASSES = CASCADE_CLASSES  # the cascade's labels: stage 1's three + stage 2's COVID-19
SENTINEL = -1.0  # stage-2 probability of an image that did not reach stage 2


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
