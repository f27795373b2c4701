"""SavedModel export for TF Serving: layout, signatures, faithfulness, REST b64 and gRPC paths, bad requests."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from covidx.data import make_dataset
from covidx.serving.export import export
from tests.helpers import CLASSES4 as CLASSES, make_run, write_image

# The export and its signatures, not the network, are under test: the small CNN traces in a fraction of MobileNetV2's
# time (test_export_families.py exports every family's network).
MODEL = "baseline-smallcnn"


def images(tmp_path, n=3):
    paths = [str(tmp_path / f"x{i}.png") for i in range(n)]
    for i, p in enumerate(paths):
        write_image(p, size=(50 + 7 * i, 61), seed=i, dtype=np.uint16 if i == 1 else np.uint8)
    jpg = str(tmp_path / "y.jpg")
    write_image(jpg, size=(45, 45), seed=9)
    return paths + [jpg]


def keras_probs(net, pre, paths):
    table = pd.DataFrame(dict(path=paths, label_index=0, mask_path="", lesion_path=""))
    x = np.concatenate([b[0].numpy() for b in make_dataset(table, "4class", pre, batch_size=8, cache=False)])
    return net.predict(x, verbose=0)


@pytest.mark.parametrize("resize", ["stretch", "crop"])
def test_export_layout_signatures_and_faithful_outputs(tmp_path, resize):
    run, net, pre = make_run(tmp_path / "run", resize=resize, model=MODEL)
    v1 = export(run, tmp_path / "exports")
    v2 = export(run, tmp_path / "exports")
    assert v1 == tmp_path / "exports" / MODEL / "1" and v2.name == "2"
    assert (v1 / "saved_model.pb").is_file() and (v1 / "variables").is_dir()
    loaded = tf.saved_model.load(str(v1))
    assert set(loaded.signatures) == {"serving_default", "predict_tensor"}
    sig = loaded.signatures["serving_default"]
    spec = sig.structured_input_signature[1]["image_bytes"]
    assert spec.dtype == tf.string and spec.shape.as_list() == [None]
    outs = sig.structured_outputs
    assert outs["probabilities"].dtype == tf.float32 and outs["class_index"].dtype == tf.int64
    assert outs["class_name"].dtype == tf.string

    paths = images(tmp_path)
    got = sig(image_bytes=tf.constant([Path(p).read_bytes() for p in paths]))
    want = keras_probs(net, pre, paths)
    np.testing.assert_allclose(got["probabilities"].numpy(), want, atol=1e-5)
    assert [c.decode() for c in got["class_name"].numpy()] == [CLASSES[i] for i in want.argmax(1)]
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded.signatures["predict_tensor"](images=tf.constant(x))["probabilities"].numpy(),
                               net.predict(x, verbose=0), atol=1e-5)


def test_rest_b64_and_grpc_request_paths(tmp_path):
    from tensorflow_serving.apis import predict_pb2

    run, net, pre = make_run(tmp_path / "run", model=MODEL)
    sig = tf.saved_model.load(str(export(run, tmp_path / "e"))).signatures["serving_default"]
    paths = images(tmp_path, 2)
    # REST: {"instances": [{"b64": ...}]}, as TF Serving decodes it into the string tensor.
    body = json.dumps({"signature_name": "serving_default",
                       "instances": [{"b64": base64.b64encode(Path(p).read_bytes()).decode()} for p in paths]})
    instances = [base64.b64decode(i["b64"]) for i in json.loads(body)["instances"]]
    rest = sig(image_bytes=tf.constant(instances))["probabilities"].numpy()
    # gRPC: a PredictRequest proto with a string TensorProto.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "serving_default"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([Path(p).read_bytes() for p in paths]))
    proto = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    grpc = sig(**{k: tf.constant(tf.make_ndarray(v)) for k, v in proto.inputs.items()})["probabilities"].numpy()
    np.testing.assert_allclose(rest, grpc)
    np.testing.assert_allclose(rest, keras_probs(net, pre, paths), atol=1e-5)


def test_bad_requests_return_invalid_argument(tmp_path):
    run, _, _ = make_run(tmp_path / "run", model=MODEL)
    v = export(run, tmp_path / "e", max_pixels=60 * 60)
    sig = tf.saved_model.load(str(v)).signatures["serving_default"]
    small = images(tmp_path, 1)[0]
    big = str(tmp_path / "big.png")
    write_image(big, size=(100, 100))
    cases = [([b"this is not an image"], "not a PNG or JPEG"),
             ([], "empty batch"),
             ([Path(big).read_bytes()], "pixel limit"),
             ([Path(small).read_bytes(), b"\x89PNG\r\n\x1a\ngarbage"], "not a PNG or JPEG"),
             ([b"\x89PNG\r\n\x1a\n" + b"\0" * 40], "PNG")]
    for batch, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            sig(image_bytes=tf.constant(batch, tf.string))
    assert sig(image_bytes=tf.constant([Path(small).read_bytes()]))["probabilities"].shape == (1, 4)


def test_saved_model_cli_lists_signatures(tmp_path):
    run, _, _ = make_run(tmp_path / "run", model=MODEL)
    v = export(run, tmp_path / "e")
    cli = Path(sys.executable).with_name("saved_model_cli")
    out = subprocess.run([str(cli), "show", "--dir", str(v), "--all"], capture_output=True, text=True, check=True).stdout
    assert "signature_def['serving_default']" in out and "signature_def['predict_tensor']" in out
    assert "dtype: DT_STRING" in out and "DT_FLOAT" in out and "DT_INT64" in out


def test_export_cli_and_predict_cli_with_a_corrupt_file(tmp_path):
    run, net, pre = make_run(tmp_path / "run", model=MODEL)
    r = subprocess.run([sys.executable, "-m", "covidx.export", "--checkpoint", str(run), "--out", str(tmp_path / "e"),
                        "--version", "7"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "e" / MODEL / "7" / "saved_model.pb").is_file()
    folder = tmp_path / "in"
    folder.mkdir()
    paths = images(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    for ckpt in (run, tmp_path / "e" / MODEL):
        out = tmp_path / f"res_{Path(ckpt).name}.csv"
        r = subprocess.run([sys.executable, "-m", "covidx.predict", str(folder), "--checkpoint", str(ckpt),
                            "--out", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "broken.png" in r.stderr and "skipped" in r.stderr
        df = pd.read_csv(out)
        assert sorted(df.path) == sorted(paths)
        assert list(df.columns) == ["path", "p_covid19", "p_bacterial", "p_viral", "p_normal", "label", "warning"]
        want = keras_probs(net, pre, list(df.path))
        np.testing.assert_allclose(df[[f"p_{c}" for c in CLASSES]].to_numpy(), want, atol=1e-5)
