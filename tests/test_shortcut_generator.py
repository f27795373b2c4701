"""Shortcut audit on the synthetic generator's burnt-in text marker (Cascade-SEME §6.B.1, Fig. 13; §4.D).

Data: SYNTHETIC COVID-19 vs viral pneumonia (task ``stage2``) where every COVID-19 training
image, and no other image, carries the text "PORTABLE" in a corner outside the lungs; the
test split has no marker. Two identical small CNNs are trained at 64 px:

* **standard** trainer: it learns the marker (training accuracy ~1, test COVID-19 recall
  collapses), and the shortcut audit (:func:`covidx.explain.runs.run_audit`, Grad-CAM energy
  inside the lung masks) flags its ``covid19`` class on the confounded training images.
* **regional** trainer (Regional Learning, eq. 6: ``CE(O_T, y) + CE(O_O, y)`` on the image and
  its lung region ``X_T = X_O · M``).

What Regional Learning guarantees, and what it does not (measured, see the asserts):
eq. 6 forces the network to classify the lung region alone, which carries no marker, so it
must learn lung evidence, and it does: on ``X_T`` it classifies the training images and keeps
a useful test COVID-19 recall where the shortcut network is at chance, and its Grad-CAM on
``X_T`` lies far more inside the lungs than the shortcut network's. But the ``CE(O_O, y)``
term still rewards the marker on the full image, so on the *unmasked* confounded images the
Regional-Learning network is flagged too and its COVID-19 recall on unmasked test images
drops. That is why the cascade feeds stage 2 the lung region at inference
(:mod:`covidx.models.cascade`, arXiv §4.2 "only the double-lung images were retained"), and
why the audit explains a Regional-Learning run on that input (``audit_input="auto"``): the
guarantee holds for the decision the system actually makes, not for full images.
"""

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

import covidx.training  # noqa: F401  (registers the regional trainer)
from covidx.data import PreprocessConfig, load_sources, make_dataset, select_task
from covidx.data.io import read_image
from covidx.data.synthetic import write_dataset
from covidx.explain.runs import run_audit
from covidx.layers import ImageNormalization
from covidx.runs import Run, RunConfig
from covidx.training.trainers import get_trainer

SIZE = 64
EPOCHS = 25
BATCH = 16
CLASSES = ["covid19", "viral"]
PRE = PreprocessConfig(image_size=SIZE, channels=1)


