"""Precision (covidx.precision): fp32 / bf16 / fp16 / auto for training, evaluation, predict and export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import covidx.layers  # noqa: F401  (registers covidx's layers for load_model)
from covidx.data.synthetic import write_dataset
from covidx.precision import (cpu_model, fold_batch_norms, fused_batch_norms, inference_copy, precision_scope,
                              resolve_precision, with_precision)
from covidx.runs import load_run
from covidx.serving.export import export

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU @ 2.0GHz\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return path


def test_auto_follows_the_cpu_flags(tmp_path):
    assert resolve_precision("auto", cpuinfo(tmp_path, "avx512f avx512_bf16")) == "bf16"
    assert resolve_precision("auto", cpuinfo(tmp_path, "amx_tile amx_bf16")) == "bf16"
    assert resolve_precision("auto", cpuinfo(tmp_path, "avx512f")) == "fp32"
    assert resolve_precision("auto", tmp_path / "missing") == "fp32"
    assert resolve_precision("fp16") == "fp16" and resolve_precision(None) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8")


def test_cpu_model_reads_the_model_name(tmp_path):
    assert cpu_model(cpuinfo(tmp_path, "avx512f")) == "Test CPU @ 2.0GHz"
    assert cpu_model(tmp_path / "missing")  # some name, never an error (platform.processor() or "unknown CPU")


def small_net():
    """A post-activation conv-BN pair (folded by inference_copy) and a pre-activation BN (kept)."""
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="predictions")(x))


def test_with_precision_keeps_weights_and_float32_outputs():
    keras.utils.set_random_seed(0)
    net = small_net()
    x = np.random.default_rng(0).uniform(0, 1, (4, 16, 16, 1)).astype("float32")
    bf16 = with_precision(net, "bf16")
    # Convolutions and dense layers keep their weights in bfloat16 in an inference copy (no cast per call).
    assert bf16.get_layer("conv").dtype_policy.name == "bfloat16" and bf16.get_layer("conv").kernel.dtype == "bfloat16"
    assert bf16.get_layer("predictions").dtype_policy.name == "float32"  # softmax in float32
    assert bf16.get_layer("bn").moving_mean.dtype == "float32"  # BN statistics in float32
    out = bf16(x)
    assert out.dtype == "float32"
    np.testing.assert_allclose(np.asarray(out), np.asarray(net(x)), atol=0.02)
    fp32 = with_precision(net, "fp32")
    assert with_precision(fp32, "fp32") is fp32 and with_precision(fp32, None) is fp32  # nothing left to change
    with precision_scope("bf16"):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fused_batchnorm_inference_is_one_kernel_in_the_input_dtype(dtype):
    from covidx.layers import FusedBatchNormalization

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (4, 5, 5, 6)).astype("float32")
    ref = keras.layers.BatchNormalization(epsilon=1e-3)
    ref.build(x.shape)
    ref.set_weights([rng.uniform(0.5, 2, 6), rng.normal(0, 1, 6), rng.normal(3, 1, 6), rng.uniform(1, 5, 6)])
    gamma, beta, mean, var = ref.get_weights()
    want = (x - mean) / np.sqrt(var + 1e-3) * gamma + beta  # NumPy, float64
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[dtype]
    with precision_scope({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]):
        fused = FusedBatchNormalization(epsilon=1e-3)
        fused.build(x.shape)
    assert fused.dtype_policy.name == policy
    fused.set_weights(ref.get_weights())
    fn = tf.function(lambda t: fused(t, training=False))
    y = fn(tf.cast(x, dtype))
    assert y.dtype == dtype  # no float32 round trip at inference
    ops = {op.type for op in fn.get_concrete_function(tf.TensorSpec(x.shape, dtype)).graph.get_operations()}
    assert "FusedBatchNormV3" in ops and "Rsqrt" not in ops  # one kernel, not Keras' element-wise chain
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=0.02, atol=0.05)
    np.testing.assert_allclose(np.asarray(tf.cast(y, "float32")), want, **tol)
    np.testing.assert_allclose(np.asarray(ref(x, training=False)), want, rtol=1e-5, atol=1e-5)
    # 2-D inputs are the parent's path.
    flat = FusedBatchNormalization(epsilon=1e-3)
    flat.build((4, 6))
    flat.set_weights([gamma, beta, mean, var])
    np.testing.assert_allclose(np.asarray(flat(x[:, 0, 0], training=False)), want[:, 0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fused_batchnorm_trains_as_batchnorm_with_one_kernel_each_way(dtype):
    """Training: batch mean and biased variance, Keras' moving-average update, gradients of BN, all by NumPy;
    FusedBatchNormV3 forward and FusedBatchNormGradV3 backward instead of the element-wise chain."""
    from covidx.layers import FusedBatchNormalization

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (4, 5, 5, 6)).astype("float32")
    w = rng.normal(0, 1, x.shape).astype("float32")  # loss = sum(w * y)
    eps, momentum = 1e-3, 0.9
    with precision_scope({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]):
        bn = FusedBatchNormalization(epsilon=eps, momentum=momentum)
        bn.build(x.shape)
    weights = [rng.uniform(0.5, 2, 6), rng.normal(0, 1, 6), rng.normal(3, 1, 6), rng.uniform(1, 5, 6)]
    bn.set_weights(weights)
    gamma, beta, moving_mean, moving_var = weights
    xd = np.asarray(tf.cast(tf.cast(x, dtype), "float32"), np.float64)  # the input as the layer sees it
    mean, var = xd.mean(axis=(0, 1, 2)), xd.var(axis=(0, 1, 2))  # biased, as Keras' BN
    xhat = (xd - mean) / np.sqrt(var + eps)
    want_y = xhat * gamma + beta
    # d/dx of sum(w * y) for BN in training (the batch statistics depend on x too)
    wm = w.reshape(-1, 6)
    want_dx = gamma / np.sqrt(var + eps) * (w - wm.mean(0) - xhat * (wm * xhat.reshape(-1, 6)).mean(0))

    @tf.function
    def step(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = bn(t, training=True)
            loss = tf.reduce_sum(tf.cast(y, "float32") * w)
        return y, tape.gradient(loss, [t, bn.gamma, bn.beta])

    t = tf.cast(x, dtype)
    y, (dx, dgamma, dbeta) = step(t)
    assert y.dtype == dtype
    ops = {op.type for op in step.get_concrete_function(tf.TensorSpec(x.shape, dtype)).graph.get_operations()}
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= ops and "Rsqrt" not in ops
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=0.03, atol=0.06)
    np.testing.assert_allclose(np.asarray(tf.cast(y, "float32")), want_y, **tol)
    np.testing.assert_allclose(np.asarray(tf.cast(dx, "float32")), want_dx, **tol)
    sums = dict(rtol=1e-4, atol=1e-3) if dtype == "float32" else dict(rtol=0.03, atol=0.1)  # over 100 values
    np.testing.assert_allclose(np.asarray(dgamma), (w * xhat).sum(axis=(0, 1, 2)), **sums)
    np.testing.assert_allclose(np.asarray(dbeta), w.sum(axis=(0, 1, 2)), **sums)
    # one step of the moving averages (the traced function ran once): Keras' update, biased variance
    np.testing.assert_allclose(np.asarray(bn.moving_mean), momentum * moving_mean + (1 - momentum) * mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), momentum * moving_var + (1 - momentum) * var, rtol=1e-4, atol=1e-4)


def randomise_batch_norms(model, rng):
    for layer in model._flatten_layers():  # nested BNs too
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 1, n), rng.normal(0, 1, n), rng.uniform(0.5, 3, n)])


def test_fold_batch_norms_merges_each_conv_bn_pair_and_nothing_else():
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((12, 12, 2))
    a = layers.BatchNormalization(name="a_bn")(layers.Conv2D(4, 3, padding="same", use_bias=False, name="a")(inputs))
    b = layers.BatchNormalization(name="b_bn")(layers.Conv2D(4, 1, name="b")(inputs))  # with a bias
    shared = layers.Conv2D(4, 3, padding="same", name="shared")(inputs)  # two users: its output must survive
    c = layers.BatchNormalization(name="c_bn")(shared)
    d = layers.Conv2D(4, 1, activation="relu", name="d")(inputs)
    d = layers.BatchNormalization(name="d_bn")(d)  # after the convolution's ReLU: cannot fold
    e = layers.BatchNormalization(name="e_bn")(layers.Concatenate(name="cat")([a, b]))  # not after a convolution
    f = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="f")(layers.Concatenate()([a, a]))
    f = layers.BatchNormalization(name="f_bn")(f)  # 16 channels: (input channel, multiplier) pairs
    x = layers.Concatenate(name="out_cat")([layers.Add(name="add")([a, b, c, d, shared]), e, f])
    net = keras.Model(inputs, layers.GlobalAveragePooling2D(name="gap")(x))
    randomise_batch_norms(net, rng)
    folded = fold_batch_norms(net)

    kinds = {layer.name: type(layer).__name__ for layer in folded.layers}
    assert kinds["a_bn"] == kinds["b_bn"] == "Conv2D" and "a" not in kinds and "b" not in kinds
    assert kinds["f_bn"] == "DepthwiseConv2D" and "f" not in kinds
    assert {kinds[n] for n in ("c_bn", "d_bn", "e_bn")} == {"BatchNormalization"}
    assert kinds["shared"] == kinds["d"] == "Conv2D"
    x = rng.normal(0, 1, (3, 12, 12, 2)).astype("float32")
    np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(net(x)), rtol=1e-5, atol=1e-5)
    # The merged weights, by the BN formula in NumPy: W * g / sqrt(var + eps), (b - mean) * s + beta.
    gamma, beta, mean, var = net.get_layer("b_bn").get_weights()
    kernel, bias = net.get_layer("b").get_weights()
    s = gamma / np.sqrt(var + net.get_layer("b_bn").epsilon)
    np.testing.assert_allclose(folded.get_layer("b_bn").kernel, kernel * s, rtol=1e-6)
    np.testing.assert_allclose(folded.get_layer("b_bn").bias, (bias - mean) * s + beta, rtol=1e-5, atol=1e-6)
    assert type(net.get_layer("a_bn")) is keras.layers.BatchNormalization  # the original is untouched
    assert fold_batch_norms(folded) is folded  # nothing left to fold


class BlockWithNorm(keras.layers.Layer):
    """A custom layer holding its own BN (as MAG-SD's attention block does): the swap must reach inside."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization()

    def call(self, inputs, training=None):
        return self.norm(inputs, training=training)


def nested_net():
    """small_net's layers with one BN inside a nested model and one inside a custom layer."""
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    inner_in = keras.Input((14, 14, 8))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization(name="conv_bn")(inner_in), name="inner")
    x = keras.layers.ReLU(name="relu")(inner(x))
    x = BlockWithNorm(name="block")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="predictions")(x))


