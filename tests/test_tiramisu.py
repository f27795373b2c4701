"""FC-DenseNet103 (Tiramisu): structure, counts, shapes, training and save/reload."""

import keras
import numpy as np
import pytest

from covidx.models import tiramisu
from covidx.models.registry import create_model, get_spec
from covidx.training.segmentation import DiceCoefficient, DiceCrossEntropyLoss
from tests.helpers import blobs


def _param_counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, frozen


@pytest.fixture(scope="module")
def fcd103_rgb():
    """The paper's counting configuration: 3-channel input, 11 classes (CamVid), 224 x 224."""
    return tiramisu.fc_densenet103(11, (224, 224, 3))


@pytest.fixture(scope="module")
def fcd103_gray():
    """The covidx configuration: 1-channel X-rays, 2 classes, any size divisible by 32."""
    return tiramisu.fc_densenet103(2, (None, None, 1))


@pytest.mark.slow
def test_fcd103_has_103_convolutions(fcd103_rgb):
    layers = fcd103_rgb.layers
    deconvs = [l for l in layers if isinstance(l, keras.layers.Conv2DTranspose)]
    convs = [
        l for l in layers if isinstance(l, keras.layers.Conv2D) and not isinstance(l, keras.layers.Conv2DTranspose)
    ]

    def n(prefix):
        return sum(l.name.startswith(prefix) for l in convs)

    assert n("first_conv") == 1
    assert n("down") == 4 + 5 + 7 + 10 + 12 == 38
    assert n("td") == 5 and all(l.kernel_size == (1, 1) for l in convs if l.name.startswith("td"))
    assert n("bottleneck") == 15
    assert len(deconvs) == 5
    assert n("up") == 38
    assert n("logits") == 1
    assert len(convs) + len(deconvs) == 103
    # Dropout 0.2 after every dense-layer and transition-down conv; none after the first conv, TUs or head.
    drops = [l for l in layers if isinstance(l, keras.layers.Dropout)]
    assert len(drops) == 38 + 5 + 15 + 38 and all(d.rate == 0.2 for d in drops)


@pytest.mark.slow
def test_fcd103_parameter_counts(fcd103_rgb, fcd103_gray):
    # Tiramisu paper Table 2 ("9.4M"): 9,322,091 trainable + 103,072 BN statistics = 9,425,163 (the paper's "9.4M").
    assert _param_counts(fcd103_rgb) == (9_322_091, 103_072)
    assert _param_counts(fcd103_gray) == (9_318_914, 103_072)


@pytest.mark.slow
def test_fcd103_stack_sizes(fcd103_rgb):
    m = fcd103_rgb

    def shape(name):
        return tuple(m.get_layer(name).output.shape[1:])

    def stack_after(block, n):
        """Stack size after layer n: what the layer reads plus its new maps.

        The last concatenation of the bottleneck and of up blocks 1-4 feeds nothing (only
        the new maps go up), so it is not part of the graph; count it from layer n itself.
        """
        return m.get_layer(f"{block}_l{n}_bn").input.shape[-1] + m.get_layer(f"{block}_l{n}_conv").filters

    assert shape("first_conv") == (224, 224, 48)
    down = [shape(f"down{i}_l{n}_concat") for i, n in enumerate((4, 5, 7, 10, 12), start=1)]
    assert down == [(224, 224, 112), (112, 112, 192), (56, 56, 304), (28, 28, 464), (14, 14, 656)]
    # Transition down keeps m channels and halves the resolution.
    assert shape("td5_pool") == (7, 7, 656)
    assert stack_after("bottleneck", 15) == 896
    assert shape("bottleneck_new") == (7, 7, 240)  # only the new maps go up
    tu = [shape(f"tu{i}_deconv") for i in range(1, 6)]
    assert tu == [(14, 14, 240), (28, 28, 192), (56, 56, 160), (112, 112, 112), (224, 224, 80)]
    assert [shape(f"tu{i}_concat")[-1] for i in range(1, 6)] == [896, 656, 464, 304, 192]
    up = [stack_after(f"up{i}", n) for i, n in enumerate((12, 10, 7, 5, 4), start=1)]
    assert up == [1088, 816, 576, 384, 256]
    assert shape("up5_l4_concat") == (224, 224, 256)
    assert m.get_layer("logits").input.shape[-1] == 256
    assert shape("predictions") == (224, 224, 11)


