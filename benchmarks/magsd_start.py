"""MAG-SD's first training steps with its classifier at the full learning rate and at a fraction of it.

Why MAG-SD's quick recipe sets ``lr_scales`` (``covidx/models/recipes.py``): MA-Net's classifier reads the
attention-pooled feature (65,536 values, L2-normalised and scaled to norm 100), so one Adam step on each of its
weights moves the logits by the step times the feature's L1 norm. This trains MA-Net with MAG-SD's own train step
(the attention-guided views and the soft distance) on the first ``steps`` x 16 images of a Kermany-layout folder
(shuffled with seed 0, prepared as the quick recipe's evaluation path prepares them: 128 px, CLAHE; no
augmentation; bf16 where the CPU has bfloat16 units), with Adam at
1e-3 after 20 steps of warm-up, once per classifier factor, and prints per 10 steps: the loss, the cross-entropy of
the primary prediction, the largest spread of one image's log-probabilities (max - min; ~10 means the logits jump)
and the accuracy. The same seed and images for every factor.

Usage::

    python benchmarks/magsd_start.py --kermany DIR [--steps 100] [--factors 1,0.01]
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

from covidx.data.inference import gray_input, preprocess_gray  # noqa: E402
from covidx.data.preprocess import PreprocessConfig  # noqa: E402
from covidx.data.sources import read_kermany  # noqa: E402
from covidx.layers.grouped_conv import fast_convolutions  # noqa: E402
from covidx.models import create_model  # noqa: E402
from covidx.models.recipes import recipe_preset  # noqa: E402
from covidx.precision import cpu_model, fused_batch_norms, precision_scope  # noqa: E402
from covidx.training.engine import layer_rates  # noqa: E402
from covidx.training.magsd import MagSDTrainer  # noqa: E402
from covidx.training.optimizers import FusedAdam  # noqa: E402
from covidx.training.schedules import WarmUp  # noqa: E402

CLASSES = ("bacterial", "normal", "viral")
SIZE, BATCH, PEAK, WARMUP = 128, 16, 1e-3, 20


def images(folder: str, n: int, model: str = "mag-sd"):
    """The first ``n`` images of a Kermany-layout folder (shuffled, seed 0) as ``model``'s quick recipe evaluates
    them, and their one-hot stage-1 labels."""
    table = read_kermany(folder)[0].sample(frac=1.0, random_state=0).head(n)
    config = PreprocessConfig.from_preset(recipe_preset(model, "quick"), image_size=SIZE)
    x = np.stack([preprocess_gray(gray_input(p), config).numpy() for p in table.path])
    y = keras.utils.to_categorical([CLASSES.index(f) for f in table.finding], len(CLASSES))
    return x, y.astype("float32")


def probe(x, y, factor: float, steps: int) -> None:
    keras.utils.set_random_seed(0)
    with precision_scope("auto"):
        net = create_model("mag-sd", num_classes=len(CLASSES), image_size=SIZE, channels=1)
    net = fast_convolutions(fused_batch_norms(net))
    trainer = MagSDTrainer(net, seed=0)
    trainer.build((None, SIZE, SIZE, 1))
    optimizer = FusedAdam(WarmUp(PEAK, WARMUP), lr_scales=layer_rates(net, {"predictions": factor}))
    variables = net.trainable_variables

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss, p = trainer.train_loss(x, y, None)
        optimizer.apply(tape.gradient(loss, variables), variables)
        log_p = tf.math.log(tf.clip_by_value(p, 1e-30, 1.0))
        spread = tf.reduce_max(tf.reduce_max(log_p, 1) - tf.reduce_min(log_p, 1))
        hits = tf.cast(tf.argmax(p, 1) == tf.argmax(y, 1), tf.float32)
        return loss, tf.reduce_mean(keras.losses.categorical_crossentropy(y, p)), spread, tf.reduce_mean(hits)

    rows = []
    for i in range(steps):
        rows.append([float(v) for v in step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])])
        if (i + 1) % 10 == 0:
            loss, ce, spread, acc = np.mean(rows[-10:], axis=0)
            print(f"| {factor:g} | {i - 8}-{i + 1} | {loss:.3f} | {ce:.3f} | {spread:.1f} | {acc:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kermany", required=True, help="Kermany-layout folder (chest_xray/train/...)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--factors", default="1,0.01", help="classifier learning-rate factors to compare")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    x, y = images(args.kermany, args.steps * BATCH)
    prior = y.mean(axis=0)
    print(f"{cpu_model()}, {args.threads} threads; {len(x)} images, the class prior's cross-entropy "
          f"{-(prior * np.log(prior)).sum():.3f}")
    print("| classifier factor | steps | loss | cross-entropy | log-probability spread | accuracy |")
    print("|---|---|---|---|---|---|")
    for factor in (float(f) for f in args.factors.split(",")):
        probe(x, y, factor, args.steps)


if __name__ == "__main__":
    main()
