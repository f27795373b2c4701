"""``python -m covidx.train``: train any registered model on a dataset (synthetic by default).

With no arguments it generates the embedded SYNTHETIC chest X-ray set (procedural
images, not patients), trains the default baseline for a few epochs on the CPU
and prints where the run went. A model's preset (``--list-models``) supplies the
paper's settings; every flag overrides one. ``--resume RUN_DIR`` continues a
killed run from its last epoch (weights, optimizer state, schedule position).

The same is available from Python: :func:`train` takes a :class:`TrainConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "baseline-mobilenetv2"


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
    mixed_precision: bool = False
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Overrides for the no-argument default run: small enough for a 2-core CPU in < 5 minutes.
DEFAULT_RUN = dict(image_size=96, epochs=10, batch_size=16, synthetic_patients=200)
# Findings of the default data are drawn at moderate to marked severity (the generator's own default keeps
# subtle cases down to 0.25), so a short CPU run learns something visible.
SYNTHETIC_SEVERITY = (0.5, 1.0)


def resolve(cfg: TrainConfig):
    """Fill every ``None`` of ``cfg`` from the model's preset; returns (cfg, preset, task)."""
    from covidx.models import get_spec
    from covidx.tasks import get_task

    spec = get_spec(cfg.model)
    if spec.kind == "cascade":
        from covidx.models.cascade import TRAINING_HINT

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
    from covidx.data.synthetic import write_dataset

    root = (Path(cfg.out) / "_data" /
            f"synthetic-p{cfg.synthetic_patients}-s{cfg.synthetic_size}-sev{SYNTHETIC_SEVERITY[0]}-seed{cfg.seed}")
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        print(f"generating SYNTHETIC chest X-rays (procedural, not patients) in {root} ...", flush=True)
        write_dataset(root, n_patients=cfg.synthetic_patients, size=cfg.synthetic_size, seed=cfg.seed,
                      severity_range=SYNTHETIC_SEVERITY)
    return manifest


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int):
    import keras

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
    """The tf.distribute strategy ``name`` (see :mod:`covidx.training.distribute`); created once per process."""
    from covidx.training.distribute import create_strategy

    return create_strategy(name)


def prepare_data(cfg: TrainConfig, task, report=None):
    """Load, verify, select the task and split; returns the table with ``split``."""
    from covidx.data import load_sources, select_task, split_table
    from covidx.data.verify import verify_table

    paths = cfg.data or [str(synthetic_default(cfg))]
    table, report = load_sources(paths, cfg.layout or None)
    if cfg.verify:
        table = verify_table(table, report, progress=cfg.verbose > 0 and len(table) > 500)
    table = select_task(table, task, report)
    if cfg.lung_masks:
        from covidx.data.lung_masks import attach_lung_masks

        table = attach_lung_masks(table, cfg.lung_masks, Path(cfg.out) / "_lung_masks")
    respect = cfg.respect_source_split
    if respect is None:
        respect = bool((table["split"] != "").all())
    table = split_table(table, cfg.val_fraction, cfg.test_fraction, cfg.seed, respect, report)
    return table, report, respect


def train(cfg: TrainConfig, resume: str | Path | None = None) -> Path:
    """Train; returns the run directory. ``resume`` continues an earlier run in place.

    Under ``strategy="multiworker"`` every worker process calls this with the same settings (its own
    ``TF_CONFIG``); only the chief writes the run folder (:mod:`covidx.training.distribute`).
    """
    if resume is None and cfg.run_name:
        named = Path(cfg.out) / cfg.model / cfg.run_name
        if (named / "config.json").is_file():  # a restarted job continues its run
            resume = named
    if resume is not None:
        run_dir = Path(resume)
        saved = json.loads((run_dir / "config.json").read_text())["train"]
        if cfg.epochs is not None:
            saved["epochs"] = cfg.epochs  # the one thing a resume may change: train longer
        cfg = TrainConfig(**saved)
    # Before TensorFlow runs any op: collective ops (multiworker) are configured at program startup.
    strategy = get_strategy(cfg.strategy)
    from covidx.training.distribute import broadcast_text, is_chief, worker_directory

    with worker_directory(cfg.out) as scratch:
        return _train(cfg, strategy, resume, is_chief(), scratch, broadcast_text)