def small_cnn() -> keras.Model:
    """Three conv-BN-ReLU stages (16/32/64 filters, 64 -> 16 px), GAP, softmax: trains in seconds."""
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = ImageNormalization("unit", name="normalize")(inp)
    for i, filters in enumerate((16, 32, 64)):
        if i:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        # A short run: a fast-moving BN average keeps the inference statistics close to the final weights.
        x = keras.layers.BatchNormalization(momentum=0.8, name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(len(CLASSES), activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inp, out, name="small_cnn")


def train_net(trainer_name: str, table: pd.DataFrame) -> keras.Model:
    keras.utils.set_random_seed(0)
    trainer_cls = get_trainer(trainer_name)
    ds = make_dataset(table, "stage2", PRE, training=True, batch_size=BATCH,
                      lung_masks="lung_mask" in trainer_cls.needs, seed=0)
    net = small_cnn()
    trainer = trainer_cls(net)
    steps = EPOCHS * -(-len(table) // BATCH)
    # Cosine decay to 0: the weights settle at the end, so BN's moving statistics match them.
    trainer.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
                    loss=keras.losses.CategoricalCrossentropy())
    trainer.fit(ds, epochs=EPOCHS, verbose=0, shuffle=False)  # the dataset shuffles itself
    return net


def predictions(net, table: pd.DataFrame, region: bool = False) -> np.ndarray:
    """Predicted class per row, on the full image or on its lung region X_T = X_O * M."""
    ds = make_dataset(table, "stage2", PRE, batch_size=32, lung_masks=region, cache=False)
    out = [net(x["image"] * x["lung_mask"] if region else x, training=False) for x, _, _ in ds]
    return np.concatenate([np.asarray(o) for o in out]).argmax(-1)


def accuracy(pred, table) -> float:
    return float(np.mean(pred == table["label_index"].to_numpy()))


def covid_recall(pred, table) -> float:
    return float(np.mean(pred[table["label_index"].to_numpy() == 0] == 0))


def lung_regions(table: pd.DataFrame, folder) -> pd.DataFrame:
    """The same rows with ``path`` pointing at PNGs of X_T = image * lung mask (OpenCV)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (path, mask) in enumerate(zip(table["path"], table["mask_path"])):
        lung = cv2.imread(mask, cv2.IMREAD_GRAYSCALE) > 127
        out = folder / f"{i:03d}.png"
        cv2.imwrite(str(out), np.rint(read_image(path) * lung).astype(np.uint8))
        paths.append(str(out))
    return table.assign(path=paths)


def as_run(net, trainer: str) -> Run:
    return Run(net, RunConfig(model="small-cnn", task="stage2", classes=CLASSES, preprocess=PRE, trainer=trainer,
                              trainer_inputs=list(get_trainer(trainer).needs)), None, None)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_audit_flags_the_marker_shortcut_and_regional_learning_decides_on_the_lungs(tmp_path):
    # Findings at moderate to marked severity, so that lung evidence is learnable at 64 px in a short run.
    root = write_dataset(tmp_path / "data", n_patients=60, size=SIZE, seed=0, confounder="PORTABLE",
                         confounder_finding="covid19", findings=("covid19", "viral"), severity_range=(0.6, 1.0))
    table, _ = load_sources([str(root / "manifest.csv")])
    table = select_task(table, "stage2")
    train, test = table[table.split == "train"], table[table.split == "test"]
    confounded = train[train["finding"] == "covid19"]
    # The generator's contract: the marker is on exactly the COVID-19 training images.
    manifest = pd.read_csv(root / "manifest.csv", keep_default_na=False)
    marked = manifest[manifest["marker"] != ""]
    assert len(marked) == len(confounded) > 20
    assert set(marked["finding"]) == {"covid19"} and set(marked["split"]) == {"train"}

    shortcut = train_net("standard", train)
    regional = train_net("regional", train)

    # The standard network learned the marker: near-perfect on training, COVID-19 missed on clean test images.
    assert accuracy(predictions(shortcut, train), train) >= 0.9
    assert covid_recall(predictions(shortcut, train), train) >= 0.9
    assert covid_recall(predictions(shortcut, test), test) <= 0.4
    # ... and it has nothing else: on the lung region alone it is at chance on its own training images.
    assert accuracy(predictions(shortcut, train, region=True), train) <= 0.65

    audit_shortcut = run_audit(as_run(shortcut, "standard"), confounded, tmp_path / "audit_shortcut")
    assert audit_shortcut["input"] == "full"  # deployed on full images
    assert audit_shortcut["flagged"] == ["covid19"]
    assert audit_shortcut["median_share"]["covid19"] < 0.25  # the evidence sits on the marker
    assert audit_shortcut["per_class"]["covid19"]["median_enrichment"] < 0.8  # well below chance

    # Regional Learning's guarantee: the lung region alone is classified, from lung evidence.
    assert accuracy(predictions(regional, train, region=True), train) >= 0.85
    recall_region = covid_recall(predictions(regional, test, region=True), test)
    assert recall_region >= 0.5
    assert recall_region >= covid_recall(predictions(shortcut, test), test) + 0.3
    # The audit explains it on its deployed input, X_T (the cascade's stage 2): not flagged.
    audit_region = run_audit(as_run(regional, "regional"), confounded, tmp_path / "audit_regional_xt")
    assert audit_region["input"] == "lung-region"
    assert audit_region["flagged"] == []
    assert audit_region["per_class"]["covid19"]["median_enrichment"] > 1.5
    assert audit_region["median_share"]["covid19"] >= audit_shortcut["median_share"]["covid19"] + 0.25
    # The audit's X_T agrees with X_T made at full resolution with OpenCV and written to disk.
    regions = lung_regions(confounded, tmp_path / "regions")
    on_disk = run_audit(as_run(regional, "standard"), regions, tmp_path / "audit_regional_disk")
    assert abs(on_disk["median_share"]["covid19"] - audit_region["median_share"]["covid19"]) < 0.05

    # What it does not guarantee: CE(O_O, y) of eq. 6 still rewards the marker on the full image, so on
    # the unmasked confounded images the Regional-Learning network is flagged as well. Its decision is
    # trustworthy on X_T, which is what the cascade gives stage 2 at inference.
    audit_full = run_audit(as_run(regional, "regional"), confounded, tmp_path / "audit_regional_full",
                           audit_input="full")
    assert "covid19" in audit_full["flagged"]
