"""Local weight files: ImageNet weights are read from disk, never downloaded at run time.

Search order for a weight file name: ``$COVIDX_WEIGHTS`` (a folder), ``weights/``
in the working directory, ``weights/`` in the covidx checkout, and the Keras cache
``~/.keras/models``. When weights are asked for and the file is absent the error
names the file and every folder searched; covidx never falls back silently to a
random initialisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

# keras.applications release file names (include_top=False variants).
IMAGENET_FILES = {
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "densenet121": "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "densenet169": "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "vgg19": "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "efficientnetb0": "efficientnetb0_notop.h5",
    "mobilenetv2": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
}
RELEASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


class WeightsNotFoundError(FileNotFoundError):
    """Weights were requested but the expected file is not on this machine."""


def search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("COVIDX_WEIGHTS"):
        dirs.append(Path(os.environ["COVIDX_WEIGHTS"]))
    dirs.append(Path.cwd() / "weights")
    dirs.append(Path(__file__).resolve().parent.parent / "weights")
    dirs.append(Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models")
    seen, out = set(), []
    for d in dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def find_weight_file(filename: str) -> Path | None:
    for d in search_dirs():
        candidate = d / filename
        if candidate.is_file():
            return candidate
    return None


def resolve_weights(arch: str, weights: str | os.PathLike | None) -> str | None:
    """Turn ``None``/``"none"``/``"imagenet"``/a path into a local file path or ``None``.

    Raises:
        WeightsNotFoundError: ImageNet weights or a given path were asked for and are absent.
    """
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        filename = IMAGENET_FILES.get(arch)
        if filename is None:
            raise WeightsNotFoundError(
                f"covidx knows no Keras ImageNet weight file for {arch!r} (published weights of other "
                "frameworks need converting first); train it from scratch (--weights none) or pass a weights file path"
            )
        found = find_weight_file(filename)
        if found is None:
            searched = "\n  ".join(str(d) for d in search_dirs())
            raise WeightsNotFoundError(
                f"ImageNet weights for {arch} were requested but {filename} was not found. Searched:\n  "
                f"{searched}\nThis machine cannot download them: copy {filename} (from {RELEASE_URL}) "
                "into weights/ or $COVIDX_WEIGHTS, or pass --weights PATH, or use --weights none."
            )
        return str(found)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist")
    return str(path)


def read_legacy_h5(path: str | os.PathLike) -> list[tuple[str, list[np.ndarray]]]:
    """``(layer name, weight arrays)`` of every layer with weights in a Keras-2 ``.h5`` file, in saved order
    (the order Keras loads them by topology). Whole-model files keep the weights under ``model_weights``."""
    def text(v):
        return v.decode("utf8") if isinstance(v, bytes) else str(v)

    out = []
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        for name in map(text, group.attrs["layer_names"]):
            g = group[name]
            arrays = [np.asarray(g[text(n)]) for n in g.attrs.get("weight_names", [])]
            if arrays:
                out.append((name, arrays))
    return out
