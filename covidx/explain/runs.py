"""Explaining a trained run: its inputs, Grad-CAM / attention / LIME heatmaps, overlay files, the shortcut audit.

``gradcam`` / ``gradcam++`` (any classifier; the target layer is the model's registered
``gradcam_layer``, or the last 4-D layer), ``lime`` (SE-DPN Fig. 7: positive superpixels red,
negative blue) or ``attention`` (MAG-SD §4.4.6: the mean attention map, its thresholded
localisation mask and box). Overlays are drawn on the image as the model saw it (after the run's
preprocessing). ``python -m covidx.explain`` is the command line over these.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from covidx.data.pipeline import make_dataset
from covidx.explain.audit import DEFAULT_MIN_ENRICHMENT, shortcut_audit
from covidx.explain.ensemble import ensemble_gradcam
from covidx.explain.gradcam import GradCAM, iter_layers
from covidx.explain.lime import explain_lime, render_lime
from covidx.explain.localization import localize
from covidx.explain.overlay import contact_sheet, display_gray, explanation_figure, overlay_heatmap, save_png
from covidx.models import get_spec
from covidx.models.magsd import attention_view
from covidx.tasks import TASKS

METHODS = ("gradcam", "gradcam++", "lime", "attention")


def model_inputs(run, paths, batch_size=16):
    """The preprocessed model inputs for ``paths`` (float32 [0, 255]), in order."""
    table = pd.DataFrame(dict(path=list(paths), label_index=0, mask_path="", lesion_path=""))
    task = TASKS.get(run.task, TASKS["4class"])
    ds = make_dataset(table, task, run.preprocess, batch_size=batch_size, cache=False, ignore_errors=False)
    return np.concatenate([x.numpy() for x, _, _ in ds])


def registered_layer(model, model_name: str):
    """The Grad-CAM target layer registered for ``model_name`` when ``model`` has it, else ``None`` (the last
    4-D layer, found by :func:`covidx.explain.gradcam.find_target_layer`): reduced copies built with other
    block counts (``model_kwargs``) name their last block differently, and models covidx did not register
    have no entry."""
    try:
        name = get_spec(model_name).gradcam_layer
    except ValueError:
        return None
    return name if name and any(name in (path, lyr.name) for path, lyr in iter_layers(model)) else None


def gradcam_layer(run, layer=None):
    return layer or registered_layer(run.model, run.config.model)


def gradcam_heatmaps(run, images, method="gradcam", layer=None, class_index=None, batch_size=16):
    """(heatmaps (N, H, W) in [0, 1], explained class per image)."""
    if run.config.model == "ensemble" and not layer and method == "gradcam":
        # One heatmap per backbone, combined by each branch's share of the class logit.
        def explain(batch):
            res = ensemble_gradcam(run.model, batch, class_index)
            return res.heatmap, res.class_indices
    else:
        cam = GradCAM(run.model, gradcam_layer(run, layer), plus_plus=method == "gradcam++")

        def explain(batch):
            res = cam.explain(batch, class_index=class_index)
            return res.heatmaps, res.class_indices
    maps, classes = [], []
    for i in range(0, len(images), batch_size):
        heat, cls = explain(images[i:i + batch_size])
        maps.append(np.asarray(heat))
        classes.append(np.asarray(cls))
    return np.concatenate(maps), np.concatenate(classes)


def attention_heatmaps(run, images, threshold=0.5):
    """MAG-SD attention: (maps (N, H, W) in [0, 1], masks, boxes [y0, x0, y1, x1))."""
    try:
        view = attention_view(run.model)
    except (ValueError, KeyError) as e:
        raise ValueError(f"--method attention needs a MAG-SD model (an 'attention_maps' layer): {e}") from None
    att = view(images, training=False)["attention_maps"]
    maps, masks, boxes = (np.asarray(t) for t in localize(att, images.shape[1:3], threshold))
    peak = maps.max(axis=(1, 2), keepdims=True)
    return maps / np.where(peak > 0, peak, 1.0), masks, boxes


def write_overlays(run, paths, method, folder, batch_size=16, layer=None, class_index=None,
                   lime_samples=1000, contact=True) -> list[Path]:
    """One overlay PNG per image in ``folder`` (plus ``contact_sheet.png`` for several images)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = model_inputs(run, paths, batch_size)
    names = run.class_names
    tiles, titles, written, rows = [], [], [], []
    if method in ("gradcam", "gradcam++"):
        maps, classes = gradcam_heatmaps(run, images, method, layer, class_index, batch_size)
        probs = run.model.predict(images, batch_size=batch_size, verbose=0)
        probs = np.asarray(probs[0] if isinstance(probs, (list, tuple)) else probs)
        labels = [names[int(c)] for c in classes]
        renders = [explanation_figure(im, m, f"{Path(p).name}: {names[int(c)]} (p = {probs[i, int(c)]:.2f})",
                                      label=f"{method.replace('gradcam', 'Grad-CAM')} (relative importance)")
                   for i, (p, im, m, c) in enumerate(zip(paths, images, maps, classes))]
    elif method == "attention":
        maps, masks, boxes = attention_heatmaps(run, images)
        renders = []
        for im, m, b in zip(images, maps, boxes):
            over = overlay_heatmap(display_gray(im), m)
            if b[2] > b[0] and b[3] > b[1]:
                cv2.rectangle(over, (int(b[1]), int(b[0])), (int(b[3]) - 1, int(b[2]) - 1), (0, 255, 0), 1)
            renders.append(over)
        probs = np.asarray(run.model(images, training=False))
        labels = [names[int(k)] for k in probs.argmax(-1)]
        rows = [dict(path=p, box_y0=int(b[0]), box_x0=int(b[1]), box_y1=int(b[2]), box_x1=int(b[3]),
                     mask_fraction=float(mk.mean())) for p, b, mk in zip(paths, boxes, masks)]
    elif method == "lime":
        renders, labels = [], []
        for p, im in zip(paths, images):
            res = explain_lime(run.model, im, num_samples=lime_samples, class_index=class_index)
            renders.append(render_lime(display_gray(im), res))
            labels.append(names[int(res.class_index)])
            rows.append(dict(path=p, class_name=labels[-1], weights=json.dumps({int(k): float(v)
                                                                               for k, v in res.weights.items()})))
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for p, render, label in zip(paths, renders, labels):
        out = folder / f"{Path(p).stem}_{method.replace('++', 'pp')}.png"
        save_png(out, render)
        written.append(out)
        tiles.append(render)
        titles.append(f"{Path(p).name}\n{label}")
    if rows:
        with open(folder / f"{method}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if contact and len(written) > 1:
        contact_sheet(tiles, titles, folder / "contact_sheet.png")
    return written


AUDIT_INPUTS = ("auto", "full", "lung-region")


def run_audit(run, table: pd.DataFrame, out_dir, min_enrichment=None, batch_size=16, audit_input="auto") -> dict:
    """Shortcut audit: Grad-CAM of the predicted class vs the lung masks of ``table`` (``mask_path``).

    ``audit_input`` is what the model is explained on: ``full`` images, or their ``lung-region``
    ``X_T = X_O · M`` (the input a Regional-Learning stage 2 gets in the cascade). ``auto`` takes the
    input the model is deployed with: the lung region for a Regional-Learning run, the full image
    otherwise. Writes ``audit.csv`` (per image) and ``audit.json``; returns the
    :func:`covidx.explain.audit.shortcut_audit` summary plus ``median_share`` and ``input``.
    """
    if audit_input not in AUDIT_INPUTS:
        raise ValueError(f"audit input must be one of {AUDIT_INPUTS}, not {audit_input!r}")
    if audit_input == "auto":
        audit_input = "lung-region" if run.regional else "full"
    if "mask_path" not in table or (table["mask_path"].astype(str) == "").any():
        raise ValueError("the shortcut audit needs a lung mask for every image (mask_path; see covidx.data.lung_masks)")
    if run.preprocess.resize == "crop":
        raise ValueError("the audit compares full images with their masks: use a stretch-resize model")
    images = model_inputs(run, table["path"].tolist(), batch_size)
    size = images.shape[1:3]
    masks = np.stack([cv2.resize((cv2.imread(m, cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8), size[::-1],
                                 interpolation=cv2.INTER_NEAREST) for m in table["mask_path"]])
    if audit_input == "lung-region":
        images = images * masks[..., None]  # as the pipeline and the cascade build X_T
    maps, _ = gradcam_heatmaps(run, images, batch_size=batch_size)
    threshold = DEFAULT_MIN_ENRICHMENT if min_enrichment is None else min_enrichment
    result = shortcut_audit(maps, masks, table["label_index"].to_numpy().astype(int), run.class_names, threshold)
    result["median_share"] = {c: v["median_share"] for c, v in result["per_class"].items()}
    result["input"] = audit_input
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(dict(path=table["path"], label=table["label"] if "label" in table else "",
                      share_inside_lungs=result["share"], enrichment=result["enrichment"])).to_csv(out / "audit.csv",
                                                                                                  index=False)
    (out / "audit.json").write_text(json.dumps({k: v for k, v in result.items() if k not in ("share", "enrichment")},
                                               indent=2, default=lambda v: None))
    return result
