"""A killed run resumed with ``--resume`` repeats the uninterrupted run's per-epoch history (same seed)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidx.data.synthetic import write_dataset
from covidx.training.resume import EpochSeeds, completed_epochs, epoch_seed

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def test_epoch_seed_depends_on_seed_and_epoch_only():
    assert epoch_seed(0, 1) == epoch_seed(0, 1)
    assert len({epoch_seed(s, e) for s in range(3) for e in range(3)}) == 9


def test_completed_epochs_reads_the_backup_metadata(tmp_path):
    assert completed_epochs(tmp_path) == 0
    (tmp_path / "training_metadata.json").write_text('{"epoch": 3, "batch": -1}')
    assert completed_epochs(tmp_path) == 3


def test_epoch_seeds_reset_dropout_state_from_seed_and_epoch():
    import keras

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dropout(0.5)(inp))
    cb = EpochSeeds(7)
    cb.set_model(model)
    x = np.ones((1, 4), np.float32)
    cb.on_epoch_begin(2)
    first = model(x, training=True).numpy()
    model(x, training=True)  # advance the state, as a finished epoch would
    cb.on_epoch_begin(2)
    np.testing.assert_array_equal(model(x, training=True).numpy(), first)


@pytest.mark.slow
def test_killed_and_resumed_run_repeats_the_uninterrupted_history(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, n_patients=16, size=48, seed=2)
    # The small CNN: resuming is the same for every model, and its graph traces 3x faster than MobileNetV2's.
    args = ["--model", "baseline-smallcnn", "--data", data / "manifest.csv", "--image-size", 32, "--epochs", 3, "--batch-size", 8,
            "--verbose", 2, "--seed", 5]
    full = subprocess.run([sys.executable, "-m", "covidx.train", *map(str, args), "--out", tmp_path / "a"],
                          capture_output=True, text=True, env=ENV)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "covidx.train", *map(str, args), "--out", tmp_path / "b"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    history, deadline = None, time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "b").glob("*/*/history.csv"))
        if found and len(found[0].read_text().strip().splitlines()) >= 2:  # header + one epoch
            history = found[0]
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert history is not None, "the run never finished an epoch"
    done = len(pd.read_csv(history))
    assert done < 3
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "covidx.train", "--resume", str(history.parent), "--verbose", "2"],
                       capture_output=True, text=True, env={**ENV, "PYTHONPATH": str(repo)},
                       cwd=tmp_path / "data")  # from another folder
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from epoch {done + 1} of 3" in r.stdout
    a = pd.read_csv(next((tmp_path / "a").glob("*/*/history.csv")))
    b = pd.read_csv(history).drop_duplicates("epoch", keep="last").reset_index(drop=True)
    assert b["epoch"].tolist() == [0, 1, 2]
    for col in ("loss", "accuracy", "val_loss"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-4, atol=1e-5, err_msg=col)
