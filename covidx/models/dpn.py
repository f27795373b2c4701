"""Dual Path Networks (DPN-68/92/98/131) and SE-DPN, the DPN-SENet of Cheng et al.

References:
    Y. Chen, J. Li, H. Xiao, X. Jin, S. Yan, J. Feng, "Dual Path Networks", NeurIPS 2017
    (official MXNet symbols: github.com/cypw/DPNs, ``settings/symbol_dpn*.py``).
    B. Cheng, R. Xue, H. Yang, L. Zhu, W. Xiang, "DPN-SENet: A self-attention mechanism
    neural network for detection and diagnosis of COVID-19 from chest x-ray images",
    arXiv 2105.09683 (code: github.com/ChengBo5/covid19-X-ray, "CB5").

Architecture (Chen et al. §3, Fig. 2; their Table 1 lists DPN-92/98, the official symbols give the
exact numbers of all four variants):

* Stem ``conv1``: 7x7/2 conv (3x3/2 for DPN-68, the "small" stem of symbol_dpn-68.py), BN, ReLU,
  3x3/2 max-pool.
* Four stages ``conv2``..``conv5`` of ``k_sec`` dual-path blocks. In stage ``s`` (0-based) the
  residual width is ``bw = base_width * 2**s`` (``base_width = 64 * bw_factor``: 256 for
  DPN-92/98/131, 64 for DPN-68), the bottleneck width ``R = k_R * bw / base_width`` and
  every block appends ``inc = inc_sec[s]`` channels to the densely connected path.
* A block: its input is the concatenation of the residual path (``bw`` channels) and the dense
  path; main branch ``1x1 (R) -> 3x3 grouped (R, G groups, stride s) -> 1x1 (bw + inc)``, every
  convolution pre-activated (BN -> ReLU -> conv, no bias). The last 1x1 output is split: the
  first ``bw`` channels are added to the residual path, the last ``inc`` channels are
  appended to the dense path.
* The first block of a stage projects its input with BN -> ReLU -> 1x1 conv to ``bw + 2*inc``
  channels ("proj", stride 1, in ``conv2``; "down", stride 2, in ``conv3``-``conv5``, whose
  grouped 3x3 also has stride 2); that output is split into the new residual base (``bw``) and
  the new dense base (``2*inc``).
* Head: concat(residual, dense) -> BN -> ReLU -> global average pool -> Dense softmax.
  DPN-92 ends with 2048 + 640 = 2688 channels and has 37,668,392 trainable parameters with a
  1000-class head (the DPN README's 37.7M), plus 125,216 BN moving statistics.

Choices written down here:

* BatchNorm ``epsilon=1e-3`` and ``momentum=0.9``: the MXNet BatchNorm defaults the official
  symbols use (``symbol_basic.py``: ``bn_momentum = 0.9``); CB5/timm copy ``eps=0.001``.
* Padding: strided convolutions and the max-pool pad symmetrically (``ZeroPadding2D``), as
  MXNet/PyTorch do, rather than Keras' asymmetric ``"same"``, so the sampling grid is the
  reference one. Zero padding before the max-pool equals -inf padding because it follows a ReLU.
* Initialisation: He-normal (fan-in) for every convolution; the official training script is not
  published and CB5 keeps PyTorch's default. The classifier keeps Keras' Glorot-uniform.
* Classifier: ``Dense`` after global average pooling, which has exactly the parameters of the
  references' 1x1-conv classifier; the test-time "mean-max pooling" of the references is off.

SE-DPN (Cheng et al. §3.2, Fig. 3): the paper says only that the SENet block (squeeze = global
pooling, excitation = two FCs, reweight) "is introduced into the DPN-92 network"; it gives
neither the position nor the ratio, and the authors' public code has no SE block at all (its
``gcnet.py`` puts a Global-Context block on the residual slice before the sum). Here a
:class:`~covidx.layers.SqueezeExcite` (r = 16, the SENet default) sits in **every** dual-path
block on the **residual slice** (the first ``bw`` channels of the last 1x1 output), **before**
it is added to the residual path. This is SENet's own placement in a residual unit (SE on the
residual branch before the identity sum, Hu et al. Fig. 3); the dense slice is concatenated, not
summed, so it has no counterpart there and is left unscaled; and it is the position at which the
authors' code inserts its attention block. It costs +4,381,232 parameters on DPN-92 and a
negligible number of FLOPs (the paper: "the same computational overhead as the DPN").

Reduced copies for tests and notebooks: :func:`dpn_config` accepts field overrides and
:meth:`DPNConfig.scaled` multiplies every width, e.g.::

    cfg = dpn_config("dpn92", k_sec=(1, 1, 2, 1)).scaled(0.25)
    model = build_dpn(4, (64, 64, 3), config=cfg, se=True)

(``build_dpn(..., width=0.25)`` is the shortcut for the width part.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import keras
import tensorflow as tf
from keras import layers

from covidx.layers import GroupedConv2D, ImageNormalization, SqueezeExcite
from covidx.models.registry import Preset, register_model
from covidx.weights import resolve_weights

BN_EPSILON = 1e-3  # MXNet BatchNorm default (official DPN symbols; CB5 eps=0.001)
BN_MOMENTUM = 0.9  # official symbol_basic.py bn_momentum
SE_RATIO = 16  # SENet's reduction ratio; Cheng et al. do not state theirs
FEATURE_LAYER = "conv5_final_relu"  # last feature map (B, H/32, W/32, 2688 for DPN-92), for Grad-CAM
STAGE_NAMES = ("conv2", "conv3", "conv4", "conv5")


@keras.saving.register_keras_serializable(package="covidx")
class DualPathSplit(keras.layers.Layer):
    """Split a 1x1 output along channels into its residual part and its dense part.

    Returns ``[x[..., :residual_channels], x[..., residual_channels:]]`` (the ``slice_axis``
    pair ``split1``/``split2`` of the official ``DualPathFactory``) as one ``tf.split``: its gradient is one
    concatenation of the two parts' gradients, where two slices' gradients are two zero-filled maps of the
    whole width (``StridedSliceGrad``) and their sum (``AddN``). SE-DPN-92's bf16 training step at 128 px,
    batch 16: 1.92 CPU s with the slices, 1.41 with the split (``benchmarks/training_kernels.py --model se-dpn92
    --skip-layers``, 2-core Xeon with AMX).
    """

    def __init__(self, residual_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.residual_channels = int(residual_channels)

    def call(self, x):
        return tf.split(x, [self.residual_channels, x.shape[-1] - self.residual_channels], axis=-1)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        rest = None if channels is None else channels - self.residual_channels
        return [(*input_shape[:-1], self.residual_channels), (*input_shape[:-1], rest)]

    def get_config(self):
        return {**super().get_config(), "residual_channels": self.residual_channels}


@dataclass(frozen=True)
class StageSpec:
    """One stage ``convN``: ``blocks`` dual-path blocks, the first of type ``block_type``."""

    name: str
    blocks: int
    bw: int  # residual-path width
    inc: int  # dense-path increment per block
    r: int  # bottleneck width R of the 1x1-a / grouped 3x3
    block_type: str  # "proj" (stride 1) or "down" (stride 2)

    @property
    def stride(self) -> int:
        return 1 if self.block_type == "proj" else 2

    @property
    def dense_width(self) -> int:
        """Dense-path width at the stage end: ``2*inc`` from the projection + ``inc`` per block."""
        return (self.blocks + 2) * self.inc

    @property
    def out_channels(self) -> int:
        return self.bw + self.dense_width


@dataclass(frozen=True)
class DPNConfig:
    """Hyper-parameters of a DPN (Chen et al. Table 1; official ``symbol_dpn-*.py``).

    Attributes:
        name: variant name.
        stem_filters: filters of the first convolution (``num_init_features``).
        stem_kernel: 7, or 3 for the small DPN-68 stem.
        k_r: ``k_R``; bottleneck width of ``conv2`` (``R = k_R * bw / base_width``).
        groups: ``G``, groups of every 3x3 convolution.
        k_sec: blocks per stage ``conv2``..``conv5``.
        inc_sec: dense-path increment per block in each stage.
        base_width: residual width of ``conv2`` (``64 * bw_factor``; doubled per stage).
    """

    name: str
    stem_filters: int
    stem_kernel: int
    k_r: int
    groups: int
    k_sec: tuple[int, int, int, int]
    inc_sec: tuple[int, int, int, int]
    base_width: int

    @property
    def bw_factor(self) -> float:
        """The references' ``bw_factor`` (4, or 1 for the small DPN-68)."""
        return self.base_width / 64

    def stages(self) -> tuple[StageSpec, ...]:
        out = []
        for s, (name, blocks, inc) in enumerate(zip(STAGE_NAMES, self.k_sec, self.inc_sec)):
            bw = self.base_width * 2**s
            r = self.k_r * bw // self.base_width
            out.append(StageSpec(name, blocks, bw, inc, r, "proj" if s == 0 else "down"))
        return tuple(out)

    @property
    def feature_dim(self) -> int:
        return self.stages()[-1].out_channels

    def scaled(self, width: float) -> "DPNConfig":
        """A reduced-width copy (for tests and quick notebooks; not a paper model).

        Multiplies the stem, ``k_R``, ``G``, the residual and dense widths by ``width``,
        keeping ``k_R`` a multiple of ``G`` so every grouped 3x3 stays valid.
        """
        if width == 1:
            return self
        groups = max(1, round(self.groups * width))
        k_r = max(1, round(self.k_r * width / groups)) * groups
        return dataclasses.replace(
            self,
            name=f"{self.name}_x{round(width * 100)}",  # e.g. dpn92_x25
            stem_filters=max(1, round(self.stem_filters * width)),
            k_r=k_r,
            groups=groups,
            inc_sec=tuple(max(1, round(i * width)) for i in self.inc_sec),
            base_width=max(1, round(self.base_width * width)),
        )


