"""Training a registered model on a dataset table: :class:`TrainConfig` in, a run folder out.

:func:`train` resolves the model's preset (the paper's settings; every field of the config that is
not ``None`` overrides one), loads and splits the data (patient-grouped), builds the train step the
preset names, and writes the run folder (:mod:`covidx.runs`). ``resume`` continues a killed run
from its last epoch (weights, optimizer state, schedule position). Errors are raised
(:class:`TrainingError` and the data/weights errors), never ``SystemExit``: ``python -m covidx.train``
is the command line over this.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras
import tensorflow as tf

import covidx
import covidx.training  # noqa: F401  (registers every trainer)
from covidx.data import PreprocessConfig, balanced_class_weights, make_dataset, split_summary
from covidx.data.duplicates import NEAR_DISTANCE
from covidx.data.prepare import SplitOptions, build_split
from covidx.data.sources import IndexReport, parse_views
from covidx.data.splitfile import read_split_file, write_split_file
from covidx.data.synthetic import is_synthetic, write_dataset
from covidx.data.verify import verify_table
from covidx.models import create_model, get_spec
from covidx.model_card import write_model_card
from covidx.models.cascade import TRAINING_HINT
from covidx.layers.grouped_conv import fast_convolutions
from covidx.precision import POLICIES, fused_batch_norms, precision_scope, resolve_precision
from covidx.runs import CONFIG_FILE, LUNG_MASK, SPLIT_FILE, RunConfig
from covidx.tasks import get_task
from covidx.models.recipes import recipe_preset
from covidx.training.callbacks import NetCheckpoint, TimeBudget, ValidationGap, checkpoint_monitor
from covidx.training.distribute import (
    WorkerBackupAndRestore,
    broadcast_text,
    create_strategy,
    distributed_datasets,
    is_chief,
    synchronize_batchnorm,
    worker_directory,
)
from covidx.training.report import END_OF_RUN, LearningCurves, split_figures
from covidx.training.schedules import WarmUp
from covidx.training.lung_masks import attach_lung_masks
from covidx.training.resume import EpochSeeds, completed_epochs, fast_forward
from covidx.training.segmentation import DiceCoefficient, DiceCrossEntropyLoss, IoUScore
from covidx.training.optimizers import FusedAdam, FusedSGD
from covidx.training.trainers import get_trainer, resolve_jit_compile

DEFAULT_MODEL = "baseline-mobilenetv2"


class TrainingError(RuntimeError):
    """The data or settings leave nothing to train on (the message says what)."""


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
    data: list[str] = field(default_factory=list)  # empty: the synthetic default
    layout: list[str] = field(default_factory=list)
    task: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    channels: int | None = None
    seed: int = 0
    optimizer: str | None = None
    learning_rate: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    min_learning_rate: float | None = None
    warmup_epochs: float | None = None
    lr_scales: dict | None = None  # {layer name: learning-rate factor} (the preset's: MAG-SD's quick recipe)
    recipe: str = "paper"  # "paper" (the model's preset) or "quick" (covidx.models.recipes)
    class_weights: bool | None = None
    weights: str | None = None
    augment: str | None = None
    clahe_prob: float | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    respect_source_split: bool | None = None  # default: True when every source brings a split
    test_source: str | None = None  # leave-one-source-out: this source is the (external) test split
    split: str | None = None  # a split file (python -m covidx.data --write-split) instead of splitting here
    duplicates: bool = True  # join patients that share an image (exact / near copies) before splitting
    near_distance: int = NEAR_DISTANCE  # pHash bits up to which two images are copies (-1: exact only)
    views: str = "PA,AP"  # views kept from metadata that has them ("unknown" keeps rows without one)
    patient_pattern: str | None = None  # regex on file names giving the patient (folders, masks layouts)
    patient_table: str | None = None  # CSV path|filename,patient_id for the same
    lung_masks: str | None = None  # lung U-Net run: predict the lung masks images lack (Regional Learning)
    out: str = "runs"
    strategy: str = "default"
    mixed_precision: bool = False  # older runs' spelling of precision="fp16"
    precision: str | None = None  # fp32 | bf16 | fp16 | auto (covidx.precision); None: fp16 if mixed_precision, else the preset's
    jit_compile: bool | None = None  # XLA-compile the train step; None: auto (resolve_jit_compile)
    fused_batchnorm: bool = True  # BN as one fused kernel forward and backward (covidx.precision.fused_batch_norms)
    matmul_weight_grads: bool = True  # bf16 kernel gradients as im2col matmuls (covidx.layers.convolution)
    fused_optimizer: bool = True  # each variable's Adam/SGD update as one kernel (covidx.training.optimizers)
    verify: bool = True
    steps_per_epoch: int | None = None  # cap (quick runs); None = one pass over the training split
    synthetic_patients: int = 60
    synthetic_size: int = 128
    model_kwargs: dict = field(default_factory=dict)  # builder arguments (ablations, reduced widths)
    trainer: str | None = None  # override the preset's train step (e.g. "moex" instead of "regional": ablations)
    trainer_kwargs: dict = field(default_factory=dict)  # trainer arguments (e.g. MAG-SD augmentations)
    cache: bool = True
    shuffle: bool = True  # off: batches in table order (reproducibility checks across strategies)
    sync_batchnorm: bool = False  # batch statistics over the global batch (all replicas) instead of per replica
    run_name: str | None = None  # OUT/<model>/<run_name> instead of a timestamp; continued if it exists (restarted jobs)
    verbose: int = 1
    report_splits: list[str] = field(default_factory=lambda: ["val"])  # scored at the end (chance verdict)
    time_budget: float | None = None  # seconds of budget_clock after which training stops (benchmarks)
    budget_clock: str = "cpu"  # "cpu" (this process's CPU seconds, both cores count) or "wall"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Overrides for the no-argument default run: it visibly learns on a 2-core CPU in < 3 minutes and ends with its
# held-out test figures. Why this model and this much data: README "The default run" and covidx/models/smallcnn.py
# (MobileNetV2 from scratch on 200 patients stayed at chance: its stride-2 stem drops the findings' texture).
DEFAULT_RUN = dict(model="baseline-smallcnn", image_size=96, epochs=8, batch_size=32, synthetic_patients=1000,
                   report_splits=["val", "test"])
# Findings of the default data are drawn at moderate to marked severity (the generator's own default keeps
# subtle cases down to 0.25), so a short CPU run learns something visible.
SYNTHETIC_SEVERITY = (0.5, 1.0)


def resolve(cfg: TrainConfig):
    """Fill every ``None`` of ``cfg`` from the model's preset; returns (cfg, preset, task)."""
    spec = get_spec(cfg.model)
    if spec.kind == "cascade":
        raise ValueError(TRAINING_HINT)
    preset = recipe_preset(cfg.model, cfg.recipe)
    values = cfg.to_dict()
    if values["precision"] is None and values["mixed_precision"]:
        values["precision"] = "fp16"  # the older flag's meaning, before the preset's precision fills in
    for k, v in values.items():
        if v is None and hasattr(preset, k):
            values[k] = getattr(preset, k)
    # Paths absolute, so config.json (and --resume) mean the same files from any folder.
    values["lr_scales"] = dict(values["lr_scales"])  # the preset's pairs, or a dict from flags / config.json
    values["data"] = [str(Path(d).resolve()) for d in values["data"]]
    values["out"] = str(Path(values["out"]).resolve())
    if values["lung_masks"]:
        values["lung_masks"] = str(Path(values["lung_masks"]).resolve())
    cfg = TrainConfig(**values)
    return cfg, preset, get_task(cfg.task)


