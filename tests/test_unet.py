"""Lung U-Net (Cascade-SEMEnet): counts, widths, shapes, training and save/reload."""

import keras
import numpy as np
import pytest

from covidx.models import unet
from covidx.models.registry import create_model, get_spec
from covidx.training.segmentation import DiceCrossEntropyLoss, IoUScore
from tests.helpers import blobs


def _param_counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, frozen


def _expected_unet_params(in_ch=1, classes=2, widths=(64, 128, 256, 512, 1024)):
    """Independent count: conv k*k*cin*cout + cout, BN 2 trainable + 2 statistics per channel."""

    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    trainable = frozen = 0
    cin = in_ch
    for w in widths:  # encoder blocks and centre: two (3x3 conv + BN)
        trainable += conv(3, cin, w) + conv(3, w, w) + 4 * w
        frozen += 4 * w
        cin = w
    for w in reversed(widths[:-1]):  # decoder: 2x2 up-conv, concat skip (2w), two (3x3 conv + BN)
        trainable += conv(2, cin, w) + conv(3, 2 * w, w) + conv(3, w, w) + 4 * w
        frozen += 4 * w
        cin = w
    trainable += conv(1, cin, classes)
    return trainable, frozen


@pytest.fixture(scope="module")
def full_unet():
    # Spatial dims left open: same weights as at 512 x 512, and small inputs run fast.
    return unet.lung_unet(2, (None, None, 1))


@pytest.mark.slow
def test_parameter_counts(full_unet):
    assert _expected_unet_params() == (31_042_434, 11_776)
    assert _param_counts(full_unet) == (31_042_434, 11_776)
    deconv = sum(
        int(np.prod(w.shape))
        for layer in full_unet.layers
        if isinstance(layer, keras.layers.Conv2DTranspose)
        for w in layer.weights
    )
    assert deconv == 2_786_240


@pytest.mark.slow
def test_widths_and_output_shape(full_unet):
    m = full_unet
    assert [m.get_layer(f"enc{i}_conv2").filters for i in range(1, 5)] == [64, 128, 256, 512]
    assert m.get_layer("centre_conv2").filters == 1024
    assert [m.get_layer(f"dec{i}_upconv").filters for i in range(1, 5)] == [512, 256, 128, 64]
    assert [m.get_layer(f"dec{i}_concat").output.shape[-1] for i in range(1, 5)] == [1024, 512, 256, 128]
    bn = m.get_layer("enc1_bn1")
    assert bn.epsilon == pytest.approx(1e-5) and bn.momentum == pytest.approx(0.9)
    assert isinstance(m.get_layer("enc1_conv1").kernel_initializer, keras.initializers.HeUniform)
    x = np.random.uniform(0, 255, (2, 48, 80, 1)).astype("float32")  # non-square, divisible by 16
    y = keras.ops.convert_to_numpy(m(x, training=False))
    assert y.shape == (2, 48, 80, 2) and y.dtype == np.float32
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)


def test_rejects_sizes_not_divisible():
    with pytest.raises(ValueError, match="divisible by 16"):
        unet.build_unet(2, (40, 40, 1), base_filters=4)


def test_registered_preset():
    spec = get_spec("lung-unet")
    p = spec.preset
    assert spec.kind == "segmenter" and p.task == "lungs"
    assert (p.image_size, p.channels, p.optimizer, p.schedule) == (512, 1, "adam", "cosine")
    assert (p.learning_rate, p.min_learning_rate) == (0.1, 1e-8)  # eta_max, eta_min (Sec. 5.A)
    model = create_model("lung-unet", image_size=32, base_filters=4, depth=2)
    assert model.input_shape == (None, 32, 32, 1) and model.output_shape == (None, 32, 32, 2)


@pytest.mark.slow
def test_training_lowers_loss():
    x, y = blobs(8, 32)
    model = unet.build_unet(2, (32, 32, 1), base_filters=8, depth=2)
    model.compile(
        keras.optimizers.Adam(3e-3), loss=DiceCrossEntropyLoss(), metrics=[IoUScore()], jit_compile=False
    )
    history = model.fit(x, y[..., None], batch_size=4, epochs=12, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses


def test_save_reload_safe_mode(tmp_path):
    model = unet.build_unet(2, (32, 32, 1), base_filters=4, depth=2)
    for w in model.non_trainable_weights:  # non-trivial BN statistics
        w.assign(np.random.uniform(0.5, 1.5, w.shape).astype("float32"))
    x, _ = blobs(2, 32, seed=5)
    # Compiled with the covidx loss and metrics, which must reload by their registered names.
    model.compile("adam", loss=DiceCrossEntropyLoss(ce_weight=0.5), metrics=[IoUScore(class_ids=(0, 1))])
    model.optimizer.build(model.trainable_variables)  # saved optimizer state matches on reload
    path = tmp_path / "unet.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded.loss, DiceCrossEntropyLoss) and loaded.loss.ce_weight == 0.5
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )
