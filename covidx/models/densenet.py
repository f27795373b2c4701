"""DenseNet169 family of Cascade-SEME (Lv et al., Med Phys 2021; arXiv 2005.01468).

Variants (Tables II / III of the journal paper):

=====================  =======  ===  ====  ==================================================
name                   head     SE   MoEx  paper
=====================  =======  ===  ====  ==================================================
``densenet169-base``   flatten   -    -    M3 "Base-DenseNet169" (224 px, flatten + FC)
``densenet169-gap``    GAP       -    -    M6 "DenseNet169" with GAP at 512 px (§6.A.2)
``se-densenet169``     GAP       x    -    M8 "SE-DenseNet169" (§4.B)
``moex-densenet169``   GAP       -    x    M12 "MoEx-DenseNet169" (§6.B)
``seme-densenet169``   GAP       x    x    M10/M14 "SEME-DenseNet169", the cascade's stage 2
=====================  =======  ===  ====  ==================================================

Architecture (Med Phys 2021 §4.B; layout and layer names of ``keras.applications.DenseNet169``):
7x7/2 stem conv (64, no bias) -> BN -> ReLU -> 3x3/2 max-pool; dense blocks of (6, 12, 32, 32)
BN-ReLU-1x1 conv (bn_size 4 x growth 32) -> BN-ReLU-3x3 conv (growth 32) layers whose outputs
are concatenated; transitions BN-ReLU-1x1 conv (compression 0.5)-2x2 average pool; final
BN -> ReLU; channels 64 -> 256 -> 128 -> 512 -> 256 -> 1280 -> 640 -> 1664. He-uniform
kernels (§5.A), BN epsilon 1.001e-5, no conv biases (as keras/torch DenseNet). With GAP and a
1000-way head the count equals ``keras.applications.DenseNet169(weights=None)`` (14,307,880).

SE placement. The paper puts SE "between the fusion layers" of the network (§4.B, preprint
Fig. 6c) but no code defines it for DenseNet. Here SE (r = 16) rescales **each dense block's
output**, the concatenation of all the block's feature maps, just before the transition (and
before the final BN for the last block). Reasons: (1) the block output is DenseNet's fusion
of all features of a resolution, the analogue of SE-ResNet's SE before the residual
addition; (2) the excitation sees 256 / 512 / 1280 / 1664 channels, whereas SE on each dense
layer's 32 new maps would be a degenerate 32 -> 2 -> 32 gate; (3) it costs +595,816
parameters (+4 %), against +8.9 M (+63 %) for an SE on the growing concatenation after
every dense layer. The preprint notes that SE barely sped DenseNet169's
convergence "because of the large number of channel fusions" (§4.1), consistent with an SE
on the fused block outputs.

MoEx sits after the stem max-pool (the official ``moex_layer="pool0"`` of
``run_moex_densenet.sh``).
"""

from __future__ import annotations

from typing import Sequence

import keras

from covidx.layers import SqueezeExcite
from covidx.models.registry import register_model
from covidx.models.resnet import (
    BN_EPSILON,
    BN_MOMENTUM,
    KERNEL_INIT,
    NORMALIZATION,
    STAGE2,
    STAGE2_MOEX,
    classifier_head,
    load_weights,
    moment_exchange,
    normalized_input,
)


def _bn_relu(x, name: str):
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def _conv(x, filters: int, kernel: int, name: str):
    return keras.layers.Conv2D(
        filters, kernel, padding="same", use_bias=False, kernel_initializer=KERNEL_INIT, name=name
    )(x)


def dense_layer(x, growth_rate: int, bn_size: int, name: str):
    """BN-ReLU-1x1 (bn_size*k) -> BN-ReLU-3x3 (k), concatenated to the input."""
    y = _bn_relu(x, f"{name}_0")
    y = _conv(y, bn_size * growth_rate, 1, f"{name}_1_conv")
    y = _bn_relu(y, f"{name}_1")
    y = _conv(y, growth_rate, 3, f"{name}_2_conv")
    return keras.layers.Concatenate(name=f"{name}_concat")([x, y])


def dense_block(x, n_layers: int, growth_rate: int, bn_size: int, se: bool, se_ratio: int, name: str):
    for i in range(n_layers):
        x = dense_layer(x, growth_rate, bn_size, f"{name}_block{i + 1}")
    if se:
        x = SqueezeExcite(se_ratio, kernel_initializer=KERNEL_INIT, name=f"{name}_se")(x)
    return x


def transition(x, compression: float, name: str):
    """BN-ReLU-1x1 conv (channels x compression) -> 2x2 average pool."""
    x = _bn_relu(x, name)
    x = _conv(x, int(x.shape[-1] * compression), 1, f"{name}_conv")
    return keras.layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)


def build_densenet169(
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
    blocks: Sequence[int] = (6, 12, 32, 32),
    growth_rate: int = 32,
    init_filters: int = 64,
    bn_size: int = 4,
    compression: float = 0.5,
    name: str | None = None,
) -> keras.Model:
    """DenseNet169 / SE- / MoEx- / SEME-DenseNet169 classifier (softmax output).

    Args are those of :func:`covidx.models.resnet.build_resnet50`; ``blocks``,
    ``growth_rate``, ``init_filters``, ``bn_size`` and ``compression`` default to
    DenseNet169 (smaller values only make reduced test copies).
    """
    inputs, x = normalized_input(input_shape, normalization)
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = keras.layers.Conv2D(
        init_filters, 7, strides=2, use_bias=False, kernel_initializer=KERNEL_INIT, name="conv1_conv"
    )(x)
    x = _bn_relu(x, "conv1")
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = moment_exchange(x, moex, moex_prob, moex_lambda, moex_seed)
    for i, n_layers in enumerate(blocks):
        x = dense_block(x, n_layers, growth_rate, bn_size, se, se_ratio, f"conv{i + 2}")
        if i < len(blocks) - 1:
            x = transition(x, compression, f"pool{i + 2}")
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name="bn")(x)
    x = keras.layers.Activation("relu", name="relu")(x)
    outputs = classifier_head(x, num_classes, head)
    default = ("seme" if moex else "se") if se else ("moex" if moex else head)
    model = keras.Model(inputs, outputs, name=name or f"{default}_densenet169")
    return load_weights(model, "densenet169", weights, input_shape)


# Stage-2 presets (task "stage2", the cascade's fine-grained step, §4); the MoEx variants
# train with Regional Learning (§5.A, §6.B.2). STAGE2 / STAGE2_MOEX are documented in resnet.py.
_VARIANTS = {
    "densenet169-base": (dict(head="flatten"), STAGE2.replace(image_size=224), "Base-DenseNet169, 224 px (M3)"),
    "densenet169-gap": (dict(), STAGE2, "DenseNet169 + GAP at 512 px (M6)"),
    "se-densenet169": (dict(se=True), STAGE2, "SE-DenseNet169 (SE on every dense-block output) + GAP (M8)"),
    "moex-densenet169": (dict(moex=True), STAGE2_MOEX, "MoEx-DenseNet169 + GAP, Regional Learning (M12)"),
    "seme-densenet169": (dict(se=True, moex=True), STAGE2_MOEX, "SEME-DenseNet169, Cascade-SEME stage 2 (M10/M14)"),
}
for _name, (_kwargs, _preset, _description) in _VARIANTS.items():
    register_model(_name, _preset, description=_description, gradcam_layer="relu", **_kwargs)(build_densenet169)
