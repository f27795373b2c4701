"""Cascade-SEME classifiers (Lv et al., Med Phys 2021): full-size parameter counts, shapes, wiring, saving.

Reference counts are keras.applications' (built here where cheap, measured once otherwise); SE
weights are added by the SENet formula ``2·C·(C/r) + C/r + C`` per SE block.
"""

import h5py
import keras
import numpy as np
import pytest

from covidx.layers import SqueezeExcite
from covidx.layers.moex import MomentExchange
from covidx.models import densenet, resnet, vgg
from covidx.models.registry import create_model, get_spec

# Measured on keras.applications 3.15 with weights=None, include_top=False):
RESNET50_NOTOP = {3: 23_587_712, 1: 23_581_440}
DENSENET169_NOTOP = {3: 12_642_880, 1: 12_636_608}
VGG19_NOTOP_3CH = 20_024_384
VGG19_TOP_1000 = 143_667_240


def se_params(channels, ratio=16):
    hidden = channels // ratio
    return 2 * channels * hidden + hidden + channels


RESNET50_SE = sum(n * se_params(c) for c, n in ((256, 3), (512, 4), (1024, 6), (2048, 3)))
DENSENET169_SE = sum(se_params(c) for c in (256, 512, 1280, 1664))  # one per dense-block output


def head(features, classes):
    return (features + 1) * classes


def test_se_weight_totals_match_spec():
    # SE-ResNet50 (bias-free SENet layout) 28,088,024 = torch ResNet50 25,557,032 + SE;
    # SE on every DenseNet169 dense-block output +595,816.
    assert RESNET50_SE == 28_088_024 - 25_557_032 == 2_530_992
    assert DENSENET169_SE == 595_816


def _weight_shapes(model):
    return {layer.name: [tuple(w.shape) for w in layer.weights] for layer in model.layers if layer.weights}


@pytest.mark.slow
@pytest.mark.parametrize(
    "ours, reference",
    [
        (lambda: resnet.build_resnet50(1000, (224, 224, 3), normalization="raw"), keras.applications.ResNet50),
        (lambda: densenet.build_densenet169(1000, (224, 224, 3), normalization="raw"), keras.applications.DenseNet169),
    ],
    ids=["resnet50", "densenet169"],
)
def test_gap_variant_equals_keras_applications(ours, reference):
    model, ref = ours(), reference(weights=None)
    assert model.count_params() == ref.count_params()
    assert _weight_shapes(model) == _weight_shapes(ref)  # same layer names, same weight shapes


@pytest.fixture(scope="module")
def seme_resnet50():
    return create_model("seme-resnet50", num_classes=3, image_size=512, channels=1)


@pytest.fixture(scope="module")
def seme_densenet169():
    return create_model("seme-densenet169", num_classes=3, image_size=512, channels=1)


def _check_forward_and_reload(model, tmp_path):
    """A 512 px forward pass gives softmax probabilities; the saved .keras reloads (safe mode) identically."""
    x = np.random.default_rng(0).uniform(0, 255, (1, 512, 512, 1)).astype("float32")
    probs = keras.ops.convert_to_numpy(model(x, training=False))
    assert probs.shape == (1, 3) and np.isclose(probs.sum(), 1.0, atol=1e-5)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(probs, keras.ops.convert_to_numpy(restored(x, training=False)))
    moex = restored.get_layer("moex")
    assert isinstance(moex, MomentExchange) and (moex.probability, moex.lam) == (1.0, 0.9)


@pytest.mark.slow
def test_seme_resnet50_full_size(seme_resnet50, tmp_path):
    model = seme_resnet50
    assert model.count_params() == RESNET50_NOTOP[1] + RESNET50_SE + head(2048, 3) == 26_118_579
    assert len([l for l in model.layers if isinstance(l, SqueezeExcite)]) == 16  # every bottleneck
    moex = [l for l in model.layers if isinstance(l, MomentExchange)]
    assert len(moex) == 1 and moex[0].input.shape == (None, 128, 128, 64)  # after the stem max-pool
    assert model.get_layer("conv5_block3_out").output.shape == (None, 16, 16, 2048)
    _check_forward_and_reload(model, tmp_path)


@pytest.mark.slow
def test_seme_densenet169_full_size(seme_densenet169, tmp_path):
    model = seme_densenet169
    assert model.count_params() == DENSENET169_NOTOP[1] + DENSENET169_SE + head(1664, 3) == 13_237_419
    se = [l for l in model.layers if isinstance(l, SqueezeExcite)]
    assert [l.input.shape[-1] for l in se] == [256, 512, 1280, 1664]  # every dense-block output
    moex = [l for l in model.layers if isinstance(l, MomentExchange)]
    assert len(moex) == 1 and moex[0].input.shape == (None, 128, 128, 64)
    assert model.get_layer("relu").output.shape == (None, 16, 16, 1664)
    _check_forward_and_reload(model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, features, notop",
    [("resnet50-base", 2048, RESNET50_NOTOP[1]), ("densenet169-base", 1664, DENSENET169_NOTOP[1])],
)
def test_base_variants_flatten_at_224(name, features, notop):
    model = create_model(name, num_classes=3, channels=1)
    assert model.input.shape == (None, 224, 224, 1)
    assert model.get_layer("flatten").output.shape == (None, 7 * 7 * features)
    assert model.count_params() == notop + head(7 * 7 * features, 3)


