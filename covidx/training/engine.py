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
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras
import tensorflow as tf

import covidx
import covidx.training  # noqa: F401  (registers every trainer)
from covidx.data import PreprocessConfig, balanced_class_weights, load_sources, make_dataset, select_task, split_summary, split_table
from covidx.data.synthetic import write_dataset
from covidx.data.verify import verify_table
from covidx.models import create_model, get_spec
from covidx.models.cascade import TRAINING_HINT
from covidx.precision import POLICIES, precision_scope, resolve_precision
from covidx.runs import LUNG_MASK, SPLIT_FILE, RunConfig
from covidx.tasks import get_task
from covidx.training.callbacks import NetCheckpoint
from covidx.training.lung_masks import attach_lung_masks
from covidx.training.segmentation import DiceCoefficient, DiceCrossEntropyLoss, IoUScore
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
    class_weights: bool | None = None
    weights: str | None = None
    augment: str | None = None
    clahe_prob: float | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    respect_source_split: bool | None = None  # default: True when every source brings a split
    lung_masks: str | None = None  # lung U-Net run: predict the lung masks images lack (Regional Learning)
    out: str = "runs"
    strategy: str = "default"
    mixed_precision: bool = False  # older runs' spelling of precision="fp16"
    precision: str | None = None  # fp32 | bf16 | fp16 | auto (covidx.precision); None: fp16 if mixed_precision
    jit_compile: bool | None = None  # XLA-compile the train step; None: auto (resolve_jit_compile)
    verify: bool = True
    steps_per_epoch: int | None = None  # cap (quick runs); None = one pass over the training split
    synthetic_patients: int = 60
    synthetic_size: int = 128
    model_kwargs: dict = field(default_factory=dict)  # builder arguments (ablations, reduced widths)
    trainer: str | None = None  # override the preset's train step (e.g. "moex" instead of "regional": ablations)
    trainer_kwargs: dict = field(default_factory=dict)  # trainer arguments (e.g. MAG-SD augmentations)
    cache: bool = True
    verbose: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Overrides for the no-argument default run: small enough for a 2-core CPU in < 5 minutes.
DEFAULT_RUN = dict(image_size=96, epochs=10, batch_size=16, synthetic_patients=200)
# Findings of the default data are drawn at moderate to marked severity (the generator's own default keeps
# subtle cases down to 0.25), so a short CPU run learns something visible.
SYNTHETIC_SEVERITY = (0.5, 1.0)


def resolve(cfg: TrainConfig):
    """Fill every ``None`` of ``cfg`` from the model's preset; returns (cfg, preset, task)."""
    spec = get_spec(cfg.model)
    if spec.kind == "cascade":
        raise ValueError(TRAINING_HINT)
    preset = spec.preset
    values = cfg.to_dict()
    for k, v in values.items():
        if v is None and hasattr(preset, k):
            values[k] = getattr(preset, k)
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


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
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
    wd = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd, adam)")


def get_strategy(name: str):
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()  # cluster from the TF_CONFIG environment variable
    raise ValueError(f"unknown strategy {name!r} (default, mirrored, multiworker)")


def prepare_data(cfg: TrainConfig, task, report=None):
    """Load, verify, select the task and split; returns the table with ``split``."""
    paths = cfg.data or [str(synthetic_default(cfg))]
    table, report = load_sources(paths, cfg.layout or None)
    if cfg.verify:
        table = verify_table(table, report, progress=cfg.verbose > 0 and len(table) > 500)
    table = select_task(table, task, report)
    if cfg.lung_masks:
        table = attach_lung_masks(table, cfg.lung_masks, Path(cfg.out) / "_lung_masks")
    respect = cfg.respect_source_split
    if respect is None:
        respect = bool((table["split"] != "").all())
    table = split_table(table, cfg.val_fraction, cfg.test_fraction, cfg.seed, respect, report)
    return table, report, respect


def train(cfg: TrainConfig, resume: str | Path | None = None) -> Path:
    """Train; returns the run directory. ``resume`` continues an earlier run in place."""
    with precision_scope("fp32"):  # restores the caller's global policy afterwards
        return _train(cfg, resume)


