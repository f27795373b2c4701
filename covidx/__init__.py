"""covidx: published chest X-ray COVID-19 / pneumonia models in Keras 3.

Subpackages:
    covidx.data        dataset sources, patient-grouped splits, tf.data pipeline, synthetic X-rays
    covidx.layers      custom, serializable Keras layers (normalisation, SE, MoEx, attention)
    covidx.models      one module per architecture plus the model registry
    covidx.training    losses, schedules, train steps, the training loop
    covidx.evaluation  the papers' metrics, significance tests, plots and reports
    covidx.explain     Grad-CAM, LIME, attention maps
    covidx.serving     SavedModel export for TF Serving

Command-line entry points: ``python -m covidx.train``, ``covidx.data``, ``covidx.evaluate``,
``covidx.explain``, ``covidx.export``, ``covidx.predict``.
"""

import os as _os

# TF's C++ start-up chatter (CUDA probing, oneDNN notes) buries covidx's own output: its log level for
# what goes through absl, and the lines written before absl starts dropped at import (covidx._quiet).
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if _os.environ.get("COVIDX_TF_STARTUP_LOG") != "1":  # set it to see TensorFlow's start-up lines again
    from covidx._quiet import import_tensorflow_quietly as _import_tf  # first, before any submodule imports TF

    _import_tf()

__version__ = "0.1.0"
