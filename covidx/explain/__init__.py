"""Explanations of covidx classifiers: Grad-CAM / Grad-CAM++, LIME, overlays and a shortcut audit.

* :mod:`covidx.explain.gradcam`  Grad-CAM and Grad-CAM++ (Cascade-SEMEnet Sec. 3.3), flat and nested models
* :mod:`covidx.explain.lime`     LIME with SLIC superpixels for radiographs (SE-DPN Sec. 3.4, Fig. 7)
* :mod:`covidx.explain.overlay`  heatmap overlays, PNG output, contact sheets
* :mod:`covidx.explain.audit`    share of explanation energy inside the lungs, per class
"""

from covidx.explain.audit import energy_inside_mask, shortcut_audit
from covidx.explain.gradcam import (
    GradCAM,
    GradCAMResult,
    candidate_layers,
    combine_heatmaps,
    find_target_layer,
    gradcam_for_layers,
)
from covidx.explain.lime import LimeResult, explain_lime, render_lime, slic_segments
from covidx.explain.overlay import contact_sheet, overlay_heatmap, save_png

__all__ = [
    "GradCAM",
    "GradCAMResult",
    "LimeResult",
    "candidate_layers",
    "combine_heatmaps",
    "contact_sheet",
    "energy_inside_mask",
    "explain_lime",
    "find_target_layer",
    "gradcam_for_layers",
    "overlay_heatmap",
    "render_lime",
    "save_png",
    "shortcut_audit",
    "slic_segments",
]
