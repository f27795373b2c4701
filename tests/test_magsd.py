"""MAG-SD (arXiv 2012.02278): MA-Net, attention-guided augmentation, soft-distance loss, trainer, localisation."""

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import jaccard_score

from covidx.layers.normalization import ImageNormalization
from covidx.models import magsd
from covidx.models.registry import create_model, get_spec
from covidx.explain import localization as L
from covidx.training import magsd as T
from covidx.training.trainers import get_trainer
from tests.helpers import tiny_ma_net

SIZE = 64
# A single bright 2x2 square in an 8x8 attention map: cells rows 2-3, cols 4-5, i.e. pixels
# [16, 32) x [32, 48) of a 64x64 image. Bilinear upsampling (half-pixel centres) crosses 0.5 * max
# exactly on the square's border, so at theta = 0.5 the attended region is the square itself.
SQUARE = (16, 32, 32, 48)
PAD = int(0.1 * SIZE)  # 6 px


def _square_maps(batch):
    maps = np.zeros((batch, 8, 8), "float32")
    maps[:, 2:4, 4:6] = 3.0
    return maps


def _images(batch, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, SIZE, SIZE, 1)).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


# ----------------------------------------------------------------------------- MA-Net


@pytest.mark.slow
def test_full_size_ma_net_parameters_and_shapes():
    net = magsd.build_magsd()  # 224x224x1, M = 32, 4 classes, 7x7 + 14x14 attention
    assert net.output.shape == (None, 4)
    assert net.get_layer("attention_maps").output.shape == (None, 7, 7, 32)
    assert net.get_layer("attention_pooling").output.shape == (None, 32 * 2048) == (None, 65536)
    trainable = sum(int(np.prod(w.shape)) for w in net.trainable_weights)
    conv_biases = sum(
        int(np.prod(l.bias.shape)) for l in net.layers if isinstance(l, keras.layers.Conv2D) and l.use_bias
    )
    # official torch layout: 23,862,336; keras.applications convs carry biases
    assert conv_biases == 26_560
    assert trainable == 23_862_336 + conv_biases == 23_888_896
    # + BN moving statistics: ResNet50 53,120 and attention BN 2 x 2 x 32
    assert net.count_params() == trainable + 53_120 + 128 == 23_942_144
    assert not net.get_layer("predictions").use_bias
    # The official code's PyTorch BN momentum 0.1 everywhere, the attention branches' BN included.
    norms = [l for l in net._flatten_layers(include_self=False) if isinstance(l, keras.layers.BatchNormalization)]
    assert len(norms) == 53 + 2 and {l.momentum for l in norms} == {0.9}

    # ablation: 3 scales (+ layer2 branch 512*32 + BN 4*32) and GAP pooling (2048*4 + 4 bias head)
    ablation = magsd.build_magsd(scales=3, pooling="gap")
    assert ablation.get_layer("attention_pooling").output.shape == (None, 2048)
    assert ablation.count_params() == 23_942_144 + 512 * 32 + 128 - 65536 * 4 + 2048 * 4 + 4


def test_preset_imagenet_weights_and_save_reload(tmp_path):
    spec = get_spec("mag-sd")
    p = spec.preset
    assert (p.task, p.image_size, p.channels, p.normalization, p.trainer) == ("4class", 224, 1, "zscore", "magsd")
    assert (p.optimizer, p.learning_rate, p.momentum, p.weight_decay) == ("sgd", 1e-3, 0.9, 1e-6)
    assert (p.batch_size, p.epochs, p.class_weights) == (32, 100, False)
    assert (p.augment, p.clahe_prob, p.clahe_inference, p.clahe_clip, p.clahe_grid) == ("mag-sd", 1.0, True, 4.0, 4)
    assert get_trainer("magsd") is T.MagSDTrainer

    # a 3-channel ResNet50 weights file of our own stands in for the ImageNet file
    donor = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    weights = tmp_path / "resnet50_notop.weights.h5"
    donor.save_weights(weights)
    net = create_model("mag-sd", image_size=SIZE, weights=str(weights), num_maps=4)
    assert net.get_layer("normalize").mode == "zscore"
    copied = 0
    for layer in donor.layers:
        if not layer.weights:
            continue
        got = net.get_layer(layer.name).get_weights()
        if layer.name == "conv1_conv":  # 1 input channel: fresh, as the official code
            assert got[0].shape == (7, 7, 1, 64)
            continue
        for a, b in zip(got, layer.get_weights()):
            np.testing.assert_array_equal(a, b)
        copied += 1
    assert copied == 105  # every conv/BN layer of the no-top ResNet50 except conv1

    x = _images(2)
    path = tmp_path / "magsd.keras"
    net.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(_np(net(x)), _np(loaded(x)))
    view, loaded_view = magsd.attention_view(net), magsd.attention_view(loaded)
    a, b = view(x), loaded_view(x)
    assert a["attention_maps"].shape == (2, 2, 2, 4)
    np.testing.assert_array_equal(_np(a["attention_maps"]), _np(b["attention_maps"]))
    np.testing.assert_array_equal(_np(a["predictions"]), _np(net(x)))


