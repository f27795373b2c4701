"""Training recipes: ``paper`` (each model's preset, the paper's setting) and ``quick`` (learns in CPU minutes).

A registered model's :class:`~covidx.models.registry.Preset` is the paper's recipe: the
optimiser, learning rate, schedule, resolution and epochs its authors used on GPUs for hours or
days. On a CPU, or when trying a model on new data, those settings can look like "learns
nothing": SEME-ResNet50's SGD at 1e-4 from He-uniform initialisation (Cascade-SEME §5.A) stays
at chance for a whole CPU epoch, while the same network with Adam at 1e-3 separates the
classes within one (measured on real radiographs; ``benchmarks/realdata.py``).

``quick`` is one set of changes per model *family* (the module that builds it), each written
below with why. What it never changes: the architecture, the task, the train step (MoEx,
Regional Learning, MAG-SD's attention-guided augmentation and soft distance), the input
normalisation, CLAHE, and class weighting. Nothing is frozen: covidx ships no pretrained
weights, so every family trains from scratch in both recipes (``--weights imagenet`` with
local files is a separate choice). Command-line flags override either recipe.

Shared reasons, referred to below:

* ``ADAM``: Adam's per-parameter step size moves a freshly initialised network at 1e-3 from
  the first steps; SGD at the papers' learning rates needs thousands of steps (the papers
  train 40-100 epochs on GPUs) before the loss moves (Kingma & Ba 2015).
* ``WARMUP``: linear warm-up from 0 to the peak learning rate: from-scratch BN statistics and
  Adam's second-moment estimates are unreliable in the first steps, and a full step size there
  can throw the network into a poor region (Goyal et al. 2017, §2.2). The classifiers warm up
  for 0.3 epoch (~80 steps on a few thousand images: what the moment estimates need, and no
  more of a short budget); the small-data families (tens of images per epoch) for one epoch.
* ``BATCH``: 16 images per step. On a CPU an image costs about the same at batch 16 as at 32,
  so a fixed budget buys twice the updates, and in a short run the number of updates is what
  moves the figure: on Kermany (SEME-ResNet50, 128 px) six epochs of 46 steps at batch 32 (276
  updates, two passes over the data) reached the same validation AUC as one epoch at batch 16
  (277 updates, one pass), 0.879 and 0.882.
* ``COSINE``: cosine annealing to 0 over the short run (Loshchilov & Hutter 2017), so the last
  epochs settle instead of ending on the peak rate.
* ``BF16``: ``precision="auto"``: bfloat16 compute on a CPU with bfloat16 units (x86 ``avx512_bf16`` /
  ``amx_bf16``), float16 on a GPU with tensor cores, float32 elsewhere (:mod:`covidx.precision`; weights,
  BN statistics, softmax and losses stay float32). On a CPU with BF16 units a ResNet50 training step runs
  1.6-1.7x faster than in float32 (``benchmarks/versus_torch.py``, rows resnet50-train and
  resnet50-train-bf16), so a budget buys 1.6-1.7x the updates. On Kermany, with the same CPU budget,
  SEME-ResNet50 in bf16 (14 epochs) reached validation macro AUC 0.930 where float32 (8 epochs, before BN
  was fused in training) reached 0.912 (README "On real radiographs").
* ``SIZE``: compute per image grows with the square of the side; 128 px keeps lobar
  consolidation and ground glass visible on a 2-core CPU at 3-16x less cost than 224-512 px.
"""

from __future__ import annotations

from covidx.models.registry import Preset, get_spec

RECIPES = ("paper", "quick")

