"""predict on awkward inputs: warnings for masks, colour photographs, tiny images and SYNTHETIC-trained
models; a wrong checkpoint fails before inputs are read; split files found from any folder; quiet start."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from covidx.data.io import radiograph_warnings, read_header
from covidx.predict import main as predict_main
from covidx.runs import SPLIT_FILE, load_run
from tests.helpers import make_run, write_image


def radiograph(path, size=96, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = 60 + 120 * np.exp(-((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size * 8.0)) + rng.normal(0, 8, (size, size))
    cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8))


def test_warnings_name_masks_colour_photos_and_tiny_images(tmp_path):
    radiograph(tmp_path / "xray.png")
    mask = np.zeros((96, 96), np.uint8)
    mask[20:70, 10:40] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    rng = np.random.default_rng(3)
    photo = np.stack([rng.integers(0, 80, (96, 96)), rng.integers(80, 160, (96, 96)), rng.integers(160, 255, (96, 96))], -1)
    cv2.imwrite(str(tmp_path / "photo.jpg"), photo.astype(np.uint8))
    radiograph(tmp_path / "tiny.png", size=20)
    assert radiograph_warnings(tmp_path / "xray.png") == []
    assert any("mask" in w for w in radiograph_warnings(tmp_path / "mask.png"))
    assert any("colour" in w for w in radiograph_warnings(tmp_path / "photo.jpg"))
    assert any("tiny image (20x20)" in w for w in radiograph_warnings(tmp_path / "tiny.png"))


def test_predict_csv_has_a_warning_column(tmp_path):
    run, _, _ = make_run(tmp_path / "run")
    folder = tmp_path / "in"
    folder.mkdir()
    radiograph(folder / "xray.png")
    mask = np.zeros((96, 96), np.uint8)
    mask[30:60, 30:60] = 255
    cv2.imwrite(str(folder / "xray_mask.png"), mask)
    out = tmp_path / "r.csv"
    assert predict_main([str(folder), "--checkpoint", str(run), "--out", str(out)]) == 0
    df = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert df.loc[str(folder / "xray.png"), "warning"] == ""
    assert "looks like a mask" in df.loc[str(folder / "xray_mask.png"), "warning"]
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "synthetic": True}))
    assert predict_main([str(folder), "--checkpoint", str(run), "--out", str(out)]) == 0
    df = pd.read_csv(out, keep_default_na=False)
    assert df["warning"].str.contains("SYNTHETIC").all()


def test_wrong_checkpoint_fails_before_inputs_are_read(tmp_path, capsys):
    assert predict_main([str(tmp_path / "no-such-input"), "--checkpoint", str(tmp_path / "WRONG")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'WRONG'}: no such checkpoint"]


def test_split_file_found_from_any_folder_and_missing_files_counted(tmp_path, monkeypatch):
    run, _, _ = make_run(tmp_path / "runs" / "m" / "1")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        write_image(data / f"x{i}.png", seed=i)
    split = pd.DataFrame({"path": [str(data / f"x{i}.png") for i in range(5)], "split": "test", "label_index": 0,
                          "mask_path": "", "lesion_path": "", "patient_id": [f"p{i}" for i in range(5)]})
    split.to_csv(run / SPLIT_FILE, index=False)  # absolute, as training writes it
    monkeypatch.chdir(tmp_path / "runs")  # another folder
    table = load_run(run).split_table()
    assert table["path"].tolist() == [str(data / f"x{i}.png") for i in range(5)]
    moved = tmp_path / "elsewhere"
    shutil.move(str(data), str(moved))
    with pytest.raises(FileNotFoundError, match=r"5 of 5 files do not exist, e\.g\. .*x0\.png.*pass --data"):
        load_run(run).split_table()


def test_a_cli_starts_without_tensorflow_chatter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "COVIDX_TF_STARTUP_LOG")}
    r = subprocess.run([sys.executable, "-m", "covidx.predict", "x.png", "--checkpoint", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: {tmp_path / 'nowhere'}: no such checkpoint"], r.stderr
    assert r.stdout == ""


def test_header_of_a_bmp_and_tiff(tmp_path):
    cv2.imwrite(str(tmp_path / "a.bmp"), np.zeros((30, 50), np.uint8))
    cv2.imwrite(str(tmp_path / "a.tif"), np.zeros((31, 51), np.uint16))
    assert (read_header(tmp_path / "a.bmp").width, read_header(tmp_path / "a.bmp").height) == (50, 30)
    h = read_header(tmp_path / "a.tif")
    assert (h.format, h.width, h.height, h.bit_depth) == ("tiff", 51, 31, 16)
