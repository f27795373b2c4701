"""LIME explanations of covidx classifiers on chest X-rays (SE-DPN paper, Sec. 3.4 and Fig. 7).

LIME (Ribeiro et al., KDD 2016; SE-DPN paper Sec. 3.4,
``explanation(x) = argmin_g L(f, g, pi_x) + Omega(g)``) splits the image into
superpixels, switches random subsets of them off, runs the model on every
perturbed copy and fits a locally weighted linear model whose coefficients are
the per-superpixel weights. The ``lime`` package does the sampling and the
fit; this module supplies what radiographs need:

* **Segmentation.** lime's default quickshift gives ragged segments on
  grayscale radiographs (lime#109). SLIC (Achanta et al., TPAMI 2012) on the
  grayscale intensity is the default here. ``compactness`` trades intensity
  edges against square shape on a [0, 1] intensity scale: 0.01 traces noise,
  1.0 ignores the lung borders, 0.1 follows them with regular segments (checked
  on a synthetic radiograph). ``sigma`` smooths film grain before clustering.
  Quickshift stays available (``segmentation="quickshift"``).
* **Cost.** One forward pass per sample in chunks of ``batch_size``
  (lime's default of 10 leaves the CPU mostly idle between tiny forward passes).
* **Channels.** lime works on RGB; perturbed images are turned back into the
  model's channel count (the mean of the three identical channels for a
  1-channel model) before prediction. Pixels stay in [0, 255], the range every
  covidx model takes.
* **Hidden superpixels** are filled with the image's mean intensity by
  default. lime's default (each superpixel's own mean) barely changes a
  smooth region, so the fit sees almost no effect there.

:func:`render_lime` draws the ``top_k`` positive superpixels red and the
``top_k`` negative ones blue over the X-ray, as in the paper's Fig. 7.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
from lime import lime_image
from skimage.segmentation import find_boundaries, quickshift, slic

from covidx.explain.overlay import as_rgb_uint8, save_png

RED = np.array([255.0, 0.0, 0.0])
BLUE = np.array([0.0, 0.0, 255.0])


def _relabel(segments: np.ndarray) -> np.ndarray:
    """Labels 0..n-1 without gaps: lime uses the labels as feature indices."""
    _, inverse = np.unique(segments, return_inverse=True)
    return inverse.reshape(segments.shape).astype(np.int64)


def _grayscale01(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, np.float64)
    if img.ndim == 3:
        img = img.mean(axis=-1)
    return img / 255.0


def slic_segments(image, n_segments: int = 50, compactness: float = 0.1, sigma: float = 1.0) -> np.ndarray:
    """SLIC superpixels of a radiograph ((H, W) or (H, W, C) in [0, 255]) on its grayscale intensity.

    Args:
        n_segments: approximate number of superpixels (SLIC's grid size).
        compactness: weight of spatial distance against intensity difference,
            on a [0, 1] intensity scale (0.1: segments follow the lung borders but stay compact).
        sigma: Gaussian smoothing (pixels) before clustering, to ignore film grain.
    Returns:
        (H, W) int64 labels 0..n-1.
    """
    labels = slic(
        _grayscale01(image), n_segments=n_segments, compactness=compactness, sigma=sigma,
        start_label=0, channel_axis=None,
    )
    return _relabel(labels)


def quickshift_segments(image, kernel_size: float = 4, max_dist: float = 200, ratio: float = 0.2) -> np.ndarray:
    """lime's default segmentation (quickshift with lime's parameters) on the RGB image in [0, 255]."""
    rgb = as_rgb_uint8(image).astype(np.float64)
    return _relabel(quickshift(rgb, kernel_size=kernel_size, max_dist=max_dist, ratio=ratio, convert2lab=True))


def make_segmentation_fn(
    segmentation: str | Callable = "slic",
    n_segments: int = 50,
    compactness: float = 0.1,
    sigma: float = 1.0,
    **kwargs,
) -> Callable[[np.ndarray], np.ndarray]:
    """Segmentation function for lime: ``"slic"``, ``"quickshift"`` (``kwargs`` go to it) or a callable."""
    if callable(segmentation):
        return lambda img: _relabel(np.asarray(segmentation(img)))
    if segmentation == "slic":
        return lambda img: slic_segments(img, n_segments, compactness, sigma)
    if segmentation == "quickshift":
        return lambda img: quickshift_segments(img, **kwargs)
    raise ValueError(f"unknown segmentation {segmentation!r}; use 'slic', 'quickshift' or a callable")


@dataclass
class LimeResult:
    """LIME explanation of one image for one class.

    Attributes:
        segments: (H, W) superpixel labels 0..n-1.
        weights: superpixel -> weight of the local linear model (positive: supports the class).
        class_index: class explained (the prediction unless one was asked for).
        probabilities: (K,) model output on the unperturbed image.
        positive_segments / negative_segments: the ``top_k`` superpixels with the
            largest positive / most negative weights, strongest first.
        positive_mask / negative_mask: (H, W) bool masks of those superpixels.
        intercept, local_prediction, score: the linear model's intercept, its
            prediction for the full image and its weighted R^2.
    """

    segments: np.ndarray
    weights: dict[int, float]
    class_index: int
    probabilities: np.ndarray
    positive_segments: list[int]
    negative_segments: list[int]
    positive_mask: np.ndarray
    negative_mask: np.ndarray
    intercept: float
    local_prediction: float
    score: float
    num_samples: int = field(default=0)

    def weight_map(self) -> np.ndarray:
        """(H, W) float32 map of each pixel's superpixel weight."""
        table = np.zeros(int(self.segments.max()) + 1, np.float32)
        for seg, w in self.weights.items():
            table[seg] = w
        return table[self.segments]


