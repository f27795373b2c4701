"""Two-stage classify -> segment from the command line (ensemble paper Sec. III, Fig. 2).

``python -m covidx.predict --checkpoint CLF --segmenter SEG INPUT`` and
``python -m covidx.export --checkpoint CLF --segmenter SEG --out DIR`` on tiny fixed-weight
models made here: the classifier calls bright images COVID-19 and dark ones normal, the
segmenter marks every pixel brighter than mid-grey as lesion, so every expected mask can be
computed independently with OpenCV.
"""

import json

import cv2
import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from covidx.export import main as export_main
from covidx.layers import ImageNormalization
from covidx.predict import main as predict_main
from tests.helpers import make_run

CLASSES = ["covid19", "pneumonia", "normal"]
SIZE = 32


def brightness_classifier():
    """Mean pixel -> bright: covid19, dark: normal (fixed head)."""
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = ImageNormalization("unit", name="normalize")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation="softmax", dtype="float32", name="predictions")(x)
    model = keras.Model(inp, out, name="brightness_classifier")
    model.get_layer("predictions").set_weights([np.array([[20.0, 0.0, -20.0]], np.float32),
                                                np.array([-10.0, 0.0, 10.0], np.float32)])
    return model


def threshold_segmenter():
    """Per-pixel softmax with lesion logit 40 (x/255 - 0.5): lesion exactly where the pixel exceeds 127.5."""
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = ImageNormalization("unit", name="normalize")(inp)
    logits = keras.layers.Conv2D(2, 1, name="logits")(x)
    out = keras.layers.Activation("softmax", dtype="float32", name="predictions")(logits)
    model = keras.Model(inp, out, name="threshold_segmenter")
    model.get_layer("logits").set_weights([np.array([[[[0.0, 40.0]]]], np.float32), np.array([0.0, -20.0], np.float32)])
    return model


def runs(tmp_path):
    clf_dir, _, _ = make_run(tmp_path / "clf", net=brightness_classifier(), size=SIZE, model="tiny-classifier",
                             classes=CLASSES, task="3class")
    seg_dir, _, _ = make_run(tmp_path / "seg", net=threshold_segmenter(), size=SIZE, model="tiny-segmenter",
                             classes=["background", "lesion"], task="lesions")
    config = json.loads((seg_dir / "config.json").read_text())
    (seg_dir / "config.json").write_text(json.dumps({**config, "kind": "segmentation"}))
    return clf_dir, seg_dir


def sick_image(shape):
    """Bright film (mean well above mid-grey) with a dark block: a mask with structure."""
    img = np.full(shape, 210, np.uint8)
    h, w = shape
    img[h // 4: h // 2, w // 3: 2 * w // 3] = 20
    return img


def write_inputs(folder):
    folder.mkdir(parents=True)
    images = {
        "covid_a.png": sick_image((40, 48)),
        "covid_b.png": sick_image((64, 64)),  # another size: the CLI batches per image size
        "normal_a.png": np.full((40, 48), 25, np.uint8),
        "sub/normal_b.png": np.full((64, 64), 35, np.uint8),
    }
    for name, img in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name), img)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")  # truncated: no IEND
    return {str(folder / k): v for k, v in images.items()}


def expected_mask(img):
    """OpenCV reference: stretch to the segmenter size, round, threshold, back to the image size (nearest)."""
    small = np.rint(cv2.resize(img.astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))
    return cv2.resize((small > 127.5).astype(np.uint8), img.shape[::-1], interpolation=cv2.INTER_NEAREST)


