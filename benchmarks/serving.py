"""Serving speed of an exported SavedModel through its bytes signature, next to the Keras model on tensors.

Exports a freshly built model (default: the ResNet50 baseline at 224, 3 channels, the cost class of the paper
models) to a temporary folder, then measures single-image latency (p50 / p95) and batch-32 throughput of
``serving_default`` on PNG bytes (decode, resize, normalisation in the graph) and of the Keras model on
already-decoded tensors.

Usage: ``python benchmarks/serving.py [--model baseline-resnet50] [--size 224] [--runs 50]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402


def timed(fn, runs):
    fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.asarray(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="baseline-resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--source-size", type=int, default=1024, help="side of the PNGs sent (real CXR: 1000-3000)")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()

    import tensorflow as tf

    from covidx.data import PreprocessConfig
    from covidx.models import create_model
    from covidx.serving.export import export

    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        run.mkdir()
        net = create_model(args.model, image_size=args.size, channels=args.channels)
        net.save(run / "best.keras")
        pre = PreprocessConfig(image_size=args.size, channels=args.channels)
        (run / "config.json").write_text(json.dumps({"model": args.model, "task": "4class", "classes": list("abcd"),
                                                     "preprocess": pre.to_dict()}))
        sig = tf.saved_model.load(str(export(run, Path(d) / "exports"))).signatures["serving_default"]
        rng = np.random.default_rng(0)
        pngs = [cv2.imencode(".png", cv2.GaussianBlur(rng.integers(0, 255, (args.source_size,) * 2, np.uint8),
                                                      (9, 9), 3))[1].tobytes() for _ in range(32)]
        one = tf.constant(pngs[:1])
        many = tf.constant(pngs)
        x1 = tf.constant(rng.uniform(0, 255, (1, args.size, args.size, args.channels)).astype("float32"))
        x32 = tf.constant(rng.uniform(0, 255, (32, args.size, args.size, args.channels)).astype("float32"))
        keras_fn = tf.function(lambda t: net(t, training=False))
        s1 = timed(lambda: sig(image_bytes=one)["probabilities"].numpy(), args.runs)
        k1 = timed(lambda: keras_fn(x1).numpy(), args.runs)
        s32 = timed(lambda: sig(image_bytes=many)["probabilities"].numpy(), max(5, args.runs // 5))
        k32 = timed(lambda: keras_fn(x32).numpy(), max(5, args.runs // 5))
    print(f"{os.cpu_count()} CPU cores; {args.model} at {args.size}x{args.size}x{args.channels}, "
          f"PNG inputs {args.source_size}x{args.source_size}")
    print(f"single image  SavedModel bytes : p50 {np.median(s1) * 1e3:7.1f} ms  p95 {np.percentile(s1, 95) * 1e3:7.1f} ms")
    print(f"single image  Keras on tensor  : p50 {np.median(k1) * 1e3:7.1f} ms  p95 {np.percentile(k1, 95) * 1e3:7.1f} ms")
    t_s, t_k = 32 / np.median(s32), 32 / np.median(k32)
    print(f"batch 32      SavedModel bytes : {t_s:7.1f} images/s")
    print(f"batch 32      Keras on tensor  : {t_k:7.1f} images/s  (in-graph preprocessing adds "
          f"{np.median(s32) / np.median(k32) - 1:+.1%} time)")


if __name__ == "__main__":
    main()
