"""MAG-SD attention layers (Li et al., "MAG-SD", IEEE JBHI 2021, arXiv 2012.02278, §3.2).

* :class:`MultiscaleAttention` — the multiscale attention generator (§3.2.2, Fig. 3):
  a 1x1 convolution per chosen feature map produces ``M`` attention maps, every branch
  is average-pooled to the grid of the deepest feature map and the branches are summed
  ("downsampled to 7x7 and connected residually").
* :class:`AttentionPooling` — bilinear attention pooling (§3.2.3, Eq. 1, Fig. 4), the
  BAP of WS-DAN (Hu et al. 2019) that MAG-SD reuses, plus the GAP / GMP pooling the
  paper compares it with (Table 6).
"""

from __future__ import annotations

import keras
from keras import ops

from covidx.layers.normalization import FusedBatchNormalization

POOLING_MODES = ("attention", "gap", "gmp")

# PyTorch's default conv/linear init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), which the
# official MAG-SD attention convs and bias-free classifier are left with.
TORCH_DEFAULT_INIT = keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


@keras.saving.register_keras_serializable(package="covidx")
class MultiscaleAttention(keras.layers.Layer):
    """Multiscale attention generator of MA-Net (MAG-SD §3.2.2, Fig. 3).

    Called on a list of feature maps ``[f_deep, f_2, ...]`` (NHWC). The first one fixes
    the output grid (ResNet50 layer4, 7x7 at 224 px); each feature map goes through its
    own branch ``1x1 conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU`` producing
    ``num_maps`` maps (the official code's ``attention_texture`` / ``attention_target``
    blocks and WS-DAN's ``BasicConv2d``), is brought to the deep grid by average pooling
    with a window equal to the size ratio, and the branches are summed.

    The official ``DblAttentionModule`` pools the 14x14 layer3 branch with a 2x2/2
    average pool; for the 28x28 layer2 branch we use the 4x4/4 average pool of the
    official (commented-out) ``TriAttentionModule``. Paper Table 5: 7x7 + 14x14 is best.

    Args:
        num_maps: ``M``, the number of attention maps (32 in the paper).
        epsilon: BatchNorm epsilon (1e-3 as the official code and WS-DAN).
        momentum: BatchNorm moving-average momentum (Keras convention; the official code's torch
            0.1 is 0.9 here, what :func:`~covidx.models.magsd.build_magsd` passes; 0.99 is Keras' default).
    """

    def __init__(self, num_maps: int = 32, epsilon: float = 1e-3, momentum: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        self.num_maps = int(num_maps)
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or not isinstance(input_shape[0], (list, tuple)):
            input_shape = [input_shape]
        target = input_shape[0][1:3]
        self.pool_sizes = []
        for i, shape in enumerate(input_shape):
            h, w = shape[1], shape[2]
            if h is None or w is None or target[0] is None:
                raise ValueError("MultiscaleAttention needs static spatial sizes")
            if h % target[0] or w % target[1]:
                raise ValueError(
                    f"feature map {i} is {h}x{w}, not an integer multiple of the attention grid "
                    f"{target[0]}x{target[1]}; use an input size divisible by 32"
                )
            self.pool_sizes.append((h // target[0], w // target[1]))
        self.convs, self.norms = [], []
        for i, shape in enumerate(input_shape):
            conv = keras.layers.Conv2D(
                self.num_maps, 1, use_bias=False, kernel_initializer=TORCH_DEFAULT_INIT, name=f"branch{i}_conv"
            )
            norm = FusedBatchNormalization(epsilon=self.epsilon, momentum=self.momentum, name=f"branch{i}_bn")
            conv.build(shape)
            norm.build((*shape[:3], self.num_maps))
            self.convs.append(conv)
            self.norms.append(norm)

    def call(self, features, training=None):
        if not isinstance(features, (list, tuple)):
            features = [features]
        out = None
        for f, conv, norm, (ph, pw) in zip(features, self.convs, self.norms, self.pool_sizes):
            a = ops.relu(norm(conv(f), training=training))
            if ph > 1 or pw > 1:  # bring the finer map to the deep grid (paper: "downsampled to 7x7")
                a = ops.average_pool(a, (ph, pw), strides=(ph, pw), padding="valid")
            out = a if out is None else out + a  # residual sum of the scales (Fig. 3, ⊕)
        return out

    def compute_output_shape(self, input_shape):
        if not isinstance(input_shape[0], (list, tuple)):
            input_shape = [input_shape]
        return (*input_shape[0][:3], self.num_maps)

    def get_config(self):
        return {**super().get_config(), "num_maps": self.num_maps, "epsilon": self.epsilon, "momentum": self.momentum}


@keras.saving.register_keras_serializable(package="covidx")
class AttentionPooling(keras.layers.Layer):
    """Bilinear attention pooling (MAG-SD §3.2.3, Eq. 1; WS-DAN BAP) or its GAP/GMP ablations.

    Called on ``[features, attention]`` with features ``(B, H, W, C)`` and attention maps
    ``(B, H, W, M)`` (attention is resized bilinearly if its grid differs).

    ``pool="attention"`` (the paper's method): part features ``PF_j = A_j ⊙ f3`` averaged
    over the ``H*W`` positions give the feature matrix ``(B, M, C)``, flattened to ``M*C``
    (65,536 for M = 32, C = 2048); then, as the official code (and WS-DAN), signed square
    root ``sign(f) * sqrt(|f| + 1e-12)``, one L2 normalisation over the whole ``M*C``
    vector, and a multiplication by ``scale`` = 100 (``self.fc(feature_matrix * 100)`` in
    the official ``res50Encoder``; the paper does not mention it).

    ``pool="gap"`` / ``"gmp"``: plain global average / max pooling of ``features`` to
    ``C`` values, the baselines of Table 6 (the official code's ``fc_bone(GAP/GMP(f3))``);
    the attention input is accepted but not used, so the generator stays in the graph
    (its maps still drive the attention-guided augmentation).
    """

    def __init__(self, pool: str = "attention", scale: float = 100.0, epsilon: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        if pool not in POOLING_MODES:
            raise ValueError(f"unknown pool {pool!r}; choose one of {POOLING_MODES}")
        self.pool = pool
        self.scale = float(scale)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        # float32 even under mixed precision: sqrt(|f| + 1e-12) needs the epsilon (0 in float16,
        # where the gradient of sqrt at 0 is infinite) and the 65,536-d L2 norm needs the range.
        features = ops.cast(inputs[0], "float32")
        attention = ops.cast(inputs[1], "float32")
        if self.pool == "gap":
            return ops.mean(features, axis=(1, 2))
        if self.pool == "gmp":
            return ops.max(features, axis=(1, 2))
        h, w = features.shape[1], features.shape[2]
        if attention.shape[1] != h or attention.shape[2] != w:
            attention = ops.image.resize(attention, (h, w), interpolation="bilinear")
        # feature matrix (B, M, C): mean over positions of A_j * f3 (Eq. 1 + GAP)
        matrix = ops.einsum("bhwm,bhwc->bmc", attention, features) / float(h * w)
        flat = ops.reshape(matrix, (-1, matrix.shape[1] * matrix.shape[2]))
        flat = ops.sign(flat) * ops.sqrt(ops.abs(flat) + self.epsilon)
        norm = ops.sqrt(ops.sum(ops.square(flat), axis=-1, keepdims=True))
        # F.normalize divides by max(norm, 1e-12)
        return flat / ops.maximum(norm, 1e-12) * self.scale

    def compute_output_shape(self, input_shape):
        f_shape, a_shape = input_shape
        if self.pool == "attention":
            return (f_shape[0], a_shape[-1] * f_shape[-1])
        return (f_shape[0], f_shape[-1])

    def get_config(self):
        return {**super().get_config(), "pool": self.pool, "scale": self.scale, "epsilon": self.epsilon}
