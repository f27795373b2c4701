"""Cascade-SEME trainers: MoEx label interpolation (eq. 3) and Regional Learning (eq. 6)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidx.layers.moex import MomentExchange
from covidx.models import densenet, resnet, vgg
from covidx.training import moex as moex_training
from covidx.training.moex import find_moment_exchange, regional_learning_loss
from covidx.training.trainers import get_trainer

TINY_RESNET = dict(blocks=(1, 1, 1, 1), base_width=8)
TINY_DENSENET = dict(blocks=(1, 1, 1, 1), growth_rate=4, init_filters=8)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype("float32")


def _ce(y, p):
    return -(y * np.log(p)).sum(axis=1)


def test_regional_learning_loss_is_the_sum_of_both_cross_entropies():
    rng = np.random.default_rng(0)
    y = np.eye(2, dtype="float32")[[0, 1, 1, 0]]
    p_orig, p_region = _softmax(rng.normal(size=(4, 2))), _softmax(rng.normal(size=(4, 2)))
    w = np.array([1.0, 0.5, 2.0, 1.5], "float32")
    # eq. 6: L = CE(O_T, y) + CE(O_O, y)
    expected = _ce(y, p_region).mean() + _ce(y, p_orig).mean()
    assert np.isclose(float(regional_learning_loss(y, p_orig, p_region)), expected, rtol=1e-5)
    weighted = (w * _ce(y, p_region)).mean() + (w * _ce(y, p_orig)).mean()
    assert np.isclose(float(regional_learning_loss(y, p_orig, p_region, w)), weighted, rtol=1e-5)


def test_regional_learning_loss_with_moex_partners_over_the_stacked_batch():
    rng = np.random.default_rng(1)
    y = np.eye(3, dtype="float32")[[0, 2, 1]]
    p_orig, p_region = _softmax(rng.normal(size=(3, 3))), _softmax(rng.normal(size=(3, 3)))
    perm = np.array([4, 2, 0, 5, 1, 3])  # over [X_O; X_T]
    lam = 0.9
    y2, p2 = np.concatenate([y, y]), np.concatenate([p_orig, p_region])
    per_sample = lam * _ce(y2, p2) + (1 - lam) * _ce(y2[perm], p2)
    expected = per_sample[:3].mean() + per_sample[3:].mean()  # L_O + L_T, each eq. 3
    got = float(regional_learning_loss(y, p_orig, p_region, permutation=perm, lam=lam))
    assert np.isclose(got, expected, rtol=1e-5)


def test_moex_trainer_needs_exactly_one_moex_layer():
    plain = resnet.build_resnet50(2, (32, 32, 1), **TINY_RESNET)
    with pytest.raises(ValueError, match="MomentExchange"):
        get_trainer("moex")(plain)
    inputs = keras.Input((8, 8, 4))
    twice = keras.Model(inputs, MomentExchange(name="a")(MomentExchange(name="b")(inputs)))
    with pytest.raises(ValueError, match="2 MomentExchange"):
        find_moment_exchange(twice)
    assert get_trainer("regional").needs == ("lung_mask",)


def test_moex_trainer_loss_in_graph_mode_uses_the_layers_permutation():
    net = resnet.build_resnet50(3, (32, 32, 1), se=True, moex=True, moex_seed=3, **TINY_RESNET)
    trainer = get_trainer("moex")(net)
    layer = find_moment_exchange(net)
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (6, 32, 32, 1)).astype("float32")
    y = np.eye(3, dtype="float32")[[0, 1, 2, 2, 1, 0]]
    w = np.array([1, 2, 1, 0.5, 1, 3], "float32")

    @tf.function
    def step(x, y, w):
        loss, y_pred = trainer.train_loss(x, y, w)
        return loss, y_pred, layer.last_permutation

    for _ in range(2):  # a new permutation per call of the traced step
        loss, p, perm = (keras.ops.convert_to_numpy(t) for t in step(x, y, w))
        assert sorted(perm) == list(range(6))
        expected = 0.9 * (w * _ce(y, p)).mean() + 0.1 * (w[perm] * _ce(y[perm], p)).mean()
        assert np.isclose(loss, expected, rtol=1e-5)


def _blob_data(n=16, size=32, seed=0):
    """Class 0: bright square top-left, class 1: bottom-right, on noise (inside a central lung mask)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 60, (n, size, size, 1)).astype("float32")
    labels = np.arange(n) % 2
    for i, c in enumerate(labels):
        lo = 6 if c == 0 else size - 14
        x[i, lo : lo + 8, lo : lo + 8] += 180.0
    mask = np.zeros((n, size, size, 1), "float32")
    mask[:, 4:-4, 4:-4] = 1.0
    return x, np.eye(2, dtype="float32")[labels], np.ones(n, "float32"), mask


def _fit_losses(trainer, data, epochs=6, learning_rate=0.05):
    trainer.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9), loss="categorical_crossentropy", metrics=["accuracy"]
    )
    history = trainer.fit(data, epochs=epochs, verbose=0)
    return history.history["loss"]


@pytest.mark.slow
def test_moex_trainer_lowers_the_loss_seme_resnet50():
    x, y, w, _ = _blob_data()
    net = resnet.build_resnet50(2, (32, 32, 1), se=True, moex=True, moex_seed=0, **TINY_RESNET)
    losses = _fit_losses(get_trainer("moex")(net), tf.data.Dataset.from_tensor_slices((x, y, w)).batch(8))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_regional_trainer_lowers_the_loss_seme_densenet169():
    x, y, w, mask = _blob_data()
    net = densenet.build_densenet169(2, (32, 32, 1), se=True, moex=True, moex_seed=0, **TINY_DENSENET)
    trainer = get_trainer("regional")(net)
    data = tf.data.Dataset.from_tensor_slices(({"image": x, "lung_mask": mask}, y, w)).batch(8)
    losses = _fit_losses(trainer, data)
    assert losses[-1] < 0.8 * losses[0], losses
    # Evaluation runs the original image only (dict inputs accepted).
    loss, accuracy = trainer.evaluate(data, verbose=0)
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0


@pytest.mark.slow
def test_standard_trainer_lowers_the_loss_vgg19_gap():
    x, y, w, _ = _blob_data()
    net = vgg.build_vgg19(2, (32, 32, 1), head="gap", width=0.125)
    data = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(8)
    # No batch normalisation in VGG: a smaller step than the BN networks.
    losses = _fit_losses(get_trainer("standard")(net), data, epochs=8, learning_rate=0.005)
    assert losses[-1] < 0.8 * losses[0], losses


def test_trainers_are_registered():
    assert get_trainer("moex") is moex_training.MoExTrainer
    assert get_trainer("regional") is moex_training.RegionalLearningTrainer
