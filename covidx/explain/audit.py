"""Shortcut audit: how much of each explanation falls inside the lungs.

COVID-19 classifiers trained on images from different sources learn the
source (text, markers, positioning) instead of the disease (DeGrave, Janizek &
Lee, Nat. Mach. Intell. 2021). The cascade paper saw a
network converge on the label area of the radiographs (Cascade-SEMEnet,
Fig. 13) and answered with lung masking (Regional Learning). This module turns
"look at the Grad-CAM" into a number per image and per class, so that a class
whose evidence lies mostly outside the lung fields is flagged.

The measure is the share of heatmap energy inside the lung mask, as in the
energy-based pointing game of Score-CAM (Wang et al., CVPRW 2020, Sec. 4.3):

    share = sum_{p in mask} L(p) / sum_p L(p)

with L the non-negative heatmap (Grad-CAM in [0, 1]; negative values, e.g. of
a LIME weight map, are clipped to 0 so that only supporting evidence counts).

A share means little without its chance level: a map spread uniformly over the
image scores the lung-area fraction ``a = |mask| / |image|`` (a quarter to a
third of a frontal radiograph; more on a lung-cropped one, less on a wide
field). The audit therefore judges the **enrichment** ``share / a``, the ratio of
the evidence density inside the lungs to the image's mean density: above 1 the
explanation prefers the lungs, below 1 it prefers everything else. A class is
flagged when its median enrichment is not above ``min_enrichment``: 1.5 by
default, a clear preference for the lungs. Exactly 1 would pass maps barely
denser in the lungs than a uniform one, which a coarse Grad-CAM (7x7 to 16x16
cells, upsampled) of a corner marker reaches by spilling over the lung border;
for the usual lung fractions of 0.25-0.35, 1.5 asks for a share of ~0.4-0.5,
close to a majority rule, while still adapting to the lung area.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# Flagged unless the median image's evidence is at least 1.5x denser inside the lungs than over the whole image
# (see the module docstring). A fixed share (say 0.5) would depend on how much of the frame the lungs fill.
DEFAULT_MIN_ENRICHMENT = 1.5


def _as_stack(maps, name: str) -> np.ndarray:
    arr = np.asarray(maps)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W), (N, H, W, 1) or (H, W), got shape {np.shape(maps)}")
    return arr


def _masks_like(lung_masks, heatmaps: np.ndarray) -> np.ndarray:
    """Boolean masks at the heatmaps' resolution (nearest-neighbour resize when sizes differ)."""
    masks = _as_stack(lung_masks, "lung_masks")
    if len(masks) != len(heatmaps):
        raise ValueError(f"{len(masks)} masks for {len(heatmaps)} heatmaps")
    masks = masks > 0.5 if masks.dtype != bool else masks
    if masks.shape[1:] != heatmaps.shape[1:]:
        h, w = heatmaps.shape[1:]
        masks = np.stack(
            [cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0 for m in masks]
        )
    return masks


def energy_inside_mask(heatmaps, lung_masks) -> np.ndarray:
    """Per-image share of heatmap energy inside the lung mask, shape (N,).

    Args:
        heatmaps: (N, H, W) or (H, W) non-negative maps (negatives clipped to 0).
        lung_masks: (N, H, W) or (H, W) masks (bool, {0, 1} or probabilities,
            thresholded at 0.5); resized with nearest neighbour to the heatmap size.
    Returns:
        float64 shares in [0, 1]; NaN for an all-zero heatmap (no evidence to place).
    """
    heat = np.maximum(_as_stack(heatmaps, "heatmaps").astype(np.float64), 0.0)
    masks = _masks_like(lung_masks, heat)
    total = heat.sum(axis=(1, 2))
    inside = (heat * masks).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def shortcut_audit(
    heatmaps,
    lung_masks,
    labels,
    class_names: Sequence[str],
    min_enrichment: float = DEFAULT_MIN_ENRICHMENT,
) -> dict:
    """Per-class summary of where the explanations fall; flags classes that look outside the lungs.

    Args:
        heatmaps: (N, H, W) explanations (e.g. Grad-CAM of the predicted or true class).
        lung_masks: (N, H, W) lung masks (e.g. from the FC-DenseNet103 lung segmenter or the dataset).
        labels: (N,) class indices, or (N, K) one-hot rows, grouping the images.
        class_names: name of each class index.
        min_enrichment: a class is flagged when the median over its images of
            ``share / lung-area fraction`` is not above this (default 1.5, see the module docstring).

    Returns:
        dict with ``share`` and ``enrichment`` (per-image lists), ``per_class``
        (name -> ``{"n", "median_share", "mean_share", "median_lung_fraction",
        "median_enrichment"}``), ``flagged`` (class names with median enrichment ≤
        min_enrichment, in class order) and ``min_enrichment``. Classes without
        images (or only all-zero heatmaps) get NaN statistics and are not flagged.
    """
    heat = _as_stack(heatmaps, "heatmaps")
    shares = energy_inside_mask(heat, lung_masks)
    lung_fraction = _masks_like(lung_masks, heat).mean(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        enrichment = np.where(lung_fraction > 0, shares / np.where(lung_fraction > 0, lung_fraction, 1.0), np.nan)
    y = np.asarray(labels)
    if y.ndim == 2:
        y = y.argmax(axis=-1)
    if y.shape != (len(heat),):
        raise ValueError(f"need one label per heatmap ({len(heat)}), got shape {np.shape(labels)}")
    if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
        raise ValueError(f"labels outside 0..{len(class_names) - 1}")

    per_class, flagged = {}, []
    for index, name in enumerate(class_names):
        selected = y == index
        valid = shares[selected][~np.isnan(shares[selected])]
        median = float(np.median(valid)) if valid.size else float("nan")
        rich = enrichment[selected][~np.isnan(enrichment[selected])]
        median_rich = float(np.median(rich)) if rich.size else float("nan")
        per_class[name] = {
            "n": int(selected.sum()),
            "median_share": median,
            "mean_share": float(valid.mean()) if valid.size else float("nan"),
            "median_lung_fraction": float(np.median(lung_fraction[selected])) if selected.any() else float("nan"),
            "median_enrichment": median_rich,
        }
        if not np.isnan(median_rich) and median_rich <= min_enrichment + 1e-9:  # not above chance
            flagged.append(name)
    return {"share": shares.tolist(), "enrichment": enrichment.tolist(), "per_class": per_class, "flagged": flagged,
            "min_enrichment": float(min_enrichment)}
