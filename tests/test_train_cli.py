"""``python -m covidx.train`` end to end on generated data: a real run, bad input (kill and resume: test_resume.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from covidx.data.synthetic import write_dataset

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
# Where the model does not matter: the default run's small CNN traces in a third of MobileNetV2's time.
SMALL = "baseline-smallcnn"


def train(*args, cwd=None, **kw):
    return subprocess.run([sys.executable, "-m", "covidx.train", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root, n_patients=24, size=64, seed=1)
    return root


def run_dir_of(out: Path) -> Path:
    runs = sorted(p for p in out.glob("*/*") if (p / "config.json").is_file())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_train_writes_a_complete_run(tmp_path, dataset):
    # Two sources in their real layouts, as a user would pass them.
    # (The default model with --data, MobileNetV2, is what test_imagenet_weights_missing_names_the_file runs.)
    r = train("--model", SMALL, "--data", dataset / "kermany", "--data", dataset / "cohen", "--image-size", 32,
              "--epochs", 2, "--batch-size", 8, "--out", tmp_path, "--verbose", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    run = run_dir_of(tmp_path)
    assert f"run finished: {run.resolve()}" in r.stdout
    for name in ("config.json", "split.csv", "best.keras", "last.keras", "history.csv"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").rglob("*tfevents*"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == SMALL and cfg["classes"] == ["covid19", "bacterial", "viral", "normal"]
    assert cfg["preprocess"]["image_size"] == 32 and cfg["train"]["epochs"] == 2
    # Generated data read through its folder layouts (sources "kermany", "cohen") is still said to be generated.
    assert cfg["synthetic"] is True and "SYNTHETIC val:" in r.stdout
    split = pd.read_csv(run / "split.csv", keep_default_na=False)
    assert split.groupby("patient_id").split.nunique().max() == 1
    assert set(split.source) == {"kermany", "cohen"}
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 2
    best = json.loads((run / "best.json").read_text())  # best.keras: the epoch with the highest validation AUC
    assert best["monitor"] == "val_auc" and best["value"] == pytest.approx(history.val_auc.max())
    assert f"best.keras (epoch {best['epoch']}: val_auc" in r.stdout
    card = (run / "MODEL_CARD.md").read_text()  # Mitchell et al. 2019 sections, filled from this run
    assert [h for h in card.splitlines() if h.startswith("## ")][:2] == ["## Model details", "## Intended use"]
    assert f"`{SMALL}`" in card and cfg["paper"] in card and "Not evaluated yet" in card
    for source, rows in split.groupby("source"):
        train_rows = rows[rows.split == "train"]
        assert f"| {source} | {len(train_rows)} ({train_rows.patient_id.nunique()} p) |" in card
    import keras

    import covidx.layers  # noqa: F401  (registers covidx's layers for load_model)

    model = keras.models.load_model(run / "best.keras", safe_mode=True)
    assert model.output_shape == (None, 4)


def test_bad_input_gives_one_clear_error_line(tmp_path, dataset, capsys):
    # In this process (the CLI's main): an exception escaping it would fail the test as a traceback would reach
    # a user; a subprocess per case would only add TensorFlow's start-up.
    from covidx.train import main

    def run(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        return code, capsys.readouterr().err

    code, err = run("--data", tmp_path / "nothing-here", "--out", tmp_path)
    assert code == 2 and err.strip().splitlines()[-1] == f"error: {tmp_path / 'nothing-here'}: no such file or folder"
    code, err = run("--model", "resnet9000", "--data", dataset / "manifest.csv", "--out", tmp_path)
    assert code == 2 and "unknown model 'resnet9000'" in err
    code, err = run("--data", dataset / "manifest.csv", "--layout", "dicomdir", "--out", tmp_path)
    assert code != 0 and "dicomdir" in err
    code, err = run("--data", dataset / "manifest.csv", "--lr-scale", "predictions=fast", "--out", tmp_path)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: --lr-scale takes LAYER=FACTOR with a positive number, got predictions=fast")
    code, err = run("--data", dataset / "manifest.csv", "--lr-scale", "head=0.1", "--image-size", 32, "--epochs", 1,
                    "--no-verify", "--out", tmp_path)
    assert code == 2 and "lr_scales:" in err and "no layer 'head'" in err.strip().splitlines()[-1]


def test_imagenet_weights_missing_names_the_file(tmp_path, dataset):
    env = {**ENV, "COVIDX_WEIGHTS": str(tmp_path / "w"), "KERAS_HOME": str(tmp_path / "k")}
    r = subprocess.run([sys.executable, "-m", "covidx.train", "--data", str(dataset / "manifest.csv"),
                        "--weights", "imagenet", "--image-size", "32", "--out", str(tmp_path), "--epochs", "1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in r.stderr
    assert str(tmp_path / "w") in r.stderr


@pytest.mark.slow
def test_corrupt_images_are_reported_and_skipped(tmp_path, dataset):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset / "kermany", data)
    files = sorted(data.rglob("*.jpeg"))
    files[0].write_bytes(b"")
    files[1].write_bytes(files[1].read_bytes()[:200])
    r = train("--model", SMALL, "--data", data, "--image-size", 32, "--epochs", 1, "--batch-size", 8,
              "--out", tmp_path / "runs", "--verbose", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"skipped  {files[0]}: zero-byte file" in r.stdout
    assert str(files[1]) in r.stdout and "truncated" in r.stdout


def test_list_models_shows_task_size_and_parameters():
    from covidx.train import list_models_table

    text = list_models_table(["baseline-mobilenetv2", "lung-unet"])
    lines = text.splitlines()
    assert lines[1].split()[:4] == ["baseline-mobilenetv2", "classifier", "4class", "224x3"]
    assert lines[1].split()[4] == "2,263,108"
    assert lines[2].split()[:3] == ["lung-unet", "segmenter", "lungs"]


@pytest.mark.slow
def test_mirrored_strategy_with_mixed_precision(tmp_path, dataset):
    """tf.distribute MirroredStrategy (one CPU replica here) and the mixed_float16 policy, end to end."""
    r = train("--model", SMALL, "--data", dataset / "kermany", "--image-size", 32, "--epochs", 1, "--batch-size", 8,
              "--strategy", "mirrored", "--mixed-precision", "--out", tmp_path, "--verbose", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    run = run_dir_of(tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["strategy"] == "mirrored" and cfg["train"]["mixed_precision"] is True
    import keras
    import numpy as np

    import covidx.layers  # noqa: F401  (registers covidx's layers for load_model)

    model = keras.models.load_model(run / "best.keras", safe_mode=True)
    assert any(layer.dtype_policy.name == "mixed_float16" for layer in model.layers)  # computed in float16 ...
    out = model(np.zeros((2, *model.input_shape[1:]), np.float32))
    assert out.dtype == "float32"  # ... with float32 probabilities (the output layer keeps float32)
    np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, atol=1e-3)
