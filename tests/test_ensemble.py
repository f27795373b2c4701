"""Concatenated ensemble VGG19 + DenseNet121 + EfficientNetB0 (ensemble paper Sec. III-A) and its Grad-CAM."""

import keras
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from covidx.layers import ImageNormalization
from covidx.explain import ensemble as EG
from covidx.models import ensemble as E
from covidx.weights import IMAGENET_FILES, WeightsNotFoundError


@pytest.mark.slow
def test_full_size_parameter_count_branches_and_freezing():
    model = E.build_ensemble(3, (224, 224, 3))
    # keras.applications notop counts: 20,024,384 + 7,037,504 + 4,049,571 + 8,451 (bare Dense(3) head).
    assert model.count_params() == 31_119_910
    assert E.count_params(model.trainable_weights) == 30_994_239
    assert E.branch_widths(model) == {"vgg19": 512, "densenet121": 1024, "efficientnetb0": 1280}
    assert model.get_layer("features").output.shape[-1] == 2816
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    assert {b: model.get_layer(n).output.shape[1:3] for b, n in E.ENSEMBLE_GRADCAM_LAYERS.items()} == {
        "vgg19": (14, 14), "densenet121": (7, 7), "efficientnetb0": (7, 7)}
    assert model.output.shape[-1] == 3
    # From scratch, BN statistics follow training (0.9); keras.applications' 0.99 stays with loaded weights.
    assert {l.momentum for l in model.layers if isinstance(l, keras.layers.BatchNormalization)} == {0.9}

    # freeze=0.5: the first floor(n/2) layers of each backbone, counted independently here.
    report = E.freeze_backbones(model, 0.5)
    expected_frozen = 0
    for b, (k, n, last) in report.branches.items():
        layers = [l for l in model.layers if l.name.startswith(b + "_") and l.name not in (b + "_normalize", b + "_gap")]
        assert n == len(layers) and k == n // 2
        assert all(not l.trainable for l in layers[:k]) and all(l.trainable for l in layers[k:])
        expected_frozen += sum(int(np.prod(w.shape)) for l in layers[:k] for w in l.weights)
    non_trainable_bn = 125_671  # BN moving statistics, never trainable
    trainable_before = E.count_params(model.trainable_weights)
    assert report.non_trainable_params == model.count_params() - trainable_before
    assert report.trainable_params + report.non_trainable_params == 31_119_910
    bn_stats_unfrozen = sum(int(np.prod(w.shape)) for l in model.layers if l.trainable for w in l.non_trainable_weights)
    assert report.non_trainable_params == expected_frozen + bn_stats_unfrozen  # frozen weights + BN stats elsewhere
    assert report.branches["vgg19"] == (10, 21, "vgg19_block3_conv4")

    # freeze="block3_pool": VGG19 up to and including that layer, the other branches trainable.
    report = E.freeze_backbones(model, "block3_pool")
    assert report.branches["vgg19"] == (11, 21, "vgg19_block3_pool")
    assert report.branches["densenet121"][0] == 0 and report.branches["efficientnetb0"][0] == 0
    vgg_frozen = sum(int(np.prod(w.shape)) for l in model.layers if l.name.startswith("vgg19_block") and
                     l.name.split("_")[1] in ("block1", "block2", "block3") for w in l.weights)
    assert report.non_trainable_params == vgg_frozen + non_trainable_bn
    assert E.freeze_backbones(model, None).trainable_params == 30_994_239


