"""Explanation speed: batched Grad-CAM vs a per-image loop, and seconds per LIME explanation.

Usage: ``python benchmarks/explain.py [--model se-dpn92] [--size 224] [--images 32] [--lime-samples 1000]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="se-dpn92")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lime-samples", type=int, default=1000)
    ap.add_argument("--lime-batch", type=int, default=64)
    args = ap.parse_args()

    from covidx.explain.gradcam import GradCAM
    from covidx.explain.lime import explain_lime
    from covidx.models import create_model, get_spec

    model = create_model(args.model, image_size=args.size)
    channels = model.inputs[0].shape[-1]
    images = np.random.default_rng(0).uniform(0, 255, (args.images, args.size, args.size, channels)).astype("float32")
    cam = GradCAM(model, get_spec(args.model).gradcam_layer)
    cam(images[:2])  # warm-up
    cam(images[:1])
    t0 = time.perf_counter()
    for i in range(0, len(images), args.batch):
        cam(images[i:i + args.batch])
    batched = len(images) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for im in images:
        cam(im[None])
    single = len(images) / (time.perf_counter() - t0)
    print(f"{os.cpu_count()} CPU cores; {args.model} at {args.size}x{args.size}")
    print(f"Grad-CAM batched (batch {args.batch}) : {batched:7.2f} images/s")
    print(f"Grad-CAM one image at a time      : {single:7.2f} images/s  (batched is {batched / single:.1f}x)")
    explain_lime(model, images[0], num_samples=50, batch_size=args.lime_batch)  # warm-up
    t0 = time.perf_counter()
    explain_lime(model, images[1], num_samples=args.lime_samples, batch_size=args.lime_batch)
    print(f"LIME, {args.lime_samples} samples, batch {args.lime_batch}: {time.perf_counter() - t0:7.1f} s per image "
          "(the SE-DPN paper: 3 s for classification + activation map on a GTX 1080 Ti)")


if __name__ == "__main__":
    main()
