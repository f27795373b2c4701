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

from covidx.training.distribute import num_workers

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


def num_replicas() -> int:
    """Replicas training in sync under the current ``tf.distribute`` strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_loss_for_distribution(loss):
    """This replica's batch mean divided by the replicas (Keras' own scaling of compiled losses)."""
    n = num_replicas()
    return loss if n == 1 else loss * tf.cast(1.0 / n, loss.dtype)


def unscale_loss_for_distribution(loss):
    """Undo :func:`scale_loss_for_distribution` (what Keras' ``_compute_loss`` returns -> this batch's mean)."""
    n = num_replicas()
    return loss if n == 1 else loss * tf.cast(n, loss.dtype)


def replica_mean(logs: dict) -> dict:
    """Scalar logs averaged over the replicas (one all-reduce); unchanged on one replica.

    Every replica holds the same number of samples (full per-replica batches), so the mean of the
    replicas' batch means is the global batch's mean. Across workers Keras averages step outputs itself
    with ``strategy.reduce("MEAN", v, axis=0)``, which needs an axis: the logs go out as ``(1,)``.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1 or not logs:
        return logs
    if num_workers(tf.distribute.get_strategy()) > 1:
        return {k: tf.reshape(tf.cast(v, tf.float32), [1]) for k, v in logs.items()}
    keys = sorted(logs)
    stacked = tf.stack([tf.cast(tf.reshape(logs[k], []), tf.float32) for k in keys])
    mean = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, stacked)
    return {k: mean[i] for i, k in enumerate(keys)}


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
        self._covidx_symbolic_built = False
        self.sample_batch = None  # a local (x, y, w) batch to build from under a distribution strategy

    def call(self, inputs, training=False):
        return self.net(image_of(inputs), training=training)

    def train_loss(self, x, y, sample_weight):
        """Forward pass and loss of one training batch: returns ``(loss, y_pred)``.

        Subclasses override this (not :meth:`train_step`) to implement a paper's loss;
        ``y_pred`` is what the compiled metrics are updated with. ``loss`` is the mean over this
        replica's batch (regularisation included), as on one device: :meth:`train_step` scales it
        for the replicas.
        """
        y_pred = self(x, training=True)
        loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        return unscale_loss_for_distribution(loss), y_pred  # Keras divides by the replicas; see train_step

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds (metrics, optimizer) from the first batch of a distributed dataset: it takes that batch
        # from the training iterator (one step's data lost) and reduces the whole ``(x, y, w)`` with
        # ``strategy.reduce``, which MultiWorkerMirroredStrategy rejects (one PerReplica per reduce). Build
        # once, from :attr:`sample_batch` (a local batch) when set, else from this worker's first replica's values.
        if self._distribute_strategy is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        if self._covidx_symbolic_built:
            return None
        if self.sample_batch is not None:
            data_batch = self.sample_batch
        elif iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                break
            local = self._distribute_strategy.experimental_local_results
            data_batch = keras.tree.map_structure(
                lambda v: local(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v, batch)
        self._covidx_symbolic_built = True
        return super()._maybe_symbolic_build(data_batch=data_batch)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, y_pred = self.train_loss(x, y, sample_weight)
            self._loss_tracker.update_state(loss, sample_weight=tf.shape(image_of(x))[0])
            # Gradients are summed over the replicas: each replica's mean over its B/N samples is
            # divided by N, so the update is the gradient of the mean over the global batch of B.
            scaled = self.optimizer.scale_loss(scale_loss_for_distribution(loss))
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        return replica_mean(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    def test_step(self, data):
        return replica_mean(super().test_step(data))
