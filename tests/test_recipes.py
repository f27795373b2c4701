"""Training recipes: ``paper`` is each model's preset unchanged, ``quick`` the documented changes per family."""

import keras
import numpy as np
import pytest

from covidx.models import get_spec, list_models
from covidx.models.recipes import QUICK, family, recipe_preset, recipe_table
from covidx.training.engine import TrainConfig, build_optimizer, resolve
from covidx.training.schedules import WarmUp

TRAINABLE = [n for n in list_models() if get_spec(n).kind != "cascade"]

# What README's "Recipes" table promises, written out by hand (not read from QUICK).
DOCUMENTED = {
    "baseline-resnet50": dict(precision="auto",
                              optimizer="adam", learning_rate=1e-3, schedule="cosine", warmup_epochs=0.3,
                              image_size=128, epochs=12, batch_size=16),
    "seme-resnet50": dict(precision="auto",
                          optimizer="adam", learning_rate=1e-3, schedule="cosine", warmup_epochs=0.3,
                          image_size=128, epochs=6, batch_size=16, min_learning_rate=0.0, trainer="moex",
                          clahe_prob=0.4, task="stage1", channels=1),
    "resnet50-base": dict(optimizer="adam", learning_rate=1e-3, image_size=128, epochs=6, trainer="standard"),
    "seme-densenet169": dict(precision="auto",
                             optimizer="adam", learning_rate=1e-3, schedule="cosine", warmup_epochs=0.3,
                             image_size=128, epochs=8, batch_size=16, trainer="regional", task="stage2"),
    "vgg19-gap": dict(optimizer="adam", learning_rate=3e-4, image_size=128, epochs=8, warmup_epochs=0.3,
                      batch_size=16),
    "se-dpn92": dict(precision="auto",
                     optimizer="adam", learning_rate=1e-3, schedule="cosine", warmup_epochs=0.3,
                     image_size=128, epochs=6, batch_size=16, resize="crop", augment="light"),
    "mag-sd": dict(precision="auto",
                   optimizer="adam", learning_rate=1e-3, schedule="cosine", warmup_epochs=0.3, image_size=128,
                   epochs=6, batch_size=16, weight_decay=0.0, augment="light", trainer="magsd", clahe_prob=1.0,
                   clahe_inference=True, lr_scales=(("predictions", 0.01),)),
    "ensemble": dict(precision="auto",
                     optimizer="adam", learning_rate=1e-3, schedule="cosine", warmup_epochs=0.3, image_size=128,
                     epochs=5, batch_size=16, task="3class", class_weights=True, augment="none",
                     lr_scales=(("vgg19_*", 0.3),)),
    "lung-unet": dict(precision="auto",
                      optimizer="adam", learning_rate=1e-3, schedule="cosine", warmup_epochs=1.0,
                      image_size=256, epochs=15, batch_size=8, min_learning_rate=0.0, task="lungs"),
    "fc-densenet103": dict(precision="auto",
                           optimizer="adam", learning_rate=1e-3, schedule="cosine", warmup_epochs=1.0,
                           image_size=128, epochs=10, batch_size=8, task="lesions"),
}


@pytest.mark.parametrize("name", TRAINABLE)
def test_paper_recipe_is_the_registered_preset(name):
    assert recipe_preset(name, "paper") == get_spec(name).preset
    assert get_spec(name).preset.warmup_epochs == 0.0  # the papers' settings have no warm-up
    assert get_spec(name).preset.precision == "fp32"  # no paper states one: float32


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_trainable_family_has_a_quick_recipe(name):
    quick, paper = recipe_preset(name, "quick"), get_spec(name).preset
    changed = {k for k, v in quick.to_dict().items() if v != paper.to_dict()[k]}
    assert changed <= set(QUICK[family(name)])  # only the documented fields change
    assert quick.warmup_epochs > 0 and quick.epochs < paper.epochs and quick.image_size <= 256
    if get_spec(name).kind == "classifier" and family(name) != "smallcnn":
        assert (quick.batch_size, quick.warmup_epochs) == (16, 0.3)  # README: BATCH, WARMUP
    # Never changed: what the model is and how it learns (task, train step, normalisation, CLAHE, class weights).
    for k in ("task", "trainer", "normalization", "channels", "clahe_prob", "clahe_inference", "class_weights",
              "weights", "resize"):
        assert getattr(quick, k) == getattr(paper, k), k


