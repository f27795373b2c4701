"""Moment Exchange (MoEx) with positional normalisation (PONO).

Li, Wu, Lim, Belongie & Weinberger, "On Feature Normalization and Data
Augmentation", CVPR 2021 (official code Boyiliee/MoEx); used as the "ME" of
Cascade-SEME (Lv et al., Med Phys 2021, §4.A, eqs. 2–3).

For every sample ``A`` of a training batch MoEx keeps the PONO-normalised
features of ``A`` and re-injects the first and second moments of a partner
``B`` (a random permutation of the batch), eq. 2::

    h_A^(B) = F^-1(ĥ_A, μ_B, σ_B) = (h_A - μ_A) / σ_A * σ_B + μ_B

The labels are interpolated in the loss (eq. 3, done by the trainer, see
:mod:`covidx.training.moex`): ``λ·l(h_A^(B), y_A) + (1-λ)·l(h_A^(B), y_B)``.
"""

from __future__ import annotations

import threading

import keras
import tensorflow as tf
from keras import ops


def replica_context():
    """``(replicas in sync, this replica's index)`` inside a ``tf.distribute`` step; ``(1, 0)`` otherwise."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return 1, 0
    return ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group


def gather_replicas(x):
    """The global batch: ``x`` of every replica concatenated on axis 0 in replica order (``x`` on one replica).

    A sum all-reduce of each replica's rows placed at its own offset (zeros elsewhere: exact), because
    ``ReplicaContext.all_gather`` fails under ``MultiWorkerMirroredStrategy`` ("destinations can not be
    empty", TensorFlow 2.21). Differentiable: the all-reduce's gradient is the all-reduce of the
    gradients, so each replica receives what every replica's loss owes its rows. Every replica must hold
    the same number of rows (training batches are ``drop_remainder``).
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    replicas, index = ctx.num_replicas_in_sync, tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    rows = tf.shape(x)[0]
    before, after = index * rows, (replicas - 1 - index) * rows
    paddings = tf.concat([[[before, after]], tf.zeros([x.shape.rank - 1, 2], tf.int32)], axis=0)
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.pad(x, paddings))


class StepSeeds:
    """Stateless seeds of one training step: ``fold_in((seed, step), k)`` for the k-th draw of the step.

    Under ``tf.distribute`` every replica must draw the same numbers, but Keras' ``SeedGenerator``
    state is one variable the replicas advance in no fixed order; the optimizer's step counter is
    the same on all of them. A trainer hands the layers (and its own augmentations) one of these.
    """

    def __init__(self, seed: int, step):
        self.base = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
        self.count = 0

    def next(self):
        self.count += 1
        return tf.random.experimental.stateless_fold_in(self.base, self.count)


def uniform(shape, low=0.0, high=1.0, seed=None):
    """``keras.random.uniform``, or a stateless draw from :class:`StepSeeds`."""
    if isinstance(seed, StepSeeds):
        return tf.random.stateless_uniform(shape, seed.next(), low, high)
    return keras.random.uniform(shape, low, high, seed=seed)


def take_global(x, indices):
    """Rows ``indices`` of the global batch of ``x`` (``ops.take(x, indices, axis=0)`` on one replica).

    Across replicas the rows are picked by a one-hot product (exact: one term per row), whose gradient is a
    dense tensor, which the all-gather's gradient (an all-reduce) takes; ``take``'s would be sparse.
    """
    replicas, _ = replica_context()
    if replicas == 1:
        return ops.take(x, indices, axis=0)
    everyone = gather_replicas(x)
    rows = tf.shape(everyone)[0]
    pick = tf.one_hot(indices, rows, dtype=everyone.dtype)
    picked = tf.matmul(pick, tf.reshape(everyone, [rows, -1]))
    return tf.reshape(picked, tf.concat([tf.shape(indices), tf.shape(everyone)[1:]], 0))


def pono_moments(x, epsilon: float = 1e-5):
    """PONO moments: per sample and per pixel, across the channel axis (NHWC axis -1).

    Returns ``(mean, std)`` of shape ``(B, H, W, 1)`` with ``std = sqrt(var + eps)`` and
    the *unbiased* variance (divide by ``C - 1``), as torch ``.var`` in the official code.
    """
    channels = x.shape[-1]
    mean = ops.mean(x, axis=-1, keepdims=True)
    var = ops.sum(ops.square(x - mean), axis=-1, keepdims=True) / (channels - 1)
    return mean, ops.sqrt(var + epsilon)


def exchange_moments(x, permutation, epsilon: float = 1e-5):
    """Eq. 2 for a whole batch: sample ``i`` gets the PONO moments of sample ``permutation[i]``.

    Computed in float32 (as the official code does) and cast back to ``x.dtype``. Under a
    ``tf.distribute`` strategy ``permutation`` indexes the global batch (:func:`gather_replicas`): a
    sample's partner may sit on another replica, whose moments (``1/C`` of the features) are gathered.
    """
    dtype = x.dtype
    x = ops.cast(x, "float32")
    mean, std = pono_moments(x, epsilon)
    partner_mean = take_global(mean, permutation)
    partner_std = take_global(std, permutation)
    # (x - μ_A)/σ_A·σ_B + μ_B written as one scale and shift (official code, fewer ops).
    scale = partner_std / std
    shift = partner_mean - mean * scale
    return ops.cast(x * scale + shift, dtype)


