"""FC-DenseNet ("One Hundred Layers Tiramisu"), the lesion segmenter of the concatenated-ensemble paper.

Reference:
    Jégou, Drozdzal, Vazquez, Romero, Bengio, "The One Hundred Layers Tiramisu: Fully
    Convolutional DenseNets for Semantic Segmentation", CVPRW 2017 (arXiv 1611.09326);
    official Theano/Lasagne code SimJeg/FC-DenseNet. Used as "U-Net architecture based
    DenseNet103" for COVID-19 / pneumonia lesion masks in the ensemble paper (Sec. III-C,
    Table II).

Structure (Tiramisu Sec. 3, Table 1 and Fig. 1):

* first layer: 3x3 conv, 48 filters, bias, linear;
* dense layer: BN -> ReLU -> 3x3 conv (``growth_rate`` filters, bias) -> dropout 0.2;
* down path: dense block whose new maps are appended to the running stack; the stack is
  kept as the skip, then transition down = BN -> ReLU -> 1x1 conv (m -> m) -> dropout ->
  2x2 max-pool;
* bottleneck dense block: only its new maps go up (its input is not re-upsampled);
* transition up: 3x3 stride-2 transposed conv on the previous block's new maps only
  (``growth_rate x layers`` filters), concatenated with the skip;
* up path dense blocks: new maps are stacked, only the new maps go to the next transition up;
* head: 1x1 conv (bias) -> per-pixel softmax.

FC-DenseNet103 stack sizes (m): 48, 112, 192, 304, 464, 656 | 896 | 1088, 816, 576, 384, 256;
103 convolutions = 1 + 38 + 5 (TD) + 15 + 5 (TU) + 38 + 1.
"""

from __future__ import annotations

from typing import Sequence

import keras

from covidx.layers import ImageNormalization
from covidx.models.registry import Preset, register_model
from covidx.weights import resolve_weights

# Lasagne BatchNormLayer defaults used by the official code: epsilon 1e-4 and moving
# average rate alpha 0.1, i.e. Keras momentum 0.9.
BN_EPSILON = 1e-4
BN_MOMENTUM = 0.9
# Lasagne HeUniform(gain="relu") = U(+-sqrt(6 / fan_in)) = Keras "he_uniform".
KERNEL_INIT = "he_uniform"

# Tiramisu paper Table 2 / Sec. 4: the three published configurations (n_pool = 5).
FC_DENSENET_CONFIGS: dict[str, dict] = {
    "fc-densenet56": {"layers_per_block": 4, "growth_rate": 12},
    "fc-densenet67": {"layers_per_block": 5, "growth_rate": 16},
    "fc-densenet103": {"layers_per_block": (4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4), "growth_rate": 16},
}


def _expand_layers_per_block(layers_per_block: int | Sequence[int], n_pool: int) -> list[int]:
    if isinstance(layers_per_block, int):
        return [layers_per_block] * (2 * n_pool + 1)
    layers = [int(n) for n in layers_per_block]
    if len(layers) != 2 * n_pool + 1:
        raise ValueError(
            f"layers_per_block needs 2 * n_pool + 1 = {2 * n_pool + 1} entries "
            f"(down, bottleneck, up), got {len(layers)}"
        )
    return layers


def _bn_relu_conv(x, filters: int, kernel_size: int, dropout: float, name: str, bn_kwargs: dict):
    """BN -> ReLU -> conv (bias, same padding) -> dropout: the Tiramisu composite layer (Sec. 3.1)."""
    x = keras.layers.BatchNormalization(name=f"{name}_bn", **bn_kwargs)(x)
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = keras.layers.Conv2D(
        filters, kernel_size, padding="same", kernel_initializer=KERNEL_INIT, name=f"{name}_conv"
    )(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}_drop")(x)
    return x


def _dense_block(stack, num_layers: int, growth_rate: int, dropout: float, name: str, bn_kwargs: dict):
    """Dense block (Tiramisu Fig. 2): each layer sees the running stack and adds ``growth_rate`` maps.

    Returns ``(stack, new_maps)``: the stack with every new layer appended and the
    concatenation of the new layers alone (what the up path upsamples).
    """
    new_maps = []
    for j in range(1, num_layers + 1):
        layer = _bn_relu_conv(stack, growth_rate, 3, dropout, f"{name}_l{j}", bn_kwargs)
        new_maps.append(layer)
        stack = keras.layers.Concatenate(name=f"{name}_l{j}_concat")([stack, layer])
    new = new_maps[0] if len(new_maps) == 1 else keras.layers.Concatenate(name=f"{name}_new")(new_maps)
    return stack, new