@pytest.mark.parametrize("name,expected", DOCUMENTED.items())
def test_quick_recipe_resolves_to_the_documented_settings(name, expected):
    quick = recipe_preset(name, "quick")
    for k, v in expected.items():
        assert getattr(quick, k) == v, (name, k)
    cfg, preset, task = resolve(TrainConfig(model=name, recipe="quick"))
    assert preset == quick
    for k, v in expected.items():
        if hasattr(cfg, k):
            assert getattr(cfg, k) == (dict(v) if k == "lr_scales" else v), (name, k)


def test_flags_override_either_recipe():
    for recipe in ("paper", "quick"):
        cfg, _, _ = resolve(TrainConfig(model="seme-resnet50", recipe=recipe, learning_rate=5e-4, image_size=96,
                                        optimizer="sgd", warmup_epochs=0.0))
        assert (cfg.learning_rate, cfg.image_size, cfg.optimizer, cfg.warmup_epochs) == (5e-4, 96, "sgd", 0.0)
    assert resolve(TrainConfig(model="seme-resnet50", recipe="quick", precision="fp32"))[0].precision == "fp32"
    assert resolve(TrainConfig(model="seme-resnet50", recipe="quick", mixed_precision=True))[0].precision == "fp16"
    assert resolve(TrainConfig(model="baseline-smallcnn", recipe="quick"))[0].precision == "fp32"  # default run as is
    assert resolve(TrainConfig(model="mag-sd", recipe="quick"))[0].lr_scales == {"predictions": 0.01}
    assert resolve(TrainConfig(model="mag-sd", recipe="quick", lr_scales={}))[0].lr_scales == {}
    assert resolve(TrainConfig(model="mag-sd"))[0].lr_scales == {}  # the paper's: one rate
    cfg, _, _ = resolve(TrainConfig(model="seme-resnet50"))
    assert (cfg.optimizer, cfg.learning_rate, cfg.image_size, cfg.epochs) == ("sgd", 1e-4, 512, 80)  # paper default


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        resolve(TrainConfig(model="seme-resnet50", recipe="fast"))


def test_recipe_table_lists_every_family():
    table = recipe_table()
    for fam in QUICK:
        assert f"| {fam} (" in table


def test_warm_up_then_cosine_matches_a_numpy_schedule():
    cfg, _, _ = resolve(TrainConfig(model="baseline-resnet50", recipe="quick", epochs=3))
    steps = 10  # per epoch: 0.3 epoch = 3 warm-up steps, then cosine over 27
    sched = build_optimizer(cfg, steps)._learning_rate  # the schedule object the optimiser steps through
    got = np.array([float(sched(s)) for s in range(30)])
    peak = 1e-3
    want = np.concatenate([peak * (np.arange(3) + 1) / 3,
                           peak * 0.5 * (1 + np.cos(np.pi * np.arange(27) / 27))])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_warm_up_round_trips_through_keras_serialization():
    sched = WarmUp(keras.optimizers.schedules.CosineDecay(1e-3, 50), 5)
    back = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    for s in (0, 3, 5, 20, 54):
        assert float(back(s)) == pytest.approx(float(sched(s)))
    assert float(WarmUp(0.01, 4)(1)) == pytest.approx(0.005)
    assert float(WarmUp(0.01, 4)(9)) == pytest.approx(0.01)


def test_readme_carries_the_current_recipe_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert recipe_table() in readme  # regenerate README's table from covidx.models.recipes.recipe_table()
