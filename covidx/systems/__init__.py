"""Multi-model inference: trained runs joined by the papers' decision rules.

* :class:`CascadeSEME` (Lv et al. 2021): stage 1 -> Th_vir gate (eq. 1) -> stage 2 on the lung region.
* :class:`TwoStagePredictor` (Hasan et al.): classify, then segment the lesions of the sick.
"""

from covidx.systems.base import SYSTEM_FILES, System, load_system, system_kind
from covidx.systems.cascade import CascadeSEME, calibrate_threshold
from covidx.systems.two_stage import TwoStagePredictor, segment_files, segmented_classes

__all__ = ["SYSTEM_FILES", "CascadeSEME", "System", "TwoStagePredictor", "calibrate_threshold", "load_system",
           "segment_files", "segmented_classes", "system_kind"]
