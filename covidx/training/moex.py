"""Cascade-SEME losses and trainers: MoEx label interpolation and Regional Learning.

* ``"moex"`` (:class:`MoExTrainer`): eq. 3 of Lv et al. (Med Phys 2021, §4.A), from the
  official MoEx training loop (``main_moex.py``): when the network's
  :class:`~covidx.layers.moex.MomentExchange` layer exchanged moments in this batch,
  ``loss = λ·CE(ŷ, y) + (1-λ)·CE(ŷ, y[perm])``; otherwise plain CE.
* ``"regional"`` (:class:`RegionalLearningTrainer`): Regional Learning, §4.D eq. 6: the
  original images ``X_O`` and their target regions ``X_T = X_O · lung_mask`` are stacked in
  one batch, ``(O_O, O_T) = F(X_O, X_T)``, and ``L = CE(O_T, y) + CE(O_O, y)``. If the
  network has a MoEx layer each CE term is eq. 3 (MoEx partners are drawn over the
  stacked batch, so a masked image may receive the moments of an unmasked one).

Both compute the paper's categorical cross-entropy on the softmax outputs directly (the
loss given to ``compile`` is not used), reduced as Keras' ``sum_over_batch_size``:
``sum(w·CE)/B``. Sample weights follow their label: the ``y[perm]`` term uses
``sample_weight[perm]`` (class-balancing weights belong to the class they weight).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from covidx.layers.moex import MomentExchange, StepSeeds, take_global
from covidx.training.trainers import Trainer, image_of, register_trainer


def _mean_cross_entropy(y_true, y_pred, sample_weight=None):
    """``sum(w·CE(y, ŷ)) / B`` (Keras ``sum_over_batch_size``) for softmax outputs."""
    ce = keras.losses.categorical_crossentropy(ops.cast(y_true, "float32"), ops.cast(y_pred, "float32"))
    if sample_weight is not None:
        ce = ce * ops.cast(ops.reshape(sample_weight, (-1,)), ce.dtype)
    return ops.mean(ce)


def moex_interpolated_loss(y_true, y_pred, permutation, lam, sample_weight=None):
    """Eq. 3: ``λ·CE(ŷ, y) + (1-λ)·CE(ŷ, y[permutation])``.

    Args:
        y_true: one-hot labels ``(B, K)`` of the samples whose features were kept (``y_A``).
        y_pred: softmax outputs ``(B, K)`` of the MoEx'ed batch.
        permutation: int ``(B,)``, the partner of every sample (``y_B = y_true[permutation]``); under
            ``tf.distribute`` an index into the global batch (labels gathered from every replica).
        lam: weight of the own label (``1.0`` gives plain CE).
        sample_weight: optional ``(B,)``; the partner term uses ``sample_weight[permutation]``.
    """
    # Under tf.distribute ``permutation`` indexes the global batch: partners' labels come from every replica.
    y_partner = take_global(ops.cast(y_true, "float32"), permutation)
    w_partner = None if sample_weight is None else take_global(
        ops.cast(ops.reshape(sample_weight, (-1,)), "float32"), permutation)
    lam = ops.cast(lam, "float32")
    return lam * _mean_cross_entropy(y_true, y_pred, sample_weight) + (1.0 - lam) * _mean_cross_entropy(
        y_partner, y_pred, w_partner
    )


def regional_learning_loss(
    y_true, y_pred_original, y_pred_region, sample_weight=None, permutation=None, lam=1.0
):
    """Eq. 6: ``L = L_T + L_O = CE(O_T, y) + CE(O_O, y)``, optionally with MoEx (eq. 3).

    Args:
        y_true: one-hot labels ``(B, K)`` (the same for an image and its target region).
        y_pred_original: ``O_O``, outputs on the original images ``(B, K)``.
        y_pred_region: ``O_T``, outputs on the target regions (image x lung mask) ``(B, K)``.
        sample_weight: optional ``(B,)``.
        permutation: MoEx partners over the **stacked** batch ``[X_O; X_T]`` (int ``(2B,)``),
            or ``None`` without MoEx.
        lam: MoEx label weight (ignored without ``permutation``).
    """
    y2 = ops.concatenate([y_true, y_true], axis=0)
    p2 = ops.concatenate([y_pred_original, y_pred_region], axis=0)
    w2 = None if sample_weight is None else ops.concatenate([ops.reshape(sample_weight, (-1,))] * 2, axis=0)
    # Both halves hold B samples, so L_O + L_T = 2 x the mean over the 2B stacked samples.
    if permutation is None:
        return 2.0 * _mean_cross_entropy(y2, p2, w2)
    return 2.0 * moex_interpolated_loss(y2, p2, permutation, lam, w2)


def find_moment_exchange(net: keras.layers.Layer) -> MomentExchange | None:
    """The network's single :class:`MomentExchange` layer (searching nested models), or ``None``."""
    found, stack = [], list(getattr(net, "layers", []))
    while stack:
        layer = stack.pop()
        if isinstance(layer, MomentExchange):
            found.append(layer)
        stack.extend(getattr(layer, "layers", []))
    if len(found) > 1:
        raise ValueError(f"{net.name} has {len(found)} MomentExchange layers; the MoEx loss needs exactly one")
    return found[0] if found else None


