"""The systems' shared interface (covidx.systems.base): predict, explain, save / load, load_system."""

from __future__ import annotations

import numpy as np
import pytest

from covidx.explain.gradcam import GradCAM
from covidx.systems import CascadeSEME, System, TwoStagePredictor, load_system, system_kind
from tests.test_systems_two_stage import CLASSES, batch, brightness_classifier, tiny_segmenter


def test_two_stage_saves_loads_and_explains(tmp_path):
    system = TwoStagePredictor(brightness_classifier(), tiny_segmenter(), CLASSES)
    assert isinstance(system, System)
    images = batch()
    system.save(tmp_path / "sys")
    assert system_kind(tmp_path / "sys") == "two_stage.json"
    loaded = load_system(tmp_path / "sys")  # safe_mode=True
    assert isinstance(loaded, TwoStagePredictor)
    a, b = system.predict(images), loaded.predict(images)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    assert [m is None for m in a.masks] == [m is None for m in b.masks]

    records = loaded.explain(images, tmp_path / "expl")
    assert len(records) == len(images)
    # The classifier's Grad-CAM, recomputed independently on the same preprocessed input.
    x0 = records[0]["classifier"]["input"].astype(np.float32)[None, ..., None]
    expected = GradCAM(loaded.classifier).explain(x0)
    np.testing.assert_allclose(records[0]["classifier"]["heatmap"], expected.heatmaps[0], atol=1e-5)
    assert [r["mask"] is None for r in records] == [m is None for m in a.masks]
    assert all((tmp_path / "expl").joinpath(r["classifier"]["overlay"]).is_file() for r in records)


def test_load_system_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cascade.json or two_stage.json"):
        load_system(tmp_path)
    assert system_kind(tmp_path) is None


@pytest.mark.parametrize("cls", [CascadeSEME, TwoStagePredictor])
def test_every_system_has_the_shared_interface(cls):
    for method in ("predict", "explain", "config", "save", "load", "from_runs"):
        assert callable(getattr(cls, method, None)), f"{cls.__name__} lacks {method}"
