"""Per-op profile of DPN's grouped 3x3 convolutions: formulations of the same computation, forward and backward.

For each shape (DPN-92's four stages at 224 px batch 8, and two at 128 px batch 16) prints milliseconds of the
forward pass and of forward + both gradients (input and kernel), for:

* ``keras``      Keras' ``Conv2D(groups=G)``: on TensorFlow/CPU every grouped conv is its own XLA cluster;
* ``covidx``     :class:`covidx.layers.GroupedConv2D`: ``tf.nn.convolution`` with the grouped kernel, no XLA
                 (oneDNN on x86 CPUs, cuDNN on GPUs);
* ``per-group``  G ordinary convolutions + concat (covidx's fallback where the grouped kernel is unsupported);
* ``depthwise``  a depthwise conv with channel multiplier C/G, then a sum over each group's inputs;
* ``blockdiag``  one dense conv with the block-diagonal kernel (G x the FLOPs).

Each formulation's output is compared with the ``covidx`` one (max abs difference). Formulations are timed in
alternation so a load change hits all alike. Usage: ``python benchmarks/grouped_conv.py [--repeats 3]
[--only keras,covidx,per-group] [--shapes 8x28x192,16x8x384]`` (``BxHxC``; groups 32).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from covidx.layers import GroupedConv2D  # noqa: E402
from covidx.layers.grouped_conv import split_grouped_conv  # noqa: E402

GROUPS = 32
SHAPES = "8x56x96,8x28x192,8x14x384,8x7x768,16x32x96,16x8x384"


def depthwise(x, k):
    kh, kw, c, r = k.shape
    g = r // c
    # depthwise kernel [.., g*c+i, j] = k[.., i, g*c+j]: input channel i of group g feeds output j of group g
    kd = tf.reshape(tf.transpose(tf.reshape(k, (kh, kw, c, g, c)), (0, 1, 3, 2, 4)), (kh, kw, r, c))
    y = tf.nn.depthwise_conv2d(x, kd, (1, 1, 1, 1), "SAME")
    b, h, w = tf.shape(y)[0], tf.shape(y)[1], tf.shape(y)[2]
    return tf.reshape(tf.reduce_sum(tf.reshape(y, (b, h, w, g, c, c)), axis=4), (b, h, w, r))


def blockdiag(x, k):
    kh, kw, c, r = k.shape
    g = r // c
    full = tf.einsum("hwigo,gf->hwgifo", tf.reshape(k, (kh, kw, c, g, c)), tf.eye(g))
    return tf.nn.conv2d(x, tf.reshape(full, (kh, kw, r, r)), 1, "SAME")


def formulations(channels: int):
    keras_conv = keras.layers.Conv2D(channels, 3, padding="same", groups=GROUPS, use_bias=False)
    covidx_conv = GroupedConv2D(channels, 3, padding="same", groups=GROUPS, use_bias=False)
    return {
        "keras": lambda x, k: keras_conv.convolution_op(x, k),
        "covidx": lambda x, k: covidx_conv.convolution_op(x, k),
        "per-group": lambda x, k: split_grouped_conv(x, k, 1, "SAME", GROUPS),
        "depthwise": depthwise,
        "blockdiag": blockdiag,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="keras,covidx,per-group,depthwise,blockdiag")
    ap.add_argument("--shapes", default=SHAPES)
    args = ap.parse_args()
    names = args.only.split(",")
    print(f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}; 3x3 convolutions, {GROUPS} groups, "
          "milliseconds (forward | forward + input and kernel gradients), median")
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        b, hw, c = map(int, shape.split("x"))
        x = tf.constant(rng.standard_normal((b, hw, hw, c)).astype("float32"))
        k = tf.constant(rng.standard_normal((3, 3, c // GROUPS, c)).astype("float32") * 0.1)
        fns = formulations(c)
        fwd, both = {}, {}
        for name in names:
            f = fns[name]
            fwd[name] = tf.function(lambda a, w, f=f: f(a, w))

            def grads(a, w, f=f):
                with tf.GradientTape() as tape:
                    tape.watch([a, w])
                    y = f(a, w)
                    loss = tf.reduce_sum(y * y)
                return tape.gradient(loss, [a, w])

            both[name] = tf.function(grads)
        reference = fwd["covidx"](x, k).numpy() if "covidx" in names else None
        err = {}
        for name in names:  # trace + warm-up
            out = fwd[name](x, k).numpy()
            err[name] = float(np.abs(out - reference).max()) if reference is not None else float("nan")
            both[name](x, k)[1].numpy()
        times = {name: ([], []) for name in names}
        for _ in range(args.repeats):
            for name in names:
                t0 = time.perf_counter()
                fwd[name](x, k).numpy()
                t1 = time.perf_counter()
                both[name](x, k)[1].numpy()
                times[name][0].append(t1 - t0)
                times[name][1].append(time.perf_counter() - t1)
        flops = 2 * b * hw * hw * c * (c // GROUPS) * 9
        print(f"batch {b}, {hw}x{hw}, {c} channels ({c // GROUPS} per group), {flops / 1e9:.2f} GFLOP forward:")
        for name in names:
            f, fb = (1e3 * float(np.median(t)) for t in times[name])
            print(f"  {name:<10} {f:9.1f} | {fb:10.1f}   ({flops / f / 1e6:6.1f} GFLOP/s forward)  "
                  f"max |diff| {err[name]:.1e}")


if __name__ == "__main__":
    main()
