"""Train steps. A *trainer* wraps the functional network for ``fit`` and owns the loss.

The saved artefact is always the plain functional network (``trainer.net``):
trainers only exist while training, so a checkpoint reloads with
``keras.models.load_model(..., safe_mode=True)`` without knowing how it was
trained, and exports to TF Serving without training-only code.

Batch contract (built by :func:`covidx.data.pipeline.make_dataset`):
``(inputs, y, sample_weight)`` where ``inputs`` is the image batch, float32 in
[0, 255], shape ``(B, H, W, C)``, or a dict ``{"image": ..., "lung_mask": ...}``
when the trainer lists ``"lung_mask"`` in :attr:`Trainer.needs`; ``y`` is one-hot
(classification) or an integer class map ``(B, H, W)`` (segmentation).

Each paper adds its trainer with :func:`register_trainer` (``moex``,
``regional``, ``magsd``, …) and names it in its preset.
"""

from __future__ import annotations

import keras
import tensorflow as tf

TRAINERS: dict[str, type] = {}


def register_trainer(name: str):
    def decorator(cls):
        if name in TRAINERS:
            raise ValueError(f"trainer {name!r} registered twice")
        TRAINERS[name] = cls
        cls.trainer_name = name
        return cls

    return decorator


def get_trainer(name: str) -> type:
    try:
        return TRAINERS[name]
    except KeyError:
        raise ValueError(f"unknown trainer {name!r}; registered: {', '.join(sorted(TRAINERS))}") from None


def resolve_jit_compile(setting: bool | None, net: keras.Model) -> bool:
    """Whether to XLA-compile the train step (``compile(jit_compile=...)``); ``None`` decides here.

    ``None`` (auto): on when a GPU is visible (Keras' own rule), off on CPUs: there TensorFlow runs
    convolutions in oneDNN, which XLA's CPU backend does not use by default, and a grouped convolution (DPN)
    under XLA is 100x slower or worse in the backward pass (``benchmarks/grouped_conv.py``; compare a
    whole step with ``benchmarks/versus_torch.py --tf-jit``). ``True`` / ``False`` force it; every
    covidx train step (standard, MoEx, Regional Learning, MAG-SD) compiles under XLA.
    """
    if setting is not None:
        return bool(setting)
    return bool(tf.config.list_physical_devices("GPU"))


def image_of(inputs):
    """The image tensor of a batch's inputs (a tensor, or a dict with an ``image`` key)."""
    return inputs["image"] if isinstance(inputs, dict) else inputs


@register_trainer("standard")
class Trainer(keras.Model):
    """Plain supervised training of ``net`` with the loss given to ``compile``.

    Subclasses override :meth:`train_step` (custom losses) and may set
    :attr:`needs` to ask the pipeline for extra inputs (``"lung_mask"``).
    Evaluation always runs the primary path: ``net(image)``.
    """

    needs: tuple[str, ...] = ()

    def __init__(self, net: keras.Model, **kwargs):
        super().__init__(name=kwargs.pop("name", f"{net.name}_trainer"), **kwargs)
        self.net = net

    def call(self, inputs, training=False):
        return self.net(image_of(inputs), training=training)

    def train_loss(self, x, y, sample_weight):
        """Forward pass and loss of one training batch: returns ``(loss, y_pred)``.

        Subclasses override this (not :meth:`train_step`) to implement a paper's loss;
        ``y_pred`` is what the compiled metrics are updated with.
        """
        y_pred = self(x, training=True)
        loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        return loss, y_pred

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, y_pred = self.train_loss(x, y, sample_weight)
            self._loss_tracker.update_state(loss, sample_weight=tf.shape(image_of(x))[0])
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