def _predict_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    """Keras models predict with ``predict_on_batch`` (compiled); any other callable is called as is."""
    if isinstance(model, keras.Model):
        return lambda x: np.asarray(model.predict_on_batch(x))
    return lambda x: np.asarray(model(x))


def explain_lime(
    model,
    image,
    num_samples: int = 1000,
    batch_size: int = 64,
    segmentation: str | Callable = "slic",
    n_segments: int = 50,
    compactness: float = 0.1,
    sigma: float = 1.0,
    top_k: int = 5,
    class_index: int | None = None,
    random_state: int = 0,
    hide_color: float | str | None = "mean",
    kernel_width: float = 0.25,
    segmentation_kwargs: dict | None = None,
    min_weight: float = 0.0,
) -> LimeResult:
    """Explain one prediction with LIME (``lime.lime_image.LimeImageExplainer``).

    Args:
        model: keras classifier (or any callable) mapping (N, H, W, C) float32
            pixels in [0, 255] to (N, K) probabilities.
        image: (H, W) or (H, W, C) pixels in [0, 255], C being the model's channels.
        num_samples: perturbed images (forward passes); the first is the unperturbed image.
        batch_size: images per model call.
        segmentation: ``"slic"`` (default, see module notes), ``"quickshift"`` or a callable.
        n_segments, compactness, sigma: SLIC parameters (see :func:`slic_segments`).
        top_k: superpixels per sign in the masks (Fig. 7 shows the strongest few).
        class_index: class to explain; ``None`` explains the predicted class.
        random_state: seed of lime's sampling (results are reproducible).
        hide_color: fill of switched-off superpixels: ``"mean"`` (image mean, default),
            a number in [0, 255], or ``None`` for lime's per-superpixel mean.
        kernel_width: width of lime's exponential kernel on cosine distance (lime default).
        segmentation_kwargs: extra arguments for quickshift.
        min_weight: superpixels with ``|weight| <= min_weight`` are left out of
            the masks (their weights stay in ``weights``); 0 keeps any sign.
    """
    img = np.asarray(image, np.float64)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected one (H, W) or (H, W, C) image, got shape {img.shape}")
    channels = 1 if img.ndim == 2 else img.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {channels}")
    # lime works on RGB; repeat a grayscale image (in float, no rounding).
    rgb = np.repeat(img.reshape(img.shape[:2])[..., None], 3, axis=-1) if channels == 1 else img.copy()
    if hide_color == "mean":
        hide_color = float(rgb.mean())

    predict = _predict_fn(model)
    first: list[np.ndarray] = []

    def classifier_fn(batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch, np.float32)
        if channels == 1:
            x = x.mean(axis=-1, keepdims=True)  # lime hands RGB copies of the grayscale image
        probs = predict(x)
        if not first:
            first.append(probs[0])  # lime's first sample is the unperturbed image
        return probs

    segment_fn = make_segmentation_fn(segmentation, n_segments, compactness, sigma, **(segmentation_kwargs or {}))
    explainer = lime_image.LimeImageExplainer(
        kernel_width=kernel_width, feature_selection="none", random_state=random_state
    )
    explanation = explainer.explain_instance(
        rgb,
        classifier_fn,
        labels=() if class_index is None else (int(class_index),),
        top_labels=1 if class_index is None else None,
        hide_color=hide_color,
        num_features=10**6,  # keep every superpixel's weight
        num_samples=num_samples,
        batch_size=batch_size,
        segmentation_fn=segment_fn,
        random_seed=random_state,
    )
    label = int(explanation.top_labels[0]) if class_index is None else int(class_index)
    weights = {int(seg): float(w) for seg, w in explanation.local_exp[label]}
    ranked = sorted(weights.items(), key=lambda kv: kv[1], reverse=True)
    positive = [s for s, w in ranked if w > min_weight][:top_k]
    negative = [s for s, w in reversed(ranked) if w < -min_weight][:top_k]
    segments = explanation.segments
    local_pred = np.ravel(explanation.local_pred)
    return LimeResult(
        segments=segments,
        weights=weights,
        class_index=label,
        probabilities=np.asarray(first[0], np.float32),
        positive_segments=positive,
        negative_segments=negative,
        positive_mask=np.isin(segments, positive),
        negative_mask=np.isin(segments, negative),
        intercept=float(explanation.intercept[label]),
        local_prediction=float(local_pred[0]) if local_pred.size else float("nan"),
        score=float(explanation.score),
        num_samples=num_samples,
    )


def render_lime(image, result: LimeResult, path=None, alpha: float = 0.45, outline: bool = True) -> np.ndarray:
    """Draw LIME's positive superpixels red and negative ones blue over the X-ray (SE-DPN Fig. 7).

    Args:
        image: (H, W), (H, W, 1) or (H, W, 3) in [0, 255], the explained image.
        result: output of :func:`explain_lime`.
        path: optional PNG path to write.
        alpha: tint opacity.
        outline: draw the highlighted superpixels' borders at full colour.
    Returns:
        (H, W, 3) uint8 RGB.
    """
    out = as_rgb_uint8(image).astype(np.float64)
    if out.shape[:2] != result.segments.shape:
        raise ValueError(f"image {out.shape[:2]} and segments {result.segments.shape} differ in size")
    for mask, colour in ((result.positive_mask, RED), (result.negative_mask, BLUE)):
        out[mask] = (1.0 - alpha) * out[mask] + alpha * colour
        if outline:
            out[find_boundaries(np.where(mask, result.segments, -1), mode="inner") & mask] = colour
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if path is not None:
        save_png(path, out)
    return out
