"""Segmentation losses and metrics against NumPy / scikit-learn on fixed arrays."""

import keras
import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score

from covidx.training import segmentation as seg


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def batch():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, (3, 6, 5)).astype("int32")
    labels[2] = 0  # an image without classes 1 and 2
    probs = _softmax(rng.normal(0, 2, (3, 6, 5, 3))).astype("float32")
    return labels, probs


def _np_dice_loss(labels, probs, smooth=1.0, include_background=True):
    onehot = np.eye(probs.shape[-1])[labels]
    if not include_background:
        onehot, probs = onehot[..., 1:], probs[..., 1:]
    out = []
    for g, p in zip(onehot, probs):
        dices = [
            (2 * (g[..., c] * p[..., c]).sum() + smooth) / (g[..., c].sum() + p[..., c].sum() + smooth)
            for c in range(g.shape[-1])
        ]
        out.append(1 - np.mean(dices))
    return np.array(out)


def _np_pixel_ce(labels, probs):
    picked = np.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]
    return -np.log(picked).mean(axis=(1, 2))


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("smooth", [1.0, 1e-3])
def test_dice_loss_matches_numpy(batch, include_background, smooth):
    labels, probs = batch
    expected = _np_dice_loss(labels, probs, smooth, include_background)
    got = _np(seg.dice_loss(labels, probs, smooth=smooth, include_background=include_background))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # (B, H, W, 1) labels give the same values.
    got4 = _np(seg.dice_loss(labels[..., None], probs, smooth=smooth, include_background=include_background))
    np.testing.assert_allclose(got4, expected, rtol=1e-5)


def test_cross_entropy_and_combination_match_numpy(batch):
    labels, probs = batch
    ce = _np_pixel_ce(labels, probs)
    np.testing.assert_allclose(_np(seg.pixel_cross_entropy(labels, probs)), ce, rtol=1e-5)
    combined = _np(seg.dice_cross_entropy_loss(labels[..., None], probs, dice_weight=0.7, ce_weight=1.3))
    np.testing.assert_allclose(combined, 0.7 * _np_dice_loss(labels, probs) + 1.3 * ce, rtol=1e-5)


def test_perfect_prediction_gives_zero_dice_loss(batch):
    labels, _ = batch
    perfect = np.eye(3, dtype="float32")[labels]
    np.testing.assert_allclose(_np(seg.dice_loss(labels, perfect)), 0.0, atol=1e-6)
    np.testing.assert_allclose(_np(seg.dice_loss(labels, perfect, smooth=1e-6)), 0.0, atol=1e-6)
    # Every pixel on a wrong class: loss 1, except that a class absent from target and
    # prediction (class 2 in the all-background image 2) counts as Dice 1 -> 1 - 1/3.
    wrong = np.eye(3, dtype="float32")[(labels + 1) % 3]
    np.testing.assert_allclose(_np(seg.dice_loss(labels, wrong, smooth=1e-6)), [1.0, 1.0, 2 / 3], atol=1e-5)


def test_loss_classes_reduce_with_sample_weight(batch):
    labels, probs = batch
    weights = np.array([1.0, 0.0, 2.0], "float32")
    per_image = 0.5 * _np_dice_loss(labels, probs) + 2.0 * _np_pixel_ce(labels, probs)
    loss = seg.DiceCrossEntropyLoss(dice_weight=0.5, ce_weight=2.0)
    # Keras default reduction "sum_over_batch_size": sum(w * l) / B.
    reduced = _np(loss(labels, probs, sample_weight=weights))
    np.testing.assert_allclose(reduced, (weights * per_image).mean(), rtol=1e-5)
    dice = _np(seg.DiceLoss()(labels, probs))
    np.testing.assert_allclose(dice, _np_dice_loss(labels, probs).mean(), rtol=1e-5)
    ce = _np(seg.PixelCrossEntropy()(labels, probs))
    np.testing.assert_allclose(ce, _np_pixel_ce(labels, probs).mean(), rtol=1e-5)


