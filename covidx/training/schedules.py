"""Learning-rate warm-up in front of any schedule (the quick recipes, :mod:`covidx.models.recipes`)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="covidx")
class WarmUp(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``after(0)`` over ``warmup_steps``, then ``after(step - warmup_steps)``.

    Goyal et al. 2017, "Accurate, Large Minibatch SGD", §2.2 (gradual warm-up); ``after`` is a
    float (constant rate) or another schedule, which starts its own clock after the warm-up.
    """

    def __init__(self, after, warmup_steps: int):
        super().__init__()
        self.after = after
        self.warmup_steps = int(warmup_steps)

    def _after(self, step):
        if isinstance(self.after, keras.optimizers.schedules.LearningRateSchedule):
            return ops.cast(self.after(step), "float32")
        return ops.convert_to_tensor(float(self.after), "float32")

    def __call__(self, step):
        step = ops.cast(step, "float32")
        w = float(max(1, self.warmup_steps))
        peak = self._after(ops.zeros((), "float32"))
        warm = peak * (step + 1.0) / w  # the first step already moves: 1/w of the peak
        return ops.where(step < w, warm, self._after(ops.maximum(step - w, 0.0)))

    def get_config(self):
        after = self.after
        if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            after = keras.saving.serialize_keras_object(after)
        return {"after": after, "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config):
        after = config["after"]
        if isinstance(after, dict):
            after = keras.saving.deserialize_keras_object(after)
        return cls(after, config["warmup_steps"])