def _train(cfg: TrainConfig, resume: str | Path | None) -> Path:
    if resume is not None:
        run_dir = Path(resume)
        saved = RunConfig.load(run_dir).train
        if cfg.epochs is not None:
            saved["epochs"] = cfg.epochs  # the one thing a resume may change: train longer
        cfg = TrainConfig(**saved)
    cfg, preset, task = resolve(cfg)
    keras.utils.set_random_seed(cfg.seed)
    # Epoch length is unknown until the first pass (unreadable files are skipped), which Keras warns about.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    precision = resolve_precision(cfg.precision or ("fp16" if cfg.mixed_precision else "fp32"))
    keras.mixed_precision.set_global_policy(POLICIES[precision])  # train() restores the caller's policy
    cfg = dataclasses.replace(cfg, precision=precision)  # config.json records what ran ("auto" decided)

    table, report, respect = prepare_data(cfg, task)
    for line in report.lines()[:50]:
        print(f"  {line}")
    if len(report.lines()) > 50:
        print(f"  ... and {len(report.lines()) - 50} more (python -m covidx.data PATH lists them all)")
    print(split_summary(table, task.classes))
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
    train_ds = make_dataset(train_t, task, pre, training=True, batch_size=cfg.batch_size, class_weights=cw,
                            lung_masks=lung, cache=cfg.cache, seed=cfg.seed)
    val_ds = (make_dataset(val_t, task, pre, batch_size=cfg.batch_size, lung_masks=lung, cache=cfg.cache)
              if len(val_t) else None)
    steps = -(-len(train_t) // cfg.batch_size)
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)
        train_ds = train_ds.take(steps)
        val_ds = val_ds.take(max(1, cfg.steps_per_epoch)) if val_ds is not None else None

    if resume is None:
        run_dir = Path(cfg.out) / cfg.model / time.strftime("%Y%m%d-%H%M%S")
        while run_dir.exists():
            run_dir = run_dir.with_name(run_dir.name + "_")
        run_dir.mkdir(parents=True)
    table.to_csv(run_dir / SPLIT_FILE, index=False)

    with get_strategy(cfg.strategy).scope():
        net = create_model(cfg.model, num_classes=task.num_classes, image_size=pre.image_size,
                           channels=pre.channels, weights=cfg.weights, **cfg.model_kwargs)
        trainer = trainer_cls(net, **cfg.trainer_kwargs)
        if task.kind == "segmentation":
            loss, metrics = DiceCrossEntropyLoss(), [DiceCoefficient(), IoUScore()]
        else:
            loss = keras.losses.CategoricalCrossentropy()
            metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"), keras.metrics.AUC(name="auc", multi_label=True)]
        trainer.compile(optimizer=build_optimizer(cfg, steps), loss=loss, metrics=metrics,
                        jit_compile=resolve_jit_compile(cfg.jit_compile, net))
        x0 = next(iter(train_ds))[0]
        trainer(x0)  # build before BackupAndRestore restores weights

    RunConfig(
        model=cfg.model, task=task.name, classes=list(task.classes), kind=task.kind, preprocess=pre,
        trainer=cfg.trainer, trainer_inputs=list(trainer_cls.needs), train=cfg.to_dict(),
        respect_source_split=respect, class_weights=None if cw is None else [float(w) for w in cw],
        parameters=int(net.count_params()), paper=preset.paper,
        versions={"covidx": covidx.__version__, "tensorflow": tf.__version__, "keras": keras.__version__},
        synthetic=not cfg.data,
    ).save(run_dir)
    monitor = "val_loss" if val_ds is not None else "loss"
    callbacks = [
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), delete_checkpoint=False),
        NetCheckpoint(run_dir, monitor=monitor),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False, profile_batch=0),
    ]
    print(f"training {cfg.model} ({net.count_params():,} parameters) on {len(train_t)} images, "
          f"{cfg.epochs} epochs, run directory {run_dir}", flush=True)
    trainer.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=callbacks, verbose=cfg.verbose,
                shuffle=False)  # the dataset shuffles itself
    return run_dir
