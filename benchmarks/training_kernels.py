"""What covidx's training kernels buy: bfloat16 kernel gradients as one matmul, and fused optimiser updates.

Two parts, both printed:

1. Per layer: the gradient of one convolution's kernel as oneDNN's backward-weights kernel
   (``Conv2DBackpropFilter``, what TensorFlow runs) against im2col + one matmul
   (:mod:`covidx.layers.convolution`), for ResNet50/DenseNet shapes at 128 and 224 px, and the largest
   relative difference between the two.
2. Whole training steps (Trainer + categorical cross-entropy, random images, fixed batch) of a model
   with Keras' Adam and TensorFlow's kernels, with :class:`~covidx.training.optimizers.FusedAdam`, and
   with both FusedAdam and :func:`~covidx.layers.grouped_conv.fast_convolutions`: images per second
   and process CPU seconds per step (what ``benchmarks/realdata.py``'s budget counts), medians. For a
   DPN (``--model se-dpn92``) also the last with the dual-path split as two slices, as before session 13
   (:class:`~covidx.models.dpn.DualPathSplit`).

Usage::

    python benchmarks/training_kernels.py [--model seme-resnet50] [--size 128] [--batch 16]
        [--precision bf16] [--steps 8] [--threads 2]
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

from covidx.layers.convolution import im2col  # noqa: E402
from covidx.layers.grouped_conv import fast_convolutions  # noqa: E402
from covidx.models import create_model  # noqa: E402
from covidx.models.dpn import DualPathSplit  # noqa: E402
from covidx.models.recipes import family  # noqa: E402
from covidx.precision import cpu_model, fused_batch_norms, precision_scope, resolve_precision  # noqa: E402
from covidx.training.optimizers import FusedAdam  # noqa: E402
from covidx.training.trainers import Trainer  # noqa: E402

# (batch, input side, in channels, out channels, kernel, stride): ResNet50 / DenseNet169 layers
SHAPES = [(16, 8, 1024, 2048, 1, 2), (16, 4, 512, 2048, 1, 1), (16, 4, 512, 512, 3, 1), (16, 8, 256, 256, 3, 1),
          (16, 16, 128, 128, 3, 1), (16, 32, 64, 256, 1, 1), (8, 7, 512, 512, 3, 1), (8, 14, 256, 256, 3, 1)]


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
    x = tf.constant(rng.uniform(0, 255, (args.batch, args.size, args.size, 1)).astype("float32"))
    y = keras.utils.to_categorical(np.arange(args.batch) % 3, 3)
    variants = {"Keras Adam, TensorFlow's kernel gradients": (keras.optimizers.Adam, False, False),
                "FusedAdam": (FusedAdam, False, False),
                "FusedAdam + fast_convolutions (what covidx trains)": (FusedAdam, True, False)}
    if family(args.model) == "dpn":
        variants["the same, the dual-path split as two slices (before session 13)"] = (FusedAdam, True, True)
    for name, (optimizer, fast, sliced) in variants.items():
        keras.backend.clear_session()
        with precision_scope(args.precision):
            net = fused_batch_norms(create_model(args.model, num_classes=3, image_size=args.size, channels=1))
        if fast:
            fast_convolutions(net)
        if sliced:
            for layer in net.layers:
                if type(layer) is DualPathSplit:
                    layer.__class__ = SlicedSplit
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
        per_layer(tf.bfloat16 if resolve_precision(args.precision) == "bf16" else tf.float32)
    train_steps(args)


if __name__ == "__main__":
    main()