_ADAM = "Adam: a from-scratch network moves at 1e-3 from the first steps (module docstring, ADAM)"
_WARMUP = "0.3 epoch of linear warm-up (module docstring, WARMUP)"
_WARMUP_SMALL = "one epoch of linear warm-up: a few steps per epoch on small data (module docstring, WARMUP)"
_BATCH = "16 images per step: twice the updates of 32 in the same CPU time (module docstring, BATCH)"
WARMUP_EPOCHS = 0.3
_COSINE = "cosine annealing to 0 within the short run (module docstring, COSINE)"
_SIZE = "128 px: 3-16x cheaper per image than the paper's size (module docstring, SIZE)"
_BF16 = ("auto: bfloat16 on CPUs with bfloat16 units (fp16 on tensor-core GPUs, else fp32): ~1.6x the updates "
         "per CPU second (module docstring, BF16)")

# family (the module that registers the model) -> {Preset field: (quick value, why)}
QUICK: dict[str, dict[str, tuple]] = {
    # keras.applications baselines (already Adam 1e-3 + cosine in their paper recipe).
    "baseline": {
        # 128 px: at 160 px (8 epochs in 2,177 of the 2,400 CPU s) validation AUC 0.909; the budget buys epochs instead.
        "image_size": (128, _SIZE),
        "batch_size": (16, _BATCH),
        "epochs": (12, "12 epochs: on Kermany (4,425 images, 128 px) validation AUC still rises through epoch 12 "
                       "(9 epochs 0.910, 12 epochs 0.918, in 1,647 and 2,385 CPU s)"),
        "warmup_epochs": (WARMUP_EPOCHS, _WARMUP),
        "precision": ("auto", _BF16),
        # Not "augment": the paper preset's light augmentation stays. On Kermany in 20 CPU-minutes, without it
        # (12 epochs) validation AUC peaked at 0.909 in epoch 6 and fell to 0.898 as the training loss went to
        # 0.02; with it (9 epochs) training and validation AUC stay together and reach 0.913.
    },
    # The default run's small VGG-style CNN: its own preset is already a CPU recipe (96 px, Adam 2e-3, cosine).
    "smallcnn": {
        "epochs": (8, "8 epochs: it separates the synthetic classes in 5-8"),
        "warmup_epochs": (1.0, _WARMUP_SMALL),
    },
    # Cascade-SEME stage-1 ResNet50 family (resnet50-*, se-/moex-/seme-resnet50): paper SGD 1e-4.
    "resnet": {
        "image_size": (128, _SIZE),
        "epochs": (6, "6 epochs at 128 px: a few CPU minutes per thousand images"),
        "optimizer": ("adam", _ADAM),
        "learning_rate": (1e-3, _ADAM),
        "min_learning_rate": (0.0, _COSINE),
        "schedule": ("cosine", _COSINE),
        "warmup_epochs": (WARMUP_EPOCHS, _WARMUP),
        "precision": ("auto", _BF16),
    },
    # Cascade-SEME stage-2 DenseNet169 family: paper SGD with eta_max 0.1.
    "densenet": {
        "image_size": (128, _SIZE),
        "epochs": (8, "8 epochs: the stage-2 data (COVID-19 vs other viral) are small"),
        "optimizer": ("adam", _ADAM),
        "learning_rate": (1e-3, _ADAM),
        "min_learning_rate": (0.0, _COSINE),
        "schedule": ("cosine", _COSINE),
        "warmup_epochs": (WARMUP_EPOCHS, _WARMUP),
        "precision": ("auto", _BF16),
    },
    # VGG19 (M1/M4): no batch normalisation, so a smaller peak learning rate than the BN families.
    "vgg": {
        "image_size": (128, _SIZE),
        "batch_size": (16, _BATCH),
        "epochs": (8, "8 epochs at 128 px"),
        "optimizer": ("adam", _ADAM),
        "learning_rate": (3e-4, "3e-4: VGG19 has no BN to keep activations in range at Adam's 1e-3"),
        "min_learning_rate": (0.0, _COSINE),
        "schedule": ("cosine", _COSINE),
        "warmup_epochs": (WARMUP_EPOCHS, _WARMUP),
        "precision": ("auto", _BF16),
    },
    # DPN / SE-DPN (Cheng et al.): Adam 1e-4 constant for 100 epochs, random 224 crops, flips both ways,
    # rotation +-30 deg, scale 0.9-1.1. An SE-DPN-92 training step costs ~1.8x SEME-ResNet50's per image
    # (Kermany, 128 px, bf16: 19.6 against 34.8 img/s in benchmarks/realdata.py).
    "dpn": {
        "image_size": (128, _SIZE + "; at 96 px (9 epochs instead of 6 in 20 CPU-minutes) SE-DPN-92 "
                                    "reached the same validation AUC on Kermany"),
        "batch_size": (16, _BATCH),
        "epochs": (6, "6 epochs: an SE-DPN-92 step costs ~1.8x a ResNet50's per image in training"),
        "learning_rate": (1e-3, "1e-3 instead of 1e-4: ten times the step, the run is 20x shorter"),
        "schedule": ("cosine", _COSINE),
        "warmup_epochs": (WARMUP_EPOCHS, _WARMUP),
        "precision": ("auto", _BF16),
        "augment": ("light", "light augmentation (+-10 deg, zoom/shift 10/5 %, horizontal flip) instead of the "
                             "paper's (vertical flips, +-30 deg): on Kermany in 20 CPU-minutes SE-DPN-92 "
                             "reached validation AUC 0.911 with it, 0.896 with the paper's (0.899 at 96 px)"),
    },
    # MA-Net / MAG-SD (Li et al.): SGD 1e-3, step decay, heavy augmentation (rotation +-120 deg...).
    "magsd": {
        "image_size": (128, _SIZE),
        "batch_size": (16, _BATCH),
        "epochs": (6, "6 epochs at 128 px"),
        "optimizer": ("adam", _ADAM),
        "learning_rate": (1e-3, _ADAM),
        "weight_decay": (0.0, "no weight decay: a short run does not overfit"),
        "schedule": ("cosine", _COSINE),
        "warmup_epochs": (WARMUP_EPOCHS, _WARMUP),
        "precision": ("auto", _BF16),
        "lr_scales": ((("predictions", 0.01),), "the classifier at 1/100 of the rate: its 65,536 inputs are the "
                      "attention-pooled feature, L2-normalised and scaled to norm 100, so one Adam step of 1e-3 on "
                      "every weight moves the logits by ~10 (benchmarks/magsd_start.py, Kermany, 128 px: from step 21 "
                      "log-probabilities 10-28 apart, a training cross-entropy of 1.7-3.3 from step 11, above the class "
                      "prior's 1.05; at 1/100: 0.64-0.79 after step 50; in 20 CPU-minutes validation AUC after one "
                      "epoch 0.568 -> 0.856, kept epoch 0.899 -> 0.904)"),
        "augment": ("light", "light augmentation (+-10 deg, zoom/shift 10/5 %): MAG-SD's Table 2 set "
                             "(rotation +-120 deg, crops, brightness) is for 100 epochs; in a few epochs it "
                             "hides the classes (viral sensitivity ~0 after one epoch)"),
    },
    # Concatenated VGG19 + DenseNet121 + EfficientNetB0 (Hasan et al.): Adam 1e-4 constant, 60 epochs.
    "ensemble": {
        "image_size": (128, _SIZE + "; three backbones per image"),
        "batch_size": (16, _BATCH),
        "epochs": (5, "5 epochs: three backbones cost ~3x one"),
        "learning_rate": (1e-3, "1e-3 instead of 1e-4 (Table II): from scratch, ten times the step"),
        "schedule": ("cosine", _COSINE),
        "warmup_epochs": (WARMUP_EPOCHS, _WARMUP + "; VGG19's branch has no BN"),
        "precision": ("auto", _BF16),
        "lr_scales": ((("vgg19_*", 0.3),), "VGG19's branch at 0.3x, VGG19's own quick rate (3e-4): it has no BN; at "
                      "1e-3, even from He-uniform kernels, its pooled features shrink to 0.2 % of their start in 100 "
                      "steps (share of the logits 0.017, DenseNet121's 3.2), at 0.3x to 2 % (0.15) "
                      "(benchmarks/ensemble_start.py, Kermany, 128 px); in 20 CPU-minutes validation AUC 0.912"),
        # Not "augment": on Kermany in 20 CPU-minutes, light augmentation (which the DPNs and MAG-SD take) gave
        # validation AUC 0.892 against 0.906 with the paper's none: augmenting costs CPU (10.9 against 12.9 img/s)
        # and slowed learning more than it held back the gap between training (0.93) and validation AUC.
    },
    # Lung U-Net (Cascade-SEMEnet §5.A): Adam with eta_max 0.1 (as printed), 512 px, 50 epochs.
    "unet": {
        "image_size": (256, "256 px: lung fields are large, smooth shapes; 4x cheaper than 512"),
        "batch_size": (8, "8 images per step at 256 px"),
        "epochs": (15, "15 epochs: a lung-mask set has tens to hundreds of images"),
        "learning_rate": (1e-3, "Adam's usual 1e-3 instead of the printed 0.1, which makes Adam's "
                                "first steps jump (the paper's own note: lower it if training diverges)"),
        "min_learning_rate": (0.0, _COSINE),
        "warmup_epochs": (1.0, _WARMUP_SMALL),
        "precision": ("auto", _BF16),
    },
    # FC-DenseNet103 lesion segmenter (Hasan et al. Table II): Adam 1e-4 constant, 40 epochs.
    "tiramisu": {
        "image_size": (128, _SIZE),
        "batch_size": (8, "8 images per step: FC-DenseNet103 keeps many full-resolution maps"),
        "epochs": (10, "10 epochs at 128 px"),
        "learning_rate": (1e-3, "1e-3 instead of 1e-4: ten times the step for a short run"),
        "schedule": ("cosine", _COSINE),
        "warmup_epochs": (1.0, _WARMUP_SMALL),
        "precision": ("auto", _BF16),
    },
}


