import numpy as np
import pandas as pd
import pytest

from covidx.data import DatasetError, IndexReport, select_task, split_summary, split_table
from covidx.data.splits import assert_no_patient_leak


def table(n_patients=60, per_patient=3, seed=0, with_split=False):
    rng = np.random.default_rng(seed)
    rows = []
    findings = ["covid19", "bacterial", "viral", "normal"]
    for p in range(n_patients):
        f = findings[p % 4]
        for i in range(rng.integers(1, per_patient + 1)):
            rows.append(dict(path=f"/x/{p}_{i}.png", finding=f, patient_id=f"P{p}", source="s",
                             split=("train" if p % 5 else "test") if with_split else "", mask_path="", lesion_path=""))
    return pd.DataFrame(rows)


def test_split_is_grouped_by_patient_stratified_and_deterministic():
    t = select_task(table(), "4class")
    a = split_table(t, 0.1, 0.2, seed=3)
    b = split_table(t, 0.1, 0.2, seed=3)
    c = split_table(t, 0.1, 0.2, seed=4)
    pd.testing.assert_series_equal(a.split, b.split)
    assert not a.split.equals(c.split)
    assert_no_patient_leak(a)
    for label in t.label.unique():  # 15 patients per class, 1-3 images each: images cut near the fractions
        rows = a[a.label == label]
        share = rows.split.value_counts() / len(rows)
        assert abs(share["test"] - 0.2) < 0.1 and abs(share["val"] - 0.1) < 0.1, share.to_dict()
        assert rows.groupby("split").patient_id.nunique().min() >= 1


def test_respect_source_split_keeps_it_and_carves_val_from_train():
    t = select_task(table(with_split=True), "4class")
    out = split_table(t, 0.1, 0.2, seed=0, respect_source_split=True)
    assert (out.loc[t.split == "test", "split"] == "test").all()
    assert (out.split == "val").any()
    assert set(out.loc[out.split == "val"].index) <= set(t.index[t.split == "train"])
    assert_no_patient_leak(out)


def test_patient_in_two_source_splits_keeps_the_higher_one_and_is_reported():
    t = select_task(table(with_split=True), "4class")
    t.loc[t.index[0], "split"] = "test" if t.loc[t.index[0], "split"] == "train" else "train"
    pid = t.loc[t.index[0], "patient_id"]
    if (t.patient_id == pid).sum() == 1:
        t = pd.concat([t, t.iloc[[0]].assign(path="/x/dup.png", split="train")], ignore_index=True)
    report = IndexReport()
    out = split_table(t, 0.0, 0.2, respect_source_split=True, report=report)
    assert out[out.patient_id == pid].split.nunique() == 1
    assert any(p == pid for p, _ in report.unmapped)


def test_task_selection_maps_and_reports():
    t = table()
    report = IndexReport()
    s2 = select_task(t, "stage2", report)
    assert set(s2.label) == {"covid19", "viral"}
    assert any("bacterial" in r for _, r in report.unmapped)
    s1 = select_task(t, "stage1")
    assert set(s1.loc[s1.finding == "covid19", "label"]) == {"viral"}  # COVID-19 is viral in stage 1
    three = select_task(t, "3class")
    assert set(three.loc[three.finding.isin(["viral", "bacterial"]), "label"]) == {"pneumonia"}
    assert list(select_task(t, "4class").label_index.unique().astype(int)) != []
    with pytest.raises(DatasetError, match="lungs"):
        select_task(t, "lungs")  # no masks
    with pytest.raises(ValueError, match="unknown task"):
        select_task(t, "5class")


def test_summary_table_counts():
    t = split_table(select_task(table(), "4class"), seed=0)
    text = split_summary(t, ["covid19", "bacterial", "viral", "normal"])
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["train", "val", "test", "no"]
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[-2] == str(len(t)) and total[-4] == "0"  # every row has a split


def test_segmentation_tables_do_not_report_a_missing_background_class():
    from covidx.tasks import get_task

    lungs, stage1 = get_task("lungs"), get_task("stage1")
    assert lungs.image_classes is None and stage1.image_classes == stage1.classes
    t = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["lung", "lung"], "patient_id": ["p1", "p2"],
                      "source": ["s", "s"], "split": ["train", "test"]})
    assert "absent" not in split_summary(t, lungs.image_classes)  # every image is a 'lung' image: nothing missing
    assert "class 'background' of the task is absent" in split_summary(t, lungs.classes)  # what it said before
