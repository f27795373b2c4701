"""Numeric precision of training and inference: ``fp32``, ``bf16``, ``fp16`` or ``auto``.

``bf16`` and ``fp16`` are Keras mixed-precision policies (``mixed_bfloat16`` / ``mixed_float16``):
variables stay float32, convolutions and matmuls run in the 16-bit type. Where the numbers need the
range, covidx keeps float32 regardless of the policy: every classifier's softmax layer is built with
``dtype="float32"``, Keras' BatchNormalization normalises and keeps its moving statistics in float32
(at inference of a checkpoint converted by :func:`with_precision`, BN's per-channel affine alone runs in
the 16-bit type, with scale and shift computed in float32),
the losses cast to float32 (:mod:`covidx.training.moex`, :mod:`covidx.training.magsd`), and model
inputs are float32 ``keras.Input`` tensors, so a bf16 network (and its SavedModel export) still takes
and returns float32.

``auto``: ``bf16`` on a CPU with bfloat16 units (x86 ``avx512_bf16`` or ``amx_bf16`` in
``/proc/cpuinfo``), ``fp16`` on a GPU with tensor cores (compute capability 7.0 or newer), else
``fp32``. float16 on a CPU is emulated and slow, which is why ``auto`` never picks it there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import keras
import tensorflow as tf

from covidx.layers.normalization import LowPrecisionBatchNormalization

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


_LOW_PRECISION_BN = {k: v for k, v in keras.saving.serialize_keras_object(LowPrecisionBatchNormalization()).items()
                     if k in ("module", "class_name", "registered_name")}


def with_precision(model: keras.Model, precision: str | None) -> keras.Model:
    """A copy of ``model`` computing in ``precision`` (same weights), e.g. a float32 checkpoint run in bf16.

    Layers whose own policy is float32 take the new policy, except the model's output layers, which
    stay float32 (softmax and outputs in float32); their BatchNormalization layers become
    :class:`~covidx.layers.normalization.LowPrecisionBatchNormalization` (the same weights; the inference
    affine in the new dtype instead of a float32 round trip per layer). Returns ``model`` itself for ``fp32``.
    """
    resolved = resolve_precision(precision)
    if resolved == "fp32":
        return model
    keep = {t._keras_history.operation.name for t in tf.nest.flatten(model.outputs)}
    config = model.get_config()
    for layer in config.get("layers", []):
        if layer["config"].get("name") in keep:
            continue
        dtype = layer["config"].get("dtype")
        if isinstance(dtype, dict) and dtype.get("config", {}).get("name") == "float32":
            dtype["config"]["name"] = POLICIES[resolved]
            if layer.get("class_name") == "BatchNormalization":  # inference affine in bf16/fp16, not float32
                layer.update(_LOW_PRECISION_BN)
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy

