"""Every architecture family exports for TF Serving at tiny size and serves what the Keras model computes.

(The baseline is covered in depth by test_export.py; cascade and two-stage exports by their own tests.)
The MAG-SD case also checks the in-graph CLAHE (TF ops) against the OpenCV CLAHE of the training pipeline.
"""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from covidx.models import create_model
from covidx.models.dpn import dpn_config
from covidx.serving.export import export
from tests.helpers import make_run, write_image

FAMILIES = [
    # registry name, input size, channels, builder kwargs, task, classes
    ("seme-resnet50", 64, 1, dict(blocks=(1, 1, 1, 1), base_width=8), "stage1", ["bacterial", "normal", "viral"]),
    ("seme-densenet169", 64, 1, dict(blocks=(1, 1, 1, 1), growth_rate=4, init_filters=8), "stage2",
     ["covid19", "viral"]),
    ("vgg19-gap", 64, 1, dict(width=0.125), "stage1", ["bacterial", "normal", "viral"]),
    ("se-dpn92", 64, 3, dict(config=dpn_config("dpn92", k_sec=(1, 1, 1, 1)).scaled(0.25)), "4class",
     ["covid19", "bacterial", "viral", "normal"]),
    ("mag-sd", 64, 1, dict(num_maps=4), "4class", ["covid19", "bacterial", "viral", "normal"]),
    # Two of the three backbones: the concatenated multi-branch export is the same, DenseNet121's graph the slowest.
    ("ensemble", 64, 3, dict(backbones=("vgg19", "efficientnetb0")), "3class", ["covid19", "pneumonia", "normal"]),
    ("fc-densenet103", 64, 1, dict(), "lesions", ["background", "lesion"]),
    ("lung-unet", 64, 1, dict(base_filters=4), "lungs", ["background", "lung"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,size,channels,kwargs,task,classes", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_exports_and_serves_faithfully(tmp_path, name, size, channels, kwargs, task, classes):
    from tests.test_export import keras_probs

    net = create_model(name, num_classes=len(classes), image_size=size, channels=channels, **kwargs)
    clahe = name == "mag-sd"  # MAG-SD applies CLAHE to every image, at inference too
    run, net, pre = make_run(tmp_path / "run", net=net, size=size, channels=channels, clahe_inference=clahe,
                             model=name, classes=classes, task=task)
    version = export(run, tmp_path / "exports")
    assert (version / "saved_model.pb").is_file() and version.parent.name == name
    sig = tf.saved_model.load(str(version)).signatures["serving_default"]
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    write_image(paths[0], size=(80, 90), seed=1)
    write_image(paths[1], size=(70, 70), seed=2)
    out = sig(image_bytes=tf.constant([Path(p).read_bytes() for p in paths]))
    want = keras_probs(net, pre, paths)
    np.testing.assert_allclose(out["probabilities"].numpy(), want, atol=1e-5)
    if task in ("lungs", "lesions"):
        assert out["mask"].shape == (2, size, size) and out["mask"].dtype == tf.uint8
    else:
        assert [c.decode() for c in out["class_name"].numpy()] == [classes[i] for i in want.argmax(1)]