def build_fc_densenet(
    num_classes: int,
    input_shape,
    layers_per_block: int | Sequence[int] = FC_DENSENET_CONFIGS["fc-densenet103"]["layers_per_block"],
    growth_rate: int = 16,
    first_filters: int = 48,
    dropout: float = 0.2,
    n_pool: int = 5,
    normalization: str = "unit",
    weights=None,
    bn_epsilon: float = BN_EPSILON,
    bn_momentum: float = BN_MOMENTUM,
    name: str = "fc_densenet",
) -> keras.Model:
    """Fully convolutional DenseNet (Jégou et al. 2017, Sec. 3) with a per-pixel softmax head.

    Args:
        num_classes: output classes per pixel.
        input_shape: ``(H, W, C)``; ``H`` and ``W`` may be ``None`` (any size divisible by
            ``2 ** n_pool`` at run time), otherwise they must be divisible by ``2 ** n_pool``.
        layers_per_block: an int (all blocks) or ``2 * n_pool + 1`` ints (down blocks,
            bottleneck, up blocks).
        growth_rate: new maps per dense layer (k).
        first_filters: filters of the first 3x3 convolution.
        dropout: dropout rate after every 3x3 dense-layer conv and transition-down conv.
        n_pool: number of transitions down (= transitions up).
        normalization: :class:`ImageNormalization` mode. ``"unit"`` (x / 255): the network is
            trained from scratch and the first conv is linear and followed by BN, so only the
            input range matters; [0, 1] keeps the He-initialised first conv at unit scale.
        weights: ``None`` or a path to a weights file of this exact configuration.
        bn_epsilon, bn_momentum: BatchNorm settings (Lasagne defaults of the official code).

    Returns:
        A functional model mapping ``(B, H, W, C)`` pixels in [0, 255] to ``(B, H, W, num_classes)``
        softmax probabilities (float32).
    """
    layers = _expand_layers_per_block(layers_per_block, n_pool)
    factor = 2**n_pool
    for dim in input_shape[:2]:
        if dim is not None and dim % factor:
            raise ValueError(
                f"FC-DenseNet with {n_pool} poolings needs height and width divisible by {factor}, "
                f"got {tuple(input_shape[:2])}"
            )
    bn_kwargs = {"epsilon": bn_epsilon, "momentum": bn_momentum}

    inputs = keras.Input(input_shape, name="image")
    x = ImageNormalization(normalization, name="normalize")(inputs)
    # First convolution: linear, no BN/ReLU before it (official FC-DenseNet.py).
    stack = keras.layers.Conv2D(
        first_filters, 3, padding="same", kernel_initializer=KERNEL_INIT, name="first_conv"
    )(x)

    # Down path: dense block, keep the stack as skip, transition down (Sec. 3.2).
    skips = []
    for i in range(n_pool):
        stack, _ = _dense_block(stack, layers[i], growth_rate, dropout, f"down{i + 1}", bn_kwargs)
        skips.append(stack)
        channels = stack.shape[-1]
        td = _bn_relu_conv(stack, channels, 1, dropout, f"td{i + 1}", bn_kwargs)
        stack = keras.layers.MaxPooling2D(2, name=f"td{i + 1}_pool")(td)

    # Bottleneck: only its new maps are upsampled, which keeps the up path affordable.
    _, new = _dense_block(stack, layers[n_pool], growth_rate, dropout, "bottleneck", bn_kwargs)

    # Up path. 'same' padding gives 2n outputs directly; Lasagne's crop='valid' output
    # (2n+1) centre-cropped to 2n keeps the same rows, so the maps coincide.
    for i in range(n_pool):
        upsampled = keras.layers.Conv2DTranspose(
            growth_rate * layers[n_pool + i],
            3,
            strides=2,
            padding="same",
            kernel_initializer=KERNEL_INIT,
            name=f"tu{i + 1}_deconv",
        )(new)
        stack = keras.layers.Concatenate(name=f"tu{i + 1}_concat")([upsampled, skips[-(i + 1)]])
        stack, new = _dense_block(stack, layers[n_pool + i + 1], growth_rate, dropout, f"up{i + 1}", bn_kwargs)

    # Head: 1x1 conv on the whole last stack, per-pixel softmax in float32 (mixed precision).
    logits = keras.layers.Conv2D(num_classes, 1, kernel_initializer=KERNEL_INIT, name="logits")(stack)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="predictions")(logits)
    model = keras.Model(inputs, outputs, name=name)

    path = resolve_weights(name, weights)
    if path is not None:
        model.load_weights(path)
    return model


def _fc_densenet_builder(config: str):
    def builder(num_classes, input_shape, weights=None, normalization="unit", **kwargs):
        args = {**FC_DENSENET_CONFIGS[config], "name": config.replace("-", "_"), **kwargs}
        return build_fc_densenet(num_classes, input_shape, weights=weights, normalization=normalization, **args)

    builder.__name__ = config.replace("-", "_")
    builder.__doc__ = f"{config} (Tiramisu Table 2); see :func:`build_fc_densenet`."
    return builder


fc_densenet56 = _fc_densenet_builder("fc-densenet56")
fc_densenet67 = _fc_densenet_builder("fc-densenet67")
fc_densenet103 = _fc_densenet_builder("fc-densenet103")

register_model(
    "fc-densenet103",
    Preset(
        task="lesions",  # ensemble paper Sec. III-C: COVID-19 / pneumonia affected regions
        # Images are "resized to specific size" (Sec. IV-B, size not given); 224 is the
        # Tiramisu training crop. Grayscale X-rays: 1 channel (3 also supported).
        image_size=224,
        channels=1,
        normalization="unit",
        # Table II, segmentation model: lr 1e-4, batch 30, 40 epochs. The optimiser is not
        # named; Adam (Keras, as in the paper) at the paper's lr. No schedule is mentioned.
        optimizer="adam",
        learning_rate=1e-4,
        batch_size=30,
        epochs=40,
        schedule="constant",
        augment="none",  # none described for segmentation
        class_weights=False,  # Table II class weights belong to the classifier
        trainer="standard",
        weights="none",
        paper="Ensemble DenseNet103-U-Net (Sec. III-C, Table II); Jégou et al. 2017 (FC-DenseNet103)",
    ),
    kind="segmenter",
    description="FC-DenseNet103 (One Hundred Layers Tiramisu) lesion segmenter, per-pixel softmax",
)(fc_densenet103)