# Official symbol_dpn-{68,92,98,131}.py (identical numbers in CB5 dpn.py and timm dpn.py).
CONFIGS: dict[str, DPNConfig] = {
    "dpn68": DPNConfig("dpn68", 10, 3, 128, 32, (3, 4, 12, 3), (16, 32, 32, 64), 64),
    "dpn92": DPNConfig("dpn92", 64, 7, 96, 32, (3, 4, 20, 3), (16, 32, 24, 128), 256),
    "dpn98": DPNConfig("dpn98", 96, 7, 160, 40, (3, 6, 20, 3), (16, 32, 32, 128), 256),
    "dpn131": DPNConfig("dpn131", 128, 7, 160, 40, (4, 8, 28, 3), (16, 32, 32, 128), 256),
}


def dpn_config(name: str, **overrides) -> DPNConfig:
    """The hyper-parameters of ``name`` ("dpn92" or "se-dpn92" etc.), with optional overrides."""
    key = name.removeprefix("se-")
    if key not in CONFIGS:
        raise ValueError(f"unknown DPN variant {name!r}; choose one of {sorted(CONFIGS)}")
    return dataclasses.replace(CONFIGS[key], **overrides)


def _conv(x, filters: int, kernel: int, stride: int, groups: int, name: str):
    if kernel > 1 and stride > 1:
        # Symmetric padding as in MXNet/PyTorch (Keras "same" pads only bottom/right for even sizes).
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    # Grouped convolutions as GroupedConv2D: Keras' Conv2D runs each through XLA on CPUs, 4-6x slower forward
    # and 300-900x slower backward (covidx/layers/grouped_conv.py); same weights, same outputs.
    conv = GroupedConv2D if groups > 1 else layers.Conv2D
    return conv(
        filters, kernel, strides=stride, padding=padding, groups=groups, use_bias=False,
        kernel_initializer="he_normal", name=f"{name}_conv",
    )(x)


