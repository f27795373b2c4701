"""ResNet50 family of Cascade-SEME (Lv et al., "Cascade-SEME", Med Phys 2021; arXiv 2005.01468).

Variants (Table II / III of the journal paper, Fig. 2):

=================  =======  ==  ====  ===============================================
name               head     SE  MoEx  paper
=================  =======  ==  ====  ===============================================
``resnet50-base``  flatten  -   -     M2 "Base-ResNet50" (224 px, flatten + FC)
``resnet50-gap``   GAP      -   -     M5 "ResNet50" with GAP at 512 px (§4.C, §6.A.2)
``se-resnet50``    GAP      x   -     M7 "SE-ResNet50" (§4.B)
``moex-resnet50``  GAP      -   x     M11 "MoEx-ResNet50" (§6.B)
``seme-resnet50``  GAP      x   x     M9/M13 "SEME-ResNet50", the cascade's stage 1 (§4)
=================  =======  ==  ====  ===============================================

Architecture choices (Med Phys 2021 §4.B, §5.A):

* Layout of ``keras.applications.ResNet50`` (v1): 7x7/2 stem conv, BN, ReLU, 3x3/2 max-pool,
  bottleneck stages (3, 4, 6, 3) of widths 64..512 (x4 expansion), projection shortcut in
  the first block of each stage, the stage stride on the **first 1x1** conv (as in the
  Caffe SE-ResNet-50 prototxt; torchvision/MoEx put it on the 3x3), **biased** convs and
  BN epsilon 1.001e-5. The layer names are keras.applications' (``conv2_block1_1_conv``
  ...), so the ImageNet ``notop`` file loads by name. Rationale: the paper's vocabulary
  (He-uniform, GAP/flatten heads) is Keras', and with this layout the GAP variant with a
  1000-way head has exactly ``keras.applications.ResNet50(weights=None)``'s 25,636,712
  parameters. The conv biases add 79,680 parameters to the Caffe/torch counts (SE-ResNet50
  1000-way: 28,167,704 here vs the bias-free SENet layout's 28,088,024).
* He-uniform initialisation of every kernel (paper §5.A), no ImageNet weights by default.
* SE (r = 16, biased FCs) on the residual branch after its last BN, before the addition
  (SENet §"SE-ResNet"; "SE between the fusion layers", §4.B).
* MoEx after the stem max-pool (the official ``moex_layer="stem"``; the paper: "after the
  first convolution layer", preprint §3.2.2).

Pixel normalisation: ``"unit"`` (x/255). The paper trains from scratch, so ImageNet
statistics have no meaning; /255 is the usual Keras from-scratch scaling, and it keeps
the background of Regional-Learning images (image x lung mask, §4.D) at exactly 0 for
every image, which a per-image z-score would not.

This module also holds the pieces shared by the whole Cascade-SEME family (DenseNet169,
VGG19): the classifier head, weight loading and the paper's training presets.
"""

from __future__ import annotations

from typing import Sequence

import keras

from covidx.layers import ImageNormalization, SqueezeExcite
from covidx.layers.moex import MomentExchange
from covidx.models.registry import Preset, register_model
from covidx.weights import read_legacy_h5, resolve_weights

KERNEL_INIT = "he_uniform"  # paper §5.A: W ~ U(-sqrt(6/n_in), sqrt(6/n_in))
BN_EPSILON = 1.001e-5  # keras.applications ResNet / DenseNet
# Moving-average momentum of BN statistics: PyTorch's 0.1 (the official MoEx code, and what these from-scratch
# models were trained with) is Keras' 0.9; Keras' own 0.99 leaves the statistics near their initial values for
# the first few hundred steps, so short runs evaluate a different network than they trained.
BN_MOMENTUM = 0.9
NORMALIZATION = "unit"  # see module docstring
HEADS = ("gap", "flatten")

