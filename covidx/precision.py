"""Numeric precision of training and inference: ``fp32``, ``bf16``, ``fp16`` or ``auto``.

``bf16`` and ``fp16`` are Keras mixed-precision policies (``mixed_bfloat16`` / ``mixed_float16``):
variables stay float32, convolutions and matmuls run in the 16-bit type (an inference copy, which nothing
trains, keeps convolution and dense weights in the 16-bit type itself). Where the numbers need the
range, covidx keeps float32 regardless of the policy: every classifier's softmax layer is built with
``dtype="float32"``, BatchNormalization keeps its moving statistics and computes the batch moments in
float32 (training runs it as one fused kernel, :func:`fused_batch_norms`; in the inference copy of a
checkpoint, :func:`inference_copy`, a BN right after a convolution is folded into that convolution's
kernel and bias in float64, and any other BN's per-channel affine is one fused kernel in the feature
map's type, with its statistics in float32),
the losses cast to float32 (:mod:`covidx.training.moex`, :mod:`covidx.training.magsd`), and model
inputs are float32 ``keras.Input`` tensors, so a bf16 network (and its SavedModel export) still takes
and returns float32.

``auto``: ``bf16`` on a CPU with bfloat16 units (x86 ``avx512_bf16`` or ``amx_bf16`` in
``/proc/cpuinfo``), ``fp16`` on a GPU with tensor cores (compute capability 7.0 or newer), else
``fp32``. float16 on a CPU is emulated and slow, which is why ``auto`` never picks it there.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from covidx.layers.convolution import DepthwiseConv2D
from covidx.layers.grouped_conv import GroupedConv2D
from covidx.layers.normalization import FusedBatchNormalization

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor listed (empty where the file does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first processor's model name (``platform.processor()`` where the file does not say)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    return bool(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))


def gpu_has_tensor_cores() -> bool:
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability and tuple(capability) >= (7, 0):
            return True
    return False


def resolve_precision(precision: str | None, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for a requested precision (``auto`` decided for this machine)."""
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if gpu_has_tensor_cores():
        return "fp16"
    if not tf.config.list_physical_devices("GPU") and cpu_has_bf16(cpuinfo):
        return "bf16"
    return "fp32"


@contextlib.contextmanager
def precision_scope(precision: str | None):
    """Build models inside this block with ``precision``'s Keras policy; the global policy is restored after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(POLICIES[resolve_precision(precision)])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _class_of(layer: keras.layers.Layer) -> dict:
    """The keys naming ``layer``'s class in a model config."""
    return {k: v for k, v in keras.saving.serialize_keras_object(layer).items()
            if k in ("module", "class_name", "registered_name")}


_FUSED_BN = _class_of(FusedBatchNormalization())
BATCH_NORMS = ("BatchNormalization", _FUSED_BN["class_name"])  # a config's BN layers, Keras' or fused
_COVIDX_CONV = _class_of(GroupedConv2D(1, 1))["registered_name"]
_KERAS_CONV = _class_of(keras.layers.Conv2D(1, 1))
_COVIDX_DEPTHWISE = _class_of(DepthwiseConv2D(1))["registered_name"]
_KERAS_DEPTHWISE = _class_of(keras.layers.DepthwiseConv2D(1))


_ZEROS = keras.saving.serialize_keras_object(keras.initializers.Zeros())
FOLDABLE = ("Conv2D", "DepthwiseConv2D")  # linear per-output-channel layers a following BN can fold into


# In an inference copy these layers keep their weights in the 16-bit compute type of a mixed policy
# ("bfloat16" for "mixed_bfloat16"): nothing trains them, and a mixed layer would cast every kernel from
# float32 on every call (SEME-ResNet50 at 512 px, batch 4, bf16: ~10 % of the forward pass on 2 cores).
# The values are the same: the mixed layer computes with the kernel rounded to the 16-bit type as well.
STORED_IN_COMPUTE_TYPE = ("Conv2D", "DepthwiseConv2D", "Dense")
_STORED = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
_MIXED = {stored: mixed for mixed, stored in _STORED.items()}  # a layer stored in 16 bits computes as mixed
_KNOWN_POLICIES = {*POLICIES.values(), *_STORED.values()}