@pytest.mark.slow
def test_fcd103_layer_settings(fcd103_rgb):
    bn = fcd103_rgb.get_layer("down1_l1_bn")
    assert bn.epsilon == pytest.approx(1e-4) and bn.momentum == pytest.approx(0.9)
    conv = fcd103_rgb.get_layer("down1_l1_conv")
    assert conv.use_bias and conv.kernel_size == (3, 3) and conv.filters == 16
    assert isinstance(conv.kernel_initializer, keras.initializers.HeUniform)
    first = fcd103_rgb.get_layer("first_conv")
    assert first.use_bias and first.activation is keras.activations.linear
    assert fcd103_rgb.get_layer("tu1_deconv").strides == (2, 2)


@pytest.mark.slow
def test_fcd103_output_shapes(fcd103_rgb, fcd103_gray):
    x = np.random.uniform(0, 255, (1, 224, 224, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(fcd103_rgb(x, training=False))
    assert y.shape == (1, 224, 224, 11)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    # Non-square, divisible by 32.
    x = np.random.uniform(0, 255, (2, 64, 96, 1)).astype("float32")
    y = keras.ops.convert_to_numpy(fcd103_gray(x, training=False))
    assert y.shape == (2, 64, 96, 2) and y.dtype == np.float32
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)


def test_rejects_sizes_not_divisible_by_32():
    with pytest.raises(ValueError, match="divisible by 32"):
        tiramisu.fc_densenet103(2, (224, 200, 1))
    with pytest.raises(ValueError, match="11 entries"):
        tiramisu.build_fc_densenet(2, (64, 64, 1), layers_per_block=(4, 5, 7))


def test_registered_preset():
    spec = get_spec("fc-densenet103")
    p = spec.preset
    assert spec.kind == "segmenter" and p.task == "lesions"
    assert (p.image_size, p.channels, p.normalization) == (224, 1, "unit")
    assert (p.learning_rate, p.batch_size, p.epochs) == (1e-4, 30, 40)  # ensemble paper Table II
    # Through the registry with the preset's channels/classes (reduced depth for speed).
    model = create_model("fc-densenet103", image_size=64, n_pool=2, layers_per_block=1)
    assert model.input_shape == (None, 64, 64, 1) and model.output_shape == (None, 64, 64, 2)
    assert model.get_layer("normalize").mode == "unit"


def test_fc_densenet56_config():
    m = tiramisu.fc_densenet56(2, (32, 32, 1))
    convs = [l for l in m.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
    # 1 + 5x4 down + 5 TD + 4 bottleneck + 5 TU + 5x4 up + 1 = 56
    assert len(convs) == 56
    assert m.get_layer("down1_l1_conv").filters == 12


def _tiny_fcd(size=32):
    """Width/depth-reduced FC-DenseNet (2 poolings, growth 6) for fast training tests."""
    return tiramisu.build_fc_densenet(
        2, (size, size, 1), layers_per_block=(2, 3, 3, 3, 2), growth_rate=6, first_filters=12, n_pool=2
    )


@pytest.mark.slow
def test_training_lowers_loss():
    x, y = blobs(8, 32)
    model = _tiny_fcd()
    model.compile(
        keras.optimizers.Adam(3e-3), loss=DiceCrossEntropyLoss(), metrics=[DiceCoefficient()], jit_compile=False
    )
    history = model.fit(x, y, batch_size=4, epochs=12, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses


def test_save_reload_safe_mode(tmp_path):
    model = _tiny_fcd()
    x, _ = blobs(2, 32, seed=3)
    # Move BN statistics away from their initial values so the check covers them.
    for w in model.non_trainable_weights:
        w.assign(np.random.uniform(0.5, 1.5, w.shape).astype("float32"))
    path = tmp_path / "fcd.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )
