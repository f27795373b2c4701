"""What covidx's training kernels buy: bfloat16 kernel gradients as one matmul, and fused optimiser updates.

Two parts, both printed:

1. Per layer: the gradient of one convolution's kernel as oneDNN's backward-weights kernel
   (``Conv2DBackpropFilter``, what TensorFlow runs) against im2col + one matmul
   (:mod:`covidx.layers.convolution`), for ResNet50/DenseNet shapes at 128 and 224 px, and the largest
   relative difference between the two. With bf16, also the kernel gradient of EfficientNetB0's depthwise
   convolutions at 128 px (the ensemble's third backbone) in bfloat16 against float32 with the casts.
2. Whole training steps (Trainer + categorical cross-entropy, random images, fixed batch) of a model
   with Keras' Adam and TensorFlow's kernels, with :class:`~covidx.training.optimizers.FusedAdam`, and
   with both FusedAdam and :func:`~covidx.layers.grouped_conv.fast_convolutions`: images per second
   and process CPU seconds per step (what ``benchmarks/realdata.py``'s budget counts), medians. For a
   DPN (``--model se-dpn92``) also the last with the dual-path split as two slices, as before session 13
   (:class:`~covidx.models.dpn.DualPathSplit`); for a model with depthwise convolutions (``--model ensemble``)
   also the last with every depthwise kernel gradient in bfloat16, as before session 14.

Usage::

    python benchmarks/training_kernels.py [--model seme-resnet50] [--size 128] [--batch 16]
        [--precision bf16] [--steps 8] [--threads 2] [--skip-layers]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from covidx.layers.convolution import DepthwiseConv2D, im2col  # noqa: E402
from covidx.layers.grouped_conv import fast_convolutions  # noqa: E402
from covidx.models import create_model, get_spec  # noqa: E402
from covidx.models.dpn import DualPathSplit  # noqa: E402
from covidx.models.recipes import family  # noqa: E402
from covidx.precision import cpu_model, fused_batch_norms, precision_scope, resolve_precision  # noqa: E402
from covidx.training.optimizers import FusedAdam  # noqa: E402
from covidx.training.trainers import Trainer  # noqa: E402

# (batch, input side, in channels, out channels, kernel, stride): ResNet50 / DenseNet169 layers
SHAPES = [(16, 8, 1024, 2048, 1, 2), (16, 4, 512, 2048, 1, 1), (16, 4, 512, 512, 3, 1), (16, 8, 256, 256, 3, 1),
          (16, 16, 128, 128, 3, 1), (16, 32, 64, 256, 1, 1), (8, 7, 512, 512, 3, 1), (8, 14, 256, 256, 3, 1)]
# (batch, input side, channels, kernel, stride, EfficientNetB0 block): its depthwise layers at 128 px
DEPTHWISE = [(16, 64, 32, 3, 1, "1a"), (16, 64, 96, 3, 2, "2a"), (16, 32, 144, 3, 1, "2b"), (16, 32, 144, 5, 2, "3a"),
             (16, 16, 240, 5, 1, "3b"), (16, 16, 240, 3, 2, "4a"), (16, 8, 480, 3, 1, "4b-c"), (16, 8, 480, 5, 1, "5a"),
             (16, 8, 672, 5, 1, "5b-c"), (16, 8, 672, 5, 2, "6a"), (16, 4, 1152, 5, 1, "6b-d"), (16, 4, 1152, 3, 1, "7a")]


def median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def per_layer(dtype) -> None:
    print(f"kernel gradient of one convolution, {dtype.name}, ms (median of 20)")
    print("| batch, side, in -> out, kernel, stride | oneDNN backward-weights | im2col + matmul | max rel. diff |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n, side, cin, cout, k, s in SHAPES:
        out = -(-side // s)
        x = tf.constant(rng.standard_normal((n, side, side, cin)), dtype)
        dy = tf.constant(rng.standard_normal((n, out, out, cout)), dtype)
        onednn = tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=[k, k, cin, cout], out_backprop=dy, strides=[1, s, s, 1], padding="SAME"))
        matmul = tf.function(lambda: tf.reshape(tf.matmul(
            tf.reshape(im2col(x, (k, k), (s, s), "SAME"), (-1, k * k * cin)), tf.reshape(dy, (-1, cout)),
            transpose_a=True), (k, k, cin, cout)))
        a, b = np.float32(onednn()), np.float32(matmul())
        diff = np.abs(a - b).max() / np.abs(a).max()
        print(f"| {n}, {side}x{side}, {cin} -> {cout}, {k}x{k}, {s} | {median_ms(onednn):.2f} | "
              f"{median_ms(matmul):.2f} | {diff:.4f} |", flush=True)


def per_layer_depthwise() -> None:
    print("\nkernel gradient of one depthwise convolution (EfficientNetB0 at 128 px), ms (median of 20)")
    print("| block: batch, side x channels, kernel, stride | oneDNN bfloat16 | float32 with casts | max rel. diff |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n, side, c, k, s, block in DEPTHWISE:
        out = -(-side // s)
        x = tf.constant(rng.standard_normal((n, side, side, c)), tf.bfloat16)
        dy = tf.constant(rng.standard_normal((n, out, out, c)), tf.bfloat16)

        def grad(x, dy):
            return tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                input=x, filter_sizes=[k, k, c, 1], out_backprop=dy, strides=[1, s, s, 1], padding="SAME")

        bf16 = tf.function(lambda: grad(x, dy))
        fp32 = tf.function(lambda: tf.cast(grad(tf.cast(x, tf.float32), tf.cast(dy, tf.float32)), tf.bfloat16))
        a, b = np.float32(bf16()), np.float32(fp32())
        diff = np.abs(a - b).max() / np.abs(b).max()
        print(f"| {block}: {n}, {side}x{side}x{c}, {k}x{k}, {s} | {median_ms(bf16):.2f} | {median_ms(fp32):.2f} | "
              f"{diff:.4f} |", flush=True)


class SlicedSplit(DualPathSplit):
    """DPN's split as it was before session 13: two slices, whose gradients are two zero-filled maps of the
    whole width and their sum (``covidx.models.dpn.DualPathSplit`` is one ``tf.split``)."""

    def call(self, x):
        return [x[..., : self.residual_channels], x[..., self.residual_channels :]]


def train_steps(args) -> None:
    print(f"\ntraining step, {args.model} @{args.size} px, batch {args.batch}, {args.precision} "
          f"(median of {args.steps} steps)")
    print("| variant | img/s | CPU s / step |")
    print("|---|---|---|")
    rng = np.random.default_rng(0)
    y = keras.utils.to_categorical(np.arange(args.batch) % 3, 3)
    channels = get_spec(args.model).preset.channels
    x = tf.constant(rng.uniform(0, 255, (args.batch, args.size, args.size, channels)).astype("float32"))
    variants = {"Keras Adam, TensorFlow's kernel gradients": (keras.optimizers.Adam, False, None),
                "FusedAdam": (FusedAdam, False, None),
                "FusedAdam + fast_convolutions (what covidx trains)": (FusedAdam, True, None)}
    if family(args.model) == "dpn":
        variants["the same, the dual-path split as two slices (before session 13)"] = (
            FusedAdam, True, {DualPathSplit: SlicedSplit})
    if family(args.model) == "ensemble":
        variants["the same, depthwise kernel gradients in bfloat16 (before session 14)"] = (
            FusedAdam, True, {DepthwiseConv2D: keras.layers.DepthwiseConv2D})
    for name, (optimizer, fast, undo) in variants.items():
        keras.backend.clear_session()
        with precision_scope(args.precision):
            net = fused_batch_norms(create_model(args.model, num_classes=3, image_size=args.size, channels=channels))
        if fast:
            fast_convolutions(net)
        for layer in net._flatten_layers(include_self=False, recursive=True) if undo else []:
            if type(layer) in undo:
                layer.__class__ = undo[type(layer)]
        trainer = Trainer(net)
        trainer.compile(optimizer=optimizer(1e-3), loss="categorical_crossentropy")
        for _ in range(3):
            trainer.train_on_batch(x, y)
        times, cpu0 = [], time.process_time()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            trainer.train_on_batch(x, y)
            times.append(time.perf_counter() - t0)
        cpu = (time.process_time() - cpu0) / args.steps
        print(f"| {name} | {args.batch / np.median(times):.2f} | {cpu:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="seme-resnet50")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-layers", action="store_true", help="only the training steps")
    args = ap.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    print(f"{cpu_model()}, {args.threads} threads, TensorFlow {tf.__version__}")
    if not args.skip_layers:
        bf16 = resolve_precision(args.precision) == "bf16"
        per_layer(tf.bfloat16 if bf16 else tf.float32)
        if bf16:
            per_layer_depthwise()
    train_steps(args)


if __name__ == "__main__":
    main()
