"""The ensemble's first training steps: does its VGG19 branch learn, or switch off?

Why :func:`covidx.models.ensemble.he_uniform_without_bn` and the ensemble's quick-recipe ``lr_scales``
(``covidx/models/recipes.py``) exist. VGG19 has no batch normalisation; trained from scratch inside the
ensemble, with keras.applications' Glorot-uniform kernels and the rate that suits the two BN branches, its
ReLUs switch off and the ensemble trains as two backbones. This trains the ensemble (128 px, bf16 where the
CPU has bfloat16 units, Adam at 1e-3 after 80 steps of warm-up, as the quick recipe; no class weights, no
augmentation) on the first ``steps`` x 16 images of a Kermany-layout folder (shuffled with seed 0, prepared as
the quick recipe's evaluation path prepares them), once per variant ``init:factor`` (VGG19's kernels
``glorot``, keras.applications' default, or ``he``, covidx's; VGG19's layers at ``factor`` x the rate), and
prints per 20 steps: the training loss, on 64 other images the share of VGG19's 512 pooled features that are
the same for every image ("dead"), their mean size, and each branch's share of the logits (the standard
deviation over images of its features times its rows of the classifier). The same seed and images for
every variant. ``--checkpoint`` prints the same figures for trained ensembles instead.

Usage::

    python benchmarks/ensemble_start.py --kermany DIR [--steps 100] [--variants glorot:1,he:1,he:0.3]
    python benchmarks/ensemble_start.py --kermany DIR --checkpoint RUN/best.keras [--checkpoint ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from covidx.layers.grouped_conv import fast_convolutions  # noqa: E402
from covidx.models import create_model  # noqa: E402
from covidx.models.ensemble import backbone_layers, branch_names  # noqa: E402
from covidx.precision import cpu_model, fused_batch_norms, precision_scope  # noqa: E402
from covidx.training.engine import layer_rates  # noqa: E402
from covidx.training.optimizers import FusedAdam  # noqa: E402
from covidx.training.schedules import WarmUp  # noqa: E402
from magsd_start import BATCH, CLASSES, SIZE, images  # noqa: E402

PEAK, WARMUP, PROBE = 1e-3, 80, 64


def probe(x, y, held_out, init: str, factor: float, steps: int) -> None:
    keras.utils.set_random_seed(0)
    with precision_scope("auto"):
        net = create_model("ensemble", num_classes=len(CLASSES), image_size=SIZE, channels=3)
    if init == "glorot":  # keras.applications' own kernels, as before covidx's He-uniform
        for conv in backbone_layers(net, "vgg19"):
            if isinstance(conv, keras.layers.Conv2D):
                conv.kernel.assign(keras.initializers.GlorotUniform()(conv.kernel.shape, dtype=conv.kernel.dtype))
    net = fast_convolutions(fused_batch_norms(net))
    optimizer = FusedAdam(WarmUp(PEAK, WARMUP), lr_scales=layer_rates(net, {"vgg19_*": factor}))
    variables = net.trainable_variables

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, net(x, training=True)))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    print(row(f"{init}, {factor:g}x", 0, "", net, held_out), flush=True)
    losses = []
    for i in range(steps):
        losses.append(float(step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])))
        if (i + 1) % 20 == 0:
            print(row(f"{init}, {factor:g}x", i + 1, f"{np.mean(losses[-20:]):.3f}", net, held_out), flush=True)


def row(variant: str, step, loss: str, net: keras.Model, held_out) -> str:
    """A table row: VGG19's dead share and feature size, and each branch's share of the logits on ``held_out``."""
    branches = branch_names(net)
    feats = keras.Model(net.input, [net.get_layer(f"{b}_gap").output for b in branches]).predict(held_out, verbose=0)
    kernel = net.get_layer("predictions").kernel.numpy()
    offsets = np.cumsum([0] + [f.shape[1] for f in feats])
    shares = [(f @ kernel[a:b]).std(axis=0).mean() for f, a, b in zip(feats, offsets, offsets[1:])]
    vgg = feats[branches.index("vgg19")]
    return (f"| {variant} | {step} | {loss} | {(vgg.std(axis=0) < 1e-6).mean():.2f} | {np.abs(vgg).mean():.3g} | "
            + " | ".join(f"{s:.3g}" for s in shares) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kermany", required=True, help="Kermany-layout folder (chest_xray/train/...)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--variants", default="glorot:1,he:1,he:0.3",
                    help="init:factor, comma-separated (init glorot or he; VGG19's rate factor)")
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="a trained ensemble (.keras): its row on the same held-out images instead of training")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    x, y = images(args.kermany, args.steps * BATCH + PROBE, "ensemble")
    held_out, x, y = x[-PROBE:], x[:-PROBE], y[:-PROBE]
    print(f"{cpu_model()}, {args.threads} threads; {len(x)} training images, {PROBE} held out")
    print("| VGG19 init, rate | step | loss | VGG19 features dead | their mean size | logit share: "
          "VGG19 | DenseNet121 | EfficientNetB0 |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.checkpoint:
        print(row(path, "trained", "", keras.saving.load_model(path, safe_mode=True), held_out), flush=True)
    for variant in [] if args.checkpoint else args.variants.split(","):
        init, factor = variant.split(":")
        if init not in ("glorot", "he"):
            raise SystemExit(f"unknown init {init!r} (glorot, he)")
        probe(x, y, held_out, init, float(factor), args.steps)


if __name__ == "__main__":
    main()