def family(name: str) -> str:
    """The family of a registered model: the module that builds it (``seme-resnet50`` -> ``resnet``)."""
    return get_spec(name).builder.__module__.rsplit(".", 1)[-1]


def quick_changes(name: str) -> dict:
    """``{field: value}`` that the quick recipe sets for model ``name``."""
    fam = family(name)
    if fam not in QUICK:
        raise ValueError(f"no quick recipe for {name!r} (family {fam!r}); families: {', '.join(QUICK)}")
    return {k: v for k, (v, _why) in QUICK[fam].items()}


def recipe_preset(name: str, recipe: str = "paper") -> Preset:
    """The preset of model ``name`` under ``recipe`` ("paper": the registered preset, unchanged)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r} ({', '.join(RECIPES)})")
    preset = get_spec(name).preset
    if recipe == "paper":
        return preset
    return preset.replace(**quick_changes(name))


def recipe_table() -> str:
    """Markdown table of what ``quick`` changes, per family, with the paper's value beside it (README)."""
    examples = {"baseline": "baseline-resnet50", "smallcnn": "baseline-smallcnn", "resnet": "seme-resnet50", "densenet": "seme-densenet169",
                "vgg": "vgg19-gap", "dpn": "se-dpn92", "magsd": "mag-sd", "ensemble": "ensemble",
                "unet": "lung-unet", "tiramisu": "fc-densenet103"}
    lines = ["| family (e.g.) | setting | paper | quick | why |", "|---|---|---|---|---|"]
    for fam, changes in QUICK.items():
        paper = get_spec(examples[fam]).preset
        for k, (v, why) in changes.items():
            lines.append(f"| {fam} ({examples[fam]}) | {k} | {_shown(getattr(paper, k))} | {_shown(v)} | {why} |")
    return "\n".join(lines)


def _shown(value) -> str:
    """A preset value as README shows it: ``lr_scales``' pairs as ``layer x factor``."""
    if isinstance(value, tuple):
        return ", ".join(f"{name} x{factor:g}" for name, factor in value) or "none"
    return str(value)
