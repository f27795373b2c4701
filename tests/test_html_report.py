"""``report.html`` of ``python -m covidx.evaluate``: its numbers equal metrics.json, it renders in a real
browser (headless Chromium) with no broken image, and the run's MODEL_CARD.md follows the evaluation."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from covidx.evaluate import main as evaluate_main
from covidx.evaluation.html import ModelSection, data_summary, gallery_cases, generated_data
from covidx.model_card import render_model_card
from tests.helpers import make_run

SIZE = 32
CLASSES = ["bacterial", "viral", "normal"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def class_images(root, n=60, seed=0):
    """Noisy images whose class sets the size of a bright disc, from two sources; all in the test split."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    rows = []
    for i in range(n):
        k = i % 3
        disc = (yy - 16) ** 2 + (xx - 16) ** 2 <= (3 + 4 * k) ** 2
        img = np.clip(60 + 120 * disc + rng.normal(0, 45, (SIZE, SIZE)), 0, 255).astype(np.uint8)
        path = root / f"img{i:03d}.png"
        cv2.imwrite(str(path), img)
        rows.append(dict(path=str(path), finding=CLASSES[k], label=CLASSES[k], label_index=k,
                         patient_id=f"p{i // 2}", source=["kermany", "cohen"][(i // 2) % 2],
                         split="test" if i < 42 else "train", mask_path="", lesion_path=""))
    return pd.DataFrame(rows)


def small_cnn(seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="predictions")(x))


def trained_run(root, table, seed, epochs):
    x = np.stack([cv2.imread(p, 0)[..., None] for p in table.path]).astype("float32")
    net = small_cnn(seed)
    net.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy")
    net.fit(x, keras.utils.to_categorical(table.label_index, 3), epochs=epochs, batch_size=16, verbose=0)
    run_dir, _, _ = make_run(root, net=net, size=SIZE, classes=CLASSES, model="custom-cnn", task="stage1")
    config = json.loads((run_dir / "config.json").read_text())
    config.update(synthetic=True, paper="a test network (no paper)", parameters=int(net.count_params()))
    (run_dir / "config.json").write_text(json.dumps(config))
    table.to_csv(run_dir / "split.csv", index=False)
    return run_dir


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):  # slow: trains two small CNNs, evaluates them four times
    """Two runs evaluated alone (report.html each) and together (one page with the comparison)."""
    root = tmp_path_factory.mktemp("report")
    table = class_images(root / "images")
    runs = [trained_run(root / "run_a", table, 0, 25), trained_run(root / "run_b", table, 1, 3)]
    for run in runs:
        assert evaluate_main(["--checkpoint", str(run), "--bootstrap", "50"]) == 0
    out = root / "both"
    assert evaluate_main(["--checkpoint", str(runs[0]), "--checkpoint", str(runs[1]), "--bootstrap", "50",
                          "--out", str(out)]) == 0
    return dict(runs=runs, table=table, both=out)


class ReportParser(HTMLParser):
    """Collects the data-metric cells (with their text), the <img> sources and the element ids."""

    def __init__(self):
        super().__init__()
        self.cells, self.images, self.ids, self._open = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs)
        if "data-metric" in attrs:
            self._open.append(dict(tag=tag, metric=attrs["data-metric"], ci=attrs.get("data-ci"), text=""))

    def handle_data(self, data):
        for cell in self._open:
            cell["text"] += data

    def handle_endtag(self, tag):
        if self._open and self._open[-1]["tag"] == tag:
            self.cells.append(self._open.pop())