@keras.saving.register_keras_serializable(package="covidx")
class MomentExchange(keras.layers.Layer):
    """MoEx layer: PONO moment exchange between batch partners during training, identity at inference.

    With probability ``probability`` per batch (one coin flip per batch, as in the official
    ``main_moex.py``) the batch is MoEx'ed with a random permutation; otherwise, and always
    at inference (``training=False``), the layer returns its input unchanged. The layer has
    no weights.

    After each call the layer exposes, as tensors of the current trace (so a trainer that
    calls the network and then reads them inside the same ``train_step`` gets the values
    of this very batch, also in graph mode under ``fit``):

    * :attr:`last_permutation`: int32 ``(B,)``, partner index of every sample (``arange(B)``
      when nothing was exchanged); under ``tf.distribute``, an index into the global batch
      (:func:`gather_replicas`);
    * :attr:`last_applied`: bool scalar, whether the batch was exchanged;
    * :attr:`last_lambda`: float32 scalar, the label weight of the sample's own label in
      eq. 3 (``lam`` when applied, ``1.0`` otherwise, so eq. 3 reduces to plain CE).

    Defaults follow the official ImageNet run scripts (``run_moex_resnet.sh``,
    ``run_moex_densenet.sh``): ``p = 1.0``, ``λ = 0.9``, PONO, ``eps = 1e-5``. The
    Cascade-SEME papers do not state p or λ (Med Phys 2021 §4.C names MoEx only).

    Args:
        probability: chance ``p`` that a training batch is MoEx'ed.
        lam: label-mixing constant ``λ`` of eq. 3 (weight of the sample's own label).
        epsilon: added to the variance before the square root.
        seed: seed of the layer's random generator (coin flip and permutation).
    """

    def __init__(
        self,
        probability: float = 1.0,
        lam: float = 0.9,
        epsilon: float = 1e-5,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        self.probability = float(probability)
        self.lam = float(lam)
        self.epsilon = float(epsilon)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="moex_seed_generator")
        # Per thread: MirroredStrategy traces its replicas in threads over one layer object, so each
        # replica's trainer must read the permutation its own replica drew.
        self._trace_state = threading.local()

    def build(self, input_shape):
        if input_shape[-1] is None or input_shape[-1] < 2:
            # The unbiased channel variance needs at least two channels.
            raise ValueError(f"MomentExchange needs a known channel axis >= 2, got {input_shape}")
        super().build(input_shape)

    def _state(self, name):
        return getattr(self._trace_state, name, None)

    @property
    def last_permutation(self):
        return self._state("permutation")

    @last_permutation.setter
    def last_permutation(self, value):
        self._trace_state.permutation = value

    @property
    def last_applied(self):
        return self._state("applied")

    @last_applied.setter
    def last_applied(self, value):
        self._trace_state.applied = value

    @property
    def step_seeds(self):
        """:class:`StepSeeds` set by the trainer under tf.distribute, else ``None`` (the layer's own generator)."""
        return self._state("step_seeds")

    @step_seeds.setter
    def step_seeds(self, value):
        self._trace_state.step_seeds = value

    @property
    def last_lambda(self):
        """Weight of the own label in eq. 3 for the last batch (``1.0`` if not exchanged)."""
        if self.last_applied is None:
            return None
        return ops.where(self.last_applied, self.lam, 1.0)

    def call(self, x, training=None):
        batch = ops.shape(x)[0]
        # Under tf.distribute the permutation is drawn over the global batch (every replica draws the same
        # one from the same seed state) and this replica keeps its rows: N replicas pair samples exactly as
        # one device holding the whole batch would. Indices are global (this replica's rows start at offset).
        replicas, replica = replica_context()
        offset = ops.cast(replica, "int32") * ops.cast(batch, "int32")
        identity = ops.arange(batch, dtype="int32") + offset
        if not training or self.probability == 0.0:
            self.last_permutation, self.last_applied = identity, ops.convert_to_tensor(False)
            return x
        everyone = ops.arange(batch * replicas, dtype="int32")
        if self.step_seeds is None:
            applied = keras.random.uniform((), seed=self.seed_generator) < self.probability
            shuffled = keras.random.shuffle(everyone, seed=self.seed_generator)
        else:  # the same draws on every replica
            applied = uniform((), seed=self.step_seeds) < self.probability
            shuffled = tf.random.experimental.stateless_shuffle(everyone, self.step_seeds.next())
        shuffled = ops.take(ops.cast(shuffled, "int32"), identity)
        self.last_permutation = ops.where(applied, shuffled, identity)
        self.last_applied = applied
        # where() (not a permutation of arange) keeps the skipped case bit-exact.
        return ops.where(applied, exchange_moments(x, shuffled, self.epsilon), x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "probability": self.probability,
            "lam": self.lam,
            "epsilon": self.epsilon,
            "seed": self.seed,
        }