def synthetic_default(cfg: TrainConfig) -> Path:
    """Generate (once) the synthetic dataset of the default run; returns its manifest."""
    root = (Path(cfg.out) / "_data" /
            f"synthetic-p{cfg.synthetic_patients}-s{cfg.synthetic_size}-sev{SYNTHETIC_SEVERITY[0]}-seed{cfg.seed}")
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        print(f"generating SYNTHETIC chest X-rays (procedural, not patients) in {root} ...", flush=True)
        write_dataset(root, n_patients=cfg.synthetic_patients, size=cfg.synthetic_size, seed=cfg.seed,
                      severity_range=SYNTHETIC_SEVERITY)
    return manifest


def layer_rates(net: keras.Model, lr_scales: dict) -> dict:
    """``{variable path: factor}`` for the trainable variables of the layers named in ``lr_scales``.

    A name with ``*``, ``?`` or ``[`` is a pattern over the model's layer names (:mod:`fnmatch`:
    ``"vgg19_*"`` is every layer of the ensemble's VGG19 branch) and takes every matching layer with
    trainable weights; a later entry overrides an earlier one for the layers both name.
    """
    rates = {}
    for name, factor in lr_scales.items():
        if any(c in name for c in "*?["):
            layers = [l for l in net.layers if fnmatch.fnmatchcase(l.name, name) and l.trainable_weights]
            if not layers:
                raise ValueError(f"lr_scales: no layer of {net.name} with trainable weights matches {name!r}")
        else:
            try:
                layers = [net.get_layer(name)]
            except ValueError:
                raise ValueError(f"lr_scales: {net.name} has no layer {name!r}") from None
            if not layers[0].trainable_weights:
                raise ValueError(f"lr_scales: layer {name!r} of {net.name} has no trainable weights")
        rates.update({v.path: float(factor) for layer in layers for v in layer.trainable_weights})
    return rates


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int, net: keras.Model | None = None):
    """The optimizer ``cfg`` names with its schedule and warm-up; ``net`` resolves ``cfg.lr_scales``."""
    warmup = int(round((cfg.warmup_epochs or 0.0) * steps_per_epoch))
    total = max(1, cfg.epochs * steps_per_epoch - warmup)  # the schedule runs after the warm-up
    lr = cfg.learning_rate
    if cfg.schedule == "cosine":
        # Cosine annealing from eta_max = learning_rate to eta_min = min_learning_rate (Loshchilov & Hutter).
        lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, total, alpha=cfg.min_learning_rate / cfg.learning_rate)
    elif cfg.schedule == "step":
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            [int(total * 0.5), int(total * 0.75)], [cfg.learning_rate, cfg.learning_rate * 0.1, cfg.learning_rate * 0.01]
        )
    elif cfg.schedule != "constant":
        raise ValueError(f"unknown schedule {cfg.schedule!r} (cosine, step, constant)")
    if warmup > 0:
        lr = WarmUp(lr, warmup)
    options = dict(weight_decay=cfg.weight_decay or None, fused=cfg.fused_optimizer,
                   lr_scales=layer_rates(net, cfg.lr_scales) if cfg.lr_scales else None)
    if cfg.optimizer == "sgd":
        return FusedSGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **options)
    if cfg.optimizer == "adam":
        return FusedAdam(lr, **options)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd, adam)")


def get_strategy(name: str):
    """The tf.distribute strategy ``name`` (see :mod:`covidx.training.distribute`); created once per process."""
    return create_strategy(name)


def split_options(cfg: TrainConfig) -> SplitOptions:
    """The :class:`~covidx.data.prepare.SplitOptions` of a training config (``--write-split`` takes the same flags)."""
    return SplitOptions(seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                        respect_source_split=cfg.respect_source_split, test_source=cfg.test_source,
                        duplicates=cfg.duplicates,
                        near_distance=cfg.near_distance, views=parse_views(cfg.views),
                        patient_pattern=cfg.patient_pattern, patient_table=cfg.patient_table, verify=cfg.verify)


def prepare_data(cfg: TrainConfig, task):
    """The split to train on: ``cfg.split`` as given, else :func:`covidx.data.prepare.build_split` (load, verify,
    select the task, join patients sharing an image, split by patient group). Returns ``(table, report, respect)``."""
    if cfg.split and cfg.data:
        raise ValueError("give --split FILE or --data PATH, not both (a split file already names its images)")
    if cfg.split:
        report = IndexReport()
        table = read_split_file(cfg.split, task)
        if cfg.verify:
            table = verify_table(table, report, progress=cfg.verbose > 0 and len(table) > 500)
        respect = None
    else:
        paths = cfg.data or [str(synthetic_default(cfg))]
        table, report, respect, _ = build_split(paths, cfg.layout, task, split_options(cfg), progress=cfg.verbose > 0)
    if cfg.lung_masks:
        table = attach_lung_masks(table, cfg.lung_masks, Path(cfg.out) / "_lung_masks")
    return table, report, respect


def train(cfg: TrainConfig, resume: str | Path | None = None) -> Path:
    """Train; returns the run directory (relative to the working folder when ``cfg.out`` is relative).
    ``resume`` continues an earlier run in place.

    Under ``strategy="multiworker"`` every worker process calls this with the same settings (its own
    ``TF_CONFIG``); only the chief writes the run folder (:mod:`covidx.training.distribute`). The caller's
    global precision policy is restored afterwards.
    """
    with precision_scope("fp32"):
        return _start(cfg, resume)


def _start(cfg: TrainConfig, resume: str | Path | None) -> Path:
    if resume is None and cfg.run_name:
        named = Path(cfg.out) / cfg.model / cfg.run_name
        if (named / CONFIG_FILE).is_file():  # a restarted job continues its run
            resume = named
    if resume is not None:
        saved = RunConfig.load(resume).train
        if cfg.epochs is not None:
            saved["epochs"] = cfg.epochs  # the one thing a resume may change: train longer
        cfg = TrainConfig(**saved)
    # Before TensorFlow runs any op: collective ops (multiworker) are configured at program startup.
    strategy = get_strategy(cfg.strategy)
    with worker_directory(cfg.out) as scratch:
        return _train(cfg, strategy, resume, is_chief(), scratch)


