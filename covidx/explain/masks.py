"""Lesion masks from Grad-CAM, and import of hand-drawn masks.

The concatenated-ensemble paper (Hasan et al., Sec. III-B, Figs. 1, 4, 5) made the ground
truth of its lesion segmenter by hand: the Grad-CAM heatmap of the COVID-19 / pneumonia
class was shown and the highlighted region cropped in Amazon SageMaker Ground Truth. Here
that step is automated (:func:`heatmap_to_mask`, :func:`write_gradcam_masks`) and hand-made
masks can still be brought in (:func:`import_masks`). Both write the ``masks`` layout
(``images/`` + ``lesions/``, matched by file stem; :func:`covidx.data.sources.read_masks`), so

    python -m covidx.train --model fc-densenet103 --data OUT --layout masks --task lesions

trains the paper's FC-DenseNet103 on them.

Automatic masks inherit everything Grad-CAM gets wrong (coarse 7x7 maps, shortcut
features the network learned instead of the disease); restricting them to a lung mask (``lung_mask=``) removes the
grossest failures (text markers, borders), and they deserve a look before training.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd

from covidx.data.io import IMAGE_EXTENSIONS, ImageReadError, largest_components, read_image, unique_stems
from covidx.data.pipeline import make_dataset
from covidx.data.preprocess import PreprocessConfig
from covidx.explain.ensemble import ensemble_gradcam
from covidx.explain.gradcam import GradCAM
from covidx.explain.overlay import save_png
from covidx.models.ensemble import branch_names
from covidx.runs import Run, load_run
from covidx.tasks import TASKS


# ---------------------------------------------------------------------------
# Heatmap -> mask
# ---------------------------------------------------------------------------


def heatmap_to_mask(
    heatmap,
    threshold: str | float = "otsu",
    keep_components: int | None = 1,
    lung_mask=None,
    min_area: int = 0,
) -> np.ndarray:
    """Binary mask (bool, H x W) of the highlighted region of a [0, 1] heatmap.

    Steps (OpenCV): the heatmap is quantised to 0..255; ``"otsu"`` thresholds it with Otsu's
    method (between-class variance maximum, ``cv2.THRESH_OTSU``; pixels above the threshold
    are foreground), a float keeps ``heatmap >= threshold``; the optional lung mask is
    applied (AND) *before* the components are counted, so the kept region is the largest one
    inside the lungs; 8-connected components (``cv2.connectedComponentsWithStats``) smaller
    than ``min_area`` pixels are dropped and the ``keep_components`` largest kept
    (``None`` or 0 keeps all).

    A constant heatmap (no localisation, e.g. all zeros) gives an empty mask.
    """
    heat = np.asarray(heatmap, np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heat.shape}")
    h8 = np.rint(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)
    if h8.max() == h8.min():
        return np.zeros(heat.shape, bool)
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a number in [0, 1], got {threshold!r}")
        _, binary = cv2.threshold(h8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        mask = binary > 0
    else:
        t = float(threshold)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {t}")
        mask = heat >= t
    if lung_mask is not None:
        lung = np.asarray(lung_mask)
        lung = lung[..., 0] if lung.ndim == 3 else lung
        if lung.shape != mask.shape:
            lung = cv2.resize(lung.astype(np.uint8), (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_NEAREST)
        mask &= lung > 0
    return largest_components(mask, keep_components or None, min_area)


# ---------------------------------------------------------------------------
# Grad-CAM masks for a dataset table
# ---------------------------------------------------------------------------


def _resolve_run(run_or_model, preprocess=None, class_names=None):
    """(model, PreprocessConfig, class names, task name) from a Run, a run path or a keras.Model."""
    if isinstance(run_or_model, (str, os.PathLike)):
        run_or_model = load_run(run_or_model)
    if isinstance(run_or_model, Run):
        run = run_or_model
        return run.model, preprocess or run.preprocess, list(class_names or run.class_names), run.task
    if not isinstance(run_or_model, keras.Model):
        raise TypeError(f"expected a Run, a run directory / .keras path or a keras.Model, got {type(run_or_model)}")
    model = run_or_model
    config = preprocess or PreprocessConfig.for_model(model)
    k = int(model.outputs[0].shape[-1])
    if class_names is None:
        if k != TASKS["3class"].num_classes:
            raise ValueError(f"a bare model with {k} outputs needs class_names=")
        class_names = TASKS["3class"].classes
    return model, config, list(class_names), "3class"


def _explain(model, images, class_index, layer=None, combine="weighted"):
    """(heatmaps (N, S, S), probabilities (N, K)): ensemble Grad-CAM for ensembles, else plain Grad-CAM."""
    if layer is None and branch_names(model):
        r = ensemble_gradcam(model, images, class_index=class_index, combine=combine)
        return r.heatmap, r.probabilities
    r = GradCAM(model, layer).explain(images, class_index=class_index)
    return r.heatmaps, r.probabilities


def _place_image(src: Path, dst_dir: Path, stem: str, symlink: bool) -> Path:
    dst = dst_dir / f"{stem}{src.suffix.lower()}"
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if symlink:
        dst.symlink_to(src.resolve())
    else:
        shutil.copy2(src, dst)
    return dst


def write_gradcam_masks(
    run_or_model,
    table: pd.DataFrame,
    out_dir,
    classes: Sequence[str] = ("covid19", "pneumonia"),
    threshold: str | float = "otsu",
    keep_components: int | None = 1,
    min_area: int = 0,
    lungs: str | bool = "auto",
    layer=None,
    combine: str = "weighted",
    symlink: bool = False,
    batch_size: int = 8,
    preprocess=None,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Grad-CAM lesion masks for the COVID-19 / pneumonia images of ``table``, in the masks layout.

    For each row whose label (``finding`` mapped through the run's task) is in ``classes``,
    the heatmap of *that* class (the paper's "positive contribution to the predefined class",
    Sec. III-B) is computed on the image as the run preprocesses it, turned into a mask by
    :func:`heatmap_to_mask`, and written as ``OUT/lesions/<stem>.png`` (0/255) next to the
    image in ``OUT/images/``. ``OUT/manifest.csv`` lists every written pair.

    Geometry: with ``resize="stretch"`` (the ensemble's preset) the heatmap is resized
    bilinearly to the original image size before thresholding and the original file is
    copied (or symlinked), so the masks match the full-resolution image. With ``"crop"`` a
    heatmap covers only the centre crop, so the cropped gray image the model saw is written
    as PNG instead.

    Args:
        run_or_model: a :class:`covidx.runs.Run`, a run directory / ``.keras`` file, or a model.
        table: dataset table (``path``, ``finding``; ``mask_path`` for lung masks).
        out_dir: output folder (created).
        classes: class names to write masks for; other rows are skipped.
        threshold, keep_components, min_area: see :func:`heatmap_to_mask`.
        lungs: ``"auto"`` (restrict to lung masks when every selected row has one),
            ``True`` (required) or ``False``.
        layer: Grad-CAM target layer; ``None`` = the ensemble's three branches
            (:func:`covidx.models.ensemble.ensemble_gradcam`) or the model's last feature map.
        combine: ensemble branch combination (``"weighted"`` or ``"mean"``).
        symlink: symlink the original images instead of copying them.
        batch_size: images per Grad-CAM batch.
        preprocess, class_names: override what the run says (needed for a bare model).

    Returns:
        The manifest as a DataFrame.
    """
    model, config, names, task_name = _resolve_run(run_or_model, preprocess, class_names)
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise ValueError(f"classes {unknown} are not classes of the model ({names})")
    task = TASKS.get(task_name, TASKS["3class"])

    def label(finding):
        return finding if finding in names else task.label_of(finding)

    rows = table.copy()
    rows["_label"] = [label(str(f)) for f in rows["finding"]]
    rows = rows[rows["_label"].isin(list(classes))].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"no rows of the table are labelled {list(classes)}")
    rows["label_index"] = [names.index(c) for c in rows["_label"]]
    has_lung = "mask_path" in rows and rows["mask_path"].fillna("").astype(str).str.len().gt(0).all()
    if lungs is True and not has_lung:
        raise ValueError("lungs=True but some selected rows have no lung mask (mask_path)")
    use_lungs = bool(lungs) and has_lung
    for col in ("mask_path", "lesion_path"):
        rows[col] = rows[col].fillna("").astype(str) if col in rows else ""

    out = Path(out_dir)
    img_dir, lesion_dir = out / "images", out / "lesions"
    img_dir.mkdir(parents=True, exist_ok=True)
    lesion_dir.mkdir(parents=True, exist_ok=True)
    stems = unique_stems(rows["path"].tolist())
    ds = make_dataset(rows, task, config, batch_size=batch_size, lung_masks=use_lungs, cache=False,
                      ignore_errors=False)
    records, start = [], 0
    for inputs, _, _ in ds:
        images = inputs["image"] if use_lungs else inputs
        lung_batch = inputs["lung_mask"].numpy()[..., 0] if use_lungs else None
        idx = range(start, start + images.shape[0])
        start += images.shape[0]
        explained = rows["label_index"].to_numpy()[list(idx)]
        heatmaps, probs = _explain(model, images.numpy(), explained, layer, combine)
        for j, i in enumerate(idx):
            src = Path(rows.at[i, "path"])
            heat, lung = heatmaps[j], (lung_batch[j] if use_lungs else None)
            if config.resize == "stretch":
                h, w = read_image(src).shape
                heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
                if lung is not None:
                    lung = cv2.resize(lung.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
                image_path = _place_image(src, img_dir, stems[i], symlink)
            else:
                image_path = save_png(img_dir / f"{stems[i]}.png", images.numpy()[j, ..., 0])
            mask = heatmap_to_mask(heat, threshold, keep_components, lung, min_area)
            lesion_path = save_png(lesion_dir / f"{stems[i]}.png", mask.astype(np.uint8) * 255)
            records.append(dict(
                stem=stems[i], path=str(image_path), lesion_path=str(lesion_path), source_path=str(src),
                finding=rows.at[i, "finding"], explained_class=names[explained[j]],
                probability=float(probs[j, explained[j]]), predicted_class=names[int(np.argmax(probs[j]))],
                mask_fraction=float(mask.mean()), lung_restricted=use_lungs,
            ))
    manifest = pd.DataFrame(records)
    manifest.to_csv(out / "manifest.csv", index=False)
    return manifest


# ---------------------------------------------------------------------------
# Hand-drawn masks
# ---------------------------------------------------------------------------


@dataclass
class MaskImport:
    """Outcome of :func:`import_masks`: usable pairs and everything that was wrong."""

    pairs: pd.DataFrame  # stem, path, lesion_path (source files; out_dir copies when written)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def summary(self) -> str:
        lines = [f"{len(self.pairs)} usable mask(s), {len(self.problems)} problem(s)"]
        lines += [f"  {f}: {why}" for f, why in self.problems]
        return "\n".join(lines)


def _files_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def import_masks(mask_dir, image_dir, out_dir=None, allow_nonbinary: bool = False) -> MaskImport:
    """Check hand-drawn lesion masks against their images and optionally write the masks layout.

    Masks and images are matched by file stem. A mask is usable when it decodes, has
    exactly its image's height and width and is binary (only 0 and one foreground value,
    255 or 1). Anti-aliased or JPEG-compressed drawings are not binary; with
    ``allow_nonbinary=True`` they are accepted and thresholded at half range (> 127, or
    > 0.5 for 0/1 masks, as :func:`covidx.data.io.read_mask` does), and the problem list
    still names them.

    Args:
        mask_dir: folder of mask images.
        image_dir: folder of the radiographs.
        out_dir: if given, ``out_dir/images/`` (copies) and ``out_dir/lesions/<stem>.png``
            (0/255) are written for the usable pairs.

    Returns:
        :class:`MaskImport` with the usable pairs and ``(file, reason)`` problems.
    """
    masks, images = _files_by_stem(Path(mask_dir)), _files_by_stem(Path(image_dir))
    problems, rows = [], []
    for stem, mpath in masks.items():
        ipath = images.get(stem)
        if ipath is None:
            problems.append((str(mpath), "no image with the same file stem"))
            continue
        try:
            m = read_image(mpath)
            shape = read_image(ipath).shape
        except ImageReadError as e:
            problems.append((str(mpath), str(e)))
            continue
        if m.shape != shape:
            problems.append((str(mpath), f"mask size {m.shape[1]}x{m.shape[0]} differs from image "
                                         f"{shape[1]}x{shape[0]}"))
            continue
        values = np.unique(m)
        binary = values.size <= 2 and values[0] == 0 and (values.size == 1 or values[-1] in (1.0, 255.0))
        if not binary:
            problems.append((str(mpath), f"not binary ({values.size} distinct values)"
                             + ("; thresholded" if allow_nonbinary else "")))
            if not allow_nonbinary:
                continue
        rows.append(dict(stem=stem, path=str(ipath), lesion_path=str(mpath),
                         _fg=(m > 127) if m.max() > 1.0 else (m > 0.5)))
    for stem, ipath in images.items():
        if stem not in masks:
            problems.append((str(ipath), "image without a mask"))
    if out_dir is not None:
        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        for r in rows:
            r["path"] = str(_place_image(Path(r["path"]), out / "images", r["stem"], symlink=False))
            r["lesion_path"] = str(save_png(out / "lesions" / f"{r['stem']}.png", r["_fg"].astype(np.uint8) * 255))
    pairs = pd.DataFrame([{k: v for k, v in r.items() if k != "_fg"} for r in rows],
                         columns=["stem", "path", "lesion_path"])
    return MaskImport(pairs, problems)