def parse(path):
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def lookup(metrics, dotted):
    value = metrics
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.mark.slow
def test_numbers_on_the_page_equal_metrics_json(evaluated):
    run = evaluated["runs"][0]
    page = parse(run / "eval" / "report.html")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    checked = set()
    for cell in page.cells:
        numbers = re.findall(r"-?\d+(?:\.\d+)?|n/a", cell["text"])
        value = lookup(metrics, cell["metric"])
        expected = "n/a" if value is None else (str(value) if isinstance(value, int) else f"{value:.3f}")
        assert numbers[0] == expected, (cell["metric"], cell["text"])
        if cell["ci"]:
            ci = lookup(metrics, cell["ci"])
            assert numbers[1:] == ([] if ci is None else [f"{ci[0]:.3f}", f"{ci[1]:.3f}"]), cell
        checked.add(cell["metric"])
    # every class x metric, the macro row, accuracy, ECE and both sources were on the page
    expected_keys = {f"per_class.{c}.{k}" for c in CLASSES for k in ("sensitivity", "specificity", "precision",
                                                                     "f1", "auc", "support")}
    expected_keys |= {f"macro.{k}" for k in ("sensitivity", "specificity", "precision", "f1", "auc")}
    expected_keys |= {"accuracy", "calibration.ece", "per_source.kermany.accuracy", "per_source.cohen.macro.auc"}
    assert expected_keys <= checked, expected_keys - checked
    assert set(metrics["per_source"]) == {"kermany", "cohen"}


@pytest.mark.slow
def test_page_is_self_contained_and_labelled(evaluated):
    run = evaluated["runs"][0]
    text = (run / "eval" / "report.html").read_text(encoding="utf-8")
    page = parse(run / "eval" / "report.html")
    assert page.images and all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert "http://" not in text and "https://" not in text and "<script" not in text  # nothing to fetch or run
    assert {"synthetic-banner", "research-notice"} <= page.ids
    assert "not a medical device" in text.lower()
    assert "a test network (no paper)" in text and "run_a" in text
    # the gallery: the most confident correct and wrong cases per class, as gallery_cases picks them
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    cm = np.array(metrics["confusion_matrix"]["counts"])
    wanted = sum(min(2, cm[k, k]) + min(2, cm[k].sum() - cm[k, k]) for k in range(3))
    assert len([img for img in page.images if img["alt"].startswith("Grad-CAM")]) == wanted > 0
    assert "Shortcut audit" not in text  # only when --audit ran
    assert text.count("<figure") == wanted + 3  # + ROC, confusion, calibration


@pytest.mark.slow
def test_several_checkpoints_share_one_page_with_their_comparison(evaluated):
    page = parse(evaluated["both"] / "report.html")
    text = (evaluated["both"] / "report.html").read_text(encoding="utf-8")
    assert {"model-1", "model-2", "comparison"} <= page.ids
    assert "McNemar" in text and "DeLong" in text
    assert any(img["alt"] == "ROC curves of the models overlaid" for img in page.images)
    rows = pd.read_csv(evaluated["both"] / "comparison.csv")
    assert f"{rows.loc[0, 'accuracy_a']:.3f}" in text and f"{rows.loc[0, 'accuracy_b']:.3f}" in text


def test_gallery_cases_pick_the_most_confident_per_class():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([[.9, .1, 0], [.6, .4, 0], [.2, .7, .1], [.1, .8, .1], [.95, .05, 0], [0, .3, .7]])
    cases = gallery_cases(y, p, ["a", "b", "c"], per_class=1)
    assert [(c["index"], c["correct"], c["predicted_class"]) for c in cases] == [
        (0, True, "a"), (2, False, "b"), (3, True, "b"), (4, False, "a"), (5, True, "c")]
    assert cases[3]["probability"] == pytest.approx(0.95)


# --------------------------------------------------------------------------- a real browser
def chromium(url, tmp_path, *extra):
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (apt-get install -y chromium; .ci/run installs it)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", *extra,
           url.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


