"""Tests of covidx.models.dpn: DPN-68/92/98/131 and SE-DPN (Chen et al. 2017; Cheng et al. 2021).

Reference numbers: timm's dpn92 and the DPN paper's Table 1 (DPN-92: 37,668,392 params with a 1000-class head, 34,979,392
without the head, 2688 features; +4,381,232 for SE r=16 on the residual slice of its 30 blocks)
and timm's published sizes (DPN-68 12.61M, DPN-92 37.67M, DPN-98 61.57M, DPN-131 79.25M).
The exact counts are recomputed here by plain arithmetic from the reference block definitions
(cypw/DPNs symbol_dpn.py, identical in CB5/timm dpn.py), independently of Keras.
"""

from __future__ import annotations

import numpy as np
import pytest

import keras
import tensorflow as tf

from covidx.layers import SqueezeExcite
from covidx.models import create_model, get_spec
from covidx.models import dpn
from covidx.weights import WeightsNotFoundError

# (stem filters, stem kernel, k_R, G, k_sec, inc_sec, bw_factor) from the official symbol_dpn-*.py.
REFERENCE = {
    "dpn68": (10, 3, 128, 32, (3, 4, 12, 3), (16, 32, 32, 64), 1),
    "dpn92": (64, 7, 96, 32, (3, 4, 20, 3), (16, 32, 24, 128), 4),
    "dpn98": (96, 7, 160, 40, (3, 6, 20, 3), (16, 32, 32, 128), 4),
    "dpn131": (128, 7, 160, 40, (4, 8, 28, 3), (16, 32, 32, 128), 4),
}
PUBLISHED_MILLIONS = {"dpn68": 12.61, "dpn92": 37.67, "dpn98": 61.57, "dpn131": 79.25}  # timm
DPN92_PARAMS = 37_668_392
DPN92_NOTOP_PARAMS = 34_979_392
DPN92_BN_STATS = 125_216
DPN92_SE_PARAMS = 4_381_232


def reference_param_count(variant: str, num_classes: int | None = 1000, se_ratio: int | None = None):
    """(trainable, BN moving statistics) of the reference DPN, by arithmetic.

    Every BN has gamma/beta (trainable, fix_gamma=False) and mean/var (statistics); convolutions
    have no bias; grouped convolutions have ``k*k*cin/G*cout`` weights; the classifier has a bias.
    """
    stem, k, k_r, groups, k_sec, inc_sec, bw_factor = REFERENCE[variant]
    params, stats = 3 * stem * k * k + 2 * stem, 2 * stem

    def bn_conv(cin, cout, kernel=1, g=1):
        return 2 * cin + kernel * kernel * cin // g * cout, 2 * cin

    in_chs = stem
    for s, (blocks, inc) in enumerate(zip(k_sec, inc_sec)):
        bw = 64 * bw_factor * 2**s
        r = k_r * bw // (64 * bw_factor)
        for b in range(blocks):
            units = [bn_conv(in_chs, r), bn_conv(r, r, 3, groups), bn_conv(r, bw + inc)]
            if b == 0:
                units.append(bn_conv(in_chs, bw + 2 * inc))
            for p, st in units:
                params, stats = params + p, stats + st
            if se_ratio:
                hidden = bw // se_ratio
                params += bw * hidden + hidden + hidden * bw + bw
            in_chs = bw + 3 * inc if b == 0 else in_chs + inc
    params, stats = params + 2 * in_chs, stats + 2 * in_chs  # final BN
    if num_classes:
        params += in_chs * num_classes + num_classes
    return params, stats


def counts(model) -> tuple[int, int]:
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    stats = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, stats


def tiny_config(**overrides):
    """DPN-92 blocks at a quarter of the width, one block per stage (two in conv2).

    Keeps every block type ("proj", "down", "normal") while staying fast on CPU, where Keras
    XLA-compiles each grouped convolution separately (the first step dominates the test time).
    """
    return dpn.dpn_config("dpn92", k_sec=(2, 1, 1, 1), **overrides).scaled(0.25)


# ---------------------------------------------------------------- configuration (no model build)


@pytest.mark.parametrize("variant", sorted(REFERENCE))
def test_config_matches_official_symbols(variant):
    cfg = dpn.dpn_config(variant)
    stem, k, k_r, groups, k_sec, inc_sec, bw_factor = REFERENCE[variant]
    assert (cfg.stem_filters, cfg.stem_kernel, cfg.k_r, cfg.groups) == (stem, k, k_r, groups)
    assert (cfg.k_sec, cfg.inc_sec, cfg.bw_factor) == (k_sec, inc_sec, bw_factor)
    assert dpn.dpn_config("se-" + variant) == cfg


