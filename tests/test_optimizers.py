"""Fused Adam / SGD: the weights after each step equal Keras' own optimizers' and a NumPy Adam."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidx.training.optimizers import FusedAdam, FusedSGD


def _train(optimizer, steps=4, seed=0):
    """Weights of a small dense network after ``steps`` steps of ``optimizer`` on fixed batches."""
    keras.utils.set_random_seed(seed)
    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    net.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.normal(size=(8, 6)).astype("float32")
        y = keras.utils.to_categorical(rng.integers(0, 3, 8), 3)
        net.train_on_batch(x, y)
    return [w.numpy() for w in net.weights]


def _schedule():
    return keras.optimizers.schedules.CosineDecay(0.05, 10)


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1}, {"beta_1": 0.5, "epsilon": 1e-3}])
def test_fused_adam_equals_keras_adam(kwargs):
    fused = _train(FusedAdam(_schedule(), **kwargs))
    reference = _train(keras.optimizers.Adam(_schedule(), **kwargs))
    for a, b in zip(fused, reference):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(fused[0], _train(FusedAdam(_schedule(), **kwargs), steps=0)[0])  # it trained


@pytest.mark.parametrize("kwargs", [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.0},
                                    {"momentum": 0.9, "weight_decay": 0.01}])
def test_fused_sgd_equals_keras_sgd(kwargs):
    fused = _train(FusedSGD(_schedule(), **kwargs))
    reference = _train(keras.optimizers.SGD(_schedule(), **kwargs))
    for a, b in zip(fused, reference):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fused_adam_step_equals_numpy_adam():
    """Kingma & Ba Algorithm 1 (epsilon added to sqrt(v_hat) scaled as Keras/TF do), three steps in NumPy."""
    w0 = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    grads = [np.array([[0.1, -0.2], [0.3, 0.0]], np.float32) * (i + 1) for i in range(3)]
    var = keras.Variable(w0)
    opt = FusedAdam(0.01, beta_1=0.8, beta_2=0.9, epsilon=1e-4)
    for g in grads:
        opt.apply([tf.constant(g)], [var])
    w, m, v = w0.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m = 0.8 * m + 0.2 * g
        v = 0.9 * v + 0.1 * g * g
        alpha = 0.01 * np.sqrt(1 - 0.9 ** t) / (1 - 0.8 ** t)
        w = w - alpha * m / (np.sqrt(v) + 1e-4)
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optimizer, kernel", [(lambda: FusedAdam(0.01), "ResourceApplyAdam"),
                                               (lambda: FusedSGD(0.01, momentum=0.9), "ResourceApplyKerasMomentum"),
                                               (lambda: FusedSGD(0.01), "ResourceApplyGradientDescent")])
def test_each_update_is_one_fused_kernel(optimizer, kernel):
    variables = [keras.Variable(np.ones((3, 2), np.float32)), keras.Variable(np.zeros(2, np.float32))]
    opt = optimizer()
    opt.build(variables)
    step = tf.function(lambda: opt.apply([tf.ones((3, 2)), tf.ones(2)], variables))
    ops = [op.type for op in step.get_concrete_function().graph.get_operations()]
    assert ops.count(kernel) == 2 and "Sqrt" not in ops  # one kernel per variable, no element-wise chain


def test_fused_optimizers_reload_from_config():
    for opt in (FusedAdam(1e-3, weight_decay=0.01), FusedSGD(0.1, momentum=0.9, nesterov=True)):
        again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        assert type(again) is type(opt) and again.get_config() == opt.get_config()


def test_training_builds_the_fused_optimizers_unless_turned_off():
    from covidx.training.engine import TrainConfig, build_optimizer

    def built(**kwargs):
        return type(build_optimizer(TrainConfig(epochs=2, learning_rate=1e-3, min_learning_rate=0.0, schedule="cosine", momentum=0.9, **kwargs), 10))

    assert built(optimizer="adam") is FusedAdam and built(optimizer="sgd") is FusedSGD
    assert built(optimizer="adam", fused_optimizer=False) is keras.optimizers.Adam
    assert built(optimizer="sgd", fused_optimizer=False) is keras.optimizers.SGD
