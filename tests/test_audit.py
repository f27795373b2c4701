"""Shortcut audit (covidx.explain.audit): heatmap energy inside the lung mask, per image and per class."""

import numpy as np
import pytest

from covidx.explain.audit import DEFAULT_MIN_ENRICHMENT, energy_inside_mask, shortcut_audit

SIZE = 32


def test_energy_share_by_hand():
    heat = np.arange(16, dtype=float).reshape(4, 4) / 15.0
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True
    # inside: (0+1) + (4+5) + (8+9) + (12+13) = 52 of 0+1+...+15 = 120 (the /15 cancels)
    np.testing.assert_allclose(energy_inside_mask(heat, mask), [52 / 120])
    # {0,1} float masks and probability masks (> 0.5) mean the same
    np.testing.assert_allclose(energy_inside_mask(heat[None], mask[None].astype(float) * 0.9), [52 / 120])


def test_negative_values_clipped_zero_map_nan_and_mask_resized():
    heat = np.array([[[1.0, -5.0], [0.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = np.array([[[1, 0], [0, 0]], [[1, 1], [1, 1]]])
    shares = energy_inside_mask(heat, mask)
    assert shares[0] == pytest.approx(1 / 4)  # -5 ignored: 1 inside of 1 + 3
    assert np.isnan(shares[1])  # no evidence to place
    big_mask = np.kron(mask, np.ones((4, 4)))  # (2, 8, 8) mask for (2, 2, 2) heatmaps
    np.testing.assert_allclose(energy_inside_mask(heat, big_mask), shares)
    with pytest.raises(ValueError):
        energy_inside_mask(heat, mask[:1])


def lungs():
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    return (((xx - 0.3) / 0.14) ** 2 + ((yy - 0.55) / 0.3) ** 2 < 1) | (((xx - 0.7) / 0.14) ** 2 + ((yy - 0.55) / 0.3) ** 2 < 1)


def blob(cy, cx, sigma=3.0):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def test_classes_looking_outside_the_lungs_are_flagged():
    rng = np.random.default_rng(0)
    mask = lungs()
    heatmaps, labels = [], []
    for _ in range(5):  # "covid19": evidence on a corner marker (text label shortcut, cascade Fig. 13)
        heatmaps.append(blob(rng.uniform(2, 5), rng.uniform(2, 5)))
        labels.append(0)
    for _ in range(5):  # "normal": evidence in the lung fields
        heatmaps.append(blob(rng.uniform(15, 20), rng.choice([9.6, 22.4])))
        labels.append(1)
    heatmaps, labels = np.stack(heatmaps), np.array(labels)
    masks = np.repeat(mask[None], len(labels), axis=0)

    report = shortcut_audit(heatmaps, masks, labels, ["covid19", "normal", "viral"])
    shares = energy_inside_mask(heatmaps, masks)
    np.testing.assert_allclose(report["share"], shares)
    assert report["flagged"] == ["covid19"]
    assert report["min_enrichment"] == DEFAULT_MIN_ENRICHMENT == 1.5
    np.testing.assert_allclose(report["enrichment"], shares / mask.mean())
    assert report["per_class"]["covid19"]["median_share"] < 0.05
    assert report["per_class"]["normal"]["median_share"] > 0.7  # lungs are ~9 px wide, the blob spills a little
    assert report["per_class"]["normal"]["median_share"] == pytest.approx(float(np.median(shares[5:])))
    assert report["per_class"]["normal"]["n"] == 5
    assert report["per_class"]["normal"]["median_lung_fraction"] == pytest.approx(mask.mean())
    assert report["per_class"]["normal"]["median_enrichment"] == pytest.approx(float(np.median(shares[5:])) / mask.mean())
    assert report["per_class"]["viral"]["n"] == 0 and np.isnan(report["per_class"]["viral"]["median_share"])

    # one-hot labels give the same report; a stricter criterion also flags "normal"
    one_hot = np.eye(3)[labels]
    assert shortcut_audit(heatmaps, masks, one_hot, ["covid19", "normal", "viral"])["flagged"] == ["covid19"]
    strict = shortcut_audit(heatmaps, masks, labels, ["covid19", "normal", "viral"], min_enrichment=1 / mask.mean())
    assert strict["flagged"] == ["covid19", "normal"]


def test_uniform_attention_scores_the_lung_area_and_is_flagged():
    mask = lungs()
    heatmaps = np.ones((3, SIZE, SIZE))
    report = shortcut_audit(heatmaps, np.repeat(mask[None], 3, 0), [0, 0, 0], ["covid19"])
    assert report["per_class"]["covid19"]["median_share"] == pytest.approx(mask.mean())
    assert report["per_class"]["covid19"]["median_enrichment"] == pytest.approx(1.0)
    assert report["flagged"] == ["covid19"]  # chance level is not evidence for the lungs
    slightly = shortcut_audit(heatmaps * (1 + 0.2 * mask), np.repeat(mask[None], 3, 0), [0, 0, 0], ["covid19"])
    assert 1.0 < slightly["per_class"]["covid19"]["median_enrichment"] < 1.5 and slightly["flagged"] == ["covid19"]
    assert shortcut_audit(heatmaps * (1 + 0.2 * mask), np.repeat(mask[None], 3, 0), [0, 0, 0], ["covid19"],
                          min_enrichment=1.0)["flagged"] == []


def test_the_same_share_is_judged_against_the_lung_area():
    """Half of the evidence inside the mask is 2.5x chance when the mask is 20 % of the frame, and below
    chance when it is 60 %."""
    heat = np.zeros((1, 10, 10))
    heat[0, :, :4] = 1.0  # evidence on the four left columns
    small = np.zeros((1, 10, 10), bool)
    small[0, :, :2] = True  # 20 % of the frame: two of the evidence columns
    large = np.zeros((1, 10, 10), bool)
    large[0, :, 2:8] = True  # 60 % of the frame: the other two
    assert energy_inside_mask(heat, small)[0] == pytest.approx(0.5) == energy_inside_mask(heat, large)[0]
    on_small, on_large = shortcut_audit(heat, small, [0], ["a"]), shortcut_audit(heat, large, [0], ["a"])
    assert on_small["per_class"]["a"]["median_enrichment"] == pytest.approx(0.5 / 0.2)
    assert on_large["per_class"]["a"]["median_enrichment"] == pytest.approx(0.5 / 0.6)
    assert on_small["flagged"] == [] and on_large["flagged"] == ["a"]


def test_bad_labels_rejected():
    with pytest.raises(ValueError):
        shortcut_audit(np.ones((2, 4, 4)), np.ones((2, 4, 4)), [0, 3], ["a", "b"])
    with pytest.raises(ValueError):
        shortcut_audit(np.ones((2, 4, 4)), np.ones((2, 4, 4)), [0], ["a", "b"])
