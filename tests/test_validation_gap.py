"""Why a lung U-Net printed ``val_loss: 2.65e21``, and the warning a run now prints when it happens.

Cause (issue: a lung U-Net under the paper's Adam at 0.1): BatchNorm's running statistics lag weights
that jump at every step, so the validation (inference-mode) logits grow layer after layer; Keras takes
the cross-entropy of a softmax output from its logits, so the loss grows with them instead of
saturating near -log(1e-7). The mask that the report blamed is not involved (a mask of another size is
resized to its image: tests/test_pipeline.py).
"""

import keras
import numpy as np

from covidx.training.callbacks import ValidationGap
from covidx.training.segmentation import DiceCrossEntropyLoss


def per_pixel_softmax(scale):
    """A 1x1 convolution per pixel with logits (+scale, -scale) for every pixel: a confident 'background'."""
    inputs = keras.Input((4, 4, 1))
    conv = keras.layers.Conv2D(2, 1, activation="softmax", kernel_initializer="zeros",
                               bias_initializer=keras.initializers.Constant([scale, -scale]))
    return keras.Model(inputs, conv(inputs))


def test_cross_entropy_of_a_softmax_grows_with_its_logits_not_with_clipped_probabilities():
    x, lung = np.zeros((2, 4, 4, 1), "float32"), np.ones((2, 4, 4), "int32")  # every pixel is lung: all wrong
    for scale, want in ((3.0, 6.0), (1e6, 2e6)):
        net = per_pixel_softmax(scale)
        net.compile(loss=DiceCrossEntropyLoss(dice_weight=0.0))
        loss = net.evaluate(x, lung, verbose=0)  # compiled graph: Keras reads the softmax's logits
        # cross-entropy from logits: logsumexp(s, -s) - (-s) ~ 2s; from probabilities it would stop at 16.1
        np.testing.assert_allclose(loss, want, rtol=1e-3)


def test_the_gap_is_named_once_with_its_cause_and_the_run_goes_on(capsys):
    gap = ValidationGap(setting="this run: adam at learning rate 0.1, --recipe paper")
    gap.on_epoch_end(0, {"loss": 1.25, "val_loss": 1.4})
    assert capsys.readouterr().out == ""  # an ordinary epoch says nothing
    gap.on_epoch_end(1, {"loss": 0.67, "val_loss": 2.65e21})
    out = capsys.readouterr().out
    assert "epoch 2: validation loss 2.65e+21" in out and "BatchNorm's running statistics" in out
    assert "adam at learning rate 0.1" in out and "--recipe quick" in out
    gap.on_epoch_end(2, {"loss": 0.42, "val_loss": float("nan")})
    out = capsys.readouterr().out
    assert out.startswith("warning: epoch 3: validation loss nan") and "BatchNorm" not in out  # the cause once
    gap.on_epoch_end(3, {"loss": 0.3})  # no validation split: nothing to compare
    assert capsys.readouterr().out == ""