# ----------------------------------------------------------------------------- a reduced MA-Net


def test_with_attention_outputs_and_reload(tmp_path):
    net = tiny_ma_net(with_attention=True)
    x = _images(3)[:, :32, :32]
    out = net(x)
    assert set(out) == {"predictions", "attention_maps"} and out["attention_maps"].shape == (3, 4, 4, 4)
    path = tmp_path / "tiny.keras"
    net.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    for key in out:
        np.testing.assert_array_equal(_np(out[key]), _np(loaded(x)[key]))


def test_trainer_lowers_loss_on_synthetic_data():
    rng = np.random.default_rng(1)
    n, size = 32, 32
    labels = np.arange(n) % 2
    x = rng.uniform(0, 60, (n, size, size, 1)).astype("float32")
    for i, c in enumerate(labels):  # a bright blob, top-left for class 0, bottom-right for class 1
        r = 4 if c == 0 else 20
        x[i, r : r + 8, r : r + 8] += 180
    y = keras.utils.to_categorical(labels, 2)
    trainer = T.MagSDTrainer(tiny_ma_net(), seed=3)
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"])
    history = trainer.fit(x, y, batch_size=8, epochs=8, verbose=0, shuffle=False).history["loss"]
    assert np.mean(history[-2:]) < 0.6 * np.mean(history[:2]), history
    assert len(trainer.trainable_variables) == len(trainer.net.trainable_variables)
    # evaluation runs the primary path only
    assert trainer(x[:2]).shape == (2, 2)


def test_trainer_flags():
    net = tiny_ma_net()
    x = _images(4)[:, :32, :32]
    y = keras.utils.to_categorical([0, 1, 0, 1], 2)
    plain = T.MagSDTrainer(net, augmentations=0)
    loss, p = plain.train_loss(x, y, None)
    ce = -np.mean(np.log(np.sum(_np(p) * y, axis=1)))
    np.testing.assert_allclose(_np(loss), ce, rtol=1e-5)
    assert T.MagSDTrainer(net, augmentations=2).augmentations == ("mixup", "patch")
    l2 = T.MagSDTrainer(net, regularizer="l2", seed=0)
    assert np.isfinite(_np(l2.train_loss(x, y, None)[0]))
    with pytest.raises(ValueError):
        T.MagSDTrainer(net, augmentations=("crop",))


# ----------------------------------------------------------------------------- attention-guided augmentation


def test_sample_attention_maps_by_weight():
    b = 2000
    att = np.zeros((b, 2, 2, 3), "float32")
    att[..., 0] = 0.25  # spatial sum 1 -> weight sqrt(1) = 1
    att[..., 1] = 2.25  # spatial sum 9 -> weight 3
    # map 2 is all zero: weight sqrt(1e-12) -> practically never drawn
    np.testing.assert_allclose(_np(T.attention_weights(att[:1]))[0], [0.25, 0.75, 0.0], atol=1e-6)
    drawn = _np(T.sample_attention_maps(att, 3, seed=5))
    assert drawn.shape == (b, 2, 2, 3)
    picked = drawn[:, 0, 0, :]  # map value identifies the map
    assert set(np.unique(picked)) <= {0.25, 2.25}
    assert abs(np.mean(picked == 2.25) - 0.75) < 0.02


