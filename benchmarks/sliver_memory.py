"""Peak memory of the serving preprocessing on a 10000 x 1 PNG (3.8 KB) for a crop-resize model at 224 px.

Run by hand: ``python benchmarks/sliver_memory.py`` (prints the peak resident memory of this process
before and after the call, and what the call did). Without the aspect-ratio bound the crop resize scales
the short side to 224 px: a 2,240,000 x 224 float tensor.
"""

import resource
import sys
import time

import cv2
import numpy as np
import tensorflow as tf

from covidx.data.inference import preprocess_bytes
from covidx.data.io import DEFAULT_MAX_PIXELS
from covidx.data.preprocess import PreprocessConfig


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main():
    data = cv2.imencode(".png", np.full((1, 10_000), 128, np.uint8))[1].tobytes()
    config = PreprocessConfig(image_size=224, resize="crop")
    ok = cv2.imencode(".png", np.full((256, 256), 128, np.uint8))[1].tobytes()
    preprocess_bytes(tf.constant(ok), config, DEFAULT_MAX_PIXELS)  # warm up: TF's own allocations
    before = peak_mb()
    t0 = time.perf_counter()
    try:
        out = preprocess_bytes(tf.constant(data), config, DEFAULT_MAX_PIXELS)
        result = f"accepted, output {tuple(out.shape)}"
    except tf.errors.InvalidArgumentError as e:
        result = "refused: " + e.message.splitlines()[-1][-120:]
    seconds = time.perf_counter() - t0
    print(f"sliver 10000x1 PNG ({len(data)} bytes): {result}")
    print(f"peak RSS before {before:.0f} MB, after {peak_mb():.0f} MB, {seconds:.2f} s", file=sys.stdout)


if __name__ == "__main__":
    main()