def _train(cfg: TrainConfig, strategy, resume, chief: bool, scratch: Path) -> Path:
    # config.json keeps absolute paths; what is printed and returned stays in the caller's terms (a relative --out
    # gives a run folder relative to the working folder, so logs and notebooks show no machine path).
    relative = not Path(cfg.out).is_absolute()
    cfg, preset, task = resolve(cfg)
    keras.utils.set_random_seed(cfg.seed)
    # Epoch length is unknown until the first pass (unreadable files are skipped), which Keras warns about.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    precision = resolve_precision(cfg.precision)
    keras.mixed_precision.set_global_policy(POLICIES[precision])  # train() restores the caller's policy
    cfg = dataclasses.replace(cfg, precision=precision)  # config.json records what ran ("auto" decided)

    # Generated files (synthetic default data, predicted lung masks) of a non-chief worker go to its scratch folder.
    table, report, respect = prepare_data(cfg if chief else dataclasses.replace(cfg, out=str(scratch)), task)
    for line in report.lines()[:50]:
        print(f"  {line}")
    if len(report.lines()) > 50:
        print(f"  ... and {len(report.lines()) - 50} more (python -m covidx.data PATH lists them all)")
    print(split_summary(table, task.image_classes))
    synthetic = is_synthetic(table)  # however the data came in: the default run, --data or --split
    if cfg.test_source:
        test_t = table[table.split == "test"]
        print(f"external test split: every image of source {cfg.test_source!r} ({len(test_t)} images, "
              f"{test_t['patient_id'].nunique()} patients), none of its patients trained on")
    train_t, val_t = table[table.split == "train"], table[table.split == "val"]
    if train_t.empty:
        raise TrainingError("the training split is empty")

    pre = PreprocessConfig.from_preset(preset, image_size=cfg.image_size, channels=cfg.channels,
                                       augment=cfg.augment, clahe_prob=cfg.clahe_prob)
    trainer_cls = get_trainer(cfg.trainer)
    lung = LUNG_MASK in trainer_cls.needs
    cw = None
    if cfg.class_weights and task.kind == "classification":
        cw = balanced_class_weights(train_t["label_index"], task.num_classes)
    distributed = strategy.num_replicas_in_sync > 1
    if distributed:
        # Each worker builds the pipeline of its shard of the table with the per-replica batch.
        def build_train(shard, batch, index):
            return make_dataset(shard, task, pre, training=True, batch_size=batch, class_weights=cw, lung_masks=lung,
                                cache=cfg.cache, shuffle=cfg.shuffle, seed=cfg.seed + 1_000_003 * index,
                                drop_remainder=True)

        def build_val(shard, batch, index):
            return make_dataset(shard, task, pre, batch_size=batch, lung_masks=lung, cache=cfg.cache)

        train_ds, steps = distributed_datasets(strategy, train_t, cfg.batch_size, build_train, True, cfg.steps_per_epoch)
        if not steps:
            raise TrainingError(f"the training split ({len(train_t)} images) is smaller than one global batch of "
                                f"{cfg.batch_size} over {strategy.num_replicas_in_sync} replicas")
        val_ds, val_steps = distributed_datasets(strategy, val_t, cfg.batch_size, build_val, False, cfg.steps_per_epoch)
        sample = next(iter(build_train(train_t, cfg.batch_size // strategy.num_replicas_in_sync, 0)))
    else:
        train_ds = make_dataset(train_t, task, pre, training=True, batch_size=cfg.batch_size, class_weights=cw,
                                lung_masks=lung, cache=cfg.cache, shuffle=cfg.shuffle, seed=cfg.seed)
        val_ds = (make_dataset(val_t, task, pre, batch_size=cfg.batch_size, lung_masks=lung, cache=cfg.cache)
                  if len(val_t) else None)
        steps = -(-len(train_t) // cfg.batch_size)
        if cfg.steps_per_epoch:
            steps = min(steps, cfg.steps_per_epoch)
            train_ds = train_ds.take(steps)
            val_ds = val_ds.take(max(1, cfg.steps_per_epoch)) if val_ds is not None else None
        sample = next(iter(train_ds))
        val_steps = None

    if resume is not None:
        run_dir = Path(resume)
    else:
        run_dir = Path(cfg.out) / cfg.model / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
        if chief and cfg.run_name:
            run_dir.mkdir(parents=True, exist_ok=True)
        elif chief:
            while run_dir.exists():
                run_dir = run_dir.with_name(run_dir.name + "_")
            run_dir.mkdir(parents=True)
        run_dir = Path(broadcast_text(strategy, str(run_dir)))  # every worker: the chief's folder
    out_dir = run_dir if chief else scratch  # where this worker writes
    shown = Path(os.path.relpath(run_dir)) if relative else run_dir
    if chief:
        write_split_file(table, run_dir / SPLIT_FILE)  # absolute paths: evaluation works from any folder

    with strategy.scope():
        net = create_model(cfg.model, num_classes=task.num_classes, image_size=pre.image_size,
                           channels=pre.channels, weights=cfg.weights, **cfg.model_kwargs)
        if cfg.fused_batchnorm:
            net = fused_batch_norms(net)
        if cfg.matmul_weight_grads:
            net = fast_convolutions(net)
        if cfg.sync_batchnorm:
            synchronize_batchnorm(net)
        trainer = trainer_cls(net, **cfg.trainer_kwargs)
        if task.kind == "segmentation":
            loss, metrics = DiceCrossEntropyLoss(), [DiceCoefficient(), IoUScore()]
        else:
            loss = keras.losses.CategoricalCrossentropy()
            metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"), keras.metrics.AUC(name="auc", multi_label=True)]
        trainer.compile(optimizer=build_optimizer(cfg, steps, net), loss=loss, metrics=metrics,
                        jit_compile=resolve_jit_compile(cfg.jit_compile, net))
        trainer(sample[0])  # build before BackupAndRestore restores weights
        trainer.sample_batch = sample

    if chief:
        RunConfig(
            model=cfg.model, task=task.name, classes=list(task.classes), kind=task.kind, preprocess=pre,
            trainer=cfg.trainer, trainer_inputs=list(trainer_cls.needs), train=cfg.to_dict(),
            respect_source_split=respect, class_weights=None if cw is None else [float(w) for w in cw],
            parameters=int(net.count_params()), paper=preset.paper,
            versions={"covidx": covidx.__version__, "tensorflow": tf.__version__, "keras": keras.__version__},
            synthetic=synthetic, test_source=cfg.test_source, replicas=strategy.num_replicas_in_sync,
        ).save(run_dir)
    monitor, mode = checkpoint_monitor(task.kind, val_ds is not None)
    done = completed_epochs(run_dir / "backup") if resume is not None else 0  # what every worker restores
    if resume is not None:
        print(f"resuming from epoch {done + 1} of {cfg.epochs} ({done} done, weights and optimizer state "
              f"from {run_dir / 'backup'})", flush=True)
        fast_forward(train_ds, done)  # the pipeline's randomness at epoch `done`, as in the uninterrupted run
    callbacks = [
        EpochSeeds(cfg.seed),  # Keras' random state per epoch from (seed, epoch): a resume repeats the run
        WorkerBackupAndRestore(run_dir / "backup", out_dir / "backup", delete_checkpoint=False),
        NetCheckpoint(out_dir, monitor=monitor, mode=mode),
        keras.callbacks.CSVLogger(str(out_dir / "history.csv"), append=True),
        LearningCurves(out_dir, f"{cfg.model}, --recipe {cfg.recipe}{', SYNTHETIC data' if synthetic else ''}"),
        keras.callbacks.TensorBoard(str(out_dir / "tensorboard"), write_graph=False, profile_batch=0),
        ValidationGap(setting=f"this run: {cfg.optimizer} at learning rate {cfg.learning_rate:g}, "
                              f"--recipe {cfg.recipe}"),
    ]
    if cfg.time_budget:
        callbacks.insert(0, TimeBudget(cfg.time_budget, cfg.budget_clock, cfg.batch_size, out_dir))
    print(f"training {cfg.model} ({net.count_params():,} parameters) on {len(train_t)} images, "
          f"{cfg.epochs} epochs, run directory {shown}"
          + (f", {strategy.num_replicas_in_sync} replicas ({'chief' if chief else 'worker'})" if distributed else ""),
          flush=True)
    trainer.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=callbacks, verbose=cfg.verbose,
                shuffle=False, steps_per_epoch=steps if distributed else None,  # the dataset shuffles itself
                validation_steps=val_steps or None)
    if not chief:
        return shown
    write_model_card(run_dir)  # what the model is for and is not; python -m covidx.evaluate adds its metrics
    figures = [f for f in (split_figures(run_dir, split, cfg.seed) for split in cfg.report_splits) if f]
    (run_dir / END_OF_RUN).write_text(json.dumps(figures, indent=2))
    for f in figures:
        print(f"{'SYNTHETIC ' if synthetic else ''}{f['line']}", flush=True)
    return shown
