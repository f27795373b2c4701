"""MA-Net, the network of MAG-SD (Li et al., IEEE JBHI 2021, arXiv 2012.02278, §3.2, Figs. 1-4).

ResNet50 encoder -> multiscale attention generator (:class:`~covidx.layers.attention.MultiscaleAttention`)
-> bilinear attention pooling (:class:`~covidx.layers.attention.AttentionPooling`) -> bias-free
linear classifier -> softmax. Training with attention-guided augmentation and the soft-distance
loss is :class:`covidx.training.magsd.MagSDTrainer` (trainer ``"magsd"``).

Encoder: ``keras.applications.ResNet50`` built on the outer input tensor (flat graph, so Grad-CAM
reaches every layer). Feature maps (paper §4.1: "attention was extracted from the output of layer2,
layer3 and layer4"): ``conv3_block4_out`` (layer2, 512 x 28 x 28), ``conv4_block6_out`` (layer3,
1024 x 14 x 14) and ``conv5_block3_out`` (layer4 = f3, 2048 x 7 x 7; pooled by attention).

Outputs. The saved network is a plain classifier: ``net(images)`` returns the softmax probabilities
``(B, classes)`` of layer ``"predictions"`` (first and only output), so evaluation, ``predict``,
Grad-CAM and the TF Serving export treat it like every other covidx classifier. The attention maps
are the output of layer ``"attention_maps"`` ``(B, h, w, M)`` (7x7xM at 224 px);
:func:`attention_view` returns a weight-sharing model with outputs
``{"predictions": ..., "attention_maps": ...}`` (what the trainer and localisation use).
``build_magsd(..., with_attention=True)`` builds the network with those two named outputs directly.

Differences from the official code (StonHamA/MAG-SD core/model.py), all stated in the report:
Keras' ResNet50 convolutions carry biases (26,560 more trainable parameters than torchvision's) and
stride the first 1x1 conv of a stage rather than the 3x3 (ResNet v1 vs torchvision's v1.5).
"""

from __future__ import annotations

import keras

from covidx.layers.attention import TORCH_DEFAULT_INIT, AttentionPooling, MultiscaleAttention
from covidx.layers.normalization import TORCH_BN_MOMENTUM, ImageNormalization, track_batch_statistics
from covidx.models.registry import Preset, register_model
from covidx.weights import resolve_weights

PREDICTIONS = "predictions"
ATTENTION_MAPS = "attention_maps"
# f3 (layer4), layer3, layer2 of ResNet50 in keras.applications names; ``scales`` takes the first n.
FEATURE_LAYERS = ("conv5_block3_out", "conv4_block6_out", "conv3_block4_out")
FIRST_CONV = "conv1_conv"


def _load_backbone_weights(net: keras.Model, path: str, input_shape) -> None:
    """Copy ResNet50 weights from ``path`` into ``net``'s encoder layers (matched by layer name).

    The file holds a 3-channel ResNet50 (keras.applications no-top layout). With a 1-channel
    input the first convolution cannot take them and keeps its fresh initialisation, as the
    official code replaces ``resnet.conv1`` by a new 1-input-channel conv after loading ImageNet.
    """
    donor = keras.applications.ResNet50(include_top=False, weights=path, input_shape=(*input_shape[:2], 3))
    for layer in donor.layers:
        if not layer.weights or (layer.name == FIRST_CONV and input_shape[-1] != 3):
            continue
        net.get_layer(layer.name).set_weights(layer.get_weights())


def build_magsd(
    num_classes: int = 4,
    input_shape=(224, 224, 1),
    weights=None,
    normalization: str = "zscore",
    num_maps: int = 32,
    scales: int = 2,
    pooling: str = "attention",
    with_attention: bool = False,
    name: str = "mag_sd",
) -> keras.Model:
    """Build MA-Net.

    Args:
        num_classes: classifier outputs (4 for the ``4class`` task, the official default).
        input_shape: ``(H, W, C)``; 224x224x1 in the paper and code; ``H, W`` divisible by 32.
        weights: ``None``, ``"imagenet"`` or a path to keras.applications ResNet50 no-top weights
            (via :func:`covidx.weights.resolve_weights`); the first conv stays fresh with 1 channel.
        normalization: :class:`ImageNormalization` mode; ``"zscore"`` as the paper (§4.2).
        num_maps: number of attention maps ``M`` (32, §3.2.2).
        scales: feature maps feeding the attention generator: 1 = 7x7, 2 = 7x7 + 14x14 (the paper's
            best and the official code), 3 = 7x7 + 14x14 + 28x28 (Table 5).
        pooling: ``"attention"`` (bilinear attention pooling), ``"gap"`` or ``"gmp"`` (Table 6).
        with_attention: output ``{"predictions", "attention_maps"}`` instead of the probabilities only.

    At the defaults: 23,942,144 parameters = 23,888,896 trainable + 53,248 BN moving statistics;
    the official torch model has 23,862,336 trainable, the difference being the 26,560 biases of
    the keras.applications ResNet50 convolutions. The pooled feature is 32 x 2048 = 65,536-d.
    """
    if scales not in (1, 2, 3):
        raise ValueError(f"scales must be 1, 2 or 3, got {scales}")
    path = resolve_weights("resnet50", weights)
    inputs = keras.Input(input_shape, name="image")
    x = ImageNormalization(normalization, name="normalize")(inputs)
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=x)
    # The official code is PyTorch: BN momentum 0.1 (Keras 0.9) in the encoder and the attention branches;
    # keras.applications' 0.99 left short runs' validation at chance (covidx.layers.normalization).
    track_batch_statistics(backbone.layers)
    features = [backbone.get_layer(n).output for n in FEATURE_LAYERS[:scales]]
    net = assemble_ma_net(inputs, features, num_classes, num_maps, pooling, with_attention, name)
    if path is not None:
        _load_backbone_weights(net, path, input_shape)
    return net