def test_from_scratch_vgg19_branch_gets_he_uniform_kernels_that_keep_its_signal():
    """He et al. 2015, Sec. 2.2: Glorot kernels (keras.applications') halve the signal at each of VGG19's ReLUs."""
    keras.utils.set_random_seed(0)
    model = E.build_ensemble(3, (32, 32, 3))
    convs = [l for l in E.backbone_layers(model, "vgg19") if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 16
    for conv in convs:
        k = conv.kernel.numpy()
        bound = np.sqrt(6.0 / np.prod(k.shape[:3]))  # U(-b, b), b = sqrt(6 / fan_in)
        assert np.abs(k).max() <= bound and abs(k.std() * np.sqrt(3.0) / bound - 1.0) < 0.05, conv.name
    k = model.get_layer("densenet121_conv1_conv").kernel.numpy()  # BN branches keep Glorot-uniform
    assert abs(k.std() / np.sqrt(2.0 / (np.prod(k.shape[:3]) + np.prod(k.shape[:2]) * k.shape[3])) - 1.0) < 0.05

    vgg = keras.applications.VGG19(include_top=False, weights=None, input_shape=(64, 64, 3), pooling="avg")
    x = ImageNormalization("caffe")(np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32"))
    glorot = np.abs(vgg(x).numpy()).mean()
    assert E.he_uniform_without_bn(vgg.layers) == 16
    assert np.abs(vgg(x).numpy()).mean() > 100 * glorot
    dense = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(32, 32, 3))
    assert E.he_uniform_without_bn(dense.layers) == 0


def _donor_densenet(size):
    """A DenseNet121 without top as keras.applications builds it, and a CheXNet-style copy with a 14-way head."""
    backbone = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone.output)
    chexnet = keras.Model(backbone.input, keras.layers.Dense(14, activation="sigmoid", name="predictions")(x))
    return backbone, chexnet


def test_weight_files_round_trip_and_missing_file(tmp_path, monkeypatch):
    size = 32
    backbone, chexnet = _donor_densenet(size)
    rng = np.random.default_rng(0)
    for v in backbone.weights:  # non-default values everywhere, BN statistics included
        v.assign(rng.normal(0, 0.05, v.shape).astype("float32") + (1.0 if "variance" in v.path else 0.0))
    x = rng.uniform(0, 255, (2, size, size, 3)).astype("float32")
    reference = backbone(ImageNormalization("imagenet")(x)).numpy()

    def branch_output(model):
        return keras.Model(model.input, model.get_layer("densenet121_relu").output)(x).numpy()

    # ImageNet-style file (keras.applications' name) found through $COVIDX_WEIGHTS.
    wdir = tmp_path / "weights"
    wdir.mkdir()
    backbone.save(wdir / IMAGENET_FILES["densenet121"])  # legacy .h5, like the release files
    monkeypatch.setenv("COVIDX_WEIGHTS", str(wdir))
    model = E.build_ensemble(3, (size, size, 3), weights="imagenet", backbones=("densenet121",))
    np.testing.assert_allclose(branch_output(model), reference, rtol=1e-5, atol=1e-5)
    assert sum(not l.trainable for l in model.layers) > 0  # freeze="auto" -> half frozen with pretrained weights
    assert {l.momentum for l in model.layers if isinstance(l, keras.layers.BatchNormalization)} == {0.99}

    # CheXNet-style file: DenseNet121 followed by a 14-class head; the head is left out.
    chexnet.save(tmp_path / "chexnet.h5")
    model = E.build_ensemble(3, (size, size, 3), densenet_weights=tmp_path / "chexnet.h5", freeze=None,
                             backbones=("densenet121",))
    np.testing.assert_allclose(branch_output(model), reference, rtol=1e-5, atol=1e-5)
    # A Keras 3 .weights.h5 of the backbone alone.
    backbone.save_weights(tmp_path / "dn.weights.h5")
    model = E.build_ensemble(3, (size, size, 3), densenet_weights=tmp_path / "dn.weights.h5",
                             backbones=("densenet121",))
    np.testing.assert_allclose(branch_output(model), reference, rtol=1e-5, atol=1e-5)

    # Missing files: one error naming every missing file; nothing downloaded.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("COVIDX_WEIGHTS", str(empty))
    monkeypatch.setenv("KERAS_HOME", str(empty))
    monkeypatch.chdir(empty)
    with pytest.raises(WeightsNotFoundError) as err:
        E.build_ensemble(3, (size, size, 3), weights="imagenet")
    for arch in ("vgg19", "densenet121", "efficientnetb0"):
        assert IMAGENET_FILES[arch] in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="nowhere.h5"):
        E.build_ensemble(3, (size, size, 3), densenet_weights=tmp_path / "nowhere.h5")


# ---------------------------------------------------------------------------
# Grad-CAM on the real ensemble (all three backbones, small input)
# ---------------------------------------------------------------------------

SIZE = 64


