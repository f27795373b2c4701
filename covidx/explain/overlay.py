"""Drawing explanations over radiographs: heatmap overlays, PNG output, contact sheets.

Conventions follow the Keras Grad-CAM example (jet colormap, alpha about 0.4)
and the figures of the papers (Cascade-SEMEnet Figs. 11/16: heatmap over the
X-ray; SE-DPN Fig. 7: LIME regions over the X-ray).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def as_rgb_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 from a grayscale (H, W) / (H, W, 1) or RGB (H, W, 3) image in [0, 255]."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected a grayscale or RGB image, got shape {np.shape(image)}")
    return np.clip(np.rint(img.astype(np.float64)), 0, 255).astype(np.uint8)


def display_gray(x) -> np.ndarray:
    """A model input (S, S, C) in [0, 255] (or a 2-D image) as a uint8 gray image: the first channel
    (covidx's channels are the gray plane repeated)."""
    a = np.asarray(x)
    return np.clip(a[..., 0] if a.ndim == 3 else a, 0, 255).astype(np.uint8)


RED = (255, 0, 0)


def overlay_mask(image, mask, color=RED, alpha: float = 0.4) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` with ``color`` blended at ``alpha`` where ``mask`` is set (ensemble paper
    Fig. 10: the lesion mask superimposed on the radiograph)."""
    base = as_rgb_uint8(image).astype(np.float64)
    m = np.asarray(mask, bool)
    if m.shape != base.shape[:2]:
        raise ValueError(f"mask shape {m.shape} does not match image {base.shape[:2]}")
    out = base.copy()
    out[m] = (1.0 - alpha) * base[m] + alpha * np.asarray(color, np.float64)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def colorize(heatmap, colormap: str = "jet") -> np.ndarray:
    """(H, W, 3) uint8 RGB rendering of a [0, 1] heatmap with a matplotlib colormap."""
    cmap = matplotlib.colormaps[colormap]
    values = np.clip(np.asarray(heatmap, np.float64), 0.0, 1.0)
    return np.rint(cmap(values)[..., :3] * 255.0).astype(np.uint8)


def overlay_heatmap(image, heatmap, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heatmap over an image: ``(1 - alpha) * image + alpha * colormap(heatmap)``.

    Args:
        image: (H, W), (H, W, 1) or (H, W, 3) pixels in [0, 255].
        heatmap: (h, w) values in [0, 1]; bilinearly resized to (H, W) if needed.
        alpha: heatmap opacity in [0, 1].
        colormap: any matplotlib colormap name.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = as_rgb_uint8(image)
    heat = np.asarray(heatmap, np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heat.shape}")
    if heat.shape != base.shape[:2]:
        heat = cv2.resize(heat, (base.shape[1], base.shape[0]), interpolation=cv2.INTER_LINEAR)
    blended = (1.0 - alpha) * base.astype(np.float64) + alpha * colorize(heat, colormap).astype(np.float64)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


MIN_FIGURE_SIDE = 512  # overlays smaller than this are thumbnails nobody can read


def explanation_figure(image, heatmap, title: str, label: str = "Grad-CAM (relative importance)",
                       min_side: int = MIN_FIGURE_SIDE, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """(H', W', 3) uint8 figure: the heatmap over the image at ``max(its size, min_side)`` pixels (bicubic
    image, bilinear heatmap), titled (class and probability) and with a colour bar of the heatmap's scale."""
    gray = display_gray(image)
    scale = max(1.0, min_side / min(gray.shape[:2]))
    size = (int(round(gray.shape[1] * scale)), int(round(gray.shape[0] * scale)))
    gray = cv2.resize(gray, size, interpolation=cv2.INTER_CUBIC)
    heat = cv2.resize(np.asarray(heatmap, np.float32), size, interpolation=cv2.INTER_LINEAR)
    dpi = 100
    fig = Figure(figsize=(size[0] / dpi * 1.25, size[1] / dpi + 0.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0.02, 0.02, 0.78, 0.9])
    ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
    shown = ax.imshow(np.clip(heat, 0, 1), cmap=colormap, alpha=alpha, vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=12)
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(label)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(path, array) -> Path:
    """Write a grayscale (H, W) or RGB (H, W, 3) array in [0, 255] as PNG; creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"expected (H, W) or (H, W, 3), got shape {np.shape(array)}")
    arr = np.clip(np.rint(arr.astype(np.float64)), 0, 255).astype(np.uint8)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"could not write {path}")
    return path


def contact_sheet(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None,
    path,
    cols: int = 4,
    tile_inches: float = 2.5,
    dpi: int = 100,
) -> Path:
    """Grid of images (grayscale or RGB, [0, 255]) with optional titles, saved to ``path`` (PNG)."""
    if not len(images):
        raise ValueError("contact_sheet needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(cols * tile_inches, rows * tile_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < len(images):
            ax.imshow(as_rgb_uint8(images[i]))
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