# --- training presets (shared by resnet.py, densenet.py, vgg.py) -------------------------
# Stage 1 = the paper's first part (Dataset1: bacterial / normal / viral), §5.A, §6.A.
STAGE1 = Preset(
    task="stage1",  # the cascade's coarse screen (§4, Fig. 2)
    image_size=512,  # §6.A.2: GAP networks retrained at 512 x 512
    channels=1,  # radiographs are grayscale and no ImageNet weights are used (§5.A)
    normalization=NORMALIZATION,
    batch_size=16,  # UNKNOWN (paper); fits 512 px ResNet50 on a single GPU
    epochs=80,  # preprint §4.1: "after 80 rounds of training"
    optimizer="sgd",  # §5.A: SGD, lr 1e-4, momentum 0.9 in all experiments
    learning_rate=1e-4,
    momentum=0.9,
    schedule="cosine",  # cosine annealing is stated for part 2 (§5.A); kept for stage 1 too
    min_learning_rate=1e-8,  # §5.A: eta_min = 1e-8
    augment="cascade",  # ±30° rotation (§5.A); the pipeline defines the preset
    clahe_prob=0.0,  # CLAHE arrives together with MoEx (§6.A.3), not for base/GAP/SE
    weights="none",  # He-uniform from scratch (§5.A)
    paper="Lv et al., Cascade-SEME, Med Phys 2021 (doi 10.1002/mp.14711)",
)
# Stage 2 = the paper's second part (Dataset2: COVID-19 vs other viral), §5.A, §6.B.
STAGE2 = STAGE1.replace(
    task="stage2",  # the cascade's fine-grained step
    learning_rate=0.1,  # §5.A / preprint §4.2: cosine annealing, eta_max = 0.1 ...
    min_learning_rate=1e-8,  # ... eta_min = 1e-8
)
# SEME/MoEx variants: stage 1 applies CLAHE to 40 % of the training images (§6.A.3);
# stage 2 uses every image both with and without CLAHE (§6.B.2, preprint §4.2), i.e. 0.5,
# and trains with Regional Learning (§5.A: the four part-2 models "with Regional Learning").
STAGE1_MOEX = STAGE1.replace(clahe_prob=0.4, trainer="moex")
STAGE2_MOEX = STAGE2.replace(clahe_prob=0.5, trainer="regional")


# --- shared building blocks --------------------------------------------------------------
def normalized_input(input_shape, normalization: str | None):
    """The ``image`` input (pixels in [0, 255]) and its in-graph normalisation."""
    inputs = keras.Input(tuple(input_shape), name="image")
    return inputs, ImageNormalization(normalization or NORMALIZATION, name="normalize")(inputs)


def moment_exchange(x, moex: bool, moex_prob: float, moex_lambda: float, moex_seed):
    """MoEx after the stem max-pool (official ``moex_layer="stem"`` / ``"pool0"``)."""
    if not moex:
        return x
    return MomentExchange(moex_prob, moex_lambda, seed=moex_seed, name="moex")(x)


def classifier_head(x, num_classes: int, head: str, hidden_units: Sequence[int] = ()):
    """``gap``: GAP -> FC (the paper's GAP component, §4.C); ``flatten``: flatten -> FC (base).

    ``hidden_units`` adds ReLU FC layers before the softmax FC (VGG19's FC-4096 x 2).
    """
    if head == "gap":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif head == "flatten":
        x = keras.layers.Flatten(name="flatten")(x)
    else:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    for i, units in enumerate(hidden_units, start=1):
        x = keras.layers.Dense(units, activation="relu", kernel_initializer=KERNEL_INIT, name=f"fc{i}")(x)
    return keras.layers.Dense(
        num_classes, activation="softmax", kernel_initializer=KERNEL_INIT,
        name="predictions", dtype="float32",
    )(x)


def load_weights(model: keras.Model, arch: str, weights, input_shape) -> keras.Model:
    """Load ``weights`` into ``model``: ``"imagenet"`` (a keras.applications ``notop`` file,
    matched by layer name, see :func:`load_legacy_h5_by_name`) or a covidx weights file.

    The paper trains from scratch (§5.A); ImageNet weights are an option for 3-channel input.
    """
    path = resolve_weights(arch, weights)
    if path is None:
        return model
    if str(weights).lower() == "imagenet":
        if input_shape[-1] != 3:
            raise ValueError(f"ImageNet weights for {arch} need 3-channel input, got {input_shape[-1]}")
        load_legacy_h5_by_name(model, path)
    else:
        model.load_weights(path)
    return model


def load_legacy_h5_by_name(model: keras.Model, path: str) -> list[str]:
    """Copy every weighted layer of a Keras-2 ``.h5`` weights file into the layer of the same name.

    Keras 2 named DenseNet's stem ``conv1/conv``; ``/`` is read as ``_`` (Keras 3 names).
    Layers of ``model`` absent from the file (SE, MoEx, head) keep their initialisation; a
    file layer absent from ``model`` or of another shape raises, so nothing loads silently
    half-way. Returns the names of the loaded layers.
    """
    loaded = []
    for file_name, arrays in read_legacy_h5(path):
        layer = model.get_layer(file_name.replace("/", "_"))
        layer.set_weights(arrays)
        loaded.append(layer.name)
    return loaded