def _bn_relu(x, name: str):
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _bn_relu_conv(x, filters: int, kernel: int, name: str, stride: int = 1, groups: int = 1):
    """Pre-activation unit BN -> ReLU -> conv (no bias), the official ``BN_AC_Conv``."""
    return _conv(_bn_relu(x, name), filters, kernel, stride, groups, name)


def dual_path_block(x, bw: int, inc: int, r: int, groups: int, block_type: str, name: str,
                    se_ratio: int | None = None):
    """One dual-path block (Chen et al. §3, Fig. 2; official ``DualPathFactory``).

    Args:
        x: the stem output (first block of ``conv2``) or a ``(residual, dense)`` pair.
        block_type: "proj" / "down" (first block of a stage, stride 1 / 2) or "normal".
        se_ratio: if set, SE on the residual slice before the sum (see the module docstring).

    Returns:
        The ``(residual, dense)`` pair: ``bw`` and ``dense + inc`` channels.
    """
    x_in = layers.Concatenate(name=f"{name}_input")(list(x)) if isinstance(x, tuple) else x
    if block_type in ("proj", "down"):
        stride = 1 if block_type == "proj" else 2
        w = _bn_relu_conv(x_in, bw + 2 * inc, 1, f"{name}_c1x1_w", stride=stride)
        residual, dense = DualPathSplit(bw, name=f"{name}_c1x1_w_split")(w)
    elif block_type == "normal":
        if not isinstance(x, tuple):
            raise ValueError("a 'normal' dual-path block needs a (residual, dense) input pair")
        stride = 1
        residual, dense = x
    else:
        raise ValueError(f"unknown block type {block_type!r}")

    h = _bn_relu_conv(x_in, r, 1, f"{name}_c1x1_a")
    h = _bn_relu_conv(h, r, 3, f"{name}_c3x3_b", stride=stride, groups=groups)
    h = _bn_relu_conv(h, bw + inc, 1, f"{name}_c1x1_c")
    out_residual, out_dense = DualPathSplit(bw, name=f"{name}_c1x1_c_split")(h)
    if se_ratio:
        out_residual = SqueezeExcite(se_ratio, name=f"{name}_se")(out_residual)
    residual = layers.Add(name=f"{name}_sum")([residual, out_residual])
    dense = layers.Concatenate(name=f"{name}_cat")([dense, out_dense])
    return residual, dense


