"""``python -m covidx.train --strategy multiworker`` run by two real worker processes on loopback ports.

Both workers get their own ``TF_CONFIG`` (one local cluster on free ports, ``distribute.local_cluster``).
The first test trains a small BN-free, dropout-free VGG19 copy on generated data, unshuffled and
unaugmented, so the run can be compared step for step with one process training on the same global
batch; the second kills a worker of a reduced SEME-ResNet50 job (MoEx step, quick recipe, bf16) and
restarts it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from covidx.data.synthetic import write_dataset
from covidx.training.distribute import local_cluster, task_of, tf_config

ARGS = ["--model", "vgg19-gap", "--model-arg", "width=0.0625", "--image-size", "32", "--epochs", "2",
        "--batch-size", "8", "--steps-per-epoch", "2", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "constant",
        "--augment", "none", "--clahe-prob", "0", "--no-shuffle", "--verbose", "2"]


def worker_envs(tmp, workers=2):
    """One environment per worker process: the same local cluster, this worker's index, a private TMPDIR."""
    return [{**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(tmp), "TF_CONFIG": config}
            for config in local_cluster(workers)]


def test_local_cluster_gives_every_worker_the_same_cluster():
    configs = local_cluster(3)
    clusters = [tf_config({"TF_CONFIG": c})["cluster"] for c in configs]
    assert clusters[0] == clusters[1] == clusters[2] and len(set(clusters[0]["worker"])) == 3
    assert [task_of({"TF_CONFIG": c}) for c in configs] == [("worker", 0), ("worker", 1), ("worker", 2)]


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
    out = tmp_path / "multi"
    args = ["--data", str(data / "manifest.csv"), "--out", str(out), "--strategy", "multiworker", *ARGS]
    codes, logs = launch(args, worker_envs(scratch))
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

    # Evaluation, export (and everything that loads a run: the cascade too) take the multi-worker run like any other.
    from covidx.runs import load_run
    from covidx.serving.client import predict_export
    from covidx.serving.export import export

    loaded = load_run(run)
    assert loaded.model.output_shape == (None, len(config["classes"]))
    table = loaded.split_table()
    assert table["split"].tolist() == pd.read_csv(single_run / "split.csv")["split"].tolist()
    probs, classes = predict_export(export(run, tmp_path / "serving"), table["path"].tolist()[:3])
    assert probs.shape == (3, len(config["classes"])) and classes == config["classes"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_killed_worker_job_restarts_and_continues_from_the_last_epoch(tmp_path):
    """BackupAndRestore across workers: worker 1 is killed after an epoch, the job is started again unchanged."""
    import time

    data = tmp_path / "data"
    write_dataset(data, n_patients=24, size=64, seed=1)
    scratch = tmp_path / "worker-tmp"
    scratch.mkdir()
    out = tmp_path / "runs"
    # A reduced SEME-ResNet50 with its preset MoEx train step (partners drawn over the global batch: the gather
    # across worker processes), the quick recipe (its warm-up here: the flags set the rest) and bfloat16.
    model = ["--model", "seme-resnet50", "--model-arg", "blocks=[1,1,1,1]", "--model-arg", "base_width=8"]
    four_epochs = ARGS[ARGS.index("--image-size"):]
    four_epochs[four_epochs.index("--epochs") + 1] = "4"
    args = ["--data", str(data / "manifest.csv"), "--out", str(out), "--strategy", "multiworker", "--run-name", "job",
            *model, *four_epochs, "--recipe", "quick", "--precision", "bf16"]
    history = out / "seme-resnet50" / "job" / "history.csv"
    procs = [subprocess.Popen([sys.executable, "-m", "covidx.train", *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for env in worker_envs(scratch)]
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

    # The same command again, on new ports (the killed job's may still be held).
    codes, logs = launch(args, worker_envs(scratch))
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    epochs = pd.read_csv(history)["epoch"].tolist()
    assert epochs[:done] == list(range(done)) and epochs[-1] == 3
    assert epochs[done] == done  # continued after the last finished epoch, not from epoch 0
    assert [p.name for p in (out / "seme-resnet50").iterdir()] == ["job"]
    assert "resuming from epoch" in logs[0]
    config = json.loads((out / "seme-resnet50" / "job" / "config.json").read_text())
    train = config["train"]
    assert (train["recipe"], train["precision"], train["warmup_epochs"]) == ("quick", "bf16", 0.3)
    assert config["trainer"] == "moex" and pd.read_csv(history)["loss"].notna().all()