def assemble_ma_net(
    inputs,
    features: list,
    num_classes: int,
    num_maps: int = 32,
    pooling: str = "attention",
    with_attention: bool = False,
    name: str = "mag_sd",
) -> keras.Model:
    """MA-Net head on an encoder's feature maps ``[f3, f2, f1]`` (deepest first; f3 is pooled).

    Attention generator ``"attention_maps"`` -> pooling ``"attention_pooling"`` -> classifier
    ``"predictions"`` (softmax, float32). :func:`build_magsd` calls it with ResNet50's layer4/3/2.
    """
    attention = MultiscaleAttention(num_maps, momentum=TORCH_BN_MOMENTUM, name=ATTENTION_MAPS)(features)
    pooled = AttentionPooling(pooling, name="attention_pooling")([features[0], attention])
    # The official classifier is bias-free on the BAP features; its GAP/GMP ablation head
    # (``fc_bone``) has a bias.
    probs = keras.layers.Dense(
        num_classes,
        activation="softmax",
        use_bias=pooling != "attention",
        kernel_initializer=TORCH_DEFAULT_INIT,
        name=PREDICTIONS,
        dtype="float32",
    )(pooled)
    outputs = {PREDICTIONS: probs, ATTENTION_MAPS: attention} if with_attention else probs
    return keras.Model(inputs, outputs, name=name)


def attention_view(net: keras.Model) -> keras.Model:
    """A model sharing ``net``'s weights with outputs ``{"predictions", "attention_maps"}``.

    Works on a freshly built or a reloaded MA-Net (the layers are found by name).
    """
    return keras.Model(
        net.input,
        {PREDICTIONS: net.get_layer(PREDICTIONS).output, ATTENTION_MAPS: net.get_layer(ATTENTION_MAPS).output},
        name=f"{net.name}_attention_view",
    )


@register_model(
    "mag-sd",
    Preset(
        task="4class",  # Dataset C / the official code's 4 classes (COVID-19, viral, bacterial, healthy)
        image_size=224,  # §4.1 "resized to 224*224"
        channels=1,  # official code: 1-channel conv1
        normalization="zscore",  # §4.2 Z-score normalisation
        resize="stretch",  # official loader: cv2.resize to 224x224
        batch_size=32,  # §4.1 (code: 16)
        epochs=100,  # §4.1 (code: 150 "steps")
        optimizer="sgd",  # §4.1 SGD, momentum 0.9
        learning_rate=1e-3,  # §4.1
        momentum=0.9,
        nesterov=False,  # paper silent; the code uses Nesterov
        weight_decay=1e-6,  # §4.1 (code: 5e-4)
        schedule="step",  # paper silent ("1e-3 at beginning"); covidx step: x0.1 at 50%, 75% (code: 50%, 83%)
        augment="mag-sd",  # Table 2: brightness, contrast, resized crop, rotation, flips
        clahe_prob=1.0,  # §4.2 CLAHE on every image (official loader: clip 4, 4x4 tiles)
        clahe_inference=True,
        clahe_clip=4.0,
        clahe_grid=4,
        class_weights=False,  # plain cross-entropy in the paper and code
        trainer="magsd",  # attention-guided augmentation + soft-distance loss (§3.3, §3.4)
        weights="none",  # the paper starts from ImageNet ResNet50: pass weights="imagenet" when the file is present
        paper="Li et al., MAG-SD, IEEE JBHI 2021 (arXiv 2012.02278)",
    ),
    description="MA-Net: ResNet50 + multiscale attention + bilinear attention pooling (MAG-SD)",
    gradcam_layer="conv5_block3_out",
)
def mag_sd(num_classes, input_shape, weights=None, normalization="zscore", **kwargs):
    return build_magsd(num_classes, input_shape, weights=weights, normalization=normalization, **kwargs)