# --- ResNet50 ----------------------------------------------------------------------------
def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool):
    x = keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same" if kernel > 1 else "valid",
        kernel_initializer=KERNEL_INIT, name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def bottleneck(x, filters: int, stride: int, projection: bool, se: bool, se_ratio: int, name: str):
    """Bottleneck 1x1 (stride) -> 3x3 -> 1x1 (x4) [-> SE] + shortcut -> ReLU (keras ResNet50 v1)."""
    shortcut = _conv_bn(x, 4 * filters, 1, stride, f"{name}_0", relu=False) if projection else x
    y = _conv_bn(x, filters, 1, stride, f"{name}_1", relu=True)
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=True)
    y = _conv_bn(y, 4 * filters, 1, 1, f"{name}_3", relu=False)
    if se:
        # SE rescales the residual branch before the fusion with the shortcut (SENet Fig. 3).
        y = SqueezeExcite(se_ratio, kernel_initializer=KERNEL_INIT, name=f"{name}_se")(y)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.Activation("relu", name=f"{name}_out")(y)


def build_resnet50(
    num_classes: int,
    input_shape=(512, 512, 1),
    weights=None,
    normalization: str | None = NORMALIZATION,
    head: str = "gap",
    se: bool = False,
    moex: bool = False,
    se_ratio: int = 16,
    moex_prob: float = 1.0,
    moex_lambda: float = 0.9,
    moex_seed: int | None = None,
    blocks: Sequence[int] = (3, 4, 6, 3),
    base_width: int = 64,
    name: str | None = None,
) -> keras.Model:
    """ResNet50 / SE- / MoEx- / SEME-ResNet50 classifier (softmax output).

    Args:
        num_classes: width of the softmax head.
        input_shape: ``(H, W, C)``, pixels in [0, 255]; grayscale or RGB.
        weights: ``None``, ``"imagenet"`` (3-channel input, backbone only) or a weights file.
        normalization: :class:`~covidx.layers.ImageNormalization` mode.
        head: ``"gap"`` or ``"flatten"`` (the paper's base networks at 224 px).
        se: Squeeze-and-Excitation in every bottleneck (ratio ``se_ratio``).
        moex: MomentExchange after the stem max-pool (``moex_prob``, ``moex_lambda``, ``moex_seed``).
        blocks, base_width: bottlenecks per stage and stem/first-stage width; the defaults
            are ResNet50 (smaller values only make reduced test copies).
    """
    inputs, x = normalized_input(input_shape, normalization)
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = keras.layers.Conv2D(base_width, 7, strides=2, kernel_initializer=KERNEL_INIT, name="conv1_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name="conv1_bn")(x)
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    x = moment_exchange(x, moex, moex_prob, moex_lambda, moex_seed)
    for stage, n_blocks in enumerate(blocks):
        filters = base_width * 2**stage
        for b in range(n_blocks):
            x = bottleneck(
                x, filters, stride=(2 if stage > 0 and b == 0 else 1), projection=(b == 0),
                se=se, se_ratio=se_ratio, name=f"conv{stage + 2}_block{b + 1}",
            )
    outputs = classifier_head(x, num_classes, head)
    default = ("seme" if moex else "se") if se else ("moex" if moex else head)
    model = keras.Model(inputs, outputs, name=name or f"{default}_resnet50")
    return load_weights(model, "resnet50", weights, input_shape)


_VARIANTS = {
    # name: (builder kwargs, preset, description)
    "resnet50-base": (dict(head="flatten"), STAGE1.replace(image_size=224), "Base-ResNet50, flatten + FC, 224 px (M2)"),
    "resnet50-gap": (dict(), STAGE1, "ResNet50 + GAP at 512 px (M5)"),
    "se-resnet50": (dict(se=True), STAGE1, "SE-ResNet50 + GAP (M7)"),
    "moex-resnet50": (dict(moex=True), STAGE1_MOEX, "MoEx-ResNet50 + GAP (M11)"),
    "seme-resnet50": (dict(se=True, moex=True), STAGE1_MOEX, "SEME-ResNet50, Cascade-SEME stage 1 (M9/M13)"),
}
for _name, (_kwargs, _preset, _description) in _VARIANTS.items():
    register_model(_name, _preset, description=_description, gradcam_layer="conv5_block3_out", **_kwargs)(build_resnet50)
