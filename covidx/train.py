"""``python -m covidx.train``: train any registered model on a dataset (synthetic by default).

With no arguments it generates the embedded SYNTHETIC chest X-ray set (procedural
images, not patients), trains the default baseline for a few epochs on the CPU
and prints where the run went. A model's preset (``--list-models``) supplies the
paper's settings; every flag overrides one. ``--resume RUN_DIR`` continues a
killed run from its last epoch (weights, optimizer state, schedule position).

The same is available from Python: :func:`covidx.training.engine.train` takes a
:class:`~covidx.training.engine.TrainConfig` (both re-exported here).
"""

from __future__ import annotations

import argparse
import json
import sys

from covidx.data.io import DEFAULT_MAX_PIXELS, set_max_pixels
from covidx.data.prepare import add_split_arguments
from covidx.data.sources import DatasetError
from covidx.models import get_spec, list_models
from covidx.models.parameters import PARAMETERS
from covidx.precision import PRECISIONS
from covidx.tasks import get_task
from covidx.training.callbacks import kept_checkpoint
from covidx.training.engine import DEFAULT_MODEL, DEFAULT_RUN, TrainConfig, TrainingError, train
from covidx.training.report import END_OF_RUN
from covidx.weights import WeightsNotFoundError

__all__ = ["TrainConfig", "main", "train"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m covidx.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help=f"registered model name (default {DEFAULT_MODEL})")
    ap.add_argument("--list-models", action="store_true", help="print every registered model and exit")
    ap.add_argument("--recipe", default="paper", choices=("paper", "quick"),
                    help="paper: the model's preset (the paper's setting); quick: learns in CPU minutes "
                         "(covidx.models.recipes; README 'Recipes'). Flags override either")
    ap.add_argument("--data", action="append", default=[], help="dataset folder or CSV (repeatable); default: synthetic")
    ap.add_argument("--layout", action="append", default=[], help="layout of each --data (detected when omitted)")
    ap.add_argument("--task", help="label scheme (default: the model's preset)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--channels", type=int, choices=(1, 3))
    ap.add_argument("--optimizer", choices=("sgd", "adam"))
    ap.add_argument("--lr", dest="learning_rate", type=float, help="initial (eta_max) learning rate")
    ap.add_argument("--min-lr", dest="min_learning_rate", type=float, help="eta_min of cosine annealing")
    ap.add_argument("--warmup-epochs", type=float, help="linear learning-rate warm-up (epochs) before the schedule")
    ap.add_argument("--lr-scale", dest="lr_scales", action="append", metavar="LAYER=FACTOR",
                    help="train layer LAYER at FACTOR x the learning rate; LAYER may be a pattern, 'vgg19_*' "
                         "(repeatable; replaces the recipe's, e.g. --lr-scale predictions=1 undoes MAG-SD's quick one)")
    ap.add_argument("--momentum", type=float)
    ap.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--schedule", choices=("cosine", "step", "constant"))
    ap.add_argument("--class-weights", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--weights", help="imagenet | PATH | none (ImageNet files are read from weights/, never downloaded)")
    ap.add_argument("--augment", help="augmentation preset (none, light, cascade, se-dpn, mag-sd)")
    ap.add_argument("--clahe-prob", type=float, help="probability of CLAHE per training image")
    ap.add_argument("--split", metavar="FILE",
                    help="train on this split file (python -m covidx.data --write-split) instead of splitting --data")
    ap.add_argument("--lung-masks", metavar="LUNG_RUN",
                    help="a trained lung-unet run: predicts lung masks for images without one (Regional Learning)")
    ap.add_argument("--out", default="runs", help="runs are written to OUT/<model>/<timestamp>/")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last epoch")
    ap.add_argument("--run-name", help="write OUT/<model>/RUN_NAME (not a timestamp); continue it if it exists "
                                       "(the same command restarts a killed cluster job)")
    ap.add_argument("--strategy", default="default", choices=("default", "mirrored", "multiworker"))
    ap.add_argument("--mixed-precision", action="store_true", help="mixed_float16 policy (the same as --precision fp16)")
    ap.add_argument("--precision", choices=PRECISIONS,
                    help="fp32, bf16, fp16, or auto: bf16 on CPUs with bfloat16 units, fp16 on GPUs with tensor "
                         "cores, else fp32 (softmax, losses and BN statistics stay float32); default: the recipe's "
                         "(paper fp32, quick auto)")
    ap.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=None,
                    help="XLA-compile the train step (default: on with a GPU, off on CPUs, where it is slower)")
    ap.add_argument("--fused-batchnorm", action=argparse.BooleanOptionalAction, default=True,
                    help="batch normalisation as one fused kernel forward and backward (default on; off: Keras' "
                         "element-wise BN, the same results within float rounding)")
    ap.add_argument("--matmul-weight-grads", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 convolutions' kernel gradients as one im2col matmul where oneDNN's kernel is slow "
                         "(default on; off: TensorFlow's, the same values within float rounding)")
    ap.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=True,
                    help="each variable's Adam/SGD update as one TensorFlow kernel (default on; off: Keras' "
                         "element-wise updates, the same values within float rounding)")
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
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help=f"refuse larger images, read from the header (default {DEFAULT_MAX_PIXELS:,})")
    add_split_arguments(ap)  # --seed, fractions, --respect-source-split, --views, patients, duplicates
    return ap


