"""Dataset readers on miniature copies of the real public layouts, built in each test."""

import pandas as pd
import pytest

from covidx.data import DatasetError, detect_layout, load_source, load_sources
from covidx.data.sources import normalize_finding
from tests.helpers import write_image, write_mask


def make_kermany(root):
    base = root / "chest_xray"
    write_image(base / "train/NORMAL/IM-0115-0001.jpeg", seed=1)
    write_image(base / "train/NORMAL/NORMAL2-IM-0465-0001.jpeg", seed=2)
    write_image(base / "train/PNEUMONIA/person12_bacteria_47.jpeg", seed=3)
    write_image(base / "train/PNEUMONIA/person12_bacteria_48.jpeg", seed=4)
    write_image(base / "test/PNEUMONIA/person3_virus_16.jpeg", seed=5)
    write_image(base / "val/NORMAL/IM-0001-0001.jpeg", seed=6)
    write_image(base / "train/PNEUMONIA/IM-9999-0001.jpeg", seed=7)  # no bacteria/virus in the name
    (base / "train/NORMAL/empty.jpeg").write_bytes(b"")  # zero-byte
    (base / "train/NORMAL/notes.txt").write_text("not an image")
    return root


def test_kermany_reads_labels_patients_and_splits(tmp_path):
    root = make_kermany(tmp_path / "kermany")
    assert detect_layout(root) == "kermany"
    table, report = load_source(root)
    by_name = {p.split("/")[-1]: r for p, r in zip(table.path, table.to_dict("records"))}
    assert by_name["person12_bacteria_47.jpeg"]["finding"] == "bacterial"
    assert by_name["person3_virus_16.jpeg"]["finding"] == "viral"
    assert by_name["person3_virus_16.jpeg"]["split"] == "test"
    assert by_name["IM-0115-0001.jpeg"]["finding"] == "normal"
    assert by_name["person12_bacteria_47.jpeg"]["patient_id"] == by_name["person12_bacteria_48.jpeg"]["patient_id"]
    assert by_name["NORMAL2-IM-0465-0001.jpeg"]["patient_id"] == "kermany:NORMAL2-IM-0465"
    assert len(table) == 6
    skipped = dict(report.skipped)
    assert any("zero-byte" in r for p, r in report.skipped if p.endswith("empty.jpeg"))
    assert any(p.endswith("notes.txt") for p in skipped)
    assert any(p.endswith("IM-9999-0001.jpeg") and "bacteria or virus" in r for p, r in report.unmapped)


COHEN_HEADER = "patientid,offset,sex,age,finding,view,modality,date,location,folder,filename,doi,url,license\n"


def make_cohen(root, name_col="filename"):
    rows = [
        ("1", "COVID-19", "PA", "X-ray", "a.jpg"),
        ("1", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "b.png"),
        ("2", "Pneumonia/Bacterial/Streptococcus", "AP", "X-ray", "c.jpg"),
        ("3", "Pneumonia/Viral/SARS", "PA", "X-ray", "d.jpg"),
        ("4", "No Finding", "PA", "X-ray", "e.jpg"),
        ("5", "COVID-19", "L", "X-ray", "f.jpg"),  # lateral: filtered
        ("6", "COVID-19", "Axial", "CT", "g.jpg"),  # CT: filtered
        ("7", "todo", "PA", "X-ray", "h.jpg"),  # unmappable
        ("8", "Pneumonia", "PA", "X-ray", "i.jpg"),  # flat: unspecified pneumonia
    ]
    header = COHEN_HEADER.replace("filename", name_col)
    lines = [header] + [f"{p},0,M,50,{f},{v},{m},2020,x,images,{n},,," "\n" for p, f, v, m, n in rows]
    root.mkdir(parents=True)
    (root / "metadata.csv").write_text("".join(lines))
    for i, (*_, n) in enumerate(rows):
        write_image(root / "images" / n, seed=i)
    return root


@pytest.mark.parametrize("name_col", ["filename", "imagename"])
def test_cohen_maps_findings_filters_views_and_reports_unmapped(tmp_path, name_col):
    root = make_cohen(tmp_path / "cohen", name_col)
    assert detect_layout(root) == "cohen"
    table, report = load_source(root)
    got = dict(zip(table.path.str.split("/").str[-1], table.finding))
    assert got == {"a.jpg": "covid19", "b.png": "covid19", "c.jpg": "bacterial", "d.jpg": "viral",
                   "e.jpg": "normal", "i.jpg": "pneumonia"}
    reasons = " | ".join(r for _, r in report.unmapped)
    assert "view 'L'" in reasons and "modality 'CT'" in reasons and "'todo'" in reasons
    assert set(table.patient_id) >= {"cohen:1", "cohen:2"}
    assert (table.split == "").all()


