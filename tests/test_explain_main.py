"""``python -m covidx.explain`` and the shortcut audit of ``covidx.evaluate --audit`` on models built in the test."""

import json

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from covidx.evaluate import main as evaluate_main
from covidx.explain.__main__ import main as explain_main
from covidx.explain.runs import run_audit
from covidx.runs import load_run
from tests.helpers import make_run

SIZE = 32


def lung_mask():
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[8:28, 6:26] = 1  # the "lungs": the centre of the image
    return m


def confounded_images(tmp_path, n=48, marker_in_lungs=False, seed=0):
    """Class 1 carries a bright square: in the top-left corner (a burnt-in marker, outside the lungs)
    or, for the honest model, inside the lungs. Returns the table with lung masks."""
    rng = np.random.default_rng(seed)
    rows = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    mask_path = tmp_path / "lungmask.png"
    cv2.imwrite(str(mask_path), lung_mask() * 255)
    for i in range(n):
        img = rng.integers(40, 90, (SIZE, SIZE)).astype(np.uint8)
        label = i % 2
        if label:
            y, x = (14, 12) if marker_in_lungs else (0, 0)
            img[y:y + 6, x:x + 6] = 250
        p = tmp_path / f"img{i}.png"
        cv2.imwrite(str(p), img)
        rows.append(dict(path=str(p), label_index=label, label=["normal", "covid19"][label], patient_id=f"p{i}",
                         mask_path=str(mask_path), lesion_path="", split="test", finding=""))
    return pd.DataFrame(rows)


def small_cnn():
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    out = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out)


def trained_run(tmp_path, table, name):
    x = np.stack([cv2.imread(p, 0)[..., None] for p in table.path]).astype("float32")
    y = keras.utils.to_categorical(table.label_index, 2)
    net = small_cnn()
    net.compile(keras.optimizers.Adam(3e-3), "categorical_crossentropy", metrics=["accuracy"])
    net.fit(x, y, epochs=40, batch_size=16, verbose=0)
    assert net.evaluate(x, y, verbose=0)[1] == 1.0
    run_dir, _, _ = make_run(tmp_path / name, net=net, size=SIZE, classes=["normal", "covid19"], model="custom-cnn",
                             task="stage2")
    table.to_csv(run_dir / "split.csv", index=False)
    return run_dir


@pytest.mark.slow
def test_audit_flags_the_shortcut_model_and_not_the_honest_one(tmp_path):
    shortcut = trained_run(tmp_path, confounded_images(tmp_path / "a", marker_in_lungs=False), "shortcut")
    honest = trained_run(tmp_path, confounded_images(tmp_path / "b", marker_in_lungs=True), "honest")
    a = run_audit(load_run(shortcut), pd.read_csv(shortcut / "split.csv", keep_default_na=False), tmp_path / "oa")
    b = run_audit(load_run(honest), pd.read_csv(honest / "split.csv", keep_default_na=False), tmp_path / "ob")
    assert "covid19" in a["flagged"] and a["median_share"]["covid19"] < 0.2
    assert "covid19" not in b["flagged"] and b["median_share"]["covid19"] > 0.8
    # through the CLI: metrics + audit files
    assert evaluate_main(["--checkpoint", str(shortcut), "--audit", "--bootstrap", "50"]) == 0
    audit = json.loads((shortcut / "eval" / "audit.json").read_text())
    assert audit["flagged"] == ["covid19"] or "covid19" in audit["flagged"]
    assert len(pd.read_csv(shortcut / "eval" / "audit.csv")) == len(pd.read_csv(shortcut / "split.csv"))
    for f in ("metrics.json", "metrics.md", "metrics.csv", "roc.png", "confusion.png", "calibration.png"):
        assert (shortcut / "eval" / f).is_file(), f


def test_explain_cli_writes_one_overlay_per_image_and_a_contact_sheet(tmp_path):
    run, _, _ = make_run(tmp_path / "run", size=64)  # MobileNetV2's last feature map is 2x2 at 64 px
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"x{i}.png"), np.random.default_rng(i).integers(0, 255, (40, 44), np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 10)
    for method, n in (("gradcam", 3), ("gradcam++", 3)):
        out = tmp_path / method
        assert explain_main(["--checkpoint", str(run), "--image", str(folder), "--method", method,
                             "--out", str(out)]) == 0
        pngs = sorted(p.name for p in out.glob("x*.png"))
        assert len(pngs) == n
        img = cv2.imread(str(out / pngs[0]))
        assert min(img.shape[:2]) >= 512  # readable: at least 512 px, titled, with a colour bar
        assert cv2.imread(str(out / "contact_sheet.png")) is not None
    out = tmp_path / "lime"
    assert explain_main(["--checkpoint", str(run), "--image", str(folder / "x0.png"), "--method", "lime",
                         "--lime-samples", "60", "--out", str(out)]) == 0
    assert (out / "x0_lime.png").is_file() and "weights" in pd.read_csv(out / "lime.csv").columns


def test_explain_cli_errors_are_one_line(tmp_path, capsys):
    run, _, _ = make_run(tmp_path / "run", size=SIZE)
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((40, 40), np.uint8))
    assert explain_main(["--checkpoint", str(run), "--image", str(tmp_path / "a.png"), "--method", "attention",
                         "--out", str(tmp_path / "o")]) == 2
    assert "needs a MAG-SD model" in capsys.readouterr().err
    assert explain_main(["--checkpoint", str(run), "--image", str(tmp_path / "a.png"), "--class", "flu",
                         "--out", str(tmp_path / "o")]) == 2
    assert "unknown class 'flu'" in capsys.readouterr().err


@pytest.mark.slow
def test_attention_method_on_mag_sd(tmp_path):
    run, net, _ = make_run(tmp_path / "run", size=64, model="mag-sd")
    cv2.imwrite(str(tmp_path / "a.png"), np.random.default_rng(0).integers(0, 255, (70, 70), np.uint8))
    assert explain_main(["--checkpoint", str(run), "--image", str(tmp_path / "a.png"), "--method", "attention",
                         "--out", str(tmp_path / "o")]) == 0
    assert cv2.imread(str(tmp_path / "o" / "a_attention.png")).shape == (64, 64, 3)
    box = pd.read_csv(tmp_path / "o" / "attention.csv").iloc[0]
    assert 0 <= box.box_y0 < box.box_y1 <= 64 and 0 < box.mask_fraction <= 1


def test_explanations_go_under_the_run_folder_and_carry_a_colour_bar(tmp_path):
    from covidx.explain.overlay import explanation_figure

    run, _, _ = make_run(tmp_path / "run", size=64)
    cv2.imwrite(str(tmp_path / "x.png"), np.random.default_rng(0).integers(0, 255, (40, 44), np.uint8))
    assert explain_main(["--checkpoint", str(run), "--image", str(tmp_path / "x.png")]) == 0
    assert (run / "explanations" / "x_gradcam.png").is_file()
    heat = np.tile(np.linspace(0, 1, 64), (64, 1))
    fig = explanation_figure(np.full((64, 64), 128, np.uint8), heat, "x.png: normal (p = 0.91)")
    assert fig.shape[0] >= 512 and fig.shape[1] > fig.shape[0]  # the colour bar widens the figure
    rgb = fig.astype(int)
    red, blue = rgb[..., 0] - rgb[..., 2] > 100, rgb[..., 2] - rgb[..., 0] > 100
    # The heatmap varies along x only, so a column holding both jet ends is the vertical colour bar.
    assert (red.any(axis=0) & blue.any(axis=0)).any()
