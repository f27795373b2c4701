"""Two-stage classify -> segment system (ensemble paper Sec. III, Fig. 2): routing, runs, TF Serving export."""

import json

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from covidx.data.preprocess import PreprocessConfig
from covidx.layers import ImageNormalization
from covidx.models.tiramisu import build_fc_densenet
from covidx.explain.overlay import overlay_mask
from covidx.serving.systems import build_two_stage_archive
from covidx.systems.two_stage import TwoStagePredictor

CLASSES = ["covid19", "pneumonia", "normal"]


def brightness_classifier(size=32):
    """Fixed head on the mean pixel: bright images -> covid19, dark images -> normal."""
    inp = keras.Input((size, size, 1), name="image")
    x = ImageNormalization("unit", name="normalize")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation="softmax", dtype="float32", name="predictions")(x)
    model = keras.Model(inp, out)
    model.get_layer("predictions").set_weights([np.array([[20.0, 0.0, -20.0]], np.float32),
                                                np.array([-10.0, 0.0, 10.0], np.float32)])
    return model


def tiny_segmenter(size=32):
    return build_fc_densenet(2, (size, size, 1), layers_per_block=1, growth_rate=4, first_filters=8, n_pool=2,
                             name="tiny_tiramisu")


def batch():
    rng = np.random.default_rng(0)
    # bright (covid19), dark (normal), bright, dark; different size from the models' input
    means = [220.0, 30.0, 200.0, 20.0]
    return np.stack([np.clip(rng.normal(m, 10, (40, 48)), 0, 255) for m in means]).astype(np.float32)


def test_routing_returns_masks_only_for_segmented_classes():
    clf, seg = brightness_classifier(), tiny_segmenter()
    pred = TwoStagePredictor(clf, seg, CLASSES)
    r = pred.predict(batch())
    assert list(r.class_name) == ["covid19", "normal", "covid19", "normal"]
    assert r.segmented.tolist() == [True, False, True, False]
    assert r.masks[1] is None and r.overlays[3] is None
    for i in (0, 2):
        assert r.masks[i].shape == (32, 32) and r.masks[i].dtype == np.uint8
        assert set(np.unique(r.masks[i])) <= {0, 1}
        assert r.overlays[i].shape == (32, 32, 3)
    # The mask is the segmenter's argmax on the same preprocessed image (resize as the pipeline does).
    x = cv2.resize(batch()[0], (32, 32), interpolation=cv2.INTER_LINEAR)
    x = np.clip(np.rint(x), 0, 255)[None, ..., None]
    expected = (np.asarray(seg(x)).argmax(-1)[0] == 1).astype(np.uint8)
    assert np.mean(expected == r.masks[0]) > 0.98  # bilinear kernels of TF and OpenCV agree up to rounding


def test_both_models_run_as_inference_copies():
    """The segmenter's BNs run as one fused kernel each; outputs as the trained models'."""
    from covidx.layers import FusedBatchNormalization
    from tests.test_precision import randomise_batch_norms

    clf, seg = brightness_classifier(), tiny_segmenter()
    randomise_batch_norms(seg, np.random.default_rng(0))
    pred = TwoStagePredictor(clf, seg, CLASSES)
    kinds = {type(layer) for layer in pred.segmenter.layers}
    assert FusedBatchNormalization in kinds and keras.layers.BatchNormalization not in kinds
    x = batch()[:, :32, :32, None]
    np.testing.assert_allclose(np.asarray(pred.segmenter(x)), np.asarray(seg(x)), rtol=1e-4, atol=1e-5)
    assert pred.classifier is clf  # no BN: nothing to change, the model itself


def test_overlay_mask_blends_red_only_inside():
    img = np.full((4, 4), 100.0)
    m = np.zeros((4, 4), bool)
    m[1, 1] = True
    out = overlay_mask(img, m, alpha=0.5)
    assert out[1, 1].tolist() == [178, 50, 50]
    assert out[0, 0].tolist() == [100, 100, 100]


def _save_run(model, folder, classes, task, config):
    folder.mkdir(parents=True)
    model.save(folder / "best.keras")
    (folder / "config.json").write_text(json.dumps({"classes": classes, "task": task, "model": model.name,
                                                    "preprocess": config.to_dict()}))
    return folder


def test_from_runs_reloads_safe_mode_and_export_serves_bytes(tmp_path):
    clf, seg = brightness_classifier(), tiny_segmenter()
    # Lesion everywhere, so that zero masks in the export can only come from the routing.
    kernel, _ = seg.get_layer("logits").get_weights()
    seg.get_layer("logits").set_weights([kernel * 0.0, np.array([0.0, 5.0], np.float32)])
    cconf = PreprocessConfig(image_size=32, channels=1)
    sconf = PreprocessConfig(image_size=32, channels=1)
    direct = TwoStagePredictor(clf, seg, CLASSES, classifier_preprocess=cconf, segmenter_preprocess=sconf)
    c_run = _save_run(clf, tmp_path / "clf", CLASSES, "3class", cconf)
    s_run = _save_run(seg, tmp_path / "seg", ["background", "lesion"], "lesions", sconf)
    loaded = TwoStagePredictor.from_runs(c_run, s_run)  # load_run uses safe_mode=True
    images = np.rint(batch())
    a, b = direct.predict(images), loaded.predict(images)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    for ma, mb in zip(a.masks, b.masks):
        assert (ma is None and mb is None) or np.array_equal(ma, mb)

    archive = build_two_stage_archive(loaded)
    out = tmp_path / "export"
    archive.write_out(str(out), verbose=False)
    served = tf.saved_model.load(str(out)).signatures["serving_default"]
    png = [cv2.imencode(".png", im.astype(np.uint8))[1].tobytes() for im in images]
    res = served(image_bytes=tf.constant(png))
    assert res["class_name"].numpy().astype(str).tolist() == ["covid19", "normal", "covid19", "normal"]
    np.testing.assert_allclose(res["probabilities"].numpy(), b.probabilities, atol=1e-5)
    assert res["segmented"].numpy().tolist() == [True, False, True, False]
    masks = res["mask"].numpy()
    assert masks.shape == (4, 32, 32) and masks.dtype == np.uint8
    assert not masks[1].any() and not masks[3].any()
    for i in (0, 2):
        np.testing.assert_array_equal(masks[i], b.masks[i])
        assert masks[i].all()
    with pytest.raises(tf.errors.InvalidArgumentError):
        served(image_bytes=tf.constant([b"not an image at all, definitely not a png file"]))
