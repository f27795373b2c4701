"""Cascade-SEME inference: Th_vir (eq. 1), routing, final labels, Regional-Learning input, persistence,
the in-graph registered model, the TF Serving export, and assembling training runs."""

import json
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from covidx.data.preprocess import PreprocessConfig
from covidx import cascade as cascade_cli
from covidx.models import cascade as C
from covidx.serving.systems import export_cascade
from covidx.systems import cascade as S
from covidx.models.registry import create_model, get_spec
from covidx.data.inference import preprocess_gray
from tests.test_lung_masks import LUNG_LEVEL, threshold_segmenter

# Fixed-weight stages: softmax(W * m + b) of the mean pixel m = mean(x) / 255, so every output is
# computable by hand. Stage 1 (bacterial, normal, viral): dark -> bacterial, mid -> normal, bright -> viral.
W1, B1 = np.array([-8.0, 0.0, 8.0]), np.array([3.0, 0.0, -5.0])
# Stage 2 (covid19, viral): COVID-19 when m > 0.3.
W2, B2 = np.array([10.0, 0.0]), np.array([-3.0, 0.0])
TINY_SEME = dict(stage1_kwargs=dict(blocks=(1, 1, 1, 1), base_width=8),
                 stage2_kwargs=dict(blocks=(1, 1, 1, 1), growth_rate=8, init_filters=16),
                 lung_kwargs=dict(base_filters=4, depth=2))


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def mean_classifier(w, b, size, name):
    inp = keras.Input((size, size, 1), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name=f"{name}_scale")(inp)
    x = keras.layers.GlobalAveragePooling2D(name=f"{name}_gap")(x)
    fc = keras.layers.Dense(len(w), activation="softmax", name=f"{name}_fc")
    model = keras.Model(inp, fc(x), name=name)
    fc.set_weights([np.asarray(w, np.float32)[None, :], np.asarray(b, np.float32)])
    return model


class Spy:
    """Stands in for stage 2: records every batch it is called on, then runs the real model."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, training=False):
        self.calls.append(np.asarray(x))
        return self.model(x, training=training)


def const(v, h=40, w=48):
    return np.full((h, w), v, np.uint8)


def test_calibrate_threshold_is_the_mean_viral_probability_of_the_reference_set():
    stage1 = mean_classifier(W1, B1, 16, "s1")
    values = np.array([10, 60, 120, 170, 200, 230, 250], np.float32)
    labels = np.array([0, 1, 2, 2, 0, 2, 1])
    x = np.ones((len(values), 16, 16, 1), np.float32) * values[:, None, None, None]
    p_viral = softmax(np.outer(values / 255.0, W1) + B1)[:, 2]
    all_ = S.calibrate_threshold(stage1, x, viral_index=2)
    viral = S.calibrate_threshold(stage1, x, viral_index=2, reference="viral", labels=labels)
    assert all_ == pytest.approx(p_viral.mean(), abs=1e-6)
    assert viral == pytest.approx(p_viral[labels == 2].mean(), abs=1e-6)
    assert abs(all_ - viral) > 0.05
    # A tf.data dataset of (x, one-hot y, w) batches, as covidx.data.make_dataset yields them.
    ds = tf.data.Dataset.from_tensor_slices((x, tf.one_hot(labels, 3), tf.ones(len(x)))).batch(3)
    assert S.calibrate_threshold(stage1, ds, 2, "viral") == pytest.approx(viral, abs=1e-6)
    assert S.calibrate_threshold(stage1, ds, 2) == pytest.approx(all_, abs=1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        S.calibrate_threshold(stage1, x, 2, reference="viral")
    with pytest.raises(ValueError, match="empty"):
        S.calibrate_threshold(stage1, x, 2, reference="viral", labels=np.zeros(len(x)))
    with pytest.raises(ValueError, match="reference"):
        S.calibrate_threshold(stage1, x, 2, reference="test")


@pytest.mark.parametrize("threshold", [0.3, 0.9, 0.99])
def test_routing_sentinel_and_final_labels(threshold):
    values = np.array([20, 60, 100, 130, 160, 200, 240])
    images = [const(v, 40 + i, 48 - i) for i, v in enumerate(values)]
    cascade = S.CascadeSEME(mean_classifier(W1, B1, 24, "s1"), mean_classifier(W2, B2, 32, "s2"), threshold)
    cascade.stage2 = spy = Spy(cascade.stage2)
    out = cascade.predict(images, batch_size=16)

    m = values / 255.0
    p1 = softmax(np.outer(m, W1) + B1)
    routed = p1[:, 2] > threshold
    np.testing.assert_allclose(out.stage1_probabilities, p1, atol=1e-5)
    np.testing.assert_array_equal(out.reached_stage2, routed)
    assert 0 < routed.sum() < len(values) or threshold == 0.99
    # Stage 2 is called once per batch with the routed images only, or not at all.
    assert len(spy.calls) == (1 if routed.any() else 0)
    if routed.any():
        np.testing.assert_allclose(spy.calls[0][..., 0], np.broadcast_to(values[routed, None, None], (routed.sum(), 32, 32)))
    p_covid = softmax(np.outer(m, W2) + B2)[:, 0]
    np.testing.assert_allclose(out.stage2_probability, np.where(routed, p_covid, -1.0), atol=1e-5)
    assert (out.stage2_probability[~routed] == S.SENTINEL).all()
    # Routed: stage 2 decides covid19 / viral. Not routed: the larger of bacterial / normal, never viral.
    expected = np.where(routed, np.where(p_covid > 0.5, "covid19", "viral"),
                        np.where(p1[:, 0] > p1[:, 1], "bacterial", "normal"))
    assert out.class_name == list(expected)
    assert [S.FINAL_CLASSES[i] for i in out.class_index] == out.class_name
    frame = out.to_frame()
    assert list(frame["label"]) == out.class_name and frame["p_viral"].to_numpy() == pytest.approx(p1[:, 2], abs=1e-5)
    if threshold == 0.9:  # value 200: viral is stage 1's argmax but below Th_vir -> normal
        assert p1[5].argmax() == 2 and not routed[5] and out.class_name[5] == "normal"


def nearest(a, out_h, out_w):
    """NumPy nearest-neighbour resize with TF2's pixel-centre convention."""
    rows = np.minimum(np.floor((np.arange(out_h) + 0.5) * np.float32(a.shape[0] / out_h)).astype(int), a.shape[0] - 1)
    cols = np.minimum(np.floor((np.arange(out_w) + 0.5) * np.float32(a.shape[1] / out_w)).astype(int), a.shape[1] - 1)
    return a[rows][:, cols]