def test_fused_batch_norms_trains_as_the_keras_model():
    """What python -m covidx.train trains: every BN fused in place (nested models and custom layers' own BNs
    included), the same weights, and SGD steps from the same start give the same losses, weights and moving
    statistics as Keras' BN."""
    from covidx.layers import FusedBatchNormalization

    def norms(model):
        return [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]

    nets = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        net = nested_net()
        randomise_batch_norms(net, np.random.default_rng(1))
        nets.append(net)
    keras_bn, fused = nets
    assert fused_batch_norms(fused) is fused
    assert [type(l) for l in norms(fused)] == [FusedBatchNormalization] * 2
    assert {type(l) for l in norms(keras_bn)} == {keras.layers.BatchNormalization}
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 16, 16, 1)).astype("float32")
    y = keras.utils.to_categorical(np.arange(8) % 3, 3)
    losses = []
    for model in (keras_bn, fused):
        model.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
        losses.append([float(model.train_on_batch(x, y)) for _ in range(3)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    for a, b in zip(keras_bn.get_weights(), fused.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_inference_copy_folds_swaps_batchnorm_and_reloads_in_safe_mode(tmp_path):
    from covidx.layers import FusedBatchNormalization

    keras.utils.set_random_seed(0)
    net = small_net()
    randomise_batch_norms(net, np.random.default_rng(1))
    x = np.random.default_rng(0).uniform(0, 1, (4, 16, 16, 1)).astype("float32")
    fp32 = inference_copy(net)  # the checkpoint's own precision: folded, float rounding apart the same network
    assert type(fp32.get_layer("conv_bn")) is keras.layers.Conv2D and "conv" not in {l.name for l in fp32.layers}
    assert type(fp32.get_layer("bn")) is FusedBatchNormalization  # pre-activation: stays BN, one kernel
    np.testing.assert_allclose(np.asarray(fp32(x)), np.asarray(net(x)), rtol=1e-5, atol=1e-6)
    bf16 = inference_copy(net, "bf16")
    assert isinstance(bf16.get_layer("bn"), FusedBatchNormalization)
    assert type(bf16.get_layer("conv_bn")) is keras.layers.Conv2D  # folded into its convolution
    assert bf16.get_layer("conv_bn").dtype_policy.name == "bfloat16"  # weights stored in the compute type
    config = fp32.get_config()  # the same values as mixed layers, which round their kernels every call
    for layer in config["layers"]:
        if layer["name"] != "predictions" and isinstance(layer["config"].get("dtype"), dict):
            layer["config"]["dtype"]["config"]["name"] = "mixed_bfloat16"
    mixed = keras.Model.from_config(config)
    mixed.set_weights(fp32.get_weights())
    assert mixed.get_layer("conv_bn").dtype_policy.name == "mixed_bfloat16"
    np.testing.assert_allclose(np.asarray(bf16(x)), np.asarray(mixed(x)), rtol=1e-6, atol=1e-7)
    assert type(net.get_layer("bn")) is keras.layers.BatchNormalization  # the original is untouched
    for name, copy in (("fp32", fp32), ("bf16", bf16)):
        copy.save(tmp_path / f"{name}.keras")
        again = keras.models.load_model(tmp_path / f"{name}.keras", safe_mode=True)
        np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(copy(x)))


@pytest.mark.slow
def test_bf16_trains_saves_reloads_and_exports_float32(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, n_patients=16, size=48, seed=2)
    r = subprocess.run([sys.executable, "-m", "covidx.train", "--model", "baseline-smallcnn", "--data",
                        str(data / "kermany"), "--image-size", "32",
                        "--epochs", "1", "--batch-size", "8", "--precision", "bf16", "--no-jit-compile",
                        "--out", str(tmp_path / "runs"), "--verbose", "0"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = next(p for p in (tmp_path / "runs").glob("*/*") if (p / "config.json").is_file())
    train_cfg = json.loads((run_dir / "config.json").read_text())["train"]
    assert train_cfg["precision"] == "bf16" and train_cfg["jit_compile"] is False

    model = keras.models.load_model(run_dir / "best.keras", safe_mode=True)
    policies = {layer.dtype_policy.name for layer in model.layers}
    assert "mixed_bfloat16" in policies
    x = np.random.default_rng(1).uniform(0, 255, (2, *model.input_shape[1:])).astype("float32")
    probs = model(x)
    assert probs.dtype == "float32"
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-3)

    exported = export(run_dir, tmp_path / "exports")
    sig = tf.saved_model.load(str(exported)).signatures["predict_tensor"]
    assert sig.structured_input_signature[1]["images"].dtype == tf.float32
    got = sig(images=tf.constant(x))["probabilities"]
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), np.asarray(probs), atol=1e-2)

    # An fp32 run's checkpoint evaluated / exported in bf16: float32 in and out, close to fp32.
    run32 = load_run(run_dir, precision="fp32")
    run16 = load_run(run_dir, precision="bf16")
    as_saved = {type(l).__name__ for l in load_run(run_dir).model.layers}
    assert "FusedBatchNormalization" in as_saved and "BatchNormalization" not in as_saved  # trained fused
    assert not {"BatchNormalization", "FusedBatchNormalization"} & {type(l).__name__ for l in run32.model.layers}
    assert {layer.dtype_policy.name for layer in run32.model.layers} == {"float32"}  # bf16-trained, run in fp32
    assert run16.model.outputs[0].dtype == "float32"
    np.testing.assert_allclose(np.asarray(run16.model(x)), np.asarray(run32.model(x)), atol=0.05)