@pytest.mark.parametrize("raw,expected", [
    ("COVID-19", "covid19"), ("Pneumonia/Viral/COVID-19", "covid19"), ("No finding", "normal"),
    ("Pneumonia/Bacterial/Klebsiella", "bacterial"), ("Pneumonia/Viral/Influenza", "viral"),
    ("Pneumonia", "pneumonia"), ("Tuberculosis", None), ("", None), ("Viral Pneumonia", "viral"),
])
def test_normalize_finding(raw, expected):
    assert normalize_finding(raw) == expected


def test_covidx_split_files(tmp_path):
    root = tmp_path / "covidx"
    write_image(root / "train" / "x1.png", seed=1)
    write_image(root / "train" / "x2.png", seed=2)
    write_image(root / "test" / "y1.png", seed=3)
    (root / "train_COVIDx9A.txt").write_text("p1 x1.png COVID-19 cohen\np2 x2.png normal rsna\nbad line\n")
    (root / "test_COVIDx9A.txt").write_text("p3 y1.png pneumonia rsna\np4 missing.png normal rsna\n")
    assert detect_layout(root) == "covidx"
    table, report = load_source(root)
    assert sorted(zip(table.finding, table.split)) == [("covid19", "train"), ("normal", "train"), ("pneumonia", "test")]
    assert any("missing.png" in p and "does not exist" in r for p, r in report.skipped)
    assert report.unmapped  # the malformed line


def test_folders_with_and_without_split_level(tmp_path):
    flat = tmp_path / "flat"
    write_image(flat / "COVID" / "a.png")
    write_image(flat / "Viral Pneumonia" / "b.png")
    write_image(flat / "Normal" / "c.png")
    table, _ = load_source(flat, "folders")
    assert sorted(table.finding) == ["covid19", "normal", "viral"]
    nested = tmp_path / "nested"
    write_image(nested / "train" / "covid19" / "a.png")
    write_image(nested / "test" / "bacterial" / "b.png")
    table, _ = load_source(nested, "folders")
    assert sorted(zip(table.finding, table.split)) == [("bacterial", "test"), ("covid19", "train")]
    bad = tmp_path / "bad"
    write_image(bad / "Tuberculosis" / "a.png")
    with pytest.raises(DatasetError, match="unknown class folder 'Tuberculosis'"):
        load_source(bad, "folders")


def test_csv_manifest_resolves_relative_paths(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    write_mask(tmp_path / "m" / "a.png")
    (tmp_path / "list.csv").write_text("path,label,patient_id,split,mask_path\nimgs/a.png,COVID-19,P1,train,m/a.png\n"
                                       "imgs/zzz.png,normal,P2,test,\n")
    table, report = load_source(tmp_path / "list.csv")
    assert table.loc[0, "finding"] == "covid19" and table.loc[0, "patient_id"] == "P1"
    assert table.loc[0, "mask_path"].endswith("m/a.png")
    assert len(report.skipped) == 1


def test_masks_layout_matches_by_stem(tmp_path):
    for stem in ("a", "b", "c"):
        write_image(tmp_path / "images" / f"{stem}.jpg")
    write_mask(tmp_path / "masks" / "a.png")
    write_mask(tmp_path / "masks" / "b.png")
    write_mask(tmp_path / "masks" / "orphan.png")
    assert detect_layout(tmp_path) == "masks"
    table, report = load_source(tmp_path)
    assert sorted(table.path.str.split("/").str[-1]) == ["a.jpg", "b.jpg"]
    reasons = dict(report.skipped)
    assert any(p.endswith("c.jpg") for p in reasons) and any(p.endswith("orphan.png") for p in reasons)


def test_empty_and_unknown_layouts_give_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the dataset layout"):
        load_source(tmp_path / "empty")
    with pytest.raises(DatasetError, match="unknown layout 'dicomdir'"):
        load_source(make_kermany(tmp_path / "k"), "dicomdir")
    only_bad = tmp_path / "only_bad" / "chest_xray" / "train" / "NORMAL"
    only_bad.mkdir(parents=True)
    (only_bad / "x.jpeg").write_bytes(b"")
    with pytest.raises(DatasetError, match="no usable images"):
        load_source(tmp_path / "only_bad", "kermany")


def test_load_sources_concatenates_and_drops_duplicates(tmp_path):
    k = make_kermany(tmp_path / "k")
    c = make_cohen(tmp_path / "c")
    table, report = load_sources([k, c, k])
    assert set(table.source) == {"kermany", "cohen"}
    assert not table.path.duplicated().any()
    assert sum("duplicate" in r for _, r in report.skipped) == 6
    assert isinstance(table, pd.DataFrame) and "dicom" in table.columns


def test_data_cli_prints_counts_skips_and_unmapped_rows(tmp_path, capsys):
    from covidx.data.__main__ import main

    k = make_kermany(tmp_path / "k")
    c = make_cohen(tmp_path / "c")
    assert main([str(k), str(c), "--task", "4class"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("11 images")  # 6 Kermany + 5 Cohen images that 4class uses
    assert "covid19" in out and "bacterial" in out and "train" in out
    assert "zero-byte file" in out and "view 'L'" in out and "'pneumonia' is not part of task 4class" in out
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
