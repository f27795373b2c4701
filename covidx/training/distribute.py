"""Distributed training on TensorFlow's own engine (``tf.distribute``).

Strategies by name (:func:`create_strategy`): ``default`` (one device), ``mirrored``
(every GPU of this machine, synchronous all-reduce) and ``multiworker``
(``tf.distribute.MultiWorkerMirroredStrategy``, one process per machine, the cluster and this
process's place in it read from the ``TF_CONFIG`` environment variable).

Collective ops must be configured before TensorFlow runs its first op, so the strategy is
created once per process, first thing (``python -m covidx.train`` does it before reading any
data) and cached: asking again returns the same object.

Who writes what (:func:`is_chief`, :func:`worker_directory`): every worker takes part in each
step and in every save (saving reads variables that are reduced across workers, a collective
op all workers must enter), but only the chief writes the run folder. The others write the same
files into a private temporary folder that is removed when training ends.

Input (:func:`distributed_datasets`): the pipeline is built from an in-memory table of file
paths (``Dataset.from_tensor_slices``), which holds no file-reading source op, so tf.data's
``AutoShardPolicy.FILE`` cannot apply and ``AUTO`` falls back to ``DATA``: every worker would
read and decode every image and keep 1/N of them. Instead the table itself is sharded
(rows ``i::N`` to input pipeline ``i``) before any file is opened, each worker builds its
pipeline for its own files with the per-replica batch (global batch / replicas), and auto-
sharding is off (``tf.distribute.InputContext``, ``distribute_datasets_from_function``).
Row ``j`` of global step ``k`` (no shuffle) is the same image on one process and on N workers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multiworker")
_created: dict[str, tf.distribute.Strategy] = {}


# ----------------------------------------------------------------------------- cluster


def tf_config(environ=None) -> dict | None:
    """The parsed ``TF_CONFIG`` (``None`` when unset); a malformed one raises ``ValueError``."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        task = config["task"]
        config["cluster"][task["type"]][int(task["index"])]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(
            f"TF_CONFIG must be JSON like {{\"cluster\": {{\"worker\": [\"host:port\", ...]}}, "
            f"\"task\": {{\"type\": \"worker\", \"index\": 0}}}} naming a task of its cluster: {e!r}"
        ) from None
    return config


def local_cluster(workers: int, host: str = "127.0.0.1") -> list[str]:
    """``TF_CONFIG`` values for ``workers`` processes on this machine, one per worker (free ``host`` ports).

    One call gives every worker the same cluster: ports picked separately for each worker would leave
    each process waiting, silently and for ever, for peers listening elsewhere.
    """
    socks = [socket.socket() for _ in range(workers)]
    try:
        for s in socks:
            s.bind((host, 0))
        cluster = {"worker": [f"{host}:{s.getsockname()[1]}" for s in socks]}
    finally:
        for s in socks:
            s.close()
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(workers)]


def task_of(environ=None) -> tuple[str, int]:
    """``(task type, index)`` of this process (``("worker", 0)`` without ``TF_CONFIG``)."""
    config = tf_config(environ)
    if config is None:
        return "worker", 0
    return config["task"]["type"], int(config["task"]["index"])


def is_chief(environ=None) -> bool:
    """Whether this process writes the run folder: the ``chief`` task if the cluster has one, else worker 0."""
    config = tf_config(environ)
    if config is None:
        return True
    kind, index = config["task"]["type"], int(config["task"]["index"])
    if "chief" in config["cluster"]:
        return kind == "chief"
    return kind == "worker" and index == 0


# ----------------------------------------------------------------------------- strategy


def create_strategy(name: str = "default") -> tf.distribute.Strategy:
    """The strategy ``name`` (created once per process; call it before TensorFlow runs any op).

    ``multiworker`` reads the cluster from ``TF_CONFIG`` (without it: a one-worker cluster).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r} ({', '.join(STRATEGIES)})")
    if name in _created:
        return _created[name]
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    else:
        config = tf_config()  # a clear error for a malformed TF_CONFIG before TensorFlow parses it
        if config is not None:  # TF waits silently until every worker of the cluster has connected
            kind, index = task_of()
            print(f"multiworker: {kind} {index} of cluster {json.dumps(config['cluster'])}, waiting for every "
                  "worker to connect", flush=True)
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:
            if "program startup" not in str(e):
                raise
            raise RuntimeError(
                "the multiworker strategy must be created before TensorFlow runs its first op: call "
                "covidx.training.distribute.create_strategy('multiworker') at the start of the program"
            ) from e
    _created[name] = strategy
    return strategy


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Input pipelines of the strategy (one per worker process)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))


def broadcast_text(strategy: tf.distribute.Strategy, text: str, max_bytes: int = 1024) -> str:
    """The chief's ``text`` on every worker (each passes its own; only the chief's is kept).

    A sum all-reduce of the UTF-8 bytes, zeros from every other worker: workers started a few
    seconds apart agree on e.g. the chief's timestamped run folder without a shared file.
    """
    if strategy.num_replicas_in_sync == 1:
        return text
    data = text.encode() if is_chief() else b""
    if len(data) > max_bytes:
        raise ValueError(f"cannot broadcast {len(data)} bytes (at most {max_bytes})")
    local = np.zeros(max_bytes, np.int32)
    local[: len(data)] = np.frombuffer(data, np.uint8)
    # Every replica of a worker adds the worker's bytes: divide by the replicas per worker.
    summed = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(local)), axis=None)
    per_worker = strategy.num_replicas_in_sync // num_workers(strategy)
    out = (np.asarray(summed) // per_worker).astype(np.uint8).tobytes().rstrip(b"\0")
    return out.decode()


@contextmanager
def worker_directory(run_dir: str | Path):
    """Where this worker writes: ``run_dir`` on the chief; elsewhere a private temp folder removed at the end."""
    if is_chief():
        yield Path(run_dir)
        return
    kind, index = task_of()
    tmp = Path(tempfile.mkdtemp(prefix=f"covidx-{kind}{index}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- input


def shard_table(table: pd.DataFrame, index: int, count: int) -> pd.DataFrame:
    """Rows ``index::count`` (in table order): input pipeline ``index`` of ``count`` reads only these files."""
    return table.iloc[index::count]


def cycle_rows(table: pd.DataFrame, length: int) -> pd.DataFrame:
    """``table`` repeated (row order kept) to exactly ``length`` rows."""
    return table.iloc[np.arange(length) % len(table)] if len(table) else table


def distributed_datasets(strategy, table: pd.DataFrame, global_batch: int, build, training: bool,
                         max_steps: int | None = None):
    """Per-worker pipelines over a table shard, with the same number of steps on every worker.

    Args:
        build: ``build(shard_table, per_replica_batch, pipeline_index) -> tf.data.Dataset`` (batched).
        training: training split: full batches only (``drop_remainder``: ``len(table) // global_batch`` steps,
            the images of a last partial global batch wait for the next epoch's shuffle). Otherwise the
            shards are cycled up to whole batches (every image is evaluated; a few of the last batch twice).

    Returns ``(distributed dataset, steps)``; ``steps`` is 0 when the table is too small.
    """
    replicas, workers = strategy.num_replicas_in_sync, num_workers(strategy)
    if global_batch % replicas:
        raise ValueError(f"the global batch size {global_batch} must be a multiple of the {replicas} replicas "
                         f"({workers} workers) it is split across")
    per_replica = global_batch // replicas
    per_worker = per_replica * (replicas // workers)
    if training:
        steps = (len(table) // workers) // per_worker
    else:
        steps = -(-(-(-len(table) // workers)) // per_worker) if len(table) >= workers else 0
    if max_steps:
        steps = min(steps, max_steps)
    if steps == 0:
        return None, 0

    def dataset_fn(ctx: tf.distribute.InputContext):
        shard = shard_table(table, ctx.input_pipeline_id, ctx.num_input_pipelines)
        if not training:
            shard = cycle_rows(shard, steps * per_worker)
        batch = ctx.get_per_replica_batch_size(global_batch)
        ds = build(shard, batch, ctx.input_pipeline_id)
        # Keras keeps one iterator across epochs when it is given the steps: every epoch is the next pass.
        return ds.take(steps * (replicas // workers)).repeat()

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return strategy.distribute_datasets_from_function(dataset_fn, options), steps


# ----------------------------------------------------------------------------- callbacks


class WorkerBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` that restores from the chief's backup and saves into this worker's folder.

    Every worker restores the same state (the chief's ``run_dir/backup``, on storage all workers
    share), so a job whose worker was killed continues from the last finished epoch when it is
    started again; every worker also saves (the save all-reduces metric state), the non-chief
    ones into their temporary folder.
    """

    def __init__(self, restore_dir: str | Path, save_dir: str | Path, **kwargs):
        super().__init__(str(save_dir), **kwargs)
        self._save_paths = (self._weights_path, self._training_metadata_path)
        restore = str(restore_dir)
        self._restore_paths = (os.path.join(restore, "latest.weights.h5"),
                               os.path.join(restore, "training_metadata.json"))

    def on_train_begin(self, logs=None):
        self._weights_path, self._training_metadata_path = self._restore_paths
        try:
            super().on_train_begin(logs)
        finally:
            self._weights_path, self._training_metadata_path = self._save_paths


# ----------------------------------------------------------------------------- model


def synchronize_batchnorm(net: keras.Model) -> int:
    """Switch every ``BatchNormalization`` of ``net`` (nested models included) to global-batch statistics.

    Keras' ``synchronized=True``: mean and variance all-reduced over the replicas at each training
    step, so N replicas normalise as one device on the global batch would (per-replica statistics
    are the default, as PyTorch ``DataParallel`` of the papers' code). Returns the layers switched.
    """
    count = 0
    # _flatten_layers also reaches the sublayers a custom layer holds (e.g. MultiscaleAttention's BN).
    for layer in net._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            count += 1
    return count