def lung_image(h, w, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 90, (h, w)).astype(np.uint8)  # background well below LUNG_LEVEL
    img[h // 5: h - h // 5, w // 8: w // 2 - 2] = 230  # "left lung"
    img[h // 4: h - h // 6, w // 2 + 3: w - w // 8] = 200  # "right lung"
    return img


def test_stage2_sees_the_lung_region_only():
    images = [lung_image(40, 48, 0), lung_image(57, 45, 1), lung_image(64, 64, 2)]
    cascade = S.CascadeSEME(mean_classifier(W1, B1, 24, "s1"), mean_classifier(W2, B2, 32, "s2"), 0.0,
                            lung_segmenter=threshold_segmenter(16))
    cascade.stage2 = spy = Spy(cascade.stage2)
    out = cascade.predict(images)
    assert out.reached_stage2.all() and len(spy.calls) == 1
    seen = spy.calls[0][..., 0]
    lung_cfg, cfg2 = PreprocessConfig(image_size=16), PreprocessConfig(image_size=32)
    for img, got in zip(images, seen):
        gray = tf.constant(img[..., None].astype(np.float32))
        x2 = preprocess_gray(gray, cfg2).numpy()[..., 0]
        # Independent mask: lung pixels of the segmenter's 16 x 16 input, brought to the original
        # size and then to stage 2's 32 x 32 input by nearest neighbour (as a mask file in training).
        mask16 = preprocess_gray(gray, lung_cfg).numpy()[..., 0] > LUNG_LEVEL
        mask = nearest(nearest(mask16, *img.shape), 32, 32)
        assert 0.2 < mask.mean() < 0.8
        np.testing.assert_array_equal(got[~mask], 0.0)  # outside the lungs stage 2 sees black
        np.testing.assert_array_equal(got[mask], x2[mask])  # inside, the stage-2 image unchanged
    # The stage-2 probability is that of the masked image, not of the original.
    m = seen.reshape(len(images), -1).mean(1) / 255.0
    np.testing.assert_allclose(out.stage2_probability, softmax(np.outer(m, W2) + B2)[:, 0], atol=1e-5)


def tiny_cascade_model(threshold=C.DEFAULT_THRESHOLD):
    return create_model("cascade-seme", image_size=32, threshold=threshold, **TINY_SEME)


def split_threshold(p):
    """A threshold in the widest gap between the middle sorted values: some images on each side."""
    s = np.sort(p)
    mid = s[len(s) // 4: len(s) - len(s) // 4 + 1]
    i = int(np.argmax(np.diff(mid)))
    return float((mid[i] + mid[i + 1]) / 2)


def test_in_graph_cascade_equals_python_cascade_and_reloads(tmp_path):
    spec = get_spec("cascade-seme")
    assert spec.kind == "cascade" and spec.preset.task == "stage1"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 32, 32, 1)).astype(np.float32)
    x[:4, 4:28, 4:28] = np.clip(x[:4, 4:28, 4:28] + 120, 0, 255)  # some variety for the gate
    probe = tiny_cascade_model()
    threshold = split_threshold(probe(x)["stage1_probabilities"].numpy()[:, 2])
    model = C.build_cascade_model(probe.get_layer("stage1_seme_resnet50"), probe.get_layer("stage2_seme_densenet169"),
                                  threshold, probe.get_layer("lung_unet"))
    got = {k: np.asarray(v) for k, v in model(x, training=False).items()}
    assert got["stage1_probabilities"].shape == (8, 3) and got["class_index"].shape == (8,)
    assert 0 < got["reached_stage2"].sum() < 8

    python = S.CascadeSEME(model.get_layer("stage1_seme_resnet50"), model.get_layer("stage2_seme_densenet169"),
                           threshold, lung_segmenter=model.get_layer("lung_unet")).predict(list(x))
    np.testing.assert_allclose(got["stage1_probabilities"], python.stage1_probabilities, atol=1e-5)
    np.testing.assert_array_equal(got["reached_stage2"], python.reached_stage2)
    np.testing.assert_allclose(got["stage2_probability"], python.stage2_probability, atol=1e-5)
    np.testing.assert_array_equal(got["class_index"], python.class_index)
    assert (got["stage2_probability"][~got["reached_stage2"]] == -1.0).all()

    model.save(tmp_path / "cascade.keras")
    reloaded = keras.models.load_model(tmp_path / "cascade.keras", safe_mode=True)
    assert reloaded.get_layer("cascade_gate").threshold == threshold
    for k, v in reloaded(x, training=False).items():
        np.testing.assert_array_equal(np.asarray(v), got[k])


def write_png(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return str(path)


def test_stages_run_as_inference_copies_and_reload_as_such(tmp_path):
    """Every cascade path runs each stage's inference copy: SEME-ResNet50's BNs folded into its convolutions,
    SEME-DenseNet169's pre-activation BNs one fused kernel each; the same outputs as the stages as trained."""
    from covidx.layers import FusedBatchNormalization
    from tests.test_precision import randomise_batch_norms

    probe = tiny_cascade_model()
    stage1, stage2 = probe.get_layer("stage1_seme_resnet50"), probe.get_layer("stage2_seme_densenet169")
    rng = np.random.default_rng(0)
    for stage in (stage1, stage2):
        randomise_batch_norms(stage, rng)
    cascade = S.CascadeSEME(stage1, stage2, 0.3)
    x = rng.uniform(0, 255, (3, 32, 32, 1)).astype(np.float32)
    for trained, running in ((stage1, cascade.stage1), (stage2, cascade.stage2)):
        kinds = [type(layer) for layer in running.layers]
        assert keras.layers.BatchNormalization not in kinds
        assert any(type(layer) is keras.layers.BatchNormalization for layer in trained.layers)  # untouched
        np.testing.assert_allclose(np.asarray(running(x)), np.asarray(trained(x)), rtol=1e-4, atol=1e-5)
    assert FusedBatchNormalization not in {type(layer) for layer in cascade.stage1.layers}  # all folded
    assert FusedBatchNormalization in {type(layer) for layer in cascade.stage2.layers}
    cascade.save(tmp_path / "c")
    loaded = S.CascadeSEME.load(tmp_path / "c")
    assert [type(layer) for layer in loaded.stage2.layers] == [type(layer) for layer in cascade.stage2.layers]
    np.testing.assert_array_equal(np.asarray(loaded.stage1(x)), np.asarray(cascade.stage1(x)))


def test_save_load_roundtrip_and_export_match_python(tmp_path):
    probe = tiny_cascade_model()
    stage1, stage2 = probe.get_layer("stage1_seme_resnet50"), probe.get_layer("stage2_seme_densenet169")
    paths = [write_png(tmp_path / "img" / f"p{i}.png", lung_image(40 + 9 * i, 48 - 3 * i, i)) for i in range(5)]
    paths[2] = write_png(tmp_path / "img" / "p2.png", lung_image(40, 40, 2).astype(np.uint16) * 257)  # 16-bit PNG
    jpg = tmp_path / "img" / "j.jpg"
    cv2.imwrite(str(jpg), lung_image(50, 44, 7))
    paths.append(str(jpg))
    cfg1, cfg2 = PreprocessConfig(image_size=32), PreprocessConfig(image_size=32, resize="crop")
    p_viral = S.CascadeSEME(stage1, stage2, 0.0, stage1_preprocess=cfg1, stage2_preprocess=cfg2) \
        .predict(paths).stage1_probabilities[:, 2]
    cascade = S.CascadeSEME(stage1, stage2, split_threshold(p_viral), lung_segmenter=threshold_segmenter(16),
                            stage1_preprocess=cfg1, stage2_preprocess=cfg2)
    want = cascade.predict(paths)
    assert 0 < want.reached_stage2.sum() < len(paths)

    cascade.save(tmp_path / "cascade")
    files = {p.name for p in (tmp_path / "cascade").iterdir()}
    assert files == {"stage1.keras", "stage2.keras", "lung.keras", "cascade.json"}
    saved = json.loads((tmp_path / "cascade" / "cascade.json").read_text())
    assert saved["threshold"] == cascade.threshold and saved["preprocess"]["stage2"]["resize"] == "crop"
    loaded = S.CascadeSEME.load(tmp_path / "cascade")
    again = loaded.predict(paths)
    for field in ("stage1_probabilities", "stage2_probability", "reached_stage2", "class_index"):
        np.testing.assert_array_equal(getattr(again, field), getattr(want, field))

    (tmp_path / "exports" / "cascade-seme" / "1").mkdir(parents=True)  # an older version being served
    version = export_cascade(tmp_path / "cascade", tmp_path / "exports")
    assert version == tmp_path / "exports" / "cascade-seme" / "2" and (version / "saved_model.pb").is_file()
    with pytest.raises(FileExistsError):
        export_cascade(tmp_path / "cascade", tmp_path / "exports", version=2)
    meta = json.loads((version / "assets.extra" / "covidx.json").read_text())
    assert meta["classes"] == list(S.FINAL_CLASSES) and meta["threshold"] == cascade.threshold
    served = tf.saved_model.load(str(version))
    assert set(served.signatures) == {"serving_default", "predict_tensor"}
    out = served.signatures["serving_default"](image_bytes=tf.constant([Path(p).read_bytes() for p in paths]))
    np.testing.assert_allclose(out["stage1_probabilities"].numpy(), want.stage1_probabilities, atol=1e-5)
    np.testing.assert_array_equal(out["reached_stage2"].numpy(), want.reached_stage2)
    np.testing.assert_allclose(out["stage2_probability"].numpy(), want.stage2_probability, atol=1e-5)
    assert (out["stage2_probability"].numpy()[~want.reached_stage2] == -1.0).all()
    # the export CLI recognises a cascade folder
    from covidx.export import main as export_main

    assert export_main(["--checkpoint", str(tmp_path / "cascade"), "--out", str(tmp_path / "exports"),
                        "--version", "5"]) == 0
    assert (tmp_path / "exports" / "cascade-seme" / "5" / "saved_model.pb").is_file()
    # predict CLI on the cascade folder and on its export: the same final labels
    import pandas as pd

    from covidx.predict import main as predict_main

    folder = tmp_path / "img"
    sources = ((tmp_path / "cascade", tmp_path / "a.csv"), (tmp_path / "exports" / "cascade-seme", tmp_path / "b.csv"))
    for source, csv in sources:
        assert predict_main([str(folder), "--checkpoint", str(source), "--out", str(csv)]) == 0
        df = pd.read_csv(csv).set_index("path").loc[[str(p) for p in paths]]
        assert list(df["label"]) == list(want.class_name)
        np.testing.assert_array_equal(df["reached_stage2"].to_numpy().astype(bool), want.reached_stage2)
    assert out["class_index"].dtype == tf.int64
    np.testing.assert_array_equal(out["class_index"].numpy(), want.class_index)
    assert [c.decode() for c in out["class_name"].numpy()] == want.class_name

    # predict_tensor: pixels already at stage 1's size, the same as predict() on those arrays.
    x = np.stack([cv2.resize(lung_image(32, 32, s), (32, 32)) for s in range(4)]).astype(np.float32)[..., None]
    tensor_out = served.signatures["predict_tensor"](images=tf.constant(x))
    direct = cascade.predict(list(x))
    np.testing.assert_allclose(tensor_out["stage1_probabilities"].numpy(), direct.stage1_probabilities, atol=1e-5)
    np.testing.assert_allclose(tensor_out["stage2_probability"].numpy(), direct.stage2_probability, atol=1e-5)
    np.testing.assert_array_equal(tensor_out["class_index"].numpy(), direct.class_index)


def make_run(root, model, task, classes, size, table=None):
    root.mkdir(parents=True)
    model.save(root / "best.keras")
    (root / "config.json").write_text(json.dumps({"model": model.name, "task": task, "classes": classes,
                                                  "preprocess": PreprocessConfig(image_size=size).to_dict()}))
    if table is not None:
        table.to_csv(root / "split.csv", index=False)
    return root


def test_from_runs_calibrates_on_the_training_split_and_cli(tmp_path, capsys):
    values = [15, 70, 200, 230, 40, 250, 100, 90, 200]
    labels = ["bacterial", "normal", "viral", "viral", "bacterial", "viral", "normal", "viral", "viral"]
    split = ["train"] * 7 + ["test", "val"]
    paths = [write_png(tmp_path / "data" / f"c{i}.png", const(v, 30 + i, 36)) for i, v in enumerate(values)]
    table = pd.DataFrame({"path": paths, "label": labels, "label_index": [S.STAGE1_CLASSES.index(c) for c in labels],
                          "split": split, "mask_path": "", "lesion_path": ""})
    r1 = make_run(tmp_path / "runs" / "s1", mean_classifier(W1, B1, 24, "s1"), "stage1", list(S.STAGE1_CLASSES), 24, table)
    r2 = make_run(tmp_path / "runs" / "s2", mean_classifier(W2, B2, 32, "s2"), "stage2", list(S.STAGE2_CLASSES), 32)
    rl = make_run(tmp_path / "runs" / "lung", threshold_segmenter(16), "lungs", ["background", "lung"], 16)

    p_viral = softmax(np.outer(np.array(values) / 255.0, W1) + B1)[:, 2]
    train = np.array(split) == "train"
    viral = np.array(labels) == "viral"
    assert cascade_cli.main(["--stage1", str(r1), "--stage2", str(r2), "--lung", str(rl), "--out", str(tmp_path / "c")]) == 0
    assert "Th_vir" in capsys.readouterr().out
    saved = json.loads((tmp_path / "c" / "cascade.json").read_text())
    assert saved["threshold"] == pytest.approx(p_viral[train].mean(), abs=1e-6)
    assert saved["calibration"]["size"] == 7 and saved["calibration"]["reference"] == "all"
    assert saved["preprocess"]["lung"]["image_size"] == 16 and (tmp_path / "c" / "lung.keras").is_file()

    by_viral = S.CascadeSEME.from_runs(r1, r2, reference="viral")
    assert by_viral.threshold == pytest.approx(p_viral[train & viral].mean(), abs=1e-6)
    assert by_viral.calibration["size"] == 3 and by_viral.lung is None
    assert abs(by_viral.threshold - saved["threshold"]) > 0.05
    assert cascade_cli.main(["--stage1", str(r2), "--stage2", str(r2), "--out", str(tmp_path / "bad")]) == 2
    assert "stage 1 classes ('covid19', 'viral') must be" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_cascade_seme():
    model = create_model("cascade-seme")
    parts = {layer.name: layer.count_params() for layer in model.layers if isinstance(layer, keras.Model)}
    # The three registered full-size networks at 512 x 512 x 1; the gate and masking add nothing.
    # SEME-ResNet50, 3 classes: the bias-free SENet layout's 26,038,899 + 79,680 conv biases (resnet.py docstring).
    # SEME-DenseNet169, 2 classes: keras DenseNet169 14,307,880 - 6,272 (1-channel stem)
    #   - 1,661,670 (1000-way -> 2-way head) + 595,816 (SE on the dense-block outputs).
    # Lung U-Net: 31,042,434 trainable + 11,776 BN statistics (unet.py docstring).
    assert parts == {"stage1_seme_resnet50": 26_118_579, "stage2_seme_densenet169": 13_235_754,
                     "lung_unet": 31_054_210}
    assert model.count_params() == sum(parts.values())
    assert model.get_layer("cascade_gate").threshold == pytest.approx(1 / 3)
    assert model.inputs[0].shape[1:] == (512, 512, 1)
    assert {k: (tuple(t.shape), t.dtype) for k, t in model.output.items()} == {
        "stage1_probabilities": ((None, 3), "float32"), "stage2_probability": ((None,), "float32"),
        "reached_stage2": ((None,), "bool"), "class_index": ((None,), "int32")}


def test_explain_both_stages_with_stage2_on_the_lung_region(tmp_path):
    """Grad-CAM of stage 1 on every image, of stage 2 on the lung-region input of the routed images only."""
    from covidx.explain.gradcam import GradCAM

    keras.utils.set_random_seed(0)
    # Sizes with a spatial last feature map: 2 x 2 for the one-block-per-stage ResNet at 64 px, 4 x 4 for a
    # two-dense-block DenseNet at 32 px.
    stage1 = create_model("seme-resnet50", image_size=64, **TINY_SEME["stage1_kwargs"])
    stage2 = create_model("seme-densenet169", image_size=32, blocks=(2, 2), growth_rate=8, init_filters=16)
    paths = [write_png(tmp_path / "in" / f"x{i}.png", lung_image(40 + 3 * i, 48, i)) for i in range(6)]
    p_viral = S.CascadeSEME(stage1, stage2, 0.0).predict(paths).stage1_probabilities[:, 2]
    cascade = S.CascadeSEME(stage1, stage2, split_threshold(p_viral), lung_segmenter=threshold_segmenter(16))
    routed = cascade.predict(paths).reached_stage2
    assert 0 < routed.sum() < len(paths)

    records = cascade.explain(paths, tmp_path / "out")
    assert [r["stage2"] is not None for r in records] == list(routed)
    cam1 = GradCAM(stage1, "conv5_block1_out")  # the reduced copy's last block (registered: conv5_block3_out)
    cam2 = GradCAM(stage2, get_spec("seme-densenet169").gradcam_layer)
    for path, r in zip(paths, records):
        x1 = preprocess_gray(tf.constant(cv2.imread(path, 0)[..., None].astype(np.float32)), cascade.stage1_preprocess)
        np.testing.assert_array_equal(r["stage1"]["input"], np.clip(x1.numpy()[..., 0], 0, 255).astype(np.uint8))
        expected = cam1.explain(x1[None])
        np.testing.assert_allclose(r["stage1"]["heatmap"], expected.heatmaps[0], atol=1e-5)
        assert r["stage1"]["class_name"] == S.STAGE1_CLASSES[int(expected.class_indices[0])]
        assert r["stage1"]["heatmap"].shape == (64, 64) and Path(r["stage1"]["overlay"]).is_file()
        if r["stage2"] is None:
            continue
        x2 = r["stage2"]["input"]
        assert (x2 == 0).mean() > 0.2  # outside the lungs stage 2 sees black (the X_T of predict)
        expected = cam2.explain(x2[None, ..., None].astype(np.float32))
        np.testing.assert_allclose(r["stage2"]["heatmap"], expected.heatmaps[0], atol=1e-4)
        assert Path(r["stage2"]["overlay"]).is_file()
    assert len(list((tmp_path / "out").glob("*.png"))) == len(paths) + routed.sum()
    # The same through python -m covidx.predict on the saved cascade folder.
    from covidx.predict import main as predict_main

    saved = cascade.save(tmp_path / "cascade")
    assert predict_main(["--checkpoint", str(saved), str(tmp_path / "in"), "--out", str(tmp_path / "p.csv"),
                         "--explain", "gradcam", "--overlays", str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli").glob("*_stage1.png"))) == len(paths)
    assert len(list((tmp_path / "cli").glob("*_stage2.png"))) == routed.sum()