def list_models_table(names=None) -> str:
    """One line per registered model: kind, task, input, parameter count at full size (from
    :data:`covidx.models.parameters.PARAMETERS`, checked against built models by a test: nothing is built
    here, so the table prints at once), description. Columns are as wide as their longest entry."""
    rows = []
    for name in names or list_models():
        spec, count = get_spec(name), PARAMETERS.get(name)
        p = spec.preset
        rows.append((name, spec.kind, p.task, f"{p.image_size}x{p.channels}",
                     f"{count:,}" if count is not None else "?",
                     f"{spec.description} [{get_task(p.task).num_classes} classes]"))
    header = ("model", "kind", "task", "input", "parameters", "description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]

    def line(r):
        return (f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}  "
                f"{r[4]:>{widths[4]}}  {r[5]}")

    return "\n".join(line(r) for r in [header, *rows])


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


def parse_lr_scales(items) -> dict:
    """``["predictions=0.01"]`` -> ``{"predictions": 0.01}``; a factor must be a positive number."""
    scales = parse_key_values(items)
    bad = [f"{k}={v}" for k, v in scales.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]
    if bad:
        raise ValueError(f"--lr-scale takes LAYER=FACTOR with a positive number, got {', '.join(bad)}")
    return {k: float(v) for k, v in scales.items()}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_models:
        print(list_models_table())
        return 0
    set_max_pixels(args.max_pixels)
    given = {k: v for k, v in vars(args).items() if k not in ("list_models", "resume", "max_pixels")}
    try:
        given["model_kwargs"] = parse_key_values(args.model_kwargs)
        given["trainer_kwargs"] = parse_key_values(args.trainer_kwargs)
        if args.lr_scales is not None:
            given["lr_scales"] = parse_lr_scales(args.lr_scales)
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
    except (DatasetError, TrainingError, WeightsNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = kept_checkpoint(run_dir)
    kept = f" (epoch {best['epoch']}: {best['monitor']} {best['value']:.4g})" if best else ""
    print(f"\nrun finished: {run_dir.resolve()}\n  checkpoints: best.keras{kept}, last.keras\n  config: config.json  split: "
          f"split.csv  log: history.csv  curves: curves.png  tensorboard: tensorboard/")
    ends = json.loads((run_dir / END_OF_RUN).read_text()) if (run_dir / END_OF_RUN).is_file() else []
    for f in ends:
        if f["split"] == "test":  # the default run: its own held-out figures, with the run folder above
            print(f"  held-out test split{' (SYNTHETIC)' if not cfg.data else ''}: " + f["line"].split(": ", 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
