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
    for opt in (FusedAdam(1e-3, weight_decay=0.01, lr_scales={"dense/kernel": 0.1}),
                FusedSGD(0.1, momentum=0.9, nesterov=True, fused=False)):
        again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        assert type(again) is type(opt) and again.get_config() == opt.get_config()


@pytest.mark.parametrize("make", [lambda **kw: FusedAdam(0.05, **kw), lambda **kw: FusedSGD(0.05, momentum=0.9, **kw),
                                  lambda **kw: FusedAdam(0.05, fused=False, **kw)])
def test_lr_scales_train_a_variable_at_a_fraction_of_the_rate(make):
    """A variable scaled by 0.1 ends where the same optimizer at 0.1x the rate takes it; the others are untouched."""
    def run(optimizer):
        variables = [keras.Variable(np.ones((3, 2), np.float32), name="kernel"), keras.Variable(np.zeros(2, np.float32))]
        optimizer.build(variables)
        for i in range(3):
            optimizer.apply([tf.fill((3, 2), 0.5 * (i + 1)), tf.fill((2,), -0.3 * (i + 1))], variables)
        return [v.numpy() for v in variables]

    probe = [keras.Variable(np.ones((3, 2), np.float32), name="kernel"), keras.Variable(np.zeros(2, np.float32))]
    scaled = run(make(lr_scales={probe[0].path: 0.1}))  # paths are "kernel" and "variable": the same in run()
    full, slow = run(make()), run(_at_rate(make, 0.005))
    np.testing.assert_allclose(scaled[0], slow[0], rtol=1e-6)
    np.testing.assert_allclose(scaled[1], full[1], rtol=1e-6)
    assert not np.allclose(scaled[0], full[0])


def _at_rate(make, rate):
    opt = make()
    opt.learning_rate = rate
    return opt


def test_lr_scales_naming_no_trained_variable_is_an_error():
    with pytest.raises(ValueError, match="predictions/kernel"):
        FusedAdam(1e-3, lr_scales={"predictions/kernel": 0.01}).build([keras.Variable(np.ones(2, np.float32))])


def test_unfused_optimizers_take_keras_arithmetic():
    variables = [keras.Variable(np.ones((3, 2), np.float32))]
    opt = FusedAdam(0.01, fused=False)
    opt.build(variables)
    step = tf.function(lambda: opt.apply([tf.ones((3, 2))], variables))
    assert "ResourceApplyAdam" not in [op.type for op in step.get_concrete_function().graph.get_operations()]


def test_training_builds_the_fused_optimizers_unless_turned_off():
    from covidx.training.engine import TrainConfig, build_optimizer

    def built(**kwargs):
        return build_optimizer(TrainConfig(epochs=2, learning_rate=1e-3, min_learning_rate=0.0, schedule="cosine", momentum=0.9, **kwargs), 10)

    assert type(built(optimizer="adam")) is FusedAdam and type(built(optimizer="sgd")) is FusedSGD
    assert built(optimizer="adam").fused and built(optimizer="sgd").fused
    assert not built(optimizer="adam", fused_optimizer=False).fused
    assert not built(optimizer="sgd", fused_optimizer=False).fused


def test_training_resolves_lr_scales_by_layer_name():
    from covidx.training.engine import TrainConfig, build_optimizer

    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"), keras.layers.Dense(2, name="predictions")])
    cfg = TrainConfig(epochs=2, optimizer="adam", learning_rate=1e-3, min_learning_rate=0.0, schedule="cosine",
                      lr_scales={"predictions": 0.01})
    head = net.get_layer("predictions")
    assert build_optimizer(cfg, 10, net).lr_scales == {head.kernel.path: 0.01, head.bias.path: 0.01}
    cfg.lr_scales = {"head": 0.1}
    with pytest.raises(ValueError, match="no layer 'head'"):
        build_optimizer(cfg, 10, net)


def test_lr_scales_patterns_take_every_matching_layer_and_later_entries_win():
    from covidx.training.engine import layer_rates

    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="vgg19_fc1"),
                            keras.layers.Dropout(0.1, name="vgg19_drop"), keras.layers.Dense(3, name="vgg19_fc2"),
                            keras.layers.Dense(2, name="predictions")])
    paths = {n: [v.path for v in net.get_layer(n).trainable_weights] for n in ("vgg19_fc1", "vgg19_fc2", "predictions")}
    rates = layer_rates(net, {"vgg19_*": 0.3, "vgg19_fc2": 0.5})
    assert rates == {**dict.fromkeys(paths["vgg19_fc1"], 0.3), **dict.fromkeys(paths["vgg19_fc2"], 0.5)}
    assert set(layer_rates(net, {"*": 2.0})) == {p for ps in paths.values() for p in ps}  # the dropout has none
    with pytest.raises(ValueError, match="matches 'resnet_\\*'"):
        layer_rates(net, {"resnet_*": 0.3})