def test_attention_boxes_are_square_plus_padding():
    maps = _square_maps(3)
    boxes = _np(T.attention_boxes(maps, (SIZE, SIZE), theta=0.5, padding=0.1))
    y0, y1, x0, x1 = SQUARE
    np.testing.assert_array_equal(boxes, [[y0 - PAD, x0 - PAD, y1 + PAD, x1 + PAD]] * 3)
    # the upsampled region itself (independent bilinear upsampling by OpenCV)
    up = cv2.resize(maps[0], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    rows, cols = np.nonzero(up >= 0.5 * maps[0].max())
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == SQUARE
    # random theta in (0.4, 0.6): the border moves by at most a pixel; clipping at the image edge
    boxes = _np(T.attention_boxes(maps, (SIZE, SIZE), theta=(0.4, 0.6), padding=0.1, seed=1))
    assert np.all(np.abs(boxes - [y0 - PAD, x0 - PAD, y1 + PAD, x1 + PAD]) <= 1)
    edge = np.zeros((1, 8, 8), "float32")
    edge[0, 0, 0] = 1.0
    assert _np(T.attention_boxes(edge, (SIZE, SIZE), 0.5, 0.1))[0, :2].tolist() == [0, 0]


def test_attention_mixup_blends_zoomed_box():
    images = _images(2)
    out = _np(T.attention_mixup(images, _square_maps(2), theta=0.5, padding=0.1, gamma=0.6))
    y0, y1, x0, x1 = SQUARE
    for img, got in zip(images, out):
        crop = img[y0 - PAD : y1 + PAD, x0 - PAD : x1 + PAD, 0]
        zoom = cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(got[..., 0], 0.6 * img[..., 0] + 0.4 * zoom, atol=1e-3)


def test_attention_patch_pastes_box_copy():
    images = np.repeat(_images(1), 6, axis=0)
    out = _np(T.attention_patch(images, _square_maps(6), theta=0.5, padding=0.1, seed=7))
    y0, y1, x0, x1 = SQUARE
    patch = images[0, y0 - PAD : y1 + PAD, x0 - PAD : x1 + PAD]
    ph, pw = patch.shape[:2]
    positions = []
    for got in out:
        found = []
        for dy in range(SIZE - ph + 1):
            for dx in range(SIZE - pw + 1):
                if np.array_equal(got[dy : dy + ph, dx : dx + pw], patch):
                    expected = images[0].copy()
                    expected[dy : dy + ph, dx : dx + pw] = patch
                    if np.array_equal(got, expected):
                        found.append((dy, dx))
        assert found, "output is not the image with the attended box pasted inside it"
        positions.append(found[0])
    assert len(set(positions)) > 1  # random location


def test_attention_dim_scales_exactly_the_attended_pixels():
    images = _images(2)
    maps = _square_maps(2)
    out = _np(T.attention_dim(images, maps, theta=0.5))
    up = cv2.resize(maps[0], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    attended = up >= 0.5 * maps[0].max()
    y0, y1, x0, x1 = SQUARE
    rows, cols = np.nonzero(attended)  # the square, its corners rounded by bilinear interpolation
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == SQUARE
    for img, got in zip(images, out):
        np.testing.assert_allclose(got[attended], img[attended] * 0.001, rtol=1e-6)
        np.testing.assert_allclose(got[~attended], img[~attended] * 1.001, rtol=1e-6)
    paper = _np(T.attention_dim(images, maps, theta=0.5, dim_factor=0.1, keep_factor=1.0))
    np.testing.assert_allclose(paper[0][attended], images[0][attended] * 0.1, rtol=1e-6)

    # "mean" centring on raw pixels == the code's dimming of the z-scored image, after standardisation
    z = ImageNormalization("zscore")
    via_mean = z(T.attention_dim(images, maps, theta=0.5, center="mean"))
    via_code = z(T.attention_dim(z(images), maps, theta=0.5, center="zero"))
    np.testing.assert_allclose(_np(via_mean), _np(via_code), atol=1e-4)


# ----------------------------------------------------------------------------- soft-distance loss


def test_soft_distance_loss_by_hand():
    y = np.eye(3, dtype="float32")[[0, 1, 2]]
    p = np.array(
        [
            [0.80, 0.10, 0.10],  # right and confident: reference = P
            [0.90, 0.05, 0.05],  # wrong but confident: smoothed label
            [0.30, 0.30, 0.40],  # right but unsure (< 0.7): smoothed label
        ],
        "float32",
    )
    v1 = np.array([[0.6, 0.2, 0.2], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]], "float32")
    v2 = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4]], "float32")
    ref = np.array([[0.80, 0.10, 0.10], [0.01, 0.97, 0.01], [0.01, 0.01, 0.97]])  # 1 - 3 * 0.01 = 0.97
    np.testing.assert_allclose(_np(T.soft_reference(y, p)), ref, atol=1e-7)

    ce = -np.log([0.80, 0.05, 0.40])
    l1 = np.abs(ref - v1).mean(axis=1) + np.abs(ref - v2).mean(axis=1)
    loss = _np(T.soft_distance_loss(y, p, [v1, v2]))
    np.testing.assert_allclose(loss, np.mean(ce + l1), rtol=1e-5)

    l2 = ((ref - v1) ** 2).mean(axis=1) + ((ref - v2) ** 2).mean(axis=1)
    np.testing.assert_allclose(_np(T.soft_distance_loss(y, p, [v1, v2], distance="l2")), np.mean(ce + l2), rtol=1e-5)
    w = np.array([1.0, 2.0, 0.5], "float32")
    weighted = _np(T.soft_distance_loss(y, p, [v1, v2], sample_weight=w))
    np.testing.assert_allclose(weighted, np.mean(w * (ce + l1)), rtol=1e-5)
    # paper's L2 ablation (Table 8): squared distance to the hard label
    hard = ((y - v1) ** 2).mean(axis=1) + ((y - v2) ** 2).mean(axis=1)
    got = _np(T.soft_distance_loss(y, p, [v1, v2], threshold=None, smoothing=0.0, distance="l2"))
    np.testing.assert_allclose(got, np.mean(ce + hard), rtol=1e-5)

    # the reference is detached: d loss / d P is the cross-entropy gradient only (Keras' CE
    # renormalises P, -log(P_y / sum P), hence the 1 / sum P term)
    pt = tf.constant(p)
    with tf.GradientTape() as tape:
        tape.watch(pt)
        value = T.soft_distance_loss(y, pt, [v1, v2])
    np.testing.assert_allclose(_np(tape.gradient(value, pt)), (-y / p + 1.0 / p.sum(1, keepdims=True)) / 3.0, rtol=1e-4)


