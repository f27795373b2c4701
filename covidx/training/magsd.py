"""MAG-SD training: attention-guided augmentation and soft-distance regularisation.

Li et al., "Multiscale Attention Guided Network for COVID-19 Diagnosis Using Chest X-ray
Images" (MAG-SD), IEEE JBHI 2021, arXiv 2012.02278, §3.3-3.4, §4.4.6; checked against the
official code (StonHamA/MAG-SD == JasonLeeGHub/MAG-SD: core/utils.py ``batch_augment``,
core/train_new.py ``train_a_iter``, core/base.py ``gen_refine_loss``, core/localize.py).

Everything is batched TF ops (no Python loop over samples, no ``py_function``), so the
train step compiles with ``tf.function``. Randomness goes through Keras seeds.

Per training batch (:class:`MagSDTrainer`):

1. primary forward ``P, A = net(I)``; ``A`` is ``(B, h, w, M)``;
2. per sample, 3 map indices drawn with replacement with probabilities
   ``sqrt(sum_hw A_k + 1e-12)``, L1-normalised (:func:`sample_attention_maps`), one map per
   augmentation: attention mixup, attention dimming, attention patching (§3.3, Fig. 5);
3. the 3 augmented batches go through the same network (3 more forwards);
4. loss = CE(P, y) + sum over views of the soft distance (Algorithm 1, Eqs. 5-7).

Evaluation uses the primary path only (``net(I)``).
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from covidx.layers.moex import StepSeeds, gather_replicas, replica_context, uniform
from covidx.models.magsd import ATTENTION_MAPS, PREDICTIONS, attention_view
from covidx.training.trainers import Trainer, image_of, register_trainer

AUGMENTATIONS = ("mixup", "dim", "patch")
# Paper §4.4.4: "1 augmentation: attention mixup; 2 augmentations: attention mixup and attention
# patching" (Table 7 labels the 2-augmentation row AM + AD; pass a tuple to choose).
AUGMENTATIONS_BY_COUNT = {0: (), 1: ("mixup",), 2: ("mixup", "patch"), 3: ("mixup", "dim", "patch")}
_EPS = 1e-12


# ----------------------------------------------------------------------------- randomness


def _rows_of_global_draw(draw, batch):
    """This replica's rows of ``draw(rows)`` taken over the global batch (``draw(batch)`` on one replica).

    Every replica draws the same numbers (same seed state) for all ``batch x replicas`` samples and
    keeps its own rows, so N replicas augment sample ``i`` of a global batch as one device would
    (and two replicas never reuse each other's draws).
    """
    replicas, replica = replica_context()
    if replicas == 1:
        return draw(batch)
    start = tf.cast(replica, tf.int32) * tf.cast(batch, tf.int32)
    return tf.gather(draw(batch * replicas), tf.range(batch) + start)


# ----------------------------------------------------------------------------- attention maps


def attention_weights(attention_maps):
    """Sampling probabilities of the maps: ``sqrt(sum_hw A_k + 1e-12)``, L1-normalised -> ``(B, M)``."""
    a = tf.cast(attention_maps, tf.float32)
    w = tf.sqrt(tf.reduce_sum(a, axis=(1, 2)) + _EPS)
    return w / tf.reduce_sum(w, axis=-1, keepdims=True)


def sample_attention_maps(attention_maps, num_draws: int = 3, seed=None):
    """Draw ``num_draws`` maps per sample, with replacement, by attention weight -> ``(B, h, w, num_draws)``.

    As the official ``res50Encoder.forward`` (``np.random.choice(M, 3, p=weights)``); the maps are
    detached (the augmentations are not differentiated).
    """
    a = tf.stop_gradient(tf.cast(attention_maps, tf.float32))
    logits = gather_replicas(tf.math.log(attention_weights(a)))  # the global batch's (B, M) under tf.distribute
    if isinstance(seed, StepSeeds):
        def draw(rows):
            return tf.random.stateless_categorical(logits, num_draws, seed.next(), dtype=tf.int32)
    else:
        def draw(rows):
            return keras.random.categorical(logits, num_draws, seed=seed, dtype="int32")
    idx = _rows_of_global_draw(draw, tf.shape(a)[0])
    return tf.gather(a, idx, axis=3, batch_dims=1)


def upsample_maps(maps, size):
    """Bilinear upsampling of ``(B, h, w)`` maps to ``size`` (half-pixel centres = torch ``align_corners=False``)."""
    up = tf.image.resize(tf.cast(maps, tf.float32)[..., None], size, method="bilinear")
    return up[..., 0]


def _as_range(theta):
    return (float(theta), float(theta)) if isinstance(theta, (int, float)) else (float(theta[0]), float(theta[1]))


def _thresholds(maps, theta, seed):
    """Per-sample threshold ``theta * max(map)``, ``theta ~ U(low, high)`` per sample (code: ``random.uniform``)."""
    low, high = _as_range(theta)
    batch = tf.shape(maps)[0]
    if high > low:
        t = _rows_of_global_draw(lambda rows: uniform((rows,), low, high, seed=seed), batch)
    else:
        t = tf.fill((batch,), low)
    return t * tf.reduce_max(maps, axis=(1, 2))


def mask_boxes(mask):
    """Bounding boxes ``[y0, x0, y1, x1)`` (int32, end exclusive) of boolean masks ``(B, H, W)`` and a non-empty flag.

    An empty mask gives the whole image (``argmax`` of all-False is 0).
    """
    rows = tf.reduce_any(mask, axis=2)
    cols = tf.reduce_any(mask, axis=1)
    h, w = tf.shape(mask)[1], tf.shape(mask)[2]

    def first_last(v, n):
        first = tf.argmax(tf.cast(v, tf.int32), axis=1, output_type=tf.int32)
        last = n - 1 - tf.argmax(tf.cast(v[:, ::-1], tf.int32), axis=1, output_type=tf.int32)
        return first, last + 1

    y0, y1 = first_last(rows, h)
    x0, x1 = first_last(cols, w)
    return tf.stack([y0, x0, y1, x1], axis=1), tf.reduce_any(rows, axis=1)


def attention_boxes(maps, size, theta, padding: float = 0.1, seed=None):
    """Padded bounding box of the attended region of each map (Eq. 2 + box), ``(B, 4)`` int32 ``[y0, x0, y1, x1)``.

    The map is upsampled to ``size``; the region is the pixels ``>= theta * max(map)`` (``max``
    of the low-resolution map, as the code); the box is grown by ``floor(padding * H)`` rows and
    ``floor(padding * W)`` columns on each side and clipped to the image. (The code's ``int()``
    casts pad 23 px above and 21 below at 224 px; we pad symmetrically.)
    """
    h, w = size
    maps = tf.cast(maps, tf.float32)
    up = upsample_maps(maps, size)
    mask = up >= _thresholds(maps, theta, seed)[:, None, None]
    boxes, _ = mask_boxes(mask)
    ph, pw = int(padding * h), int(padding * w)
    pad = tf.constant([-ph, -pw, ph, pw], tf.int32)
    return tf.clip_by_value(boxes + pad, 0, tf.constant([h, w, h, w], tf.int32))


# ----------------------------------------------------------------------------- image ops


def _source_coords(start, length, out_size: int):
    """Bilinear source indices/weights of ``out_size`` samples of the span ``[start, start+length)``.

    Half-pixel centres with clamping at the span edges, as torch ``F.interpolate(mode="bilinear",
    align_corners=False)`` on the cropped tensor (and ``cv2.resize`` INTER_LINEAR).
    """
    length_f = tf.cast(length, tf.float32)[:, None]
    i = tf.range(out_size, dtype=tf.float32)[None, :]
    src = tf.clip_by_value((i + 0.5) * length_f / out_size - 0.5, 0.0, length_f - 1.0)
    lo = tf.floor(src)
    frac = src - lo
    lo_i = tf.cast(lo, tf.int32)
    hi_i = tf.minimum(lo_i + 1, tf.cast(length_f, tf.int32) - 1)
    start = tf.cast(start, tf.int32)[:, None]
    return start + lo_i, start + hi_i, frac


def crop_and_resize(images, boxes, size):
    """Crop ``boxes`` ``[y0, x0, y1, x1)`` from ``images`` (NHWC) and resize each crop to ``size`` bilinearly."""
    images = tf.cast(images, tf.float32)
    y_lo, y_hi, fy = _source_coords(boxes[:, 0], boxes[:, 2] - boxes[:, 0], size[0])
    x_lo, x_hi, fx = _source_coords(boxes[:, 1], boxes[:, 3] - boxes[:, 1], size[1])
    top = tf.gather(images, y_lo, axis=1, batch_dims=1)
    bottom = tf.gather(images, y_hi, axis=1, batch_dims=1)
    fy = fy[:, :, None, None]
    rows = top * (1.0 - fy) + bottom * fy
    left = tf.gather(rows, x_lo, axis=2, batch_dims=1)
    right = tf.gather(rows, x_hi, axis=2, batch_dims=1)
    fx = fx[:, None, :, None]
    return left * (1.0 - fx) + right * fx


def attention_mixup(images, maps, theta=(0.4, 0.6), padding: float = 0.1, gamma: float = 0.6, seed=None):
    """Attention mixup (§3.3.1, Eqs. 2-3): ``I1 = gamma * I0 + (1 - gamma) * B``.

    ``B`` is the padded bounding box of the attended region (:func:`attention_boxes`) enlarged to
    the input size. The paper leaves ``gamma`` open ("in [0, 1]"); the code uses
    ``images * 0.6 + upsampled_patch * 0.4``, so ``gamma = 0.6``; ``theta ~ U(0.4, 0.6)``, padding 0.1.
    """
    images = tf.cast(images, tf.float32)
    size = images.shape[1:3]
    boxes = attention_boxes(maps, size, theta, padding, seed)
    return gamma * images + (1.0 - gamma) * crop_and_resize(images, boxes, size)


def attention_patch(images, maps, theta=(0.4, 0.6), padding: float = 0.1, seed=None):
    """Attention patching (§3.3.2): the attended bounding box is pasted onto a copy of the image.

    The top-left corner is uniform over the positions that keep the whole patch inside the image
    (code: ``random.randint(0, H - h_patch)``); ``theta ~ U(0.4, 0.6)``, padding 0.1 as the code.
    """
    images = tf.cast(images, tf.float32)
    h, w = images.shape[1], images.shape[2]
    boxes = attention_boxes(maps, (h, w), theta, padding, seed)
    ph, pw = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    u = _rows_of_global_draw(lambda rows: uniform((rows, 2), seed=seed), tf.shape(images)[0])
    dy = tf.cast(tf.floor(u[:, 0] * tf.cast(h - ph + 1, tf.float32)), tf.int32)
    dx = tf.cast(tf.floor(u[:, 1] * tf.cast(w - pw + 1, tf.float32)), tf.int32)
    rows, cols = tf.range(h)[None, :], tf.range(w)[None, :]
    in_y = (rows >= dy[:, None]) & (rows < (dy + ph)[:, None])
    in_x = (cols >= dx[:, None]) & (cols < (dx + pw)[:, None])
    src_y = tf.clip_by_value(boxes[:, 0:1] + rows - dy[:, None], 0, h - 1)
    src_x = tf.clip_by_value(boxes[:, 1:2] + cols - dx[:, None], 0, w - 1)
    shifted = tf.gather(tf.gather(images, src_y, axis=1, batch_dims=1), src_x, axis=2, batch_dims=1)
    region = (in_y[:, :, None] & in_x[:, None, :])[..., None]
    return tf.where(region, shifted, images)


def attention_dim(
    images,
    maps,
    theta=(0.2, 0.5),
    dim_factor: float = 0.001,
    keep_factor: float = 1.001,
    center: str = "zero",
    seed=None,
):
    """Attention dimming (§3.3.3, Eq. 4): pixels with upsampled map ``>= theta * max`` are scaled by ``dim_factor``.

    Eq. 4 of the paper uses 0.1 in the attended region and 1 elsewhere; the official code computes
    ``images * (mask + 0.001)`` with ``mask = map < threshold``, i.e. 0.001 in the attended region
    and 1.001 elsewhere — the defaults here (paper: ``dim_factor=0.1, keep_factor=1.0``);
    ``theta ~ U(0.2, 0.5)`` as the code.

    ``center="zero"`` multiplies the pixel values; ``center="mean"`` scales deviations from each
    image's mean, ``m + (x - m) * factor``. The code dims images that are already z-scored, so it
    pulls the region to the image mean; since covidx models z-score inside the graph,
    ``zscore(dim_mean(x)) == zscore(dim_zero(zscore(x)))``: ``"mean"`` on raw pixels reproduces the
    code's behaviour (up to the network's own re-standardisation).
    """
    if center not in ("zero", "mean"):
        raise ValueError(f"center must be 'zero' or 'mean', got {center!r}")
    images = tf.cast(images, tf.float32)
    maps = tf.cast(maps, tf.float32)
    up = upsample_maps(maps, images.shape[1:3])
    keep = up < _thresholds(maps, theta, seed)[:, None, None]
    factor = tf.where(keep, keep_factor, dim_factor)[..., None]
    if center == "zero":
        return images * factor
    mean = tf.reduce_mean(images, axis=(1, 2, 3), keepdims=True)
    return mean + (images - mean) * factor


# ----------------------------------------------------------------------------- loss


def soft_reference(y_true, p_primary, threshold: float | None = 0.7, smoothing: float = 0.01):
    """The reference distribution ``P'(I)`` of Algorithm 1 (detached).

    ``P(I)`` is kept where the primary prediction is right and its top probability is ``>= threshold``;
    elsewhere it is replaced by the smoothed label: ``smoothing`` for every class and
    ``1 - C * smoothing`` for the true class (the code's vector; it sums to ``1 - smoothing``).
    Algorithm 1 writes "if P^c(I) > θ keep P(I), else the ground truth" (θ = 0.7) — with θ > 0.5 a
    true-class probability above θ is the same as "right and confident"; the paper's fallback is
    the hard label (``smoothing=0``). ``threshold=None`` always uses the label.
    """
    y = tf.cast(y_true, tf.float32)
    p = tf.stop_gradient(tf.cast(p_primary, tf.float32))
    classes = p.shape[-1]
    true = tf.argmax(y, axis=-1, output_type=tf.int32)
    smoothed = tf.one_hot(true, classes) * (1.0 - classes * smoothing - smoothing) + smoothing
    if threshold is None:
        return smoothed
    right = tf.equal(tf.argmax(p, axis=-1, output_type=tf.int32), true)
    confident = tf.reduce_max(p, axis=-1) >= threshold
    return tf.where((right & confident)[:, None], p, smoothed)


def soft_distance_loss(
    y_true,
    p_primary,
    p_aux_list: Sequence,
    threshold: float | None = 0.7,
    smoothing: float = 0.01,
    distance: str = "l1",
    sample_weight=None,
):
    """``L_reg = CE(P, y) + sum_views mean_c d(P', p_view)`` (Algorithm 1, Eqs. 5-7; code ``gen_refine_loss``).

    ``d`` is ``|P' - p|`` (``"l1"``, the paper and code: ``L1Loss`` mean over batch and classes,
    one term per augmented view, summed) or ``(P' - p)^2`` (``"l2"``). The CE of the augmented
    views is not optimised (the code only logs it). Inputs are probabilities (softmax outputs).
    With ``sample_weight`` the per-sample losses are weighted and averaged over the batch size
    (the Keras ``sum_over_batch_size`` reduction).

    The paper's L2 ablation (Table 8, §4.4.5: "L2 compared all predictions directly with ground
    truth") is ``threshold=None, smoothing=0, distance="l2"``.
    """
    if distance not in ("l1", "l2"):
        raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}")
    y = tf.cast(y_true, tf.float32)
    p = tf.cast(p_primary, tf.float32)
    per_sample = keras.losses.categorical_crossentropy(y, p)
    if p_aux_list:
        ref = soft_reference(y, p, threshold, smoothing)
        for p_view in p_aux_list:
            diff = ref - tf.cast(p_view, tf.float32)
            d = tf.abs(diff) if distance == "l1" else tf.square(diff)
            per_sample = per_sample + tf.reduce_mean(d, axis=-1)
    if sample_weight is not None:
        per_sample = per_sample * tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
    return tf.reduce_mean(per_sample)


# ----------------------------------------------------------------------------- trainer


@register_trainer("magsd")
class MagSDTrainer(Trainer):
    """MAG-SD training step: 1 primary + up to 3 attention-augmented forwards, soft-distance loss.

    The loss is the paper's (:func:`soft_distance_loss`); the loss given to ``compile`` is not used.
    ``net`` is a MA-Net (:func:`covidx.models.magsd.build_magsd`); the trainer reads its attention
    maps through :func:`~covidx.models.magsd.attention_view` (shared weights), so checkpoints of
    ``net`` stay a plain classifier.

    Args:
        augmentations: names from ``("mixup", "dim", "patch")`` or a count 0-3 (Table 7 ablation,
            :data:`AUGMENTATIONS_BY_COUNT`).
        regularizer: ``"soft"`` (Algorithm 1) or ``"l2"`` (Table 8: squared distance to the label).
        threshold, smoothing: of :func:`soft_reference` (0.7, 0.01).
        mixup_theta, dim_theta, patch_theta, padding, mixup_gamma, dim_factor, keep_factor:
            augmentation settings (code: (0.4, 0.6), (0.2, 0.5), (0.4, 0.6), 0.1, 0.6, 0.001, 1.001).
        dim_center: ``"mean"`` (dimming toward the image mean, the code's z-space behaviour) or ``"zero"``.
        seed: seed of the trainer's random stream (map draws, thresholds, patch positions).
    """

    def __init__(
        self,
        net: keras.Model,
        augmentations: Sequence[str] | int = AUGMENTATIONS,
        regularizer: str = "soft",
        threshold: float = 0.7,
        smoothing: float = 0.01,
        mixup_theta=(0.4, 0.6),
        dim_theta=(0.2, 0.5),
        patch_theta=(0.4, 0.6),
        padding: float = 0.1,
        mixup_gamma: float = 0.6,
        dim_factor: float = 0.001,
        keep_factor: float = 1.001,
        dim_center: str = "mean",
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(net, **kwargs)
        if isinstance(augmentations, int):
            augmentations = AUGMENTATIONS_BY_COUNT[augmentations]
        unknown = set(augmentations) - set(AUGMENTATIONS)
        if unknown:
            raise ValueError(f"unknown augmentations {sorted(unknown)}; choose from {AUGMENTATIONS}")
        if regularizer not in ("soft", "l2"):
            raise ValueError(f"regularizer must be 'soft' or 'l2', got {regularizer!r}")
        self.augmentations = tuple(augmentations)
        self.regularizer = regularizer
        self.threshold, self.smoothing = threshold, smoothing
        self.mixup_theta, self.dim_theta, self.patch_theta = mixup_theta, dim_theta, patch_theta
        self.padding, self.mixup_gamma = padding, mixup_gamma
        self.dim_factor, self.keep_factor, self.dim_center = dim_factor, keep_factor, dim_center
        self.attention_net = attention_view(net)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        out = self.net(image_of(inputs), training=training)
        return out[PREDICTIONS] if isinstance(out, dict) else out

    def augment(self, images, maps, seed=None):
        """The augmented batches, one per entry of :attr:`augmentations`, each with its own map ``maps[..., i]``."""
        views = []
        seed = self.seed_generator if seed is None else seed
        for i, name in enumerate(self.augmentations):
            m = maps[..., i]
            if name == "mixup":
                views.append(attention_mixup(images, m, self.mixup_theta, self.padding, self.mixup_gamma, seed))
            elif name == "dim":
                views.append(
                    attention_dim(images, m, self.dim_theta, self.dim_factor, self.keep_factor, self.dim_center, seed)
                )
            else:
                views.append(attention_patch(images, m, self.patch_theta, self.padding, seed))
        return views

    def train_loss(self, x, y, sample_weight):
        images = tf.cast(image_of(x), tf.float32)
        # Under tf.distribute every replica draws the same numbers (StepSeeds: from the step counter).
        seeds = (StepSeeds(self.seed or 0, self.optimizer.iterations) if tf.distribute.has_strategy()
                 else self.seed_generator)
        out = self.attention_net(images, training=True)
        p_primary = out[PREDICTIONS]
        p_views = []
        if self.augmentations:
            maps = sample_attention_maps(out[ATTENTION_MAPS], len(self.augmentations), seeds)
            p_views = [self.call(view, training=True) for view in self.augment(images, maps, seeds)]
        if self.regularizer == "soft":
            loss = soft_distance_loss(y, p_primary, p_views, self.threshold, self.smoothing, "l1", sample_weight)
        else:
            loss = soft_distance_loss(y, p_primary, p_views, None, 0.0, "l2", sample_weight)
        return loss, p_primary
