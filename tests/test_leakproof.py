"""Leak-proof splits on generated copies of the real layouts: patient identity, duplicate images, split files,
mixed-source splits, official test sets, the summary and views."""

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covidx.data import IndexReport, SplitOptions, build_split, load_source, load_sources, make_split, select_task
from covidx.data.__main__ import main as data_main
from covidx.data.duplicates import (NEAR_DISTANCE, duplicate_groups, fingerprint, fingerprint_table,
                                    merge_duplicate_groups)
from covidx.data.patients import PatientRule, kermany_patient, record_patient
from covidx.data.splitfile import SPLIT_COLUMNS, read_split_file, write_split_file
from covidx.data.splits import assert_no_patient_leak, split_summary, split_warnings
from covidx.tasks import get_task
from tests.helpers import write_image

CLASSES4 = ["covid19", "bacterial", "viral", "normal"]


def smooth_image(path, seed, size=96):
    """A radiograph-like smooth image (random low-frequency field): distinct seeds give distinct pHashes."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (6, 6)).astype(np.float32)
    img = np.clip(cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return img


def fast(**kw):
    return SplitOptions(hash_cache=False, verify=False, **kw)


# ------------------------------------------------------------------ 1. patient identity

@pytest.mark.parametrize("stem,patient", [
    ("person447_virus_921_1", "person447"), ("person12_bacteria_47", "person12"),
    ("IM-0011-0001", "IM-0011"), ("IM-0011-0001-0001", "IM-0011"),
    ("NORMAL2-IM-0465-0001", "NORMAL2-IM-0465"), ("NORMAL2-IM-0465-0001-0002", "NORMAL2-IM-0465"),
    ("scan_0001", None),
])
def test_kermany_name_forms(stem, patient):
    assert kermany_patient(stem)[0] == patient


def test_letter_suffixed_record_ids_name_one_patient():
    assert record_patient("COVID-00003a") == record_patient("COVID-00003b") == "COVID-00003"
    assert record_patient("42") == "42" and record_patient("ANON") == "ANON"


def make_kermany(root, names):
    for i, (split, cls, name) in enumerate(names):
        smooth_image(root / "chest_xray" / split / cls / name, seed=1000 + i)
    return root


def test_one_patient_under_two_kermany_name_forms_stays_in_one_split(tmp_path):
    names = [("train", "NORMAL", "IM-0011-0001.jpeg"), ("train", "NORMAL", "IM-0011-0001-0001.jpeg"),
             ("train", "PNEUMONIA", "person447_virus_921_1.jpeg"), ("train", "PNEUMONIA", "person447_virus_922.jpeg"),
             ("train", "NORMAL", "odd-name.jpeg")]
    names += [("train", "NORMAL", f"IM-{100 + p:04d}-0001.jpeg") for p in range(12)]
    names += [("train", "PNEUMONIA", f"person{p}_bacteria_{p}.jpeg") for p in range(12)]
    root = make_kermany(tmp_path / "k", names)
    table, report = load_source(root)
    pid = dict(zip(table.path.str.split("/").str[-1], table.patient_id))
    assert pid["IM-0011-0001.jpeg"] == pid["IM-0011-0001-0001.jpeg"] == "kermany:IM-0011"
    assert pid["person447_virus_921_1.jpeg"] == "kermany:person447"
    # A name that says no patient is kept, as its own patient, and named in the report.
    assert [p.split("/")[-1] for p, _ in report.no_patient] == ["odd-name.jpeg"]
    for seed in range(4):
        out, *_ = build_split([root], None, "4class", fast(seed=seed, respect_source_split=False))
        assert out[out.patient_id == "kermany:IM-0011"].split.nunique() == 1
        assert_no_patient_leak(out)


def test_patient_pattern_on_folders_and_table_on_masks(tmp_path):
    for name in ("p01_a.png", "p01_b.png", "p02_a.png", "x.png"):
        write_image(tmp_path / "f" / "COVID" / name)
    rule = PatientRule(pattern=r"^(?P<patient>p\d+)_")
    table, report = load_source(tmp_path / "f", "folders", patients=rule)
    pid = dict(zip(table.path.str.split("/").str[-1], table.patient_id))
    assert pid["p01_a.png"] == pid["p01_b.png"] == "folders:p01" != pid["p02_a.png"]
    assert [p.split("/")[-1] for p, _ in report.no_patient] == ["x.png"]
    # Without a rule every file is its own patient, and every one is reported.
    _, report = load_source(tmp_path / "f", "folders")
    assert len(report.no_patient) == 4 and "--patient-pattern" in report.no_patient[0][1]

    for stem in ("a", "b", "c"):
        write_image(tmp_path / "m" / "images" / f"{stem}.png")
        write_image(tmp_path / "m" / "masks" / f"{stem}.png")
    (tmp_path / "patients.csv").write_text("path,patient_id\nm/images/a.png,P1\nm/images/b.png,P1\n")
    table, report = load_source(tmp_path / "m", patients=PatientRule(table=str(tmp_path / "patients.csv")))
    pid = dict(zip(table.path.str.split("/").str[-1], table.patient_id))
    assert pid["a.png"] == pid["b.png"] == "masks:P1"
    assert [p.split("/")[-1] for p, _ in report.no_patient] == ["c.png"]
    with pytest.raises(ValueError, match="not a regular expression"):
        PatientRule(pattern="(")


# ------------------------------------------------------------------ 6. views (and Figure1's schema)

def make_figure1(root):
    root.mkdir(parents=True)
    rows = [("COVID-00003a", "COVID-19", "AP erect"), ("COVID-00003b", "COVID-19", ""),
            ("COVID-00004", "COVID-19", "PA"), ("COVID-00005", "COVID-19", "L")]
    (root / "metadata.csv").write_text("patientid,finding,view,modality\n" +
                                       "".join(f"{p},{f},{v},X-ray\n" for p, f, v in rows))
    for i, (p, *_) in enumerate(rows):
        smooth_image(root / "images" / f"{p}.jpg", seed=i)
    return root


def test_missing_view_is_reported_and_can_be_kept(tmp_path):
    root = make_figure1(tmp_path / "fig1")
    table, report = load_source(root, "cohen")
    assert sorted(table.path.str.split("/").str[-1]) == ["COVID-00003a.jpg", "COVID-00004.jpg"]
    reasons = dict(report.unmapped)
    assert any("COVID-00003b" in k and v.startswith("view missing") for k, v in reasons.items())
    assert any("view 'L'" in v for v in reasons.values())
    table, _ = load_source(root, "cohen", views=("PA", "AP", "unknown"))
    assert len(table) == 3
    assert table.groupby("patient_id").size().to_dict() == {"cohen:COVID-00003": 2, "cohen:COVID-00004": 1}
    table, _ = load_source(root, "cohen", views=("all",))
    assert len(table) == 4


# ------------------------------------------------------------------ 2. duplicates

def test_exact_and_resized_copies_in_two_sources_form_one_group(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    original = smooth_image(a / "COVID" / "orig.png", seed=7, size=128)
    (b / "covid19").mkdir(parents=True)
    shutil.copy(a / "COVID" / "orig.png", b / "covid19" / "same-bytes.png")
    small = cv2.resize(original, (100, 100), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(b / "covid19" / "resized.jpg"), small, [cv2.IMWRITE_JPEG_QUALITY, 90])
    for i in range(30):  # distinct images around them
        smooth_image(a / ("COVID" if i % 2 else "Normal") / f"a{i}.png", seed=100 + i)
        smooth_image(b / ("covid19" if i % 2 else "normal") / f"b{i}.png", seed=200 + i)
    (tmp_path / "b.csv").write_text("path,label,source\n" + "".join(
        f"{p.relative_to(tmp_path)},{p.parent.name},sourceB\n" for p in sorted(b.rglob("*.*"))))

    table, _ = load_sources([a, tmp_path / "b.csv"], ["folders", "csv"])
    fp = fingerprint_table(table, cache=False)
    groups = duplicate_groups(fp)
    assert groups.dup_group.nunique() == 1, groups[["path", "kind"]]
    assert sorted(groups.path.str.split("/").str[-1]) == ["orig.png", "resized.jpg", "same-bytes.png"]
    assert groups.cross_source.all() and (groups.kind == "near").all() and not groups.conflict.any()
    # The byte-identical pair alone is an exact group; the resized copy is within the threshold, not equal.
    exact = duplicate_groups(fp, near_distance=-1)
    assert sorted(exact.path.str.split("/").str[-1]) == ["orig.png", "same-bytes.png"]
    assert (exact.kind == "exact").all()
    d = bin(int(fingerprint(b / "covid19" / "resized.jpg")[1], 16) ^ int(fingerprint(a / "COVID" / "orig.png")[1], 16))
    assert 0 < d.count("1") <= NEAR_DISTANCE

    for seed in range(5):
        out, report, _, g = build_split([a, tmp_path / "b.csv"], ["folders", "csv"], "4class",
                                        fast(seed=seed, patient_pattern=r"^(\w+)\."))
        members = out[out.path.isin(g.path)]
        assert len(members) == 3 and members.split.nunique() == 1 and members.group_id.nunique() == 1
        assert_no_patient_leak(out)


def test_copies_with_conflicting_labels_are_reported(tmp_path):
    smooth_image(tmp_path / "x" / "COVID" / "a.png", seed=1)
    smooth_image(tmp_path / "x" / "Normal" / "b.png", seed=2)
    shutil.copy(tmp_path / "x" / "COVID" / "a.png", tmp_path / "x" / "Normal" / "a-copy.png")
    table, _ = load_source(tmp_path / "x", "folders")
    fp = fingerprint_table(table, cache=False)
    groups = duplicate_groups(fp)
    report = IndexReport()
    merged = merge_duplicate_groups(fp, groups, report)
    assert groups.conflict.all() and merged.group_id.nunique() == 2
    assert any("different labels" in r and "a-copy.png=normal" in r for _, r in report.unmapped)


def test_fingerprints_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    for i in range(3):
        smooth_image(tmp_path / "d" / "COVID" / f"{i}.png", seed=i)
    table, _ = load_source(tmp_path / "d", "folders")
    cache = tmp_path / "cache.sqlite"
    first = fingerprint_table(table, cache=cache)
    calls = []
    import covidx.data.duplicates as dup

    monkeypatch.setattr(dup, "fingerprint", lambda p: calls.append(p) or ("x", "0" * 64))
    again = fingerprint_table(table, cache=cache)
    assert calls == [] and again.phash.tolist() == first.phash.tolist()
    smooth_image(tmp_path / "d" / "COVID" / "1.png", seed=99, size=80)  # changed file: hashed again
    fingerprint_table(table, cache=cache)
    assert [p.split("/")[-1] for p in calls] == ["1.png"]


def test_data_cli_lists_duplicate_groups_cross_source_first(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    smooth_image(a / "COVID" / "x.png", seed=1)
    smooth_image(a / "COVID" / "y.png", seed=2)
    shutil.copytree(a, b)
    shutil.copy(a / "COVID" / "x.png", a / "COVID" / "x-again.png")
    (tmp_path / "b.csv").write_text("path,label,patient_id,source\nb/COVID/y.png,covid19,Q,other\n")
    assert data_main([str(a), str(tmp_path / "b.csv"), "--layout", "folders", "--layout", "csv",
                      "--duplicates"]) == 0
    out = capsys.readouterr().out
    assert "duplicate groups: 2 (2 exact, 0 near)" in out
    first = out.index("group 0 (2 images, exact, cross-source)")
    assert first < out.index("group 1 (2 images, exact)")
    assert "y.png" in out[first:out.index("group 1")]


# ------------------------------------------------------------------ 4. mixed sources

def mixed_table(with_split=False):
    """Two sources with very different class mixes (as COVID-19 collections and Kermany are)."""
    rows = []
    mix = {"cohen": {"covid19": 60, "viral": 6, "bacterial": 6, "normal": 4},
           "kermany": {"bacterial": 80, "viral": 50, "normal": 40}}
    for source, counts in mix.items():
        for finding, n in counts.items():
            for p in range(n):
                split = ("test" if p % 5 == 0 else "train") if with_split and source == "kermany" else ""
                for i in range(1 + p % 3):
                    rows.append(dict(path=f"/{source}/{finding}/{p}_{i}.png", finding=finding,
                                     patient_id=f"{source}:{finding}{p}", source=source, split=split,
                                     mask_path="", lesion_path=""))
    return select_task(pd.DataFrame(rows), "4class")


def test_mixed_sources_every_split_keeps_each_class_share():
    t = mixed_table()
    out = make_split(t, 0.15, 0.2, seed=0)
    assert_no_patient_leak(out)
    overall = out.label.value_counts(normalize=True)
    for split, frac in (("val", 0.15), ("test", 0.2)):
        part = out[out.split == split]
        assert abs(len(part) / len(out) - frac) < 0.03
        share = part.label.value_counts(normalize=True)
        for c in CLASSES4:
            assert abs(share.get(c, 0) - overall[c]) < 0.05, (split, c, share.to_dict(), overall.to_dict())
        for (src, c), n in out.groupby(["source", "label"]).size().items():  # every (source, class) cut alike
            got = ((part.source == src) & (part.label == c)).sum()
            assert abs(got - frac * n) <= 3, (split, src, c, got, n)


def test_respected_official_test_set_stays_intact():
    t = mixed_table(with_split=True)
    # Kermany's official train and test share patients: one patient's image in both, and a copy of an
    # official test image turning up in the source without a split (joined by a duplicate group).
    shared = t[(t.source == "kermany") & (t.split == "test")].iloc[0]
    t = pd.concat([t, pd.DataFrame([shared.to_dict() | {"path": "/kermany/train/extra.png", "split": "train"}])],
                  ignore_index=True)
    copy_of = t[(t.source == "kermany") & (t.split == "test")].iloc[1]
    t["group_id"] = t["patient_id"]
    t = pd.concat([t, pd.DataFrame([copy_of.to_dict() | {"path": "/cohen/copy.png", "source": "cohen", "split": "",
                                                         "patient_id": "cohen:copy", "group_id": copy_of.patient_id}])],
                  ignore_index=True)
    official_test = set(t.loc[t.split == "test", "path"])
    report = IndexReport()
    out = make_split(t, 0.1, 0.2, seed=0, respect_source_split=True, report=report)
    assert set(out.loc[(out.split == "test") & (out.source == "kermany"), "path"]) == official_test
    assert "/kermany/train/extra.png" not in set(out.path)  # removed from training, not moved to test
    assert any(gid == shared.patient_id and "removed from the official train split" in r for gid, r in report.unmapped)
    assert out.loc[out.path == "/cohen/copy.png", "split"].item() == "test"  # follows its official copy
    # Validation comes from Kermany's official train split only, for Kermany rows.
    val_k = out[(out.split == "val") & (out.source == "kermany")]
    assert len(val_k) and set(val_k.path) <= set(t.loc[t.split == "train", "path"])
    assert_no_patient_leak(out)
    assert {"covid19"} <= set(out.loc[(out.split == "val"), "label"])  # cohen's own val carved per class


def test_summary_adds_up_and_warns():
    t = mixed_table(with_split=True)
    text = split_summary(t, CLASSES4)  # cohen rows have no split yet
    lines = text.splitlines()
    assert lines[0].split() == ["train", "val", "test", "no", "split", "total"]
    row = {ln.split("  ")[0].strip(): ln for ln in lines[1:] if not ln.startswith("warning")}

    def counts(line):
        return [int(x) for x in re.findall(r"(\d+) \(\d+p\)", line)]

    total = counts(row["total"])
    assert sum(total[:4]) == total[4] == len(t)
    assert total[3] == (t.source == "cohen").sum()
    assert counts(row["source cohen"])[3] == counts(row["source cohen"])[4]
    assert sum(counts(row[c])[4] for c in CLASSES4) == len(t)
    assert "warning: the val split" not in text
    only_k = make_split(t[t.source == "kermany"], 0.1, 0.2, respect_source_split=True)
    warnings = split_warnings(only_k, CLASSES4)
    assert "class 'covid19' of the task is absent from the data" in warnings
    no_test = make_split(t[(t.source == "kermany") & (t.split == "train")], 0.1, 0.2, respect_source_split=True)
    assert any("test split is empty" in w for w in split_warnings(no_test, CLASSES4))
    lacking = no_test.copy()
    lacking.loc[(lacking.split == "val") & (lacking.label == "viral"), "split"] = "train"
    assert "the val split has no 'viral' images" in split_warnings(lacking, CLASSES4)


# ------------------------------------------------------------------ 3. split files

def test_split_file_round_trip_and_relative_paths(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for i in range(24):
        smooth_image(root / CLASSES4[i % 4] / f"p{i // 8}_{i}.png", seed=i)
    file = tmp_path / "share" / "split.csv"
    args = [str(root), "--layout", "folders", "--task", "4class", "--seed", "3", "--patient-pattern", r"^(p\d+_\d+)",
            "--write-split", str(file), "--relative-paths"]
    monkeypatch.setenv("COVIDX_CACHE_DIR", str(tmp_path / "cache"))
    assert data_main(args) == 0
    written = pd.read_csv(file, keep_default_na=False)
    assert list(written.columns[:5]) == SPLIT_COLUMNS and not written.path.str.startswith("/").any()
    opts = SplitOptions(seed=3, patient_pattern=r"^(p\d+_\d+)", hash_cache=tmp_path / "cache" / "x.sqlite")
    expected, *_ = build_split([root], ["folders"], "4class", opts)
    monkeypatch.chdir(tmp_path / "share")  # relative paths resolve against the file, not the working folder
    back = read_split_file(file, get_task("4class"))
    pd.testing.assert_frame_equal(back[SPLIT_COLUMNS].sort_values("path").reset_index(drop=True),
                                  expected[SPLIT_COLUMNS].sort_values("path").reset_index(drop=True))
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("moved"))
    assert read_split_file(moved / "share" / "split.csv").path.str.startswith(str(moved)).all()


def test_bad_split_files_give_one_clear_error(tmp_path):
    from covidx.data import DatasetError

    f = tmp_path / "s.csv"
    f.write_text("path,label,patient_id,source\na.png,normal,P,s\n")
    with pytest.raises(DatasetError, match="missing column"):
        read_split_file(f)
    f.write_text("path,label,patient_id,source,split\na.png,normal,P,s,train\nb.png,normal,P,s,test\n")
    with pytest.raises(DatasetError, match="in more than one split"):
        read_split_file(f)
    f.write_text("path,label,patient_id,source,split\na.png,tb,P,s,train\n")
    with pytest.raises(DatasetError, match="row 2 has label 'tb'"):
        read_split_file(f, get_task("4class"))


@pytest.mark.slow
def test_train_uses_exactly_the_written_split(tmp_path):
    import subprocess
    import sys

    from tests.test_train_cli import ENV, run_dir_of

    root = tmp_path / "data"
    for i in range(32):
        smooth_image(root / CLASSES4[i % 4] / f"{i}.png", seed=i, size=40)
    file = tmp_path / "split.csv"
    import covidx

    # The run starts in another folder (so the checkout is put on the path) and must still find the files.
    env = {**ENV, "COVIDX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(Path(covidx.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "covidx.data", str(root), "--task", "4class", "--seed", "5",
                        "--write-split", str(file)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    written = pd.read_csv(file, keep_default_na=False)
    # Change the file by hand: training must follow the file, not recompute a split.
    written.loc[0, "split"] = "test" if written.loc[0, "split"] != "test" else "val"
    written.to_csv(file, index=False)
    r = subprocess.run([sys.executable, "-m", "covidx.train", "--model", "baseline-smallcnn", "--split", str(file),
                        "--image-size", "32", "--epochs",
                        "1", "--batch-size", "8", "--steps-per-epoch", "2", "--out", str(tmp_path / "runs"),
                        "--verbose", "0"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = run_dir_of(tmp_path / "runs")
    run = pd.read_csv(run_dir / "split.csv", keep_default_na=False)
    # Images that covidx did not generate: no --data, but nothing of the run says SYNTHETIC.
    assert "SYNTHETIC" not in r.stdout and "val: accuracy" in r.stdout
    assert json.loads((run_dir / "config.json").read_text())["synthetic"] is False
    assert "> **SYNTHETIC**" not in (run_dir / "MODEL_CARD.md").read_text()  # the banner of generated data
    key = ["path", "label", "patient_id", "source", "split"]
    pd.testing.assert_frame_equal(run[key].sort_values("path").reset_index(drop=True),
                                  written[key].sort_values("path").reset_index(drop=True))

