"""Adam and SGD with each variable's update as one fused kernel.

Keras 3 writes an optimizer's update as separate operations per variable: Adam's is about ten passes
over each weight tensor (``m += (g - m)(1 - b1)``, ``v += (g² - v)(1 - b2)``, ``sqrt``, divide,
subtract...) plus a dozen scalar operations, each a kernel launch. For ResNet50's 25 M parameters in
161 tensors that was ~200 ms of a ~1 s training step on 2 cores (128 px, batch 16, bfloat16; TF
profiler). TensorFlow's own training kernels (``ResourceApplyAdam``, ``ResourceApplyKerasMomentum``,
``ResourceApplyGradientDescent``) do the same arithmetic in one vectorised, multi-threaded pass:
~50 ms. The formulas are Keras' own (Kingma & Ba 2015, Algorithm 1 with the "epsilon hat" of its
§2; Keras' momentum ``m = momentum·m - lr·g``, ``w += m`` or, Nesterov, ``w += momentum·m - lr·g``), so
the weights after a step equal Keras' to float rounding (``tests/test_optimizers.py``).

Everything else is Keras': schedules, weight decay (applied before the update, decoupled), gradient
clipping, EMA, distribution strategies, the state's variables and their checkpoints. Cases the fused
kernels do not cover (AMSGrad, sparse gradients, a variable that is not float32/float64) take the
parent's path. ``python -m covidx.train --no-fused-optimizer`` trains with Keras' update for every
variable (``fused=False``).

Both take ``lr_scales``, learning-rate factors per variable (path -> factor), which Keras' optimizers lack:
a layer whose full step is too large for the rest of the network's rate (MAG-SD's classifier on a
65,536-d attention-pooled feature of norm 100, :mod:`covidx.models.recipes`) trains at a fraction of it
(PyTorch's parameter groups). Weight decay, which Keras applies apart from the update, keeps the full rate.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _fusable(gradient, variable) -> bool:
    return not isinstance(gradient, tf.IndexedSlices) and variable.dtype in (tf.float32, tf.float64)


def _handle(variable):
    """The resource handle of a Keras or TensorFlow variable (under a strategy: the one being updated)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


class _LayerRates:
    """What both optimizers add to Keras' own: ``lr_scales`` (variable path -> learning-rate factor) and
    ``fused`` (False: Keras' update for every variable)."""

    def __init__(self, *args, lr_scales: dict | None = None, fused: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_scales = {str(path): float(factor) for path, factor in (lr_scales or {}).items()}
        self.fused = bool(fused)
        self._scales = {}  # optimizer variable index -> factor, once built

    def build(self, variables):
        super().build(variables)
        unknown = set(self.lr_scales) - {v.path for v in variables}
        if unknown:
            raise ValueError(f"lr_scales names variables the model does not train: {', '.join(sorted(unknown))}")
        # By index, not path: under a distribution strategy update_step sees each replica's tf.Variable.
        self._scales = {self._get_variable_index(v): self.lr_scales[v.path] for v in variables
                        if v.path in self.lr_scales}

    def _rate(self, variable, learning_rate):
        scale = self._scales.get(self._get_variable_index(variable)) if self._scales else None
        return learning_rate if scale is None else learning_rate * scale

    def get_config(self):
        return {**super().get_config(), "lr_scales": dict(self.lr_scales), "fused": self.fused}


@keras.saving.register_keras_serializable(package="covidx")
class FusedAdam(_LayerRates, keras.optimizers.Adam):
    """``keras.optimizers.Adam`` with each variable's update as one ``ResourceApplyAdam`` (module docstring)."""

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = self._rate(variable, learning_rate)
        if not self.fused or self.amsgrad or not _fusable(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
            beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))


@keras.saving.register_keras_serializable(package="covidx")
class FusedSGD(_LayerRates, keras.optimizers.SGD):
    """``keras.optimizers.SGD`` (momentum, Nesterov) with each variable's update as one kernel (module docstring)."""

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = self._rate(variable, learning_rate)
        if not self.fused or not _fusable(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        lr, gradient = tf.cast(learning_rate, dtype), tf.cast(gradient, dtype)
        if self.momentum == 0:
            tf.raw_ops.ResourceApplyGradientDescent(var=_handle(variable), alpha=lr, delta=gradient)
            return
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(self.momentums[self._get_variable_index(variable)]), lr=lr,
            grad=gradient, momentum=tf.cast(self.momentum, dtype), use_nesterov=self.nesterov)