def _images(rng, n, quadrant):
    """Gray noise; ``quadrant`` 0..3 (TL, TR, BL, BR) gets a bright square, ``None`` none."""
    x = rng.normal(100, 8, (n, SIZE, SIZE, 1)).clip(0, 255)
    h = SIZE // 2
    for i in range(n):
        if quadrant is not None:
            y0, x0 = (quadrant // 2) * h, (quadrant % 2) * h
            oy, ox = rng.integers(4, h - 16, 2)
            x[i, y0 + oy:y0 + oy + 12, x0 + ox:x0 + ox + 12] = 250
    return np.repeat(x, 3, axis=-1).astype("float32")


@pytest.fixture(scope="module")
def trained_ensemble():
    """Ensemble whose head is trained (backbones frozen) so that a bright square means class 0.

    Training only the head of frozen backbones is a logistic regression on the 2816
    concatenated features; it is solved with scikit-learn on features extracted once and
    written into the ``predictions`` layer (instead of many slow full-graph steps).
    """
    keras.utils.set_random_seed(0)
    model = E.build_ensemble(3, (SIZE, SIZE, 3))
    rng = np.random.default_rng(0)
    x = np.concatenate([_images(rng, 2, q) for q in range(4)] + [_images(rng, 8, None)])
    y = np.array([0] * 8 + [1] * 8)
    f = EG.features_model(model).predict(x, batch_size=16, verbose=0)
    mu, sd = f.mean(0), f.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, max_iter=5000).fit((f - mu) / sd, y)
    assert clf.score((f - mu) / sd, y) == 1.0
    w = clf.coef_[0] / sd  # logit(class 1) - logit(class 0) in raw features
    b = clf.intercept_[0] - (mu * w).sum()
    kernel = np.zeros((2816, 3), np.float32)
    kernel[:, 0], kernel[:, 1] = -w / 2, w / 2
    bias = np.array([-b / 2, b / 2, -20.0], np.float32)  # class 2 (normal) unused here
    model.get_layer("predictions").set_weights([kernel, bias])
    return model


def _quadrant_mass(heat):
    h = SIZE // 2
    total = heat.sum(axis=(1, 2))
    return heat[:, :h, :h].sum(axis=(1, 2)) / total, heat[:, h:, h:].sum(axis=(1, 2)) / total


def test_ensemble_gradcam_follows_the_evidence_and_survives_reload(trained_ensemble, tmp_path):
    model = trained_ensemble
    rng = np.random.default_rng(1)
    x = np.concatenate([_images(rng, 1, 0), _images(rng, 1, 3)])  # square top-left, then bottom-right
    r = EG.ensemble_gradcam(model, x)
    assert r.heatmap.shape == (2, SIZE, SIZE) and r.class_indices.tolist() == [0, 0]
    assert set(r.branch_heatmaps) == {"vgg19", "densenet121", "efficientnetb0"}
    assert np.isclose(r.heatmap.max(axis=(1, 2)), 1.0).all() and r.heatmap.min() >= 0
    tl, br = _quadrant_mass(r.heatmap)
    assert tl[0] > br[0] and br[1] > tl[1]  # the heatmap moves with the square

    # Weights = each branch's share of the class-0 logit, computed independently with NumPy.
    f = EG.features_model(model)(x).numpy()
    w0 = model.get_layer("predictions").get_weights()[0][:, 0]
    shares = np.stack([(f[:, a:b] * w0[a:b]).sum(1) for a, b in ((0, 512), (512, 1536), (1536, 2816))], 1)
    np.testing.assert_allclose(r.contributions, shares, rtol=1e-4, atol=1e-4)
    pos = np.maximum(shares, 0)
    np.testing.assert_allclose(r.weights, pos / pos.sum(1, keepdims=True), atol=1e-5)
    mean = EG.ensemble_gradcam(model, x, combine="mean")
    manual = np.mean([mean.branch_heatmaps[b] for b in ("vgg19", "densenet121", "efficientnetb0")], axis=0)
    np.testing.assert_allclose(mean.heatmap, manual / manual.max(axis=(1, 2), keepdims=True), atol=1e-5)

    path = tmp_path / "ensemble.keras"
    model.save(path)
    reloaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(reloaded(x).numpy(), model(x).numpy(), atol=1e-6)
    again = EG.ensemble_gradcam(reloaded, x)
    np.testing.assert_allclose(again.heatmap, r.heatmap, atol=1e-5)
    np.testing.assert_allclose(again.weights, r.weights, atol=1e-6)
