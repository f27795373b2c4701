"""Grad-CAM of the concatenated ensemble: one heatmap per backbone, combined by each branch's share.

Hasan et al. explain the ensemble with Grad-CAM (Figs. 9-10); with three backbones behind one
concatenation there are three last feature maps, so each gets its own Grad-CAM and the maps are
combined (:func:`ensemble_gradcam`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from covidx.explain.gradcam import combine_heatmaps, gradcam_for_layers
from covidx.models.ensemble import ENSEMBLE_GRADCAM_LAYERS, FEATURES_LAYER, HEAD_LAYERS, branch_names, branch_widths


def features_model(model: keras.Model) -> keras.Model:
    """The concatenated GAP features (B, 2816) of an ensemble, sharing its layers."""
    layer = model.get_layer(FEATURES_LAYER) if FEATURES_LAYER in {l.name for l in model.layers} else \
        model.get_layer(f"{branch_names(model)[0]}_gap")
    return keras.Model(model.input, layer.output, name=f"{model.name}_features")


# ---------------------------------------------------------------------------
# Grad-CAM over the three branches (Sec. III-B, Fig. 4)
# ---------------------------------------------------------------------------


def branch_contributions(model: keras.Model, images, class_index) -> np.ndarray:
    """(N, branches) contribution of each branch's features to the explained class logit.

    Gradient x input on the concatenated features f: ``sum_{j in branch} f_j dS_c/df_j``.
    For a bare Dense head the logit is ``S_c = w_c . f + b_c``, so this is exactly
    ``sum_{j in branch} w_cj f_j``, the part of the logit each backbone supplies; with a
    hidden layer it is the first-order (Taylor) share. Dropout is inactive at inference.
    """
    x = tf.convert_to_tensor(np.asarray(images, np.float32))
    f = features_model(model)(x, training=False)
    head = [model.get_layer(n) for n in HEAD_LAYERS if n in {l.name for l in model.layers}]
    classes = tf.constant(np.broadcast_to(np.asarray(class_index, np.int64), (x.shape[0],)))
    with tf.GradientTape() as tape:
        tape.watch(f)
        h = f
        for layer in head[:-1]:
            h = layer(h, training=False)
        dense = head[-1]
        logits = tf.matmul(tf.cast(h, tf.float32), tf.cast(dense.kernel, tf.float32)) + tf.cast(dense.bias, tf.float32)
        score = tf.reduce_sum(tf.gather(logits, classes, batch_dims=1))
    share = (tape.gradient(score, f) * f).numpy()
    bounds = np.cumsum([0] + list(branch_widths(model).values()))
    return np.stack([share[:, a:b].sum(axis=1) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)


@dataclass
class EnsembleGradCAM:
    """Combined and per-branch Grad-CAM of the ensemble.

    Attributes:
        heatmap: (N, H, W) combined heatmap in [0, 1] at the input size.
        branch_heatmaps: branch -> (N, H, W) heatmap in [0, 1].
        weights: (N, branches) weights used to combine (rows sum to 1).
        contributions: (N, branches) branch shares of the class logit (see :func:`branch_contributions`).
        class_indices: (N,) explained class; probabilities: (N, K).
    """

    heatmap: np.ndarray
    branch_heatmaps: dict[str, np.ndarray]
    weights: np.ndarray
    contributions: np.ndarray
    class_indices: np.ndarray
    probabilities: np.ndarray


def ensemble_gradcam(model: keras.Model, images, class_index=None, combine: str = "weighted",
                     layers: Mapping[str, str] | None = None) -> EnsembleGradCAM:
    """Grad-CAM from each backbone's last feature map, combined into one heatmap.

    Every branch heatmap (Selvaraju et al., Eqs. 1-2; one forward pass and one tape for all
    branches, :func:`covidx.explain.gradcam.gradcam_for_layers`, on the model as built or
    reloaded: the branches are part of the flat graph) is upsampled to the input and
    normalised to max 1. They are combined by

    * ``"mean"``: the plain average;
    * ``"weighted"``: weights proportional to each branch's share of the class logit,
      ``sum_{j in branch} w_cj f_j`` for a bare Dense head. Why this is meaningful: with
      GAP, ``f_j`` is the spatial mean of channel ``j``, and Grad-CAM's channel weight is
      ``w_cj / (hw)``, so each branch's un-ReLU'd CAM integrates to exactly its share of the
      logit. Weighting the normalised maps by the shares lets a branch that hardly moves
      the decision contribute hardly anything to the picture, where the mean would give
      an uninformative branch a third of it. Negative shares (a branch arguing against the
      class) get weight 0; if no share is positive the mean is used.

    Args:
        model: an ensemble (:func:`covidx.models.ensemble.build_ensemble`) or a reload of one.
        images: (N, H, W, 3) float pixels in [0, 255] (or one image).
        class_index: ``None`` (predicted class), an int or one int per image.
        combine: ``"weighted"`` or ``"mean"``.
        layers: branch -> target layer; default :data:`ENSEMBLE_GRADCAM_LAYERS`.
    """
    if combine not in ("weighted", "mean"):
        raise ValueError(f"combine must be 'weighted' or 'mean', got {combine!r}")
    x = np.asarray(images, np.float32)
    x = x[None] if x.ndim == 3 else x
    branches = branch_names(model)
    targets = {b: (layers or ENSEMBLE_GRADCAM_LAYERS)[b] for b in branches}
    results = gradcam_for_layers(model, x, list(targets.values()), class_index=class_index)
    per_branch = {b: results[targets[b]].heatmaps for b in branches}
    first = results[targets[branches[0]]]
    classes, probabilities = first.class_indices, first.probabilities
    contributions = branch_contributions(model, x, classes)
    n, k = len(x), len(branches)
    if combine == "mean":
        weights = np.full((n, k), 1.0 / k)
    else:
        positive = np.maximum(contributions, 0.0)
        total = positive.sum(axis=1, keepdims=True)
        weights = np.where(total > 0, positive / np.where(total > 0, total, 1.0), 1.0 / k)
    heatmap = np.stack([combine_heatmaps([per_branch[b][i] for b in branches], weights[i]) for i in range(n)])
    return EnsembleGradCAM(heatmap, per_branch, weights, contributions, classes, probabilities)
