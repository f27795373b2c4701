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

import keras
from keras import ops


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

    Computed in float32 (as the official code does) and cast back to ``x.dtype``.
    """
    dtype = x.dtype
    x = ops.cast(x, "float32")
    mean, std = pono_moments(x, epsilon)
    partner_mean = ops.take(mean, permutation, axis=0)
    partner_std = ops.take(std, permutation, axis=0)
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
      when nothing was exchanged);
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
        self.last_permutation = None
        self.last_applied = None

    def build(self, input_shape):
        if input_shape[-1] is None or input_shape[-1] < 2:
            # The unbiased channel variance needs at least two channels.
            raise ValueError(f"MomentExchange needs a known channel axis >= 2, got {input_shape}")
        super().build(input_shape)

    @property
    def last_lambda(self):
        """Weight of the own label in eq. 3 for the last batch (``1.0`` if not exchanged)."""
        if self.last_applied is None:
            return None
        return ops.where(self.last_applied, self.lam, 1.0)

    def call(self, x, training=None):
        batch = ops.shape(x)[0]
        identity = ops.arange(batch, dtype="int32")
        if not training or self.probability == 0.0:
            self.last_permutation, self.last_applied = identity, ops.convert_to_tensor(False)
            return x
        coin = keras.random.uniform((), seed=self.seed_generator)
        applied = coin < self.probability
        shuffled = ops.cast(keras.random.shuffle(identity, seed=self.seed_generator), "int32")
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
