"""VGG19 baselines of Cascade-SEME (Lv et al., Med Phys 2021, §6.A; Table II M1 / M4).

* ``vgg19-base`` (M1 "Base-VGG19"): VGG19 at 224 px with its original classifier,
  flatten (7 x 7 x 512) -> FC 4096 -> FC 4096 -> softmax (Simonyan & Zisserman; the
  ``include_top`` head of ``keras.applications.VGG19``).
* ``vgg19-gap`` (M4 "VGG19" with GAP): 512 px, global average pooling on the last conv
  block replaces flatten + the two FC-4096 layers ("the GAP ... greatly reduces the
  input of the classifier level", §4.C, after Lin et al.'s NIN), then one softmax FC.

The paper adds neither SE nor MoEx to VGG (§4.A: it has no fusion layer). Layout and
layer names follow ``keras.applications.VGG19`` (3x3 convs with bias, 2x2 max-pools);
He-uniform kernels (§5.A). Presets: the cascade's stage-1 data (Dataset1), where the
paper trained VGG19 (§6.A).
"""

from __future__ import annotations

import keras

from covidx.models.registry import register_model
from covidx.models.resnet import KERNEL_INIT, NORMALIZATION, STAGE1, classifier_head, load_weights, normalized_input

VGG19_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))


def build_vgg19(
    num_classes: int,
    input_shape=(512, 512, 1),
    weights=None,
    normalization: str | None = NORMALIZATION,
    head: str = "gap",
    fc_units: int = 4096,
    width: float = 1.0,
    name: str | None = None,
) -> keras.Model:
    """VGG19 classifier: ``head="flatten"`` (FC-4096 x 2 classifier) or ``"gap"`` (GAP -> FC).

    ``width`` scales every conv width (1.0 = VGG19; smaller only for reduced test copies).
    """
    inputs, x = normalized_input(input_shape, normalization)
    for b, (filters, n_convs) in enumerate(VGG19_BLOCKS, start=1):
        for c in range(1, n_convs + 1):
            x = keras.layers.Conv2D(
                max(1, int(filters * width)), 3, padding="same", activation="relu",
                kernel_initializer=KERNEL_INIT, name=f"block{b}_conv{c}",
            )(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{b}_pool")(x)
    # The base network keeps VGG19's FC-4096 x 2 classifier; GAP replaces it (§4.C).
    hidden = (fc_units, fc_units) if head == "flatten" else ()
    outputs = classifier_head(x, num_classes, head, hidden_units=hidden)
    model = keras.Model(inputs, outputs, name=name or f"{head}_vgg19")
    return load_weights(model, "vgg19", weights, input_shape)


register_model(
    "vgg19-base", STAGE1.replace(image_size=224), head="flatten", gradcam_layer="block5_conv4",
    description="Base-VGG19: flatten + FC-4096 x 2 at 224 px (M1)",
)(build_vgg19)
register_model("vgg19-gap", STAGE1, description="VGG19 + GAP at 512 px (M4)", head="gap",
               gradcam_layer="block5_conv4")(build_vgg19)