# ----------------------------------------------------------------------------- localisation (§4.4.6)


def test_localization_iou_known_answer():
    maps = np.zeros((1, 8, 8, 2), "float32")
    maps[0, 2:4, 4:6, :] = [1.0, 3.0]  # mean over the M maps = 2 on the square
    up, mask, boxes = L.localize(maps, (SIZE, SIZE), threshold=0.5)
    expected_up = cv2.resize(maps[0].mean(axis=-1), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(_np(up)[0], expected_up, atol=1e-5)
    expected = expected_up >= 0.5 * expected_up.max()
    np.testing.assert_array_equal(_np(mask)[0], expected)
    y0, y1, x0, x1 = SQUARE
    np.testing.assert_array_equal(_np(boxes)[0], [y0, x0, y1, x1])

    gt_box = np.array([[20, 30, 36, 50]])  # overlap 12 x 16 = 192; union 256 + 320 - 192 = 384
    np.testing.assert_allclose(_np(L.box_iou(boxes, gt_box)), [0.5])
    gt_mask = _np(L.boxes_to_masks(gt_box, (SIZE, SIZE)))
    assert gt_mask.sum() == 320 and gt_mask[0, 20:36, 30:50].all()
    box_mask = _np(L.boxes_to_masks(boxes, (SIZE, SIZE)))[0]
    np.testing.assert_allclose(_np(L.mask_iou(box_mask[None], gt_mask)), [0.5])

    disk = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(disk, (40, 24), 10, 1, -1)
    np.testing.assert_allclose(
        _np(L.mask_iou(mask, disk[None].astype(bool)))[0], jaccard_score(disk.ravel(), expected.ravel()), rtol=1e-6
    )
    # an empty mask gives an empty box and IoU 0
    _, empty_mask, empty_box = L.localize(np.zeros((1, 8, 8), "float32"), (SIZE, SIZE), threshold=1.0, relative=False)
    assert not _np(empty_mask).any() and _np(empty_box).tolist() == [[0, 0, 0, 0]]
    assert _np(L.box_iou(empty_box, gt_box)).tolist() == [0.0]
