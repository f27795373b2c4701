"""One training step of each custom trainer on 1 and on 2 replicas (run as its own process).

TensorFlow fixes its logical devices when it initialises, so the two logical CPU devices of the
2-replica ``MirroredStrategy`` are configured first thing here and the test runs this file in a
subprocess (``tests/test_distributed_steps.py``). Prints one JSON line: per trainer, the loss and
accuracy of both runs and the largest weight difference.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from covidx.layers.moex import MomentExchange  # noqa: E402
from covidx.layers.normalization import ImageNormalization  # noqa: E402
from covidx.precision import precision_scope  # noqa: E402
from covidx.training.distribute import synchronize_batchnorm  # noqa: E402
from covidx.training.magsd import MagSDTrainer  # noqa: E402
from covidx.training.moex import MoExTrainer, RegionalLearningTrainer  # noqa: E402
from covidx.training.trainers import Trainer  # noqa: E402
from tests import helpers  # noqa: E402

SIZE, CLASSES, GLOBAL_BATCH = 32, 3, 8


def bn(name):
    # Statistics over the global batch (what --sync-batchnorm switches on): one device's normalisation.
    return keras.layers.BatchNormalization(synchronized=True, name=name)


def small_cnn(moex: bool):
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = ImageNormalization("zscore", name="normalize")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(x)
    x = keras.layers.ReLU()(bn("bn1")(x))
    if moex:
        x = MomentExchange(probability=1.0, lam=0.9, seed=3, name="moex")(x)
    x = keras.layers.Conv2D(12, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.ReLU()(bn("bn2")(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax", name="predictions")(x))


def tiny_ma_net():
    net = helpers.tiny_ma_net(num_classes=CLASSES, synchronized=True)
    assert synchronize_batchnorm(net) > 3  # the encoder's 3 (already) and the attention generator's
    return net


CASES = {
    "standard": (lambda: small_cnn(False), Trainer, {}),
    "moex": (lambda: small_cnn(True), MoExTrainer, {}),
    "regional": (lambda: small_cnn(False), RegionalLearningTrainer, {}),
    # Regional Learning + MoEx is left out: each replica stacks [X_O; X_T] of its own samples, so the global
    # permutation indexes a different (equally uniform) layout than one device's [X_O of all; X_T of all].
    "magsd": (tiny_ma_net, MagSDTrainer, {"seed": 5}),
    # The standard step under --precision bf16 (mixed_bfloat16: bf16 compute, float32 variables and all-reduce).
    "standard-bf16": (lambda: small_cnn(False), Trainer, {}),
}
PRECISION = {"standard-bf16": "bf16"}


def data():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (GLOBAL_BATCH, SIZE, SIZE, 1)).astype("float32")
    masks = np.zeros_like(images)
    masks[:, 6:26, 4:28] = 1.0
    labels = keras.utils.to_categorical(np.arange(GLOBAL_BATCH) % CLASSES, CLASSES)
    weights = rng.uniform(0.5, 2.0, GLOBAL_BATCH).astype("float32")  # class-balancing weights, per sample
    return images, masks, labels, weights


def one_step(case: str, strategy, initial):
    build, trainer_cls, kwargs = CASES[case]
    images, masks, labels, weights = data()
    x = {"image": images, "lung_mask": masks} if "lung_mask" in trainer_cls.needs else images
    keras.utils.set_random_seed(0)
    with strategy.scope():
        net = build()
        net.set_weights(initial)
        trainer = trainer_cls(net, **kwargs)
        trainer.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.CategoricalCrossentropy(),
                        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
        history = trainer.fit(x, labels, sample_weight=weights, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False,
                              verbose=0).history
    return {k: float(v[0]) for k, v in history.items()}, [np.asarray(w) for w in net.weights]


def main(cases):
    # One strategy object each for the whole process: collective instance keys are per strategy.
    one_replica, two_replicas = tf.distribute.MirroredStrategy(["/cpu:0"]), tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}
    for case in cases:
        with precision_scope(PRECISION.get(case, "fp32")):
            keras.utils.set_random_seed(0)
            initial = CASES[case][0]().get_weights()
            one, w1 = one_step(case, one_replica, initial)
            two, w2 = one_step(case, two_replicas, initial)
        results[case] = {
            "one": one, "two": two,
            "weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2)),
            "weight_change": max(float(np.max(np.abs(a - b))) for a, b in zip(w1, initial)),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