def test_factory_and_serialization(batch):
    labels, probs = batch
    assert isinstance(seg.segmentation_loss("dice"), seg.DiceLoss)
    assert isinstance(seg.segmentation_loss("dice_ce", ce_weight=0.5), seg.DiceCrossEntropyLoss)
    assert isinstance(seg.segmentation_loss("ce"), seg.PixelCrossEntropy)
    with pytest.raises(ValueError, match="unknown segmentation loss"):
        seg.segmentation_loss("focal")
    for obj in (
        seg.DiceLoss(smooth=0.5, include_background=False),
        seg.DiceCrossEntropyLoss(dice_weight=2.0, ce_weight=0.25),
        seg.PixelCrossEntropy(),
    ):
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
        assert type(restored) is type(obj) and restored.get_config() == obj.get_config()
        np.testing.assert_allclose(_np(restored(labels, probs)), _np(obj(labels, probs)), rtol=1e-6)
    serialized = keras.saving.serialize_keras_object(seg.dice_cross_entropy_loss)
    assert keras.saving.deserialize_keras_object(serialized) is seg.dice_cross_entropy_loss
    for metric in (seg.DiceCoefficient(class_ids=(0, 2)), seg.IoUScore()):
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
        assert type(restored) is type(metric) and restored.class_ids == metric.class_ids


def test_metrics_match_sklearn(batch):
    labels, probs = batch
    rng = np.random.default_rng(3)
    labels2 = rng.integers(0, 3, (2, 6, 5)).astype("int32")
    probs2 = _softmax(rng.normal(0, 2, (2, 6, 5, 3))).astype("float32")
    dice, iou = seg.DiceCoefficient(), seg.IoUScore(class_ids=(0, 1, 2))
    for m in (dice, iou):
        m.update_state(labels, probs)
        m.update_state(labels2[..., None], probs2)  # accumulates over batches
    y_true = np.concatenate([labels.ravel(), labels2.ravel()])
    y_pred = np.concatenate([probs.argmax(-1).ravel(), probs2.argmax(-1).ravel()])
    assert float(dice.result()) == pytest.approx(f1_score(y_true == 1, y_pred == 1), rel=1e-6)
    assert float(iou.result()) == pytest.approx(jaccard_score(y_true, y_pred, average="macro"), rel=1e-6)
    iou.reset_state()
    assert float(iou.result()) == 1.0  # nothing seen: empty classes count as perfect


def test_metrics_with_per_image_weights(batch):
    labels, probs = batch
    weights = np.array([2.0, 0.0, 1.0], "float32")
    pixel_weights = np.broadcast_to(weights[:, None, None], labels.shape).ravel()
    y_true, y_pred = labels.ravel(), probs.argmax(-1).ravel()
    dice = seg.DiceCoefficient(class_ids=(2,))
    dice.update_state(labels, probs, sample_weight=weights)
    expected = f1_score(y_true == 2, y_pred == 2, sample_weight=pixel_weights)
    assert float(dice.result()) == pytest.approx(expected, rel=1e-6)
    iou = seg.IoUScore()
    iou.update_state(labels, probs, sample_weight=weights)
    expected = jaccard_score(y_true == 1, y_pred == 1, sample_weight=pixel_weights)
    assert float(iou.result()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_trainer_fit_with_segmentation_loss_and_metrics():
    """The covidx Trainer contract: (image, class map, per-image weight) batches."""
    from covidx.training.trainers import Trainer

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 16, 16, 1)).astype("float32")
    y = (x[..., 0] > 127).astype("int32")  # bright pixels are foreground
    inputs = keras.Input((16, 16, 1))
    h = keras.layers.Rescaling(1 / 12.75, offset=-10.0)(inputs)  # [-10, 10]: separable by one 1x1 conv
    outputs = keras.layers.Conv2D(2, 1, activation="softmax")(h)
    trainer = Trainer(keras.Model(inputs, outputs))
    trainer.compile(
        keras.optimizers.Adam(0.05),
        loss=seg.segmentation_loss("dice_ce"),
        metrics=[seg.DiceCoefficient(), seg.IoUScore()],
        jit_compile=False,
    )
    history = trainer.fit(x, y, sample_weight=np.ones(8, "float32"), batch_size=4, epochs=15, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert history.history["dice"][-1] > 0.9 and history.history["iou"][-1] > 0.8