def _train(cfg, strategy, resume, chief, scratch, broadcast_text) -> Path:
    import warnings

    import keras
    import tensorflow as tf

    from covidx.data import PreprocessConfig, balanced_class_weights, make_dataset, split_summary
    from covidx.models import create_model
    from covidx.training.distribute import WorkerBackupAndRestore, distributed_datasets
    from covidx.training.trainers import get_trainer
    import covidx.training  # noqa: F401  (registers every trainer)

    cfg, preset, task = resolve(cfg)
    keras.utils.set_random_seed(cfg.seed)
    # Epoch length is unknown until the first pass (unreadable files are skipped), which Keras warns about.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    if cfg.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")

    # Generated files (synthetic default data, predicted lung masks) of a non-chief worker go to its scratch folder.
    table, report, respect = prepare_data(cfg if chief else dataclasses.replace(cfg, out=str(scratch)), task)
    for line in report.lines()[:50]:
        print(f"  {line}")
    if len(report.lines()) > 50:
        print(f"  ... and {len(report.lines()) - 50} more (python -m covidx.data PATH lists them all)")
    print(split_summary(table, task.classes))
    train_t, val_t = table[table.split == "train"], table[table.split == "val"]
    if train_t.empty:
        raise SystemExit("error: the training split is empty")

    pre = PreprocessConfig.from_preset(preset, image_size=cfg.image_size, channels=cfg.channels,
                                       augment=cfg.augment, clahe_prob=cfg.clahe_prob)
    trainer_cls = get_trainer(cfg.trainer)
    lung = "lung_mask" in trainer_cls.needs
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
            raise ValueError(f"the training split ({len(train_t)} images) is smaller than one global batch of "
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
    if chief:
        table.to_csv(run_dir / "split.csv", index=False)

    with strategy.scope():
        net = create_model(cfg.model, num_classes=task.num_classes, image_size=pre.image_size,
                           channels=pre.channels, weights=cfg.weights, **cfg.model_kwargs)
        if cfg.sync_batchnorm:
            from covidx.training.distribute import synchronize_batchnorm

            synchronize_batchnorm(net)
        trainer = trainer_cls(net, **cfg.trainer_kwargs)
        if task.kind == "segmentation":
            from covidx.training.segmentation import DiceCoefficient, DiceCrossEntropyLoss, IoUScore

            loss, metrics = DiceCrossEntropyLoss(), [DiceCoefficient(), IoUScore()]
        else:
            loss = keras.losses.CategoricalCrossentropy()
            metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"), keras.metrics.AUC(name="auc", multi_label=True)]
        trainer.compile(optimizer=build_optimizer(cfg, steps), loss=loss, metrics=metrics)
        trainer(sample[0])  # build before BackupAndRestore restores weights
        trainer.sample_batch = sample

    config = {
        "model": cfg.model, "task": task.name, "classes": list(task.classes), "kind": task.kind,
        "preprocess": pre.to_dict(), "train": cfg.to_dict(), "trainer": cfg.trainer,
        "respect_source_split": respect, "class_weights": None if cw is None else [float(w) for w in cw],
        "parameters": int(net.count_params()), "paper": preset.paper,
        "versions": {"covidx": __import__("covidx").__version__, "tensorflow": tf.__version__, "keras": keras.__version__},
        "synthetic": not cfg.data,
        "replicas": strategy.num_replicas_in_sync,
    }
    if chief:
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    from covidx.training.callbacks import NetCheckpoint

    monitor = "val_loss" if val_ds is not None else "loss"
    callbacks = [
        WorkerBackupAndRestore(run_dir / "backup", out_dir / "backup", delete_checkpoint=False),
        NetCheckpoint(out_dir, monitor=monitor),
        keras.callbacks.CSVLogger(str(out_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(out_dir / "tensorboard"), write_graph=False, profile_batch=0),
    ]
    print(f"training {cfg.model} ({net.count_params():,} parameters) on {len(train_t)} images, "
          f"{cfg.epochs} epochs, run directory {run_dir}"
          + (f", {strategy.num_replicas_in_sync} replicas ({'chief' if chief else 'worker'})" if distributed else ""),
          flush=True)
    trainer.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=callbacks, verbose=cfg.verbose,
                shuffle=False, steps_per_epoch=steps if distributed else None,  # the dataset shuffles itself
                validation_steps=val_steps or None)
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m covidx.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help=f"registered model name (default {DEFAULT_MODEL})")
    ap.add_argument("--list-models", action="store_true", help="print every registered model and exit")
    ap.add_argument("--data", action="append", default=[], help="dataset folder or CSV (repeatable); default: synthetic")
    ap.add_argument("--layout", action="append", default=[], help="layout of each --data (detected when omitted)")
    ap.add_argument("--task", help="label scheme (default: the model's preset)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--channels", type=int, choices=(1, 3))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", choices=("sgd", "adam"))
    ap.add_argument("--lr", dest="learning_rate", type=float, help="initial (eta_max) learning rate")
    ap.add_argument("--min-lr", dest="min_learning_rate", type=float, help="eta_min of cosine annealing")
    ap.add_argument("--momentum", type=float)
    ap.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--schedule", choices=("cosine", "step", "constant"))
    ap.add_argument("--class-weights", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--weights", help="imagenet | PATH | none (ImageNet files are read from weights/, never downloaded)")
    ap.add_argument("--augment", help="augmentation preset (none, light, cascade, se-dpn, mag-sd)")
    ap.add_argument("--clahe-prob", type=float, help="probability of CLAHE per training image")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--respect-source-split", action=argparse.BooleanOptionalAction, default=None,
                    help="keep a source's own train/val/test split (default: when every source has one)")
    ap.add_argument("--lung-masks", metavar="LUNG_RUN",
                    help="a trained lung-unet run: predicts lung masks for images without one (Regional Learning)")
    ap.add_argument("--out", default="runs", help="runs are written to OUT/<model>/<timestamp>/")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last epoch")
    ap.add_argument("--run-name", help="write OUT/<model>/RUN_NAME (not a timestamp); continue it if it exists "
                                       "(the same command restarts a killed cluster job)")
    ap.add_argument("--strategy", default="default", choices=("default", "mirrored", "multiworker"))
    ap.add_argument("--mixed-precision", action="store_true", help="mixed_float16 policy")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip the full decode check of every file")
    ap.add_argument("--steps-per-epoch", type=int, help="cap on steps per epoch (quick runs)")
    ap.add_argument("--synthetic-patients", type=int, default=60, help="patients (all classes) of the synthetic default")
    ap.add_argument("--model-arg", dest="model_kwargs", action="append", default=[], metavar="KEY=VALUE",
                    help="builder argument, e.g. width=0.25, pooling=gap, scales=3, se_ratio=8 (repeatable)")
    ap.add_argument("--trainer", help="train step, overriding the preset's (standard, moex, regional, magsd)")
    ap.add_argument("--trainer-arg", dest="trainer_kwargs", action="append", default=[], metavar="KEY=VALUE",
                    help="trainer argument, e.g. augmentations=2, regularizer=l2 (repeatable)")
    ap.add_argument("--no-cache", dest="cache", action="store_false")
    ap.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                    help="batches in table order (reproducibility checks across strategies)")
    ap.add_argument("--sync-batchnorm", action="store_true",
                    help="batch normalisation over the global batch (all replicas) instead of each replica's")
    ap.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    return ap


def list_models_table(names=None) -> str:
    """One line per registered model: kind, task, input, parameter count (built at full size), description."""
    import keras

    from covidx.models import create_model, get_spec, list_models
    from covidx.tasks import get_task

    lines = [f"{'model':<22}{'kind':<12}{'task':<9}{'input':>10}{'parameters':>14}  description"]
    for name in names or list_models():
        spec = get_spec(name)
        p = spec.preset
        try:
            n = f"{create_model(name).count_params():,}"
        except Exception as e:  # a model that cannot be built is listed with the reason
            n = f"({type(e).__name__})"
        keras.backend.clear_session()
        lines.append(f"{name:<22}{spec.kind:<12}{p.task:<9}{f'{p.image_size}x{p.channels}':>10}{n:>14}  {spec.description}"
                     f" [{get_task(p.task).num_classes} classes]")
    return "\n".join(lines)


def parse_key_values(items) -> dict:
    """``["width=0.25", "pooling=gap", "augmentations=[\"mixup\"]"]`` -> dict (values parsed as JSON when they are)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_models:
        print(list_models_table())
        return 0
    from covidx.data.sources import DatasetError
    from covidx.weights import WeightsNotFoundError

    given = {k: v for k, v in vars(args).items() if k not in ("list_models", "resume")}
    try:
        given["model_kwargs"] = parse_key_values(args.model_kwargs)
        given["trainer_kwargs"] = parse_key_values(args.trainer_kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    no_args = argv is not None and len(argv) == 0 or argv is None and len(sys.argv) == 1
    if given["model"] is None:
        given["model"] = DEFAULT_MODEL
    if no_args:
        given.update(DEFAULT_RUN)
    cfg = TrainConfig(**given)
    try:
        run_dir = train(cfg, resume=args.resume)
    except (DatasetError, WeightsNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nrun finished: {run_dir.resolve()}\n  checkpoints: best.keras, last.keras\n  config: config.json  split: "
          f"split.csv  log: history.csv  tensorboard: tensorboard/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
