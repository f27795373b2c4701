"""Concatenated ensemble VGG19 + DenseNet121 + EfficientNetB0 (3 classes).

Reference:
    Hasan, Alom, Ali, "Deep Learning based Detection and Segmentation of COVID-19 &
    Pneumonia on Chest X-ray Image" (ICICT4SD 2021), Sec. III-A, Fig. 3, Table II.

Structure (Sec. III-A, Fig. 3): one image input, three keras.applications
backbones without their ImageNet tops, each global-average pooled, the three feature
vectors concatenated (512 + 1024 + 1280 = 2816) and classified by a softmax layer over
COVID-19 / pneumonia / normal. With a bare ``Dense(3)`` head the model has 31,119,910
parameters (keras.applications' notop counts 20,024,384 + 7,037,504 + 4,049,571, plus 8,451).

Design choices:

* **One flat graph.** Every backbone is built on the outer graph (``input_tensor=``)
  behind its own preprocessing branch, not nested as a sub-model, so Grad-CAM can reach
  each backbone's last feature map, also after a ``.keras`` reload (a nested
  sub-model's inner layers are not connected to the outer input in Keras 3).
* **Per-branch preprocessing.** The input is float pixels in [0, 255]; each branch
  applies what its ImageNet weights expect (keras.applications' ``preprocess_input``): ``caffe`` for VGG19, ``imagenet``
  (keras "torch") for DenseNet121 and none for EfficientNetB0, which normalises inside
  its own graph. The outer ``normalization`` argument of the registry is therefore ignored.
* **Unique, self-describing names.** keras.applications layer names do not collide
  between these three backbones today, but they are generic (``relu``, ``bn``, auto-named
  ``zero_padding2d``), so every backbone layer is prefixed with its branch
  (``vgg19_block5_conv4``, ``densenet121_relu``, ``efficientnetb0_top_activation``).
  Names cannot contain ``/`` in Keras 3, hence ``_``.
* **Transfer learning** (Sec. IV-A): ImageNet weights for VGG19 and EfficientNetB0 and a
  DenseNet121 "trained with medical X-ray images to classify around 14 diseases"
  (CheXNet-style) for the DenseNet branch; "some initial layers as non-trainable and rest
  of the layer as trainable". How many is not given: ``freeze`` takes a fraction of each
  backbone's layers from the input side or a layer name; the default ``"auto"`` freezes
  half of each backbone when pretrained weights are loaded and nothing when training
  from scratch (freezing random filters would only cripple the network).
* **From scratch** (no weights files): every BN layer follows training (momentum 0.9,
  :func:`~covidx.layers.normalization.track_batch_statistics`) and VGG19, which has no BN, gets He-uniform
  kernels instead of keras.applications' Glorot-uniform, under which its ReLUs switch off and the
  ensemble trains as two backbones (:func:`he_uniform_without_bn`).
* **Class weights** (Table II: COVID-19 4283, Pneumonia 1587, Normal 701). These are the
  image counts of Table I (Normal 1587, Pneumonia 4283, COVID-19 701) re-assigned to the
  classes. The text states the rule: "Lower value is preferred for the class of higher
  number of data", which the table itself breaks (pneumonia, the largest class, gets more
  weight than normal). We implement the stated rule as inverse-frequency ("balanced")
  weights computed from the training split (``class_weights=True`` in the preset:
  ``n / (K n_c)``, for Table I's counts COVID-19 3.13, pneumonia 0.51, normal 1.38).
  :data:`PAPER_CLASS_WEIGHTS` keeps the table's literal numbers for reference.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import keras
import numpy as np

from covidx.layers import ImageNormalization
from covidx.layers.normalization import track_batch_statistics
from covidx.models.baseline import efficientnet_std_fix
from covidx.models.registry import Preset, register_model
from covidx.weights import WeightsNotFoundError, read_legacy_h5, resolve_weights

log = logging.getLogger(__name__)

# branch name -> (keras.applications constructor, ImageNormalization mode, GAP feature width)
ENSEMBLE_BACKBONES: dict[str, tuple] = {
    "vgg19": (keras.applications.VGG19, "caffe", 512),
    "densenet121": (keras.applications.DenseNet121, "imagenet", 1024),
    "efficientnetb0": (keras.applications.EfficientNetB0, "raw", 1280),
}

# Last convolutional feature map of each branch (Grad-CAM targets, ensemble paper Sec. III-B).
# VGG19: the last conv before block5_pool (twice the resolution of the pooled map);
# DenseNet121: the final BN + ReLU; EfficientNetB0: the 1x1 top conv after its activation.
ENSEMBLE_GRADCAM_LAYERS: dict[str, str] = {
    "vgg19": "vgg19_block5_conv4",
    "densenet121": "densenet121_relu",
    "efficientnetb0": "efficientnetb0_top_activation",
}

# Table II of the paper, literally (see the module docstring for how they are used).
PAPER_CLASS_WEIGHTS = {"covid19": 4283.0, "pneumonia": 1587.0, "normal": 701.0}

FEATURES_LAYER = "features"
HEAD_LAYERS = ("head_dropout", "head_hidden", "head_hidden_dropout", "predictions")


# ---------------------------------------------------------------------------
# Layers of one branch
# ---------------------------------------------------------------------------


def branch_names(model: keras.Model) -> list[str]:
    """Branches present in ``model``, in concatenation order."""
    names = {layer.name for layer in model.layers}
    return [b for b in ENSEMBLE_BACKBONES if f"{b}_gap" in names]


def backbone_layers(model: keras.Model, branch: str) -> list[keras.layers.Layer]:
    """The keras.applications layers of ``branch`` (input side first; no normalisation, no GAP)."""
    own = (f"{branch}_normalize", f"{branch}_normalize_std", f"{branch}_gap")
    return [l for l in model.layers if l.name.startswith(f"{branch}_") and l.name not in own]


def branch_widths(model: keras.Model) -> dict[str, int]:
    """GAP feature width of each branch, in concatenation order."""
    return {b: int(model.get_layer(f"{b}_gap").output.shape[-1]) for b in branch_names(model)}


def he_uniform_without_bn(layers) -> int:
    """He-uniform kernels for every convolution among ``layers`` when none of them is a BatchNormalization
    layer (VGG19 of the three); returns how many were set. For a branch trained from scratch.

    keras.applications builds VGG19 with Glorot-uniform kernels (variance ``2 / (fan_in + fan_out)``), which
    halve the signal's second moment at every ReLU: after VGG19's 16 convolutions a 128-px X-ray's pooled
    features are ~0.002, and from there Adam's first steps (each ~the learning rate, bias included) switch
    its ReLUs off: in the quick recipe's first 100 steps on Kermany 78 % of the branch's 512 pooled features
    became the same for every image, and in a 20-minute run 99 % (their share of the logits 4e-10), so the
    ensemble trained as two backbones (``benchmarks/ensemble_start.py``). He-uniform (variance ``2 / fan_in``;
    He et al. 2015, Sec. 2.2, derived for deep ReLU networks without normalisation such as VGG; Cascade-SEME's
    own VGG19 uses it, Sec. 5.A) keeps the signal's scale through the 16 layers. A branch with BN keeps
    keras.applications' initialisers.
    """
    if any(isinstance(l, keras.layers.BatchNormalization) for l in layers):
        return 0
    convs = [l for l in layers if isinstance(l, keras.layers.Conv2D)]
    for conv in convs:
        conv.kernel.assign(keras.initializers.HeUniform()(conv.kernel.shape, dtype=conv.kernel.dtype))
    return len(convs)


# ---------------------------------------------------------------------------
# Freezing (transfer learning, Sec. IV-A)
# ---------------------------------------------------------------------------


@dataclass
class FreezeReport:
    """Frozen / trainable split after :func:`freeze_backbones`.

    ``branches`` maps a branch to ``(frozen layers, backbone layers, last frozen layer or "")``.
    """

    branches: dict[str, tuple[int, int, str]]
    trainable_params: int
    non_trainable_params: int

    def summary(self) -> str:
        parts = [f"{b}: {f}/{n} layers frozen" + (f" (up to {last})" if last else "")
                 for b, (f, n, last) in self.branches.items()]
        return "; ".join(parts) + (f"; {self.trainable_params:,} trainable / "
                                   f"{self.non_trainable_params:,} non-trainable parameters")


def count_params(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def _frozen_count(layers: list, rule, branch: str) -> int:
    """How many layers of one backbone ``rule`` freezes (from the input side)."""
    if rule is None or rule is False:
        return 0
    if rule is True:
        return len(layers)
    if isinstance(rule, str):
        names = [l.name for l in layers]
        for candidate in (rule, f"{branch}_{rule}"):
            if candidate in names:
                return names.index(candidate) + 1
        raise ValueError(f"no layer {rule!r} in the {branch} branch (names look like {names[-1]!r})")
    fraction = float(rule)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"freeze fraction must be in [0, 1], got {rule}")
    return int(np.floor(fraction * len(layers)))


def freeze_backbones(model: keras.Model, freeze) -> FreezeReport:
    """Freeze the input side of each backbone; every other layer becomes trainable.

    Args:
        model: an ensemble from :func:`build_ensemble` (or reloaded from ``.keras``).
        freeze: ``None``/``0`` (all trainable), ``True``/``1.0`` (backbones frozen,
            head only), a fraction in (0, 1) of each backbone's layers counted from the
            input side (``int(floor(fraction * n))``), a layer name (frozen up to and
            including it, in the branch that owns it; other branches stay trainable) or a
            mapping ``{branch: rule}``.

    Frozen BatchNormalization layers run in inference mode (Keras 3 semantics for
    ``trainable=False``), the usual fine-tuning behaviour.
    """
    branches = branch_names(model)
    if isinstance(freeze, Mapping):
        unknown = set(freeze) - set(branches)
        if unknown:
            raise ValueError(f"unknown branches {sorted(unknown)}; the model has {branches}")
        rules = {b: freeze.get(b) for b in branches}
    elif isinstance(freeze, str):
        owners = [b for b in branches if any(l.name in (freeze, f"{b}_{freeze}") for l in backbone_layers(model, b))]
        if len(owners) != 1:
            raise ValueError(f"layer {freeze!r} found in {len(owners)} branches of {model.name!r}; "
                             "use the prefixed name (e.g. 'vgg19_block3_pool') or a {branch: rule} mapping")
        rules = {b: (freeze if b == owners[0] else None) for b in branches}
    else:
        rules = {b: freeze for b in branches}

    for layer in model.layers:
        layer.trainable = True
    report = {}
    for b in branches:
        layers = backbone_layers(model, b)
        k = _frozen_count(layers, rules[b], b)
        for layer in layers[:k]:
            layer.trainable = False
        report[b] = (k, len(layers), layers[k - 1].name if k else "")
    return FreezeReport(report, count_params(model.trainable_weights), count_params(model.non_trainable_weights))


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def load_backbone_weights(backbone: keras.Model, path: str, branch: str) -> int:
    """Load a backbone weights file into ``backbone``; returns the number of trailing layers ignored.

    Accepts a file of exactly this backbone (``.weights.h5`` or legacy ``.h5``) or, for
    legacy ``.h5``, a file of the backbone followed by a classifier (a CheXNet-style
    DenseNet121 with a 14-way head): the backbone's layers are matched in topological
    order (as Keras loads ``.h5``), and the trailing head layers are left out. Shapes are
    checked layer by layer, so a file of another architecture fails loudly.
    """
    layers = [l for l in backbone.layers if l.weights]
    if not str(path).endswith((".h5", ".hdf5")) or str(path).endswith(".weights.h5"):
        backbone.load_weights(path)
        return 0
    saved = [arrays for _, arrays in read_legacy_h5(path)]
    if len(saved) < len(layers):
        raise ValueError(f"{path} holds {len(saved)} layers with weights, the {branch} backbone needs {len(layers)}")
    for layer, arrays in zip(layers, saved):
        expected = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays]
        if expected != got:
            raise ValueError(f"{path}: weights for {branch} layer {layer.name!r} have shapes {got}, expected {expected}")
        layer.set_weights(arrays)
    return len(saved) - len(layers)


# ---------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------


def build_ensemble(
    num_classes: int = 3,
    input_shape=(224, 224, 3),
    weights=None,
    densenet_weights=None,
    freeze="auto",
    dropout: float = 0.0,
    hidden_units: int = 0,
    backbones: Sequence[str] = tuple(ENSEMBLE_BACKBONES),
    name: str = "ensemble",
) -> keras.Model:
    """VGG19 + DenseNet121 + EfficientNetB0 -> GAP each -> concatenate -> softmax (Sec. III-A, Fig. 3).

    Args:
        num_classes: output classes (3 in the paper: COVID-19, pneumonia, normal).
        input_shape: ``(H, W, 3)``; the backbones' ImageNet weights need RGB, so gray
            X-rays are repeated to 3 channels by the data pipeline.
        weights: ``None``; ``"imagenet"`` (each backbone's local keras.applications file
            through :func:`covidx.weights.resolve_weights`); or a path to weights of this
            whole ensemble.
        densenet_weights: optional path to a CheXNet-style DenseNet121 weights file for the
            DenseNet branch (Sec. IV-A: DenseNet121 "trained with Medical X-ray images");
            overrides ImageNet for that branch. See :func:`load_backbone_weights`.
        freeze: see :func:`freeze_backbones`; ``"auto"`` = 0.5 when backbone weights were
            loaded, else nothing frozen.
        dropout: dropout before the classifier (and after the hidden layer); 0 = none.
        hidden_units: a ReLU Dense layer of this width between the features and the
            classifier; 0 = bare ``Dense(num_classes)`` head (the paper's Fig. 3).
        backbones: a subset of the branches, for ablations; the paper uses all three.
        name: model name.

    Returns:
        Functional model mapping ``(B, H, W, 3)`` pixels in [0, 255] to float32 softmax
        probabilities ``(B, num_classes)``.

    Raises:
        WeightsNotFoundError: a requested weights file is missing (the message names it).
    """
    if input_shape[-1] != 3:
        raise ValueError(f"the ensemble takes 3-channel input (ImageNet backbones), got {input_shape[-1]} channels; "
                         "use channels=3 so the pipeline repeats gray X-rays")
    unknown = [b for b in backbones if b not in ENSEMBLE_BACKBONES]
    if unknown or not backbones:
        raise ValueError(f"backbones must be a non-empty subset of {list(ENSEMBLE_BACKBONES)}, got {list(backbones)}")
    imagenet = weights is not None and str(weights).lower() == "imagenet"
    whole_model_weights = None if weights is None or imagenet or str(weights).lower() == "none" else weights
    # Resolve every file first, so one error names each missing file before anything is built.
    files: dict[str, str | None] = {}
    missing = []
    for b in backbones:
        try:
            files[b] = resolve_weights(b, "imagenet") if imagenet else None
        except WeightsNotFoundError as e:
            missing.append(str(e))
    if densenet_weights is not None and "densenet121" in backbones:
        try:
            files["densenet121"] = resolve_weights("densenet121", densenet_weights)
        except WeightsNotFoundError as e:
            missing.append(str(e))
    if missing:
        raise WeightsNotFoundError("\n".join(missing))

    inputs = keras.Input(input_shape, name="image")
    pooled = []
    for b in backbones:
        app, mode, _ = ENSEMBLE_BACKBONES[b]
        x = ImageNormalization(mode, name=f"{b}_normalize")(inputs)
        path = files[b]
        imagenet_file = path if imagenet and not (b == "densenet121" and densenet_weights is not None) else None
        if b == "efficientnetb0" and imagenet_file is not None:
            x = efficientnet_std_fix(x, f"{b}_normalize_std")
        # keras.applications loads its own .h5 topologically at construction time.
        backbone = app(include_top=False, weights=imagenet_file, input_tensor=x)
        if path is None:
            track_batch_statistics(backbone.layers)  # from scratch: BN statistics that follow training
            he_uniform_without_bn(backbone.layers)
        if path is not None and imagenet_file is None:
            ignored = load_backbone_weights(backbone, path, b)
            if ignored:
                log.info("%s: %d trailing layer(s) of %s (a classifier head) not loaded", b, ignored, path)
        for layer in backbone.layers:
            if not isinstance(layer, keras.layers.InputLayer) and not layer.name.startswith(f"{b}_normalize"):
                layer.name = f"{b}_{layer.name}"
        pooled.append(keras.layers.GlobalAveragePooling2D(name=f"{b}_gap")(backbone.output))

    x = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name=FEATURES_LAYER)(pooled)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    if hidden_units:
        x = keras.layers.Dense(hidden_units, activation="relu", name="head_hidden")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name="head_hidden_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    model = keras.Model(inputs, outputs, name=name)

    if whole_model_weights is not None:
        model.load_weights(resolve_weights(name, whole_model_weights))
    pretrained = any(p is not None for p in files.values()) or whole_model_weights is not None
    rule = (0.5 if pretrained else None) if freeze == "auto" else freeze
    report = freeze_backbones(model, rule)
    log.info("ensemble %s", report.summary())
    return model


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def ensemble(num_classes, input_shape, weights=None, normalization=None, **kwargs):
    """Registry builder; ``normalization`` is ignored (each branch normalises itself)."""
    return build_ensemble(num_classes, input_shape, weights=weights, **kwargs)


register_model(
    "ensemble",
    Preset(
        task="3class",  # Sec. II, Table I: COVID-19 / pneumonia / normal
        # "resized to specific size" (Sec. IV-B), size not given: 224 is the ImageNet
        # resolution all three backbones (and their weights) were designed and trained at.
        image_size=224,
        channels=3,  # ImageNet backbones; gray X-rays are repeated to RGB by the pipeline
        normalization="raw",  # the outer input stays [0, 255]; each branch normalises itself
        # Table II: lr 1e-4, batch 30, 60 epochs. The optimiser is not named; Adam.
        optimizer="adam",
        learning_rate=1e-4,
        batch_size=30,
        epochs=60,
        schedule="constant",  # no schedule described
        augment="none",  # no augmentation described
        class_weights=True,  # Table II class weighting, as inverse frequency (module docstring)
        trainer="standard",
        # ImageNet needs the three keras.applications files in weights/ or $COVIDX_WEIGHTS
        # (covidx/weights.py names them); then pass --weights imagenet.
        weights="none",
        paper="Hasan et al., ensemble DenseNet103-U-Net (Sec. III-A, IV-A, Table II)",
    ),
    description="VGG19 + DenseNet121 + EfficientNetB0, GAP each, concatenated (2816) -> softmax",
)(ensemble)
