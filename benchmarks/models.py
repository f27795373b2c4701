"""Forward throughput of the paper models on this CPU, next to their plain keras.applications backbones.

Prints images/second (median of timed batches after a warm-up) for:

* SEME-ResNet50 / SEME-DenseNet169 at 224 and 512 vs keras.applications ResNet50 / DenseNet169
  (same input size, 3 channels, random weights): the cost of SE + MoEx (target <= 15 %);
* SE-DPN-92 vs DPN-92 at 224 (the cost of SE);
* the concatenated ensemble and FC-DenseNet103 at 224, with VGG19 + DenseNet121 + EfficientNetB0 run
  separately (the ensemble should cost no more than their sum);
* MA-Net (MAG-SD) forward and one MAG-SD training step (1 primary + 3 attention-augmented passes)
  vs keras.applications ResNet50.

Usage: ``python benchmarks/models.py [--batch 8] [--repeats 5] [--only seme,dpn,ensemble,magsd]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def rate(model, size, channels=3, batch=8, repeats=5) -> float:
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, size, size, channels)).astype("float32"))
    fn = tf.function(lambda t: model(t, training=False), jit_compile=False)
    fn(x)  # trace + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(x)
        (out[0] if isinstance(out, (list, tuple)) else out).numpy()
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def rates_interleaved(models, size, channels=3, batch=8, repeats=5, rounds=3) -> list[float]:
    """images/s of each model, timed in alternation (A B A B ...) so that a load change on the machine hits
    every model alike; median over ``rounds * repeats`` batches each."""
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, size, size, channels)).astype("float32"))
    fns = [tf.function(lambda t, m=m: m(t, training=False), jit_compile=False) for m in models]
    for fn in fns:
        fn(x).numpy()  # trace + warm-up
    times = [[] for _ in models]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(x).numpy()
                times[i].append(time.perf_counter() - t0)
    return [batch / float(np.median(t)) for t in times]


def app(name, size):
    inp = keras.Input((size, size, 3))
    base = getattr(keras.applications, name)(include_top=False, weights=None, input_tensor=inp, pooling="avg")
    return keras.Model(inp, keras.layers.Dense(3)(base.output))


def line(label, value, ref=None, ref_label=""):
    extra = f"   ({(1 / value) / (1 / ref) - 1:+.1%} time per image vs {ref_label})" if ref else ""
    print(f"  {label:<44}{value:8.2f} img/s{extra}")


def bench_seme(args):
    from covidx.models import create_model

    for size in (224, 512):
        print(f"Cascade-SEME at {size}x{size}, batch {args.batch} (timed in alternation):")
        for family, app_name, gap_name, seme_name in (("ResNet50", "ResNet50", "resnet50-gap", "seme-resnet50"),
                                                      ("DenseNet169", "DenseNet169", "densenet169-gap",
                                                       "seme-densenet169")):
            models = [app(app_name, size), create_model(gap_name, image_size=size, channels=3),
                      create_model(seme_name, image_size=size, channels=3)]
            plain, gap, seme = rates_interleaved(models, size, batch=args.batch, repeats=args.repeats)
            line(f"keras.applications {family}", plain)
            line(f"{gap_name} (covidx, no SE / MoEx)", gap, plain, family)
            line(f"{seme_name} (SE + MoEx, MoEx idle at inference)", seme, plain, family)
            line(f"  ... the same vs {gap_name}", seme, gap, gap_name)
            del models
            keras.backend.clear_session()


def bench_dpn(args):
    from covidx.models import create_model

    print(f"SE-DPN at 224x224, batch {args.batch}:")
    p = rate(create_model("dpn92"), 224, batch=args.batch, repeats=args.repeats)
    line("DPN-92", p)
    line("SE-DPN-92", rate(create_model("se-dpn92"), 224, batch=args.batch, repeats=args.repeats), p, "DPN-92")
    keras.backend.clear_session()


def bench_ensemble(args):
    from covidx.models import create_model

    print(f"Ensemble and FC-DenseNet103 at 224x224, batch {args.batch}:")
    parts = [rate(app(n, 224), 224, batch=args.batch, repeats=args.repeats)
             for n in ("VGG19", "DenseNet121", "EfficientNetB0")]
    for n, r in zip(("VGG19", "DenseNet121", "EfficientNetB0"), parts):
        line(f"{n} alone", r)
    summed = 1.0 / sum(1.0 / r for r in parts)
    line("the three run one after another", summed)
    line("ensemble (one graph)", rate(create_model("ensemble"), 224, batch=args.batch, repeats=args.repeats),
         summed, "the three separately")
    keras.backend.clear_session()
    line("FC-DenseNet103 (1 channel)", rate(create_model("fc-densenet103"), 224, channels=1, batch=min(args.batch, 4),
                                            repeats=args.repeats))
    keras.backend.clear_session()


def bench_magsd(args):
    from covidx.models import create_model
    from covidx.training.magsd import MagSDTrainer

    print(f"MAG-SD at 224x224, batch {args.batch}:")
    r = rate(app("ResNet50", 224), 224, batch=args.batch, repeats=args.repeats)
    line("keras.applications ResNet50 (3 ch)", r)
    net = create_model("mag-sd")
    line("MA-Net forward (1 ch, M=32, attention pooling)", rate(net, 224, channels=1, batch=args.batch,
                                                               repeats=args.repeats), r, "ResNet50")
    trainer = MagSDTrainer(net)
    trainer.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss="categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (args.batch, 224, 224, 1)).astype("float32")
    y = keras.utils.to_categorical(np.arange(args.batch) % 4, 4)
    trainer.train_on_batch(x, y)  # trace
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        trainer.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    print(f"  {'MAG-SD train step (4 forwards + 1 backward)':<44}{float(np.median(times)):8.2f} s/step "
          f"({args.batch / float(np.median(times)):.2f} img/s)")
    keras.backend.clear_session()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="seme,dpn,ensemble,magsd")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, Keras {keras.__version__}")
    for name in args.only.split(","):
        globals()[f"bench_{name}"](args)


if __name__ == "__main__":
    main()