def dpn_features(x, config: DPNConfig, se_ratio: int | None = None):
    """Stem and the four stages; returns the final ``conv5_final_relu`` feature map."""
    # conv1: symmetric padding, conv stride 2, BN, ReLU, max-pool 3x3/2 (pad 1).
    x = layers.ZeroPadding2D(config.stem_kernel // 2, name="conv1_pad")(x)
    x = layers.Conv2D(
        config.stem_filters, config.stem_kernel, strides=2, use_bias=False,
        kernel_initializer="he_normal", name="conv1_conv",
    )(x)
    x = _bn_relu(x, "conv1")
    x = layers.ZeroPadding2D(1, name="conv1_pool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="conv1_pool")(x)

    for stage in config.stages():
        for i in range(1, stage.blocks + 1):
            x = dual_path_block(
                x, stage.bw, stage.inc, stage.r, config.groups,
                stage.block_type if i == 1 else "normal", f"{stage.name}_{i}", se_ratio,
            )
    x = layers.Concatenate(name="conv5_final_cat")(list(x))
    return _bn_relu(x, "conv5_final")


def build_dpn(
    num_classes: int,
    input_shape: Sequence[int] = (224, 224, 3),
    weights: str | None = None,
    normalization: str = "imagenet",
    variant: str = "dpn92",
    se: bool = False,
    se_ratio: int = SE_RATIO,
    width: float = 1.0,
    k_sec: Sequence[int] | None = None,
    config: DPNConfig | None = None,
    include_top: bool = True,
    pooling: str | None = "avg",
    name: str | None = None,
) -> keras.Model:
    """Build a DPN / SE-DPN classifier on float pixels in [0, 255].

    Args:
        num_classes: classifier outputs (softmax).
        input_shape: ``(H, W, C)``.
        weights: ``None``, a weights file path, or "imagenet" (no Keras DPN weights exist
            locally, so that raises :class:`covidx.weights.WeightsNotFoundError`).
        normalization: :class:`ImageNormalization` mode (ImageNet mean/std as in CB5).
        variant: "dpn68", "dpn92", "dpn98" or "dpn131".
        se: add SqueezeExcite (ratio ``se_ratio``) to every block (SE-DPN).
        width: multiply all widths (reduced copies for tests; 1.0 = the paper model).
        k_sec: blocks per stage, overriding the variant's (reduced copies, e.g. ``(1, 1, 2, 1)``).
        config: an explicit :class:`DPNConfig` (overrides ``variant``).
        include_top: add GAP + Dense softmax; otherwise return features.
        pooling: without top, "avg" gives the GAP vector, ``None`` the feature map.
    """
    config = config or dpn_config(variant)
    if k_sec is not None:
        config = dataclasses.replace(config, k_sec=tuple(k_sec))
    config = config.scaled(width)
    path = resolve_weights(config.name, weights)  # fail before building if weights are missing
    inputs = keras.Input(tuple(input_shape), name="image")
    x = ImageNormalization(normalization, name="normalize")(inputs)
    x = dpn_features(x, config, se_ratio if se else None)
    if include_top or pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    model = keras.Model(inputs, x, name=name or f"{'se_' if se else ''}{config.name}")
    if path is not None:
        model.load_weights(path)
    return model


# Training defaults of Cheng et al. (one protocol for DPN-68/92/131 in their Table 1 and for DPN-SE).
PRESET = Preset(
    task="4class",  # §4.1: COVID-19, normal, bacterial, viral (covidx order: covid19/bacterial/viral/normal)
    image_size=224,  # §3.1, Fig. 1
    channels=3,
    normalization="imagenet",  # CB5 train.py: Normalize(ImageNet mean, std)
    resize="crop",  # §3.1 steps 1-2: short side to 224, then a 224x224 crop
    augment="se-dpn",  # §3.1 step 3: affine flip / rotate / scale
    epochs=100,  # §4.2: "all the network models were trained for 100 epochs"
    optimizer="adam",  # paper silent; CB5 train.py: optim.Adam(lr=0.0001), no weight decay
    learning_rate=1e-4,
    weight_decay=0.0,
    schedule="constant",  # paper silent; CB5 creates CosineAnnealingLR but never steps it
    batch_size=32,  # paper silent (one 1080 Ti, §4.2); CB5's 256 is dpn68 on 4 GPUs
    class_weights=True,  # covidx default for the imbalanced 4-class data
    paper="Cheng et al. 2021, DPN-SENet, arXiv 2105.09683; Chen et al. 2017, Dual Path Networks",
)


def _register(variant: str, se: bool) -> None:
    name = f"{'se-' if se else ''}{variant}"
    what = f"{variant.upper()} with SqueezeExcite (r={SE_RATIO}) on every block's residual slice" if se \
        else f"{variant.upper()} (Chen et al. 2017)"

    def builder(num_classes, input_shape, weights=None, normalization="imagenet", **kwargs):
        return build_dpn(num_classes, input_shape, weights, normalization, **kwargs)

    builder.__name__ = f"build_{name.replace('-', '_')}"
    register_model(name, PRESET, description=what, gradcam_layer=FEATURE_LAYER, variant=variant, se=se)(builder)


for _variant in CONFIGS:
    _register(_variant, se=False)
    _register(_variant, se=True)