def test_dpn92_stage_structure():
    stages = dpn.dpn_config("dpn92").stages()
    assert [s.name for s in stages] == ["conv2", "conv3", "conv4", "conv5"]
    assert [s.bw for s in stages] == [256, 512, 1024, 2048]
    assert [s.r for s in stages] == [96, 192, 384, 768]
    assert [s.r // 32 for s in stages] == [3, 6, 12, 24]  # channels per group
    assert [(s.block_type, s.stride) for s in stages] == [("proj", 1), ("down", 2), ("down", 2), ("down", 2)]
    assert [(s.bw, s.dense_width) for s in stages] == [(256, 80), (512, 192), (1024, 528), (2048, 640)]
    assert [s.out_channels for s in stages] == [336, 704, 1552, 2688]


def test_reference_counts_reproduce_published_sizes():
    # The arithmetic reference itself against the measured numbers and timm's table.
    assert reference_param_count("dpn92") == (DPN92_PARAMS, DPN92_BN_STATS)
    assert reference_param_count("dpn92", None)[0] == DPN92_NOTOP_PARAMS
    assert reference_param_count("dpn92", 1000, 16)[0] - DPN92_PARAMS == DPN92_SE_PARAMS
    for variant, millions in PUBLISHED_MILLIONS.items():
        assert round(reference_param_count(variant)[0] / 1e6, 2) == millions


def test_scaled_config_keeps_groups_valid():
    cfg = dpn.dpn_config("dpn92").scaled(0.25)
    assert (cfg.groups, cfg.k_r, cfg.base_width, cfg.stem_filters) == (8, 24, 64, 16)
    assert all(s.r % cfg.groups == 0 for s in cfg.stages())
    assert dpn.dpn_config("dpn92").scaled(1.0) == dpn.dpn_config("dpn92")
    with pytest.raises(ValueError, match="unknown DPN variant"):
        dpn.dpn_config("dpn200")


def test_registry_presets():
    for variant in ("dpn68", "dpn92", "dpn98", "dpn131"):
        for name, se in ((variant, False), ("se-" + variant, True)):
            spec = get_spec(name)
            assert spec.builder_kwargs == {"variant": variant, "se": se}
            p = spec.preset
            assert (p.task, p.image_size, p.resize, p.augment, p.epochs) == ("4class", 224, "crop", "se-dpn", 100)
            assert (p.optimizer, p.learning_rate, p.class_weights, p.normalization) == ("adam", 1e-4, True, "imagenet")


# ---------------------------------------------------------------- one block against NumPy


def _np_bn_relu(x, layer):
    gamma, beta, mean, var = (np.asarray(w) for w in layer.get_weights())
    return np.maximum((x - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0.0)


def _np_conv(x, kernel, stride=1, groups=1):
    """Convolution with symmetric zero padding k//2 (MXNet/PyTorch), grouped over contiguous channels."""
    k = kernel.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho = (x.shape[1] + 2 * p - k) // stride + 1
    wo = (x.shape[2] + 2 * p - k) // stride + 1
    cin_g, cout = kernel.shape[2], kernel.shape[3]
    cout_g = cout // groups
    out = np.zeros((x.shape[0], ho, wo, cout))
    for g in range(groups):
        for i in range(k):
            for j in range(k):
                patch = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride, g * cin_g : (g + 1) * cin_g]
                out[..., g * cout_g : (g + 1) * cout_g] += patch @ kernel[i, j, :, g * cout_g : (g + 1) * cout_g]
    return out


def _np_block(model, name, residual, dense, bw, stride, groups, projection, se):
    """One dual-path block computed from the paper's description with the Keras layer weights."""
    lay = model.get_layer
    x = np.concatenate([residual, dense], axis=-1)

    def unit(t, part, s=1, g=1):
        return _np_conv(_np_bn_relu(t, lay(f"{name}_{part}_bn")), np.asarray(lay(f"{name}_{part}_conv").kernel), s, g)

    if projection:
        w = unit(x, "c1x1_w", stride)
        residual, dense = w[..., :bw], w[..., bw:]
    h = unit(unit(unit(x, "c1x1_a"), "c3x3_b", stride, groups), "c1x1_c")
    out_res, out_dense = h[..., :bw], h[..., bw:]
    if se:
        layer = lay(f"{name}_se")
        s = out_res.mean(axis=(1, 2))
        s = np.maximum(s @ np.asarray(layer.squeeze.kernel) + np.asarray(layer.squeeze.bias), 0)
        s = 1 / (1 + np.exp(-(s @ np.asarray(layer.excite.kernel) + np.asarray(layer.excite.bias))))
        out_res = out_res * s[:, None, None, :]
    return residual + out_res, np.concatenate([dense, out_dense], axis=-1)


def test_dual_path_blocks_match_numpy():
    """A "down" block (stride 2, even input size) then a "normal" block, with SE, in inference mode."""
    bw, inc, r, groups = 16, 4, 8, 4
    res_in = keras.Input((8, 8, 12))
    dense_in = keras.Input((8, 8, 6))
    x = dpn.dual_path_block((res_in, dense_in), bw, inc, r, groups, "down", "conv3_1", se_ratio=4)
    x = dpn.dual_path_block(x, bw, inc, r, groups, "normal", "conv3_2", se_ratio=4)
    model = keras.Model([res_in, dense_in], list(x))

    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            gamma, beta, mean, var = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c), rng.uniform(0.5, 2, c)
            layer.set_weights([gamma, beta, mean, var])
    residual = rng.normal(size=(2, 8, 8, 12)).astype("float32")
    dense = rng.normal(size=(2, 8, 8, 6)).astype("float32")
    got_res, got_dense = model.predict([residual, dense], verbose=0)

    r1, d1 = _np_block(model, "conv3_1", residual, dense, bw, 2, groups, projection=True, se=True)
    r2, d2 = _np_block(model, "conv3_2", r1, d1, bw, 1, groups, projection=False, se=True)
    assert got_res.shape == (2, 4, 4, 16) and got_dense.shape == (2, 4, 4, 2 * inc + 2 * inc)
    np.testing.assert_allclose(got_res, r2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_dense, d2, rtol=1e-4, atol=1e-4)


