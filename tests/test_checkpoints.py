"""Which checkpoint a run keeps as best.keras: the validation figure the papers report, not the loss."""

import json
from types import SimpleNamespace

import keras
import numpy as np

from covidx.training.callbacks import NetCheckpoint, checkpoint_monitor


def test_checkpoint_monitor_is_the_reported_figure():
    assert checkpoint_monitor("classification", validation=True) == ("val_auc", "max")
    assert checkpoint_monitor("segmentation", validation=True) == ("val_dice", "max")
    assert checkpoint_monitor("classification", validation=False) == ("loss", "min")


def tiny_net():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2, name="fc")(inputs))


def test_best_keras_is_the_epoch_with_the_highest_validation_auc(tmp_path):
    net = tiny_net()
    callback = NetCheckpoint(tmp_path, *checkpoint_monitor("classification", True))
    callback.set_model(SimpleNamespace(net=net))
    # The loss rises while the AUC peaks at epoch 2: the loss would keep epoch 1.
    for epoch, (auc, loss) in enumerate([(0.80, 0.50), (0.90, 0.60), (0.85, 0.70)]):
        net.get_layer("fc").set_weights([np.full((4, 2), epoch, "float32"), np.zeros(2, "float32")])
        callback.on_epoch_end(epoch, {"val_auc": auc, "val_loss": loss, "auc": 0.99})
    assert json.loads((tmp_path / "best.json").read_text()) == {"monitor": "val_auc", "value": 0.90, "epoch": 2}
    best = keras.models.load_model(tmp_path / "best.keras", safe_mode=True)
    last = keras.models.load_model(tmp_path / "last.keras", safe_mode=True)
    assert best.get_layer("fc").get_weights()[0][0, 0] == 1 and last.get_layer("fc").get_weights()[0][0, 0] == 2


def test_a_resumed_run_compares_against_its_own_monitor_only(tmp_path):
    (tmp_path / "best.json").write_text(json.dumps({"monitor": "val_auc", "value": 0.95, "epoch": 3}))
    assert NetCheckpoint(tmp_path, "val_auc", "max").best == 0.95
    # A best.json another monitor wrote (an older run kept by validation loss) is not an AUC to beat.
    (tmp_path / "best.json").write_text(json.dumps({"monitor": "val_loss", "value": 0.1, "epoch": 3}))
    assert NetCheckpoint(tmp_path, "val_auc", "max").best == -np.inf
