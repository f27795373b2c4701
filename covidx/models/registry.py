"""Model registry: a name maps to a builder plus the paper's defaults (its *preset*).

Every architecture module registers its variants with :func:`register_model`;
``python -m covidx.train --model NAME`` and notebooks both go through
:func:`create_model` and :func:`get_spec`, so a preset is the one place where a
paper's input size, task, optimiser, schedule, augmentation and CLAHE policy are
written down.

Builder contract: ``builder(num_classes, input_shape, weights, normalization,
**kwargs) -> keras.Model``, where ``input_shape`` is ``(H, W, C)`` and the model
takes float pixels in [0, 255] and normalises them itself
(:class:`covidx.layers.ImageNormalization`).

Importing this module imports the package ``covidx.models`` first (Python imports a parent
package before its modules), and the package imports every architecture module, so the registry
is complete whenever :func:`get_spec` can be called.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from covidx.tasks import get_task


@dataclass(frozen=True)
class Preset:
    """Training and preprocessing defaults of one registered model (the paper's setting)."""

    task: str = "4class"
    image_size: int = 224
    channels: int = 3
    normalization: str = "imagenet"
    resize: str = "stretch"  # "stretch" or "crop" (short side to size, centre crop)
    batch_size: int = 32
    epochs: int = 30
    optimizer: str = "adam"  # "sgd" or "adam"
    learning_rate: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine", "constant" or "step"
    min_learning_rate: float = 0.0
    warmup_epochs: float = 0.0  # linear warm-up from 0 to learning_rate before the schedule (quick recipes)
    lr_scales: tuple = ()  # ((layer name, factor), ...): those layers train at factor x the learning rate
    augment: str = "none"  # a name from covidx.data.augment.PRESETS
    clahe_prob: float = 0.0  # probability of CLAHE per training image
    clahe_inference: bool = False  # CLAHE on every image at evaluation / inference
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    class_weights: bool = True
    trainer: str = "standard"  # a name from covidx.training.trainers.TRAINERS
    weights: str = "none"  # "none", "imagenet" or a file path
    precision: str = "fp32"  # none of the papers states one: float32, their frameworks' default (covidx.precision)
    paper: str = ""

    def replace(self, **changes) -> "Preset":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable
    preset: Preset
    kind: str = "classifier"  # "classifier", "segmenter" or "cascade"
    description: str = ""
    builder_kwargs: dict = field(default_factory=dict)
    gradcam_layer: str | None = None  # the last convolutional feature map, named so users need not search


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    preset: Preset | None = None,
    kind: str = "classifier",
    description: str = "",
    gradcam_layer: str | None = None,
    **builder_kwargs,
):
    """Decorator: register ``builder`` under ``name`` with its paper defaults.

    Extra keyword arguments are passed to the builder every time (so one
    builder can register several variants, e.g. ``se=True, moex=True``).
    """
    preset = preset or Preset()
    get_task(preset.task)  # validate early

    def decorator(builder):
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, builder, preset, kind, description, dict(builder_kwargs), gradcam_layer)
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def create_model(
    name: str,
    num_classes: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    weights: str | None = None,
    **kwargs,
):
    """Build a registered model; arguments left ``None`` come from its preset."""
    spec = get_spec(name)
    p = spec.preset
    if num_classes is None:
        num_classes = get_task(p.task).num_classes
    size = image_size or p.image_size
    ch = channels or p.channels
    w = p.weights if weights is None else weights
    args = {**spec.builder_kwargs, **kwargs}
    args.setdefault("normalization", p.normalization)
    model = spec.builder(
        num_classes=num_classes,
        input_shape=(size, size, ch),
        weights=None if w in (None, "none") else w,
        **args,
    )
    return model
