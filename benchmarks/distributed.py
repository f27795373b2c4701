"""Data-parallel training on this machine: two 1-thread workers against one 2-thread process.

A ResNet50 (keras.applications, random weights, 3 channels, softmax over 4 classes) trains on
random tensors with SGD at the same global batch:

* ``single``: one process, 2 intra-op threads, no strategy;
* ``multiworker``: two processes on loopback ports, 1 intra-op thread each,
  ``MultiWorkerMirroredStrategy`` (ring all-reduce of the gradients every step), half the batch each.

Rounds alternate (single, multiworker, single, ...) so the load of a shared machine hits both alike.
Prints images/second (median over rounds of the timed steps after a warm-up), the scaling efficiency
(multiworker / single: 1.0 = the all-reduce and the second process cost nothing), the bytes
all-reduced per step (every trainable weight's gradient, float32) and, on paper, what that traffic
costs 8 GPUs on one 25 Gb/s link with a ring all-reduce.

Usage: ``python benchmarks/distributed.py [--size 128] [--batch 16] [--steps 8] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidx.training.distribute import local_cluster  # noqa: E402


def run(args) -> None:
    """One process of a round: prints ``{"rate": images/s (global), "bytes": all-reduced per step}``."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if args.mode == "multiworker" else tf.distribute.get_strategy()
    import keras
    import numpy as np

    workers = strategy.num_replicas_in_sync
    local = args.batch // workers
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (local, args.size, args.size, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 4, local), 4)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    from covidx.training.trainers import Trainer  # covidx's train step (loss scaling, multi-worker logs)

    with strategy.scope():
        net = keras.applications.ResNet50(weights=None, input_shape=(args.size, args.size, 3), classes=4)
        model = Trainer(net)
        model.compile(keras.optimizers.SGD(0.01), "categorical_crossentropy")
        model.sample_batch = (x, y)
    if workers > 1:  # each worker's tensors are its half of the global batch
        ds = strategy.experimental_distribute_dataset(ds)
    model.fit(ds, steps_per_epoch=args.warmup, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=args.steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    grads = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
    print(json.dumps({"rate": args.batch * args.steps / seconds, "bytes": grads}))


def launch(mode, args):
    common = [sys.executable, __file__, "--run", mode, "--size", str(args.size), "--batch", str(args.batch),
              "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if mode == "single":
        out = subprocess.run([*common, "--threads", "2"], capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    procs = []
    for config in local_cluster(2):
        env = {**os.environ, "TF_CONFIG": config}
        procs.append(subprocess.Popen([*common, "--threads", "1"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])  # the chief's (both time the same steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=128, help="input size (px)")
    ap.add_argument("--batch", type=int, default=16, help="global batch")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gpu-rate", type=float, default=400.0,
                    help="assumed training images/s of one GPU on ResNet50 at 224 px (for the 8-GPU estimate)")
    ap.add_argument("--run", choices=("single", "multiworker"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        args.mode = args.run
        return run(args)

    rates = {"single": [], "multiworker": []}
    grads = 0
    for r in range(args.rounds):
        for mode in ("single", "multiworker"):
            res = launch(mode, args)
            rates[mode].append(res["rate"])
            grads = res["bytes"]
            print(f"round {r + 1} {mode:<12} {res['rate']:7.2f} img/s", flush=True)
    single, multi = statistics.median(rates["single"]), statistics.median(rates["multiworker"])
    print(f"\nResNet50 at {args.size} px, global batch {args.batch}, SGD, {args.steps} timed steps x {args.rounds} rounds")
    print(f"  one process, 2 threads            {single:7.2f} img/s")
    print(f"  two workers, 1 thread each        {multi:7.2f} img/s")
    print(f"  scaling efficiency                {multi / single:7.2f}  (multiworker / single process, same 2 cores)")
    print(f"  all-reduced per step              {grads / 1e6:7.1f} MB  (float32 gradients of {grads // 4:,} weights)")
    # Ring all-reduce: every worker sends and receives 2 (N-1)/N of the buffer per step.
    n, link = 8, 25e9 / 8  # bytes/s of a 25 Gb/s link
    comm = 2 * (n - 1) / n * grads / link
    per_gpu_batch = 32
    compute = per_gpu_batch / args.gpu_rate
    print(f"\nOn paper, 8 GPUs over one 25 Gb/s link (ring all-reduce, {per_gpu_batch} images per GPU per step, "
          f"{args.gpu_rate:.0f} img/s per GPU):")
    print(f"  all-reduce {comm * 1e3:.0f} ms per step vs {compute * 1e3:.0f} ms of compute: "
          f"{compute / (compute + comm):.0%} efficiency without overlap, "
          f"{min(1.0, compute / comm):.0%} if the all-reduce overlaps the backward pass "
          f"-> {n * per_gpu_batch / (compute + comm):.0f} to {n * per_gpu_batch / max(compute, comm):.0f} img/s")


if __name__ == "__main__":
    main()