def test_dual_path_split():
    x = np.arange(2 * 3 * 3 * 7, dtype="float32").reshape(2, 3, 3, 7)
    a, b = dpn.DualPathSplit(5)(x)
    np.testing.assert_array_equal(a, x[..., :5])
    np.testing.assert_array_equal(b, x[..., 5:])
    assert dpn.DualPathSplit.from_config(dpn.DualPathSplit(5).get_config()).residual_channels == 5


def test_dual_path_split_gradient_is_one_concatenation():
    """The split's gradient is the two parts' gradients side by side, without a zero-filled map per part."""
    split = dpn.DualPathSplit(5)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 3, 3, 7)).astype("float32"))
    wa, wb = rng.normal(size=(2, 3, 3, 5)).astype("float32"), rng.normal(size=(2, 3, 3, 2)).astype("float32")

    @tf.function
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            a, b = split(x)
            loss = tf.reduce_sum(a * wa) + tf.reduce_sum(b * wb)
        return tape.gradient(loss, x)

    np.testing.assert_allclose(grad(x), np.concatenate([wa, wb], axis=-1), rtol=1e-6)
    ops = {op.type for op in grad.get_concrete_function(x).graph.get_operations()}
    assert not ops & {"StridedSliceGrad", "AddN"}, ops


# ---------------------------------------------------------------- full-size models (built once each)


@pytest.fixture(scope="module")
def dpn92_full():
    return dpn.build_dpn(1000, (224, 224, 3), variant="dpn92")


@pytest.fixture(scope="module")
def se_dpn92_4class():
    return create_model("se-dpn92")  # registry path: 4 classes, 224 x 224 x 3


@pytest.mark.slow
def test_dpn92_parameter_count(dpn92_full):
    assert counts(dpn92_full) == (DPN92_PARAMS, DPN92_BN_STATS)
    assert len([l for l in dpn92_full.layers if l.name.endswith("_sum")]) == 30