def _history(value) -> list:
    """Every ``keras_history`` ([layer, node, tensor]) referenced in a functional config's node data."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return [value["config"]["keras_history"]]
        return [h for v in value.values() for h in _history(v)]
    if isinstance(value, (list, tuple)):
        return [h for v in value for h in _history(v)]
    return []


def _foldable_pairs(config: dict) -> dict[str, str]:
    """``{batch_norm_name: conv_name}`` for BNs over the channel (last) axis whose one input is a
    ``Conv2D`` / ``DepthwiseConv2D`` without activation whose output nothing else uses."""
    layers = {layer["name"]: layer for layer in config["layers"]}
    uses: dict[str, int] = {}
    for layer in config["layers"]:
        for name, _, _ in _history(layer.get("inbound_nodes", [])):
            uses[name] = uses.get(name, 0) + 1
    for name, _, _ in _history(config.get("output_layers", [])):
        uses[name] = uses.get(name, 0) + 1
    pairs = {}
    for layer in config["layers"]:
        if layer["class_name"] not in BATCH_NORMS or len(layer.get("inbound_nodes", [])) != 1:
            continue
        sources = _history(layer["inbound_nodes"])
        if len(sources) != 1 or layer["config"].get("axis") not in (-1, 3, [-1], [3]):
            continue
        conv = layers.get(sources[0][0])
        if (conv is not None and conv["class_name"] in FOLDABLE and uses.get(conv["name"]) == 1
                and len(conv.get("inbound_nodes", [])) == 1 and conv["config"].get("activation") == "linear"
                and conv["config"].get("data_format", "channels_last") == "channels_last"):
            pairs[layer["name"]] = conv["name"]
    return pairs


def _fold(config: dict, pairs: dict[str, str]) -> dict:
    """``config`` with each folded pair's convolution in its BN's place (named after the BN, with a bias)."""
    convs = {layer["name"]: layer for layer in config["layers"] if layer["name"] in pairs.values()}
    layers = []
    for layer in config["layers"]:
        if layer["name"] in convs:
            continue
        if layer["name"] in pairs:
            conv = convs[pairs[layer["name"]]]
            layer = {**conv, "name": layer["name"],
                     "config": {**conv["config"], "name": layer["name"], "use_bias": True, "bias_constraint": None,
                                "bias_regularizer": None, "bias_initializer": _ZEROS}}
        layers.append(layer)
    return {**config, "layers": layers}


def _folded_weights(conv, bn) -> list[np.ndarray]:
    """Kernel ``W * s`` and bias ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``, in float64."""
    kernel = np.asarray(conv.kernel, np.float64)
    scale = 1.0 / np.sqrt(np.asarray(bn.moving_variance, np.float64) + bn.epsilon)
    if bn.scale:
        scale = scale * np.asarray(bn.gamma, np.float64)
    shift = -np.asarray(bn.moving_mean, np.float64) * scale
    if bn.center:
        shift = shift + np.asarray(bn.beta, np.float64)
    bias = np.asarray(conv.bias, np.float64) if conv.use_bias else np.zeros_like(scale)
    # A depthwise kernel is (h, w, in, multiplier); its output channel i * multiplier + j is [..., i, j].
    kernel_scale = scale.reshape(kernel.shape[2:]) if isinstance(conv, keras.layers.DepthwiseConv2D) else scale
    return [(kernel * kernel_scale).astype("float32"), (bias * scale + shift).astype("float32")]


def _set_precision(model: keras.Model, config: dict, precision: str | None) -> bool:
    """Turn ``config``'s BatchNormalization layers into :class:`FusedBatchNormalization`, ungrouped covidx
    ``Conv2D`` and ``DepthwiseConv2D`` layers into Keras' own, and set every layer
    under a covidx policy but the outputs to ``precision``'s (``None``: each layer's own), the layers of
    :data:`STORED_IN_COMPUTE_TYPE` under a mixed policy to its pure 16-bit one; whether anything changed."""
    target = None if precision is None else POLICIES[resolve_precision(precision)]
    keep = {t._keras_history.operation.name for t in tf.nest.flatten(model.outputs)}
    changed = False
    for layer in config.get("layers", []):
        if layer.get("class_name") == "BatchNormalization":
            layer.update(_FUSED_BN)
            changed = True
        if layer.get("registered_name") == _COVIDX_CONV and layer["config"].get("groups", 1) == 1:
            # covidx's Conv2D differs from Keras' only in its training gradient when ungrouped, and its
            # custom-gradient identity op would stand between a convolution and the activation oneDNN
            # fuses into it (covidx.layers.convolution).
            layer.update(_KERAS_CONV)
            changed = True
        if layer.get("registered_name") == _COVIDX_DEPTHWISE:  # the same, for its float32 kernel gradient
            layer.update(_KERAS_DEPTHWISE)
            changed = True
        dtype = layer["config"].get("dtype")
        if (layer["config"].get("name") in keep or not isinstance(dtype, dict)
                or dtype.get("config", {}).get("name") not in _KNOWN_POLICIES):
            continue
        policy = _MIXED.get(dtype["config"]["name"], dtype["config"]["name"]) if target is None else target
        if layer.get("class_name") in STORED_IN_COMPUTE_TYPE:
            policy = _STORED.get(policy, policy)
        if dtype["config"]["name"] != policy:
            dtype["config"]["name"] = policy
            changed = True
    return changed


def _rebuild(model: keras.Model, config: dict, pairs: dict[str, str]) -> keras.Model:
    """``config`` built, with ``model``'s weights layer by layer (the folded pairs' merged)."""
    copy = model.__class__.from_config(config)
    for layer in copy.layers:
        if layer.name in pairs:
            layer.set_weights(_folded_weights(model.get_layer(pairs[layer.name]), model.get_layer(layer.name)))
        elif layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return copy


def fold_batch_norms(model: keras.Model) -> keras.Model:
    """An inference copy of ``model`` with every ``Conv2D`` (or ``DepthwiseConv2D``) ``-> BatchNormalization``
    pair merged into one convolution (ResNet-type post-activation networks, EfficientNet; a pre-activation BN,
    e.g. DenseNet's or DPN's first, follows a ReLU or a concatenation and stays).

    At inference BN is ``y = (x - mean) * g / sqrt(var + eps) + beta``, so with
    ``s = g / sqrt(var + eps)`` the pair equals a convolution with kernel ``W * s`` (per output
    channel) and bias ``(b - mean) * s + beta``, computed here in float64 from the float32 weights. The
    merged layer takes the BN layer's name (so layer names downstream, e.g. Grad-CAM targets, still
    resolve); the convolution's own name, whose output no longer exists, is gone. Only the top level of a
    functional model is folded; the copy is for inference, not for training (it has no BN to update).
    Returns ``model`` itself when nothing folds.
    """
    config = model.get_config()
    pairs = _foldable_pairs(config) if "layers" in config else {}
    return _rebuild(model, _fold(config, pairs), pairs) if pairs else model


def fused_batch_norms(model: keras.Model) -> keras.Model:
    """Make every Keras ``BatchNormalization`` in ``model`` a :class:`FusedBatchNormalization`, in place, and
    return ``model``: what covidx trains, since one fused kernel forward and one backward replace Keras' chain
    of element-wise passes (``benchmarks/versus_torch.py``'s training rows measure the step). Nested models
    and the sublayers of custom layers are included. The fused layer has the parent's weights, state and
    config and only another ``call``, so changing the class of the built layer is the whole swap: no copy,
    which would cost as much as building the model again. Swap before the model is compiled or called."""
    # _flatten_layers reaches every sublayer, however deep (Keras has no public walk over them).
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer) is keras.layers.BatchNormalization:
            layer.__class__ = FusedBatchNormalization
    return model


def with_precision(model: keras.Model, precision: str | None) -> keras.Model:
    """An inference copy of ``model`` computing in ``precision`` (same weights), e.g. a float32 checkpoint run
    in bf16 or a bf16-trained one run in fp32; ``None`` keeps each layer's own precision.

    Layers under one of covidx's policies (float32, mixed_bfloat16, mixed_float16) take the new one, except
    the model's output layers, which stay as built (softmax and outputs in float32); convolutions and dense
    layers keep their weights in the 16-bit type itself (:data:`STORED_IN_COMPUTE_TYPE`). BatchNormalization
    layers become :class:`~covidx.layers.normalization.FusedBatchNormalization` (the same weights; the
    inference affine as one fused kernel in the feature map's dtype instead of element-wise passes and, in
    bf16/fp16, a float32 round trip per layer). What covidx's inference paths run is :func:`inference_copy`
    (BN folded into the convolutions as well). Returns ``model`` itself when nothing changes.
    """
    config = model.get_config()
    return _rebuild(model, config, {}) if _set_precision(model, config, precision) else model


def inference_copy(model: keras.Model, precision: str | None = None) -> keras.Model:
    """The network as covidx's inference paths run it (evaluate, predict, export, the benchmarks): every
    ``Conv2D -> BatchNormalization`` pair folded into one convolution (:func:`fold_batch_norms`, in any
    precision: at float32 the fold changes outputs by float rounding only, and saves one pass over the feature
    map per BN), the other BNs as one fused kernel each, computed in ``precision`` (:func:`with_precision`;
    ``None`` keeps the checkpoint's own). One copy is built for both.
    """
    config = model.get_config()
    pairs = _foldable_pairs(config) if "layers" in config else {}
    config = _fold(config, pairs) if pairs else config
    changed = _set_precision(model, config, precision)
    return _rebuild(model, config, pairs) if pairs or changed else model