def _moex_state(layer: MomentExchange | None):
    """Permutation and λ of the layer's call in the current trace (``None, 1.0`` without MoEx)."""
    if layer is None:
        return None, 1.0
    if layer.last_permutation is None:
        raise RuntimeError(f"MomentExchange layer {layer.name!r} was not called by the network")
    return layer.last_permutation, layer.last_lambda


def _step_seeds(trainer, layer: MomentExchange):
    """Under a tf.distribute strategy: seeds from the step counter, so every replica draws the same
    permutation (see :class:`~covidx.layers.moex.StepSeeds`); ``None`` (the layer's own generator) otherwise."""
    if not tf.distribute.has_strategy():
        return None
    return StepSeeds(layer.seed or 0, trainer.optimizer.iterations)


def _regularization(model: keras.Model):
    return ops.sum(model.losses) if model.losses else 0.0


@register_trainer("moex")
class MoExTrainer(Trainer):
    """MoEx training (eq. 3): the network must contain one :class:`MomentExchange` layer.

    The forward pass runs the network with ``training=True``; the layer records the
    permutation and λ it used, which this step reads inside the same trace (graph mode
    under ``fit`` included), so image and label mixing always agree.
    """

    def __init__(self, net: keras.Model, **kwargs):
        super().__init__(net, **kwargs)
        if find_moment_exchange(net) is None:
            raise ValueError(f"trainer 'moex' needs a network with a MomentExchange layer; {net.name} has none")

    def train_loss(self, x, y, sample_weight):
        layer = find_moment_exchange(self.net)
        layer.last_permutation = None  # never read a permutation left over from another trace
        layer.step_seeds = _step_seeds(self, layer)
        y_pred = self.net(image_of(x), training=True)
        permutation, lam = _moex_state(layer)
        loss = moex_interpolated_loss(y, y_pred, permutation, lam, sample_weight)
        return loss + _regularization(self), y_pred


@register_trainer("regional")
class RegionalLearningTrainer(Trainer):
    """Regional Learning (§4.D, eq. 6), combined with MoEx when the network has a MoEx layer.

    Inputs are ``{"image": (B, H, W, C) in [0, 255], "lung_mask": (B, H, W, 1) in {0, 1}}``.
    The target region ``X_T = image · lung_mask`` and the original image go through the
    network in one stacked batch (the paper's "superimposed in a batch", Fig. 7), so batch
    normalisation sees both. Metrics are computed on the original images; evaluation and
    inference use the original image only.
    """

    needs = ("lung_mask",)

    def train_loss(self, x, y, sample_weight):
        image = x["image"]
        region = image * ops.cast(x["lung_mask"], image.dtype)
        layer = find_moment_exchange(self.net)
        if layer is not None:
            layer.last_permutation = None
            layer.step_seeds = _step_seeds(self, layer)
        batch = ops.shape(image)[0]
        y_pred = self.net(ops.concatenate([image, region], axis=0), training=True)
        y_pred_original, y_pred_region = y_pred[:batch], y_pred[batch:]
        permutation, lam = _moex_state(layer)
        loss = regional_learning_loss(y, y_pred_original, y_pred_region, sample_weight, permutation, lam)
        return loss + _regularization(self), y_pred_original