@pytest.mark.slow
def test_vgg19_variants():
    base = vgg.build_vgg19(1000, (224, 224, 3), head="flatten", normalization="raw")
    assert base.count_params() == VGG19_TOP_1000  # keras.applications.VGG19(weights=None)
    gap = create_model("vgg19-gap", num_classes=3, channels=3)
    assert gap.input.shape == (None, 512, 512, 3)
    assert gap.get_layer("block5_pool").output.shape == (None, 16, 16, 512)
    assert gap.count_params() == VGG19_NOTOP_3CH + head(512, 3)


TINY = {
    "resnet": dict(blocks=(1, 1, 1, 1), base_width=8),
    "densenet": dict(blocks=(1, 1, 1, 1), growth_rate=4, init_filters=8),
    "vgg": dict(width=0.125, fc_units=16),
}
REGISTERED = {
    # name: (family, SE layers?, MoEx?, head, task, trainer, image size)
    "resnet50-base": ("resnet", False, False, "flatten", "stage1", "standard", 224),
    "resnet50-gap": ("resnet", False, False, "gap", "stage1", "standard", 512),
    "se-resnet50": ("resnet", True, False, "gap", "stage1", "standard", 512),
    "moex-resnet50": ("resnet", False, True, "gap", "stage1", "moex", 512),
    "seme-resnet50": ("resnet", True, True, "gap", "stage1", "moex", 512),
    "densenet169-base": ("densenet", False, False, "flatten", "stage2", "standard", 224),
    "densenet169-gap": ("densenet", False, False, "gap", "stage2", "standard", 512),
    "se-densenet169": ("densenet", True, False, "gap", "stage2", "standard", 512),
    "moex-densenet169": ("densenet", False, True, "gap", "stage2", "regional", 512),
    "seme-densenet169": ("densenet", True, True, "gap", "stage2", "regional", 512),
    "vgg19-base": ("vgg", False, False, "flatten", "stage1", "standard", 224),
    "vgg19-gap": ("vgg", False, False, "gap", "stage1", "standard", 512),
}


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_variant_wiring(name):
    family, has_se, has_moex, head_kind, task, trainer, size = REGISTERED[name]
    preset = get_spec(name).preset
    assert (preset.task, preset.trainer, preset.image_size) == (task, trainer, size)
    assert (preset.optimizer, preset.momentum, preset.normalization, preset.augment) == ("sgd", 0.9, "unit", "cascade")
    assert preset.weights == "none"  # He-uniform from scratch (§5.A)
    model = create_model(name, image_size=32, **TINY[family])
    layers = model.layers
    assert model.output.shape == (None, 3 if task == "stage1" else 2)
    assert any(isinstance(l, SqueezeExcite) for l in layers) == has_se
    assert any(isinstance(l, MomentExchange) for l in layers) == has_moex
    assert any(l.name == ("flatten" if head_kind == "flatten" else "avg_pool") for l in layers)
    assert model.get_layer("normalize").mode == "unit"
    conv = next(l for l in layers if isinstance(l, keras.layers.Conv2D))
    assert conv.kernel_initializer.__class__.__name__ == "HeUniform"
    # MoEx has no weights: SEME and SE variants have the same count (Med Phys 2021 §4.C: MoEx adds no parameters).
    if has_moex:
        plain = create_model(name, image_size=32, moex=False, **TINY[family])
        assert plain.count_params() == model.count_params()


def test_weights_file_round_trip(tmp_path):
    model = resnet.build_resnet50(3, (32, 32, 1), se=True, moex=True, **TINY["resnet"])
    path = tmp_path / "net.weights.h5"
    model.save_weights(path)
    reloaded = resnet.build_resnet50(3, (32, 32, 1), weights=str(path), se=True, moex=True, **TINY["resnet"])
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), keras.ops.convert_to_numpy(reloaded(x)))


def _write_legacy_h5(path, layers, rename):
    """A Keras-2 style weights file (root attrs layer_names / per-group weight_names)."""
    with h5py.File(path, "w") as f:
        names = []
        for layer in layers:
            if not layer.weights:
                continue
            file_name = rename.get(layer.name, layer.name)
            names.append(file_name.encode())
            group = f.create_group(file_name)
            weight_names = [f"{file_name}/{w.name}:0".encode() for w in layer.weights]
            group.attrs["weight_names"] = weight_names
            for w_name, w in zip(weight_names, layer.weights):
                group.create_dataset(w_name.decode(), data=keras.ops.convert_to_numpy(w))
        f.attrs["layer_names"] = names


def test_imagenet_weights_load_by_layer_name(tmp_path, monkeypatch):
    source = densenet.build_densenet169(3, (32, 32, 3), **TINY["densenet"])
    # Keras 2 named DenseNet's stem "conv1/conv"; the backbone file has no head.
    backbone = [l for l in source.layers if l.name != "predictions"]
    _write_legacy_h5(
        tmp_path / "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5", backbone, {"conv1_conv": "conv1/conv"}
    )
    monkeypatch.setenv("COVIDX_WEIGHTS", str(tmp_path))
    target = densenet.build_densenet169(3, (32, 32, 3), weights="imagenet", se=True, **TINY["densenet"])
    for layer in backbone:
        for a, b in zip(layer.weights, target.get_layer(layer.name).weights):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    with pytest.raises(ValueError, match="3-channel"):
        densenet.build_densenet169(3, (32, 32, 1), weights="imagenet", **TINY["densenet"])