# Runs after load: how many <img> elements the page has, and which of them did not decode.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify({n: images.length, broken: broken});
  document.body.appendChild(out);
});
</script>"""


def image_check(report, tmp_path, extra_html=""):
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", extra_html + IMAGE_CHECK + "</body>"),
                     encoding="utf-8")
    r = chromium(probe, tmp_path, "--dump-dom")
    found = re.search(r'<pre id="image-check">(.*?)</pre>', r.stdout)
    assert found, r.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"'))


@pytest.mark.slow
def test_chromium_shows_every_image(evaluated, tmp_path):
    report = evaluated["runs"][0] / "eval" / "report.html"
    n_images = len(parse(report).images)
    assert image_check(report, tmp_path) == {"n": n_images, "broken": []}
    # the check itself catches a broken image
    bad = image_check(report, tmp_path, '<img src="data:image/png;base64,iVBORw0KGgo=" alt="truncated">')
    assert bad == {"n": n_images + 1, "broken": ["truncated"]}


@pytest.mark.slow
def test_chromium_screenshot_is_not_blank(evaluated, tmp_path):
    report = evaluated["both"] / "report.html"
    shot = tmp_path / "report.png"
    r = chromium(report, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.is_file(), r.stderr[-2000:]
    image = cv2.imread(str(shot))  # BGR
    assert image.shape[:2] == (2400, 1280)
    ink = (image < 200).any(axis=-1).mean()
    assert 0.03 < ink < 0.9 and image.std() > 20, ink  # text, tables and figures, not an empty page
    top = image[5:30, 300:980].reshape(-1, 3).mean(axis=0)  # the SYNTHETIC banner spans the top
    assert top[2] > 150 and top[1] < 90 and top[0] < 90, top


# --------------------------------------------------------------------------- the model card
@pytest.mark.slow
def test_evaluation_updates_the_model_card(evaluated):
    run = evaluated["runs"][0]
    card = (run / "MODEL_CARD.md").read_text()
    headings = re.findall(r"^## (.+)$", card, flags=re.M)
    assert headings == ["Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
                        "Quantitative analyses", "Ethical considerations", "Caveats and recommendations"]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert "SYNTHETIC" in card and "Not a medical device" in card
    assert "a test network (no paper)" in card and "`custom-cnn`" in card
    assert "the run's held-out test split" in card
    acc, ci = metrics["accuracy"], metrics["ci"]["accuracy"]
    assert f"Accuracy {acc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" in card
    table = evaluated["table"]
    for source in ("kermany", "cohen"):
        rows = table[table.source == source]
        n_test = int((rows.split == "test").sum())
        assert re.search(rf"^\| {source} \| \d+ \({rows[rows.split == 'train'].patient_id.nunique()} p\) \| "
                         rf"{n_test} \(", card, flags=re.M), source
        assert f"| {source} | {metrics['per_source'][source]['n_samples']} |" in card


@pytest.mark.slow
def test_export_carries_the_model_card(evaluated, tmp_path):
    from covidx.serving.export import export

    run = evaluated["runs"][0]
    version = export(run, tmp_path / "exports")
    assert (version / "assets.extra" / "MODEL_CARD.md").read_text() == (run / "MODEL_CARD.md").read_text()
    # a run folder without a card gets one written from its config and split
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("MODEL_CARD.md", "model_card_evaluation.json", "eval"))
    card = (export(bare, tmp_path / "exports2") / "assets.extra" / "MODEL_CARD.md").read_text()
    assert "## Training data" in card and "Not evaluated yet" in card and (bare / "MODEL_CARD.md").is_file()


def test_page_is_labelled_synthetic_when_the_run_or_the_evaluated_images_are_generated():
    table = pd.DataFrame(dict(source=["kermany"] * 2, split=["train", "test"], patient_id=["p1", "p2"],
                              label=["viral", "normal"]))

    def section(run_synthetic=False, data_synthetic=False, source="kermany"):
        data = data_summary(table.assign(source=source), ["viral", "normal"], synthetic=data_synthetic)
        return ModelSection(name="m", metrics={}, run={"synthetic": run_synthetic}, data=data)

    assert not generated_data([section()])
    assert generated_data([section(run_synthetic=True)])  # trained on generated images
    assert generated_data([section(data_synthetic=True)])  # a real run evaluated on generated images
    assert generated_data([section(source="kermany-synthetic")])  # sources named so
    assert generated_data([section(), section(data_synthetic=True)])  # one section is enough


def test_model_card_labels_generated_data_synthetic():
    def split(source):
        return pd.DataFrame(dict(source=[source] * 2, split=["train", "test"], patient_id=["p1", "p2"],
                                 label=["viral", "normal"]))

    banner = "> **SYNTHETIC**"
    assert banner in render_model_card({"model": "m", "synthetic": True}, split("kermany"))
    assert banner in render_model_card({"model": "m"}, split("kermany-synthetic"))  # a generated manifest
    assert banner not in render_model_card({"model": "m"}, split("kermany"))
