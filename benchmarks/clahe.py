"""CLAHE speed: covidx's TF-ops ``clahe_tf`` (the exportable one) vs OpenCV ``createCLAHE().apply``.

Both on the same uint8 gray images (SYNTHETIC: smooth random textures made here), clip 2,
8x8 tiles. ``clahe_tf`` runs inside a ``tf.function`` traced once with a dynamic
``[None, None, None, 1]`` signature, as in an exported SavedModel; OpenCV runs image after
image, with its default threads and with ``cv2.setNumThreads(1)``. Also prints the largest
difference between the two outputs (expected 0).

Usage: ``python benchmarks/clahe.py [--sizes 512 224] [--batches 1 32] [--repeats 5]``
(prints figures; run by hand).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from covidx.data.clahe import clahe_tf  # noqa: E402

CLIP, GRID = 2.0, 8


def make_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n smooth random uint8 textures of size x size (coarse noise upsampled bicubically)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        coarse = rng.normal(size=(size // 16 + 2, size // 16 + 2)).astype(np.float32)
        x = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        x = (x - x.min()) / (x.max() - x.min() + 1e-6)
        out[i] = np.clip(20 + 200 * x + rng.normal(0, 4, x.shape), 0, 255).astype(np.uint8)
    return out


def best_seconds(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up (the least disturbed by other load)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    traced = tf.function(lambda x: clahe_tf(x, CLIP, GRID),
                         input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
    clahe = cv2.createCLAHE(clipLimit=CLIP, tileGridSize=(GRID, GRID))
    default_threads = cv2.getNumThreads()
    print(f"CLAHE clip {CLIP}, {GRID}x{GRID} tiles; TF {tf.__version__} (intra-op threads "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}), "
          f"OpenCV {cv2.__version__} ({default_threads} threads), {os.cpu_count()} CPU cores")
    print(f"{'size':>6} {'method':<28} {'batch':>5} {'ms / image':>11} {'images / s':>11}")
    for size in args.sizes:
        images = make_images(max(args.batches), size)
        reference = np.stack([clahe.apply(im) for im in images])
        for batch in args.batches:
            x = tf.constant(images[:batch, ..., None], tf.float32)
            out = traced(x).numpy()[..., 0]
            worst = int(np.abs(out.astype(np.int32) - reference[:batch]).max())
            sec = best_seconds(lambda: traced(x).numpy(), args.repeats) / batch
            print(f"{size:>6} {'clahe_tf (tf.function)':<28} {batch:>5} {1e3 * sec:>11.3f} {1 / sec:>11.1f}"
                  f"   max |diff| vs cv2 = {worst}")
        for threads, label in ((default_threads, "cv2 (default threads)"), (1, "cv2 (1 thread)")):
            cv2.setNumThreads(threads)
            sec = best_seconds(lambda: [clahe.apply(im) for im in images], args.repeats) / len(images)
            print(f"{size:>6} {label:<28} {1:>5} {1e3 * sec:>11.3f} {1 / sec:>11.1f}")
        cv2.setNumThreads(default_threads)


if __name__ == "__main__":
    main()