def test_predict_segments_sick_images_and_skips_corrupt_file(tmp_path, capsys):
    clf_dir, seg_dir = runs(tmp_path)
    images = write_inputs(tmp_path / "in")
    out = tmp_path / "results.csv"
    masks = tmp_path / "masks"
    rc = predict_main(["--checkpoint", str(clf_dir), "--segmenter", str(seg_dir), str(tmp_path / "in"),
                       "--out", str(out), "--masks", str(masks)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "skipped" in err

    df = pd.read_csv(out, keep_default_na=False)
    assert list(df.columns) == ["path", "p_covid19", "p_pneumonia", "p_normal", "label", "segmented", "mask_path",
                                "overlay_path", "warning"]
    assert sorted(df.path) == sorted(images)  # the corrupt file is not in the results
    for _, row in df.iterrows():
        img = images[row.path]
        sick = img.mean() > 127
        assert row.label == ("covid19" if sick else "normal")
        assert row.segmented == int(sick)
        if not sick:
            assert row.mask_path == "" and row.overlay_path == ""
            continue
        mask = cv2.imread(row.mask_path, cv2.IMREAD_UNCHANGED)
        assert mask.shape == img.shape and set(np.unique(mask)) <= {0, 255}
        agree = np.mean((mask > 0) == expected_mask(img).astype(bool))
        assert agree > 0.98, agree  # TF and OpenCV bilinear kernels agree up to rounding
        assert 0.5 < (mask > 0).mean() < 0.95  # the dark block is background, the bright film lesion
        overlay = cv2.cvtColor(cv2.imread(row.overlay_path), cv2.COLOR_BGR2RGB)
        assert overlay.shape == img.shape + (3,)
        inside, outside = overlay[mask > 0], overlay[mask == 0]
        assert (inside[:, 0] > inside[:, 1]).all()  # red tint on the lesion
        assert (outside[:, 0] == outside[:, 1]).all() and (outside[:, 1] == outside[:, 2]).all()  # gray elsewhere
    written = sorted(p.name for p in masks.iterdir())
    assert written == ["covid_a_mask.png", "covid_a_overlay.png", "covid_b_mask.png", "covid_b_overlay.png"]


def test_predict_segmenter_errors(tmp_path, capsys):
    clf_dir, seg_dir = runs(tmp_path)
    write_inputs(tmp_path / "in")
    # A classifier given as the segmenter is refused with a message, not a crash.
    rc = predict_main(["--checkpoint", str(clf_dir), "--segmenter", str(clf_dir), str(tmp_path / "in"),
                       "--out", str(tmp_path / "r.csv")])
    assert rc == 2 and "not a segmenter" in capsys.readouterr().err
    rc = predict_main(["--checkpoint", str(clf_dir), "--segmenter", str(tmp_path / "nope"), str(tmp_path / "in"),
                       "--out", str(tmp_path / "r.csv")])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_export_two_stage_serves_masks_for_sick_images_only(tmp_path, capsys):
    clf_dir, seg_dir = runs(tmp_path)
    out = tmp_path / "exports"
    assert export_main(["--checkpoint", str(clf_dir), "--segmenter", str(seg_dir), "--out", str(out),
                        "--version", "3"]) == 0
    version = out / "two_stage" / "3"
    assert (version / "saved_model.pb").is_file()
    meta = json.loads((version / "assets.extra" / "covidx.json").read_text())
    assert meta["classes"] == CLASSES and meta["segment_classes"] == ["covid19", "pneumonia"]
    # The same version again is refused; without --version the next one is written.
    assert export_main(["--checkpoint", str(clf_dir), "--segmenter", str(seg_dir), "--out", str(out),
                        "--version", "3"]) == 2
    assert "exists" in capsys.readouterr().err

    images = [sick_image((40, 48)), np.full((40, 48), 25, np.uint8), sick_image((64, 64))]
    served = tf.saved_model.load(str(version)).signatures["serving_default"]
    res = served(image_bytes=tf.constant([cv2.imencode(".png", im)[1].tobytes() for im in images]))
    assert res["class_name"].numpy().astype(str).tolist() == ["covid19", "normal", "covid19"]
    assert res["segmented"].numpy().tolist() == [True, False, True]
    masks = res["mask"].numpy()
    assert masks.shape == (3, SIZE, SIZE)
    assert not masks[1].any()
    for i in (0, 2):
        small = np.rint(cv2.resize(images[i].astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))
        assert np.mean(masks[i] == (small > 127.5)) > 0.98
