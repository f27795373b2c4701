"""Lung-field U-Net of Cascade-SEMEnet (Regional Learning masks).

Reference:
    Lv, Lu, Wang et al., "Cascade-SEMEnet..." (Med Phys 2021, Sec. 5.A and 6.B.2; arXiv
    2005.01468, Sec. 3.2.3): "U-Net is an improvement based on the VGG network. The images go
    through each convolution layer of the VGG to obtain the feature map. Then transposed
    convolution is used to the feature map and the pixel-level classification is carried out
    in the last layer." Trained with Adam and cosine annealing (eta_max 0.1, eta_min 1e-8),
    He-uniform initialisation, no ImageNet weights; evaluated by mean IoU.
    Ronneberger, Fischer, Brox, "U-Net", MICCAI 2015 (the paper's ref. [8]).

The paper gives no layer table, so the network is Ronneberger's U-Net with the two
choices that current lung-mask U-Nets make (e.g. IlliaOvcharenko/lung-segmentation):
BatchNorm after every 3x3 conv and 'same' padding (output size = input size, no cropping).

* encoder: blocks of two (3x3 conv -> BN -> ReLU), widths 64, 128, 256, 512, 2x2 max-pool
  after each; centre block 1024;
* decoder: 2x2 stride-2 transposed conv halving the channels (1024 -> 512, ...; Ronneberger's
  "up-convolution"), concatenation with the encoder skip, two (3x3 conv -> BN -> ReLU);
* head: 1x1 conv to the classes -> per-pixel softmax.

Parameter count (1 channel, 2 classes): 31,042,434 trainable + 11,776 BN statistics, the
size of Ronneberger's U-Net (31.0M) plus BN. A common vanilla lung U-Net
(21,986,434 parameters) is smaller because it upsamples by interpolation (no weights; the four
transposed convolutions here hold 2,786,240), its centre block narrows back to 512 (1024 -> 512
instead of 1024 -> 1024: 4.7M fewer) and each decoder block halves its width in its second conv
(1024 -> 512 -> 256, ...) where Ronneberger keeps it (1024 -> 512 -> 512, ...).
"""

from __future__ import annotations

import keras

from covidx.layers import ImageNormalization
from covidx.models.registry import Preset, register_model
from covidx.weights import resolve_weights

# BatchNorm as in the PyTorch lung U-Net reference (torch defaults: eps 1e-5, momentum 0.1,
# i.e. Keras momentum 0.9); the paper does not state them.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
# Paper Sec. 5.A: W ~ U(-sqrt(6 / n_in), sqrt(6 / n_in)) for every convolution.
KERNEL_INIT = "he_uniform"


def _conv_block(x, filters: int, name: str, bn_kwargs: dict):
    """Two VGG-style 3x3 conv -> BN -> ReLU units (Ronneberger Sec. 2, with BN)."""
    for j in (1, 2):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", kernel_initializer=KERNEL_INIT, name=f"{name}_conv{j}"
        )(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn{j}", **bn_kwargs)(x)
        x = keras.layers.ReLU(name=f"{name}_relu{j}")(x)
    return x


def build_unet(
    num_classes: int,
    input_shape,
    base_filters: int = 64,
    depth: int = 4,
    normalization: str = "unit",
    weights=None,
    bn_epsilon: float = BN_EPSILON,
    bn_momentum: float = BN_MOMENTUM,
    name: str = "lung_unet",
) -> keras.Model:
    """U-Net with VGG-style encoder and transposed-convolution decoder.

    Args:
        num_classes: output classes per pixel (2 for lung / background).
        input_shape: ``(H, W, C)``; ``H`` and ``W`` may be ``None``, otherwise divisible by ``2 ** depth``.
        base_filters: width of the first block; block ``i`` has ``base_filters * 2**i`` filters
            (64 -> 64, 128, 256, 512, centre 1024).
        depth: number of poolings (= decoder stages).
        normalization: :class:`ImageNormalization` mode; ``"unit"`` (x / 255), the network is
            trained from scratch and BN follows the first conv.
        weights: ``None`` or a path to a weights file of this exact configuration.

    Returns:
        A functional model mapping ``(B, H, W, C)`` pixels in [0, 255] to ``(B, H, W, num_classes)``
        softmax probabilities (float32).
    """
    factor = 2**depth
    for dim in input_shape[:2]:
        if dim is not None and dim % factor:
            raise ValueError(
                f"U-Net of depth {depth} needs height and width divisible by {factor}, got {tuple(input_shape[:2])}"
            )
    bn_kwargs = {"epsilon": bn_epsilon, "momentum": bn_momentum}

    inputs = keras.Input(input_shape, name="image")
    x = ImageNormalization(normalization, name="normalize")(inputs)
    skips = []
    for i in range(depth):
        x = _conv_block(x, base_filters * 2**i, f"enc{i + 1}", bn_kwargs)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"enc{i + 1}_pool")(x)
    x = _conv_block(x, base_filters * 2**depth, "centre", bn_kwargs)

    for i in range(depth):
        filters = base_filters * 2 ** (depth - 1 - i)
        x = keras.layers.Conv2DTranspose(
            filters, 2, strides=2, padding="same", kernel_initializer=KERNEL_INIT, name=f"dec{i + 1}_upconv"
        )(x)
        x = keras.layers.Concatenate(name=f"dec{i + 1}_concat")([skips[-(i + 1)], x])
        x = _conv_block(x, filters, f"dec{i + 1}", bn_kwargs)

    logits = keras.layers.Conv2D(num_classes, 1, kernel_initializer=KERNEL_INIT, name="logits")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="predictions")(logits)
    model = keras.Model(inputs, outputs, name=name)

    path = resolve_weights(name, weights)
    if path is not None:
        model.load_weights(path)
    return model


@register_model(
    "lung-unet",
    Preset(
        task="lungs",
        # Not stated in the paper (its classifiers run at 512 x 512); 512 and batch 4 follow the
        # lung U-Net reference (IlliaOvcharenko/lung-segmentation readme), ~50 epochs there too.
        image_size=512,
        channels=1,
        normalization="unit",
        batch_size=4,
        epochs=50,
        # Sec. 5.A: Adam + cosine annealing, eta_max = 0.1, eta_min = 1e-8 (as printed; 0.1 is
        # high for Adam, BN keeps it trainable; lower learning_rate if training diverges).
        optimizer="adam",
        learning_rate=0.1,
        min_learning_rate=1e-8,
        schedule="cosine",
        augment="none",
        class_weights=False,
        trainer="standard",
        weights="none",  # Sec. 5.A: no ImageNet weights, He-uniform init
        paper="Cascade-SEMEnet (Med Phys 2021, Sec. 5.A, 6.B.2; arXiv 2005.01468 Sec. 3.2.3)",
    ),
    kind="segmenter",
    description="VGG-style U-Net with transposed-conv decoder for lung fields (Cascade-SEMEnet)",
)
def lung_unet(num_classes, input_shape, weights=None, normalization="unit", **kwargs):
    """The Cascade-SEMEnet lung U-Net; see :func:`build_unet`."""
    return build_unet(num_classes, input_shape, weights=weights, normalization=normalization, **kwargs)
