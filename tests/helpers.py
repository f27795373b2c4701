"""Small image/dataset writers shared by the tests (synthetic data made in the test)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_image(path, size=(40, 48), value=None, seed=0, ext=None, dtype=np.uint8, channels=1):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hi = 65535 if dtype == np.uint16 else 255
    shape = size + ((channels,) if channels > 1 else ())
    img = np.full(shape, value, dtype) if value is not None else rng.integers(0, hi, shape).astype(dtype)
    ok, buf = cv2.imencode(ext or path.suffix, img)
    assert ok
    path.write_bytes(buf.tobytes())
    return img


def write_mask(path, size=(40, 48), box=(10, 10, 30, 30)):
    m = np.zeros(size, np.uint8)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = 255
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), m)
    return m > 0


CLASSES4 = ["covid19", "bacterial", "viral", "normal"]


def make_run(root, net=None, size=32, channels=1, resize="stretch", clahe_inference=False,
             model="baseline-mobilenetv2", classes=None, task="4class"):
    """A run directory as covidx.train writes it (best.keras + config.json), without training."""
    import json

    from covidx.data import PreprocessConfig
    from covidx.models import create_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    classes = classes or CLASSES4
    if net is None:
        net = create_model(model, num_classes=len(classes), image_size=size, channels=channels)
    net.save(root / "best.keras")
    pre = PreprocessConfig(image_size=size, channels=channels, resize=resize, clahe_inference=clahe_inference)
    (root / "config.json").write_text(json.dumps({"model": model, "task": task, "classes": list(classes),
                                                  "kind": "classification", "preprocess": pre.to_dict()}))
    return root, net, pre


def blobs(n, size, seed=0):
    """Noisy images with one bright disc each and the disc as the class-1 mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = rng.integers(size // 8, size // 4)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype("int32")
        images.append(np.clip(60 + 140 * mask + rng.normal(0, 20, mask.shape), 0, 255))
        masks.append(mask)
    return np.stack(images)[..., None].astype("float32"), np.stack(masks)


def tiny_ma_net(num_classes=2, num_maps=4, with_attention=False, size=32, synchronized=False):
    """MA-Net's head (the paper's attention generator, attention pooling and classifier: the same code as
    ``build_magsd``) on a 3-stage conv encoder instead of ResNet50. ``synchronized``: BN over the global batch."""
    import keras

    from covidx.layers.normalization import ImageNormalization
    from covidx.models import magsd

    inputs = keras.Input((size, size, 1), name="image")
    x = ImageNormalization("zscore", name="normalize")(inputs)
    feats = []
    for i, width in enumerate((8, 16, 32)):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name=f"stage{i}_conv")(x)
        x = keras.layers.BatchNormalization(synchronized=synchronized, name=f"stage{i}_bn")(x)
        x = keras.layers.ReLU(name=f"stage{i}_relu")(x)
        feats.append(x)
    return magsd.assemble_ma_net(inputs, feats[::-1], num_classes, num_maps, with_attention=with_attention, name="tiny")
