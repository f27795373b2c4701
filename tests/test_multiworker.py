"""``python -m covidx.train --strategy multiworker`` run by two real worker processes on loopback ports.

Both workers get their own ``TF_CONFIG`` (free ports picked here) and train a small BN-free,
dropout-free VGG19 copy on generated data, unshuffled and unaugmented, so the run can be compared
step for step with one process training on the same global batch.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidx.data.synthetic import write_dataset

ARGS = ["--model", "vgg19-gap", "--model-arg", "width=0.0625", "--image-size", "32", "--epochs", "2",
        "--batch-size", "8", "--steps-per-epoch", "2", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "constant",
        "--augment", "none", "--clahe-prob", "0", "--no-shuffle", "--verbose", "2"]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def worker_env(tmp, ports, index):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(tmp),
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}


def launch(args, envs):
    procs = [subprocess.Popen([sys.executable, "-m", "covidx.train", *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for env in envs]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return [p.returncode for p in procs], outs


def weights_of(path):
    import keras

    import covidx.layers  # noqa: F401  (registers covidx's layers)

    return keras.models.load_model(path, safe_mode=True).get_weights()


@pytest.mark.slow
def test_two_workers_train_like_one_process_and_only_the_chief_writes(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, n_patients=24, size=64, seed=1)
    scratch = tmp_path / "worker-tmp"
    scratch.mkdir()
    ports = free_ports(2)
    out = tmp_path / "multi"
    args = ["--data", str(data / "manifest.csv"), "--out", str(out), "--strategy", "multiworker", *ARGS]
    codes, logs = launch(args, [worker_env(scratch, ports, i) for i in range(2)])
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)

    # One run folder, written by the chief; worker 1 wrote nothing that outlived the run.
    runs = [p for p in out.glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert f"run finished: {run.resolve()}" in logs[0] and f"run finished: {run.resolve()}" in logs[1]
    for name in ("config.json", "split.csv", "history.csv", "best.keras", "last.keras", "backup/latest.weights.h5"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").rglob("*tfevents*"))
    assert list(scratch.iterdir()) == []
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [0, 1] and history["loss"].notna().all()
    config = json.loads((run / "config.json").read_text())
    assert config["replicas"] == 2 and config["train"]["strategy"] == "multiworker"

    # One process, the same global batch of 8: the same losses and the same weights.
    single = tmp_path / "single"
    r = subprocess.run([sys.executable, "-m", "covidx.train", "--data", str(data / "manifest.csv"), "--out",
                        str(single), *ARGS], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    single_run = next(p for p in single.glob("*/*") if p.is_dir())
    reference = pd.read_csv(single_run / "history.csv")
    np.testing.assert_allclose(history["loss"], reference["loss"], rtol=1e-4)
    assert abs(history["loss"][1] - history["loss"][0]) > 1e-3  # it trained (the comparison means something)
    for a, b in zip(weights_of(run / "last.keras"), weights_of(single_run / "last.keras")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # Evaluation (and everything that loads a run) takes the multi-worker run like any other.
    from covidx.runs import load_run

    loaded = load_run(run)
    assert loaded.model.output_shape == (None, len(config["classes"]))
    assert loaded.split_table()["split"].tolist() == pd.read_csv(single_run / "split.csv")["split"].tolist()


@pytest.mark.slow
@pytest.mark.skip(reason="KNOWN DEFECT (issue 18 open): the restarted two-worker job hangs in TF's collective-ops "
                         "initialisation (both workers wait in Context.ensure_initialized); the first job trains and "
                         "writes its backup. Remove this marker to reproduce it: pytest tests/test_multiworker.py -k killed")
def test_killed_worker_job_restarts_and_continues_from_the_last_epoch(tmp_path):
    """BackupAndRestore across workers: worker 1 is killed after an epoch, the job is started again unchanged."""
    import time

    data = tmp_path / "data"
    write_dataset(data, n_patients=24, size=64, seed=1)
    scratch = tmp_path / "worker-tmp"
    scratch.mkdir()
    out = tmp_path / "runs"
    four_epochs = list(ARGS)
    four_epochs[ARGS.index("--epochs") + 1] = "4"
    args = ["--data", str(data / "manifest.csv"), "--out", str(out), "--strategy", "multiworker", "--run-name", "job",
            *four_epochs]
    history = out / "vgg19-gap" / "job" / "history.csv"
    ports = free_ports(2)
    procs = [subprocess.Popen([sys.executable, "-m", "covidx.train", *args], env=worker_env(scratch, ports, i),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    deadline = time.time() + 600
    while time.time() < deadline and not (history.is_file() and len(history.read_text().splitlines()) >= 2):
        assert procs[0].poll() is None, "the chief ended before finishing an epoch"
        time.sleep(0.2)
    procs[1].kill()  # a worker dies mid-job ...
    procs[1].wait()
    procs[0].kill()  # ... and the job is torn down (the chief would wait on the dead worker's collectives)
    procs[0].wait()
    done = len(pd.read_csv(history))
    assert 1 <= done < 4

    codes, logs = launch(args, [worker_env(scratch, free_ports(2), i) for i in range(2)])  # the same command again
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    epochs = pd.read_csv(history)["epoch"].tolist()
    assert epochs[:done] == list(range(done)) and epochs[-1] == 3
    assert epochs[done] == done  # continued after the last finished epoch, not from epoch 0
    assert [p.name for p in (out / "vgg19-gap").iterdir()] == ["job"]
