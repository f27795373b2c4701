"""The SYNTHETIC chest X-ray generator (covidx.data.synthetic) and its on-disk layouts."""

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covidx.data.synthetic import (
    COHEN_COLUMNS,
    MANIFEST_COLUMNS,
    SYNTHETIC_FINDINGS,
    generate_xray,
    is_synthetic,
    main,
    make_anatomy,
    write_dataset,
)

SIZE = 96
SEEDS = range(6)
ABNORMAL = ("bacterial", "viral", "covid19")
KERMANY_PNEUMONIA = re.compile(r"^person\d+_(bacteria|virus)_\d+\.jpeg$")
KERMANY_NORMAL = re.compile(r"^(NORMAL2-)?IM-\d+-\d+\.jpeg$")


@pytest.fixture(scope="module")
def samples():
    """Counterfactual sets: for each seed, the same patient drawn with each finding."""
    return {f: [generate_xray(f, SIZE, rng=s) for s in SEEDS] for f in SYNTHETIC_FINDINGS}


def _iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def _lungs(mask):
    """Connected components of a lung mask, largest first (the two lungs)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1
    return [labels == k for k in order]


# ------------------------------------------------------------------ single images

def test_shapes_dtypes_and_ranges(samples):
    for f, xs in samples.items():
        for x in xs:
            assert x.finding == f
            for arr in (x.image, x.lung_mask, x.lesion_mask):
                assert arr.shape == (SIZE, SIZE) and arr.dtype == np.uint8
            assert set(np.unique(x.lung_mask)) <= {0, 1} and set(np.unique(x.lesion_mask)) <= {0, 1}
            # Radiograph dynamic range: dark air outside the body, bright mediastinum / abdomen.
            assert np.percentile(x.image, 3) < 40 and np.percentile(x.image, 97) > 170
            # Two lungs covering a plausible part of the image.
            assert 0.12 < x.lung_mask.mean() < 0.45
            lungs = _lungs(x.lung_mask)
            assert len(lungs) == 2 and lungs[1].sum() > 0.5 * lungs[0].sum()


def test_lesion_masks_inside_lungs_empty_only_for_normal(samples):
    for f, xs in samples.items():
        for x in xs:
            if f == "normal":
                assert x.lesion_mask.sum() == 0 and x.severity == 0.0
                continue
            assert x.lesion_mask.sum() > 0, f
            inside = np.logical_and(x.lesion_mask, x.lung_mask).sum() / x.lesion_mask.sum()
            assert inside >= 0.95


def test_lungs_darker_than_mediastinum(samples):
    for xs in samples.values():
        for x in xs:
            rows = np.where(x.lung_mask.any(1))[0]
            band = np.zeros_like(x.lung_mask, bool)
            c = SIZE // 2
            band[rows[0]:rows[-1], c - SIZE // 30:c + SIZE // 30] = True  # the column between the lungs
            band &= x.lung_mask == 0
            assert x.image[x.lung_mask > 0].mean() + 40 < x.image[band].mean()


def test_findings_change_only_their_own_pixels(samples):
    """Same seed, different finding: same patient and film; pixels differ where the finding is."""
    for f in ABNORMAL:
        for normal, x in zip(samples["normal"], samples[f]):
            np.testing.assert_array_equal(normal.lung_mask, x.lung_mask)
            diff = np.abs(x.image.astype(int) - normal.image.astype(int))
            near_lungs = cv2.dilate(x.lung_mask, np.ones((3, 3), np.uint8), iterations=2) > 0
            assert diff[near_lungs].sum() >= 0.95 * diff.sum() > 0
            lesion, rest = x.lesion_mask > 0, (x.lung_mask > 0) & (x.lesion_mask == 0)
            assert diff[lesion].mean() > 3 * diff[rest].mean()
            # Findings add density: the lungs get brighter than the same patient's normal lungs.
            assert x.image[x.lung_mask > 0].mean() > normal.image[normal.lung_mask > 0].mean()
            assert x.image[lesion].mean() > normal.image[lesion].mean() + 8


def test_class_specific_patterns(samples):
    def sides(x):
        return sum(bool(np.logical_and(lung, x.lesion_mask).any()) for lung in _lungs(x.lung_mask))

    # Bacterial: lobar, one lung. Viral: both lungs. COVID-19: mostly both lungs.
    assert all(sides(x) == 1 for x in samples["bacterial"])
    assert all(sides(x) == 2 for x in samples["viral"])
    assert sum(sides(x) == 2 for x in samples["covid19"]) >= 4

    def lesion_stats(x):
        dist = cv2.distanceTransform(x.lung_mask, cv2.DIST_L2, 3)  # distance to the lung border
        lung_rows = np.where(x.lung_mask.any(1))[0]
        ys = np.where(x.lesion_mask)[0]
        height = (ys.mean() - lung_rows[0]) / (lung_rows[-1] - lung_rows[0])  # 0 apex .. 1 base
        return dist[x.lesion_mask > 0].mean() / dist[x.lung_mask > 0].mean(), height

    covid = np.array([lesion_stats(x) for x in samples["covid19"]]).mean(0)
    viral = np.array([lesion_stats(x) for x in samples["viral"]]).mean(0)
    assert covid[0] < viral[0]  # COVID-19 is peripheral, viral perihilar
    assert covid[1] > viral[1] and covid[1] > 0.5  # and in the lower zones

    # Consolidation is denser than ground glass: bigger jump over the same patient's normal lung.
    def jump(f):
        return np.mean([x.image[x.lesion_mask > 0].mean() - n.image[x.lesion_mask > 0].mean()
                        for x, n in zip(samples[f], samples["normal"])])

    assert jump("bacterial") > jump("covid19")


def test_severity_controls_extent_and_density():
    mild = generate_xray("covid19", SIZE, rng=3, severity=0.1)
    severe = generate_xray("covid19", SIZE, rng=3, severity=1.0)
    assert severe.lesion_mask.sum() > mild.lesion_mask.sum()
    assert severe.image[severe.lung_mask > 0].mean() > mild.image[mild.lung_mask > 0].mean()


def test_deterministic_for_a_seed():
    a, b = generate_xray("viral", SIZE, rng=11), generate_xray("viral", SIZE, rng=11)
    for name in ("image", "lung_mask", "lesion_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.image, generate_xray("viral", SIZE, rng=12).image)
    assert make_anatomy(5) == make_anatomy(5)


def test_anatomy_shared_within_a_patient():
    within, across = [], []
    for p in range(5):
        anatomy = make_anatomy(np.random.default_rng(100 + p), SIZE)
        views = [generate_xray("normal", SIZE, rng=10 * p + k, anatomy=anatomy).lung_mask for k in range(3)]
        within += [_iou(views[0], views[1]), _iou(views[1], views[2])]
        across.append(_iou(views[0], generate_xray("normal", SIZE, rng=900 + p).lung_mask))
        assert not np.array_equal(views[0], views[1])  # per-image jitter: not the same picture twice
    assert min(within) > 0.8
    assert np.mean(across) < np.mean(within) - 0.1


def test_anatomy_renders_at_any_size():
    anatomy = make_anatomy(3, 256)
    small = generate_xray("normal", 64, rng=1, anatomy=anatomy)
    large = generate_xray("normal", 192, rng=1, anatomy=anatomy)
    down = cv2.resize(large.lung_mask, (64, 64), interpolation=cv2.INTER_NEAREST)
    assert _iou(small.lung_mask, down) > 0.85


@pytest.mark.parametrize("text", ["L", "PORTABLE"])
def test_marker_only_where_asked(text):
    plain = generate_xray("covid19", SIZE, rng=21)
    marked = generate_xray("covid19", SIZE, rng=21, marker=text)
    changed = marked.image != plain.image
    assert changed.sum() >= 6
    ys, xs = np.where(changed)
    # A corner box, clear of the lungs.
    assert ys.max() - ys.min() < 0.15 * SIZE and xs.max() - xs.min() < 0.4 * SIZE
    assert ys.max() < 0.25 * SIZE or ys.min() > 0.75 * SIZE
    assert xs.max() < 0.5 * SIZE or xs.min() >= 0.5 * SIZE
    assert not np.logical_and(changed, marked.lung_mask).any()
    np.testing.assert_array_equal(marked.lung_mask, plain.lung_mask)
    np.testing.assert_array_equal(marked.lesion_mask, plain.lesion_mask)


def test_rejects_unknown_finding():
    with pytest.raises(ValueError, match="unknown finding"):
        generate_xray("tuberculosis", SIZE, rng=0)


# ------------------------------------------------------------------ datasets on disk

DATASET_ARGS = dict(n_patients=24, size=64, seed=3, confounder="PORTABLE", confounder_finding="covid19",
                    confounder_splits=("train",))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("syn") / "data", **DATASET_ARGS)


@pytest.fixture(scope="module")
def manifest(dataset):
    return pd.read_csv(dataset / "manifest.csv", dtype=str, keep_default_na=False)


def _images(root: Path):
    suffixes = (".png", ".jpg", ".jpeg")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and "masks" not in p.parts)


def test_kermany_layout(dataset):
    base = dataset / "kermany" / "chest_xray"
    assert {p.name for p in base.iterdir()} <= {"train", "val", "test"}
    files = sorted(base.glob("*/*/*"))
    assert files and {p.parent.name for p in files} == {"NORMAL", "PNEUMONIA"}
    for p in files:
        rx = KERMANY_PNEUMONIA if p.parent.name == "PNEUMONIA" else KERMANY_NORMAL
        assert rx.match(p.name), p.name
        assert p.read_bytes()[:3] == b"\xff\xd8\xff"  # really JPEG
    kinds = {KERMANY_PNEUMONIA.match(p.name).group(1) for p in files if p.parent.name == "PNEUMONIA"}
    assert kinds == {"bacteria", "virus"}


def test_cohen_layout(dataset):
    meta = pd.read_csv(dataset / "cohen" / "metadata.csv", dtype=str, keep_default_na=False)
    required = ["patientid", "offset", "sex", "age", "finding", "view", "modality", "date", "location", "folder",
                "filename", "doi", "url", "license", "clinical_notes", "other_notes"]
    assert set(required) <= set(meta.columns) and list(meta.columns) == COHEN_COLUMNS
    assert {"COVID-19", "Pneumonia/Viral/COVID-19"} <= set(meta.finding)  # flat and hierarchical
    assert set(meta.finding) <= {"COVID-19", "Pneumonia/Viral/COVID-19", "No Finding"}
    assert {"PA", "L"} <= set(meta.view) and set(meta.view) <= {"PA", "AP", "AP Supine", "L", "Axial"}
    assert set(meta.modality) == {"X-ray", "CT"} and (meta.modality == "CT").sum() == 2
    for r in meta.itertuples():
        assert (dataset / "cohen" / r.folder / r.filename).is_file()
    assert meta.clinical_notes.str.contains("SYNTHETIC").all()


def test_masks_for_every_image(dataset):
    images = _images(dataset)
    stems = [p.stem for p in images]
    assert len(stems) == len(set(stems))  # unique across the whole dataset
    for p in images:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        for kind in ("lungs", "lesions"):
            mask = cv2.imread(str(dataset / "masks" / kind / f"{p.stem}.png"), cv2.IMREAD_UNCHANGED)
            assert mask is not None and mask.shape == img.shape[:2] and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
    assert len(list((dataset / "masks" / "lungs").iterdir())) == len(images)


def test_manifest(dataset, manifest):
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert set(manifest.finding) == set(SYNTHETIC_FINDINGS)
    assert set(manifest.source) == {"kermany-synthetic", "cohen-synthetic"}
    assert set(manifest.split) == {"train", "val", "test"}
    assert (manifest.groupby("patient_id").split.nunique() == 1).all()  # no patient in two splits
    assert set(manifest[manifest.finding == "covid19"].split) == {"train", "val", "test"}
    for r in manifest.itertuples():
        assert all((dataset / rel).is_file() for rel in (r.path, r.mask_path, r.lesion_path))
        kermany = r.source == "kermany-synthetic"
        assert r.path.startswith(f"kermany/chest_xray/{r.split}/") if kermany else r.path.startswith("cohen/images/")
        lesion = cv2.imread(str(dataset / r.lesion_path), cv2.IMREAD_GRAYSCALE)
        assert (lesion.max() == 0) == (r.finding == "normal")
    # Lateral and CT decoys are on disk and in metadata.csv but not among the manifest's frontal X-rays.
    assert len(manifest) < len(_images(dataset))
    readme = (dataset / "README.txt").read_text()
    assert readme.startswith("SYNTHETIC DATA - NOT REAL PATIENTS") and "seed = 3" in readme


def test_confounder_only_on_train_covid(dataset, manifest, tmp_path):
    confounded = (manifest.finding == "covid19") & (manifest.split == "train")
    assert confounded.any()
    assert ((manifest.marker == "PORTABLE") == confounded).all()
    # The same dataset without the confounder differs exactly in the marked images.
    clean = write_dataset(tmp_path / "clean", **{**DATASET_ARGS, "confounder": None})
    for r, marked in zip(manifest.itertuples(), confounded):
        same = (dataset / r.path).read_bytes() == (clean / r.path).read_bytes()
        assert same != marked, r.path


def test_readers_accept_the_layouts(dataset, manifest):
    from covidx.data.sources import read_cohen, read_csv_manifest, read_kermany

    kermany, k_report = read_kermany(dataset / "kermany")
    cohen, c_report = read_cohen(dataset / "cohen")
    table, m_report = read_csv_manifest(dataset / "manifest.csv")
    assert not k_report.lines() and not m_report.lines()
    # The reader drops exactly the lateral and CT decoy rows.
    dropped = c_report.lines()
    assert dropped and all(("view 'L'" in line) or ("modality 'CT'" in line) for line in dropped)
    assert len(kermany) + len(cohen) == len(table) == len(manifest)
    assert set(kermany.patient_id) | set(cohen.patient_id) == set(manifest.patient_id)
    by_path = dict(zip(table.path, table.finding))
    for frame in (kermany, cohen):
        for path, finding in zip(frame.path, frame.finding):
            assert by_path[str(Path(path))] == finding


def test_generated_images_are_known_as_synthetic_however_they_are_read(dataset, tmp_path):
    import shutil

    from covidx.data.sources import read_cohen, read_csv_manifest, read_kermany

    kermany, _ = read_kermany(dataset / "kermany")  # the folder layout's reader names the source "kermany"
    assert set(kermany.source) == {"kermany"} and is_synthetic(kermany)
    assert is_synthetic(read_cohen(dataset / "cohen")[0])
    assert is_synthetic(read_csv_manifest(dataset / "manifest.csv")[0])  # by the manifest's source names
    # The same files outside the generated folder (how real data looks to covidx) are not.
    shutil.copytree(dataset / "kermany", tmp_path / "kermany")
    copied, _ = read_kermany(tmp_path / "kermany")
    assert len(copied) == len(kermany) and not is_synthetic(copied)
    assert is_synthetic(pd.concat([copied, kermany]))  # one generated image is enough


def test_write_dataset_is_deterministic(tmp_path):
    args = dict(n_patients=8, size=48, seed=7)

    def digest(root):
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode() + p.read_bytes())
        return h.hexdigest()

    first = digest(write_dataset(tmp_path / "a", **args))
    assert first == digest(write_dataset(tmp_path / "b", **args))
    assert first == digest(write_dataset(tmp_path / "a", **args))  # regenerating in place
    assert first != digest(write_dataset(tmp_path / "c", **{**args, "seed": 8}))


def test_write_dataset_never_clobbers_other_data(tmp_path):
    (tmp_path / "kermany").mkdir()
    (tmp_path / "kermany" / "mine.txt").write_text("real data")
    with pytest.raises(FileExistsError, match="not a covidx synthetic dataset"):
        write_dataset(tmp_path, n_patients=4, size=32)
    assert (tmp_path / "kermany" / "mine.txt").read_text() == "real data"


def test_command_line(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--patients", "8", "--size", "48", "--seed", "2",
                 "--confounder", "L"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "marker 'L'" in out
    manifest = pd.read_csv(tmp_path / "cli" / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) >= 8 and set(manifest.marker) <= {"", "L"}