@pytest.mark.slow
def test_dpn92_stage_widths_from_layer_shapes(dpn92_full):
    # (last block, spatial size, residual width, dense width) at 224 x 224 input.
    expected = [
        ("conv2_3", 56, 256, 80), ("conv3_4", 28, 512, 192), ("conv4_20", 14, 1024, 528), ("conv5_3", 7, 2048, 640),
    ]
    for block, size, res_w, dense_w in expected:
        assert tuple(dpn92_full.get_layer(f"{block}_sum").output.shape) == (None, size, size, res_w)
        assert tuple(dpn92_full.get_layer(f"{block}_cat").output.shape) == (None, size, size, dense_w)
    assert tuple(dpn92_full.get_layer(dpn.FEATURE_LAYER).output.shape) == (None, 7, 7, 2688)
    assert tuple(dpn92_full.get_layer("conv1_pool").output.shape) == (None, 56, 56, 64)
    grouped = dpn92_full.get_layer("conv4_5_c3x3_b_conv")
    assert grouped.groups == 32 and tuple(grouped.kernel.shape) == (3, 3, 12, 384)


@pytest.mark.slow
def test_dpn92_no_top_features():
    model = dpn.build_dpn(1000, (224, 224, 3), variant="dpn92", include_top=False, pooling="avg")
    assert counts(model) == (DPN92_NOTOP_PARAMS, DPN92_BN_STATS)
    assert tuple(model.output.shape) == (None, 2688)


@pytest.mark.slow
def test_se_dpn92_count_and_output(se_dpn92_4class):
    model = se_dpn92_4class
    trainable, stats = counts(model)
    assert trainable == DPN92_NOTOP_PARAMS + DPN92_SE_PARAMS + 2688 * 4 + 4
    assert trainable == reference_param_count("dpn92", 4, se_ratio=16)[0]
    assert stats == DPN92_BN_STATS
    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    y = model.predict(x, verbose=0)
    assert y.shape == (2, 4)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_se_placement(se_dpn92_4class):
    """One SE per block, on the bw-channel residual slice of the last 1x1, feeding the block's Add."""
    model = se_dpn92_4class
    se_layers = [l for l in model.layers if isinstance(l, SqueezeExcite)]
    assert len(se_layers) == 30
    for stage in dpn.dpn_config("dpn92").stages():
        for i in range(1, stage.blocks + 1):
            name = f"{stage.name}_{i}"
            se = model.get_layer(f"{name}_se")
            split = model.get_layer(f"{name}_c1x1_c_split")
            assert se.input is split.output[0]  # the residual slice
            assert se.input.shape[-1] == stage.bw and se.ratio == 16
            assert any(t is se.output for t in model.get_layer(f"{name}_sum").input)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dpn68", "dpn98", "dpn131"])
def test_other_variants_parameter_counts(variant):
    model = dpn.build_dpn(1000, (224, 224, 3), variant=variant)
    assert counts(model) == reference_param_count(variant)
    assert round(counts(model)[0] / 1e6, 2) == PUBLISHED_MILLIONS[variant]
    expected_features = 832 if variant == "dpn68" else 2688
    assert tuple(model.get_layer(dpn.FEATURE_LAYER).output.shape) == (None, 7, 7, expected_features)


# ---------------------------------------------------------------- reduced copies: training, saving


def test_training_steps_lower_the_loss():
    model = dpn.build_dpn(4, (64, 64, 3), config=tiny_config(), se=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(8) % 4, 4)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    losses = [float(model.train_on_batch(x, y)) for _ in range(5)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]


def test_save_reload_safe_mode(tmp_path):
    model = dpn.build_dpn(4, (64, 64, 3), config=tiny_config(), se=True)
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    path = tmp_path / "se_dpn_tiny.keras"
    model.save(path)
    reloaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(model.predict(x, verbose=0), reloaded.predict(x, verbose=0))
    assert reloaded.get_layer("conv3_1_se").ratio == 16

    weights = tmp_path / "tiny.weights.h5"
    model.save_weights(weights)
    again = dpn.build_dpn(4, (64, 64, 3), weights=str(weights), config=tiny_config(), se=True)
    np.testing.assert_array_equal(model.predict(x, verbose=0), again.predict(x, verbose=0))


def test_imagenet_weights_are_not_downloaded():
    with pytest.raises(WeightsNotFoundError):
        dpn.build_dpn(4, (64, 64, 3), weights="imagenet", width=0.25)


def test_width_shortcut_and_feature_map():
    model = dpn.build_dpn(4, (64, 64, 3), variant="dpn68", width=0.5, include_top=False, pooling=None)
    cfg = dpn.dpn_config("dpn68").scaled(0.5)
    assert tuple(model.output.shape) == (None, 2, 2, cfg.feature_dim)
    assert model.name == "dpn68_x50"
