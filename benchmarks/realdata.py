"""Real radiographs under a fixed CPU budget: each family's ``--recipe quick`` (and ``paper`` beside it).

Classifiers train on a Kermany-layout training folder (bacterial / normal / viral: the cascade's
stage-1 task) with a patient-grouped, label-stratified validation split carved from it (no test
split: the official Kermany test set is kept for the project's evaluation). The lung U-Net trains
on an image/mask-pairs folder (``images/`` + ``masks/``). Each run stops when its budget of
**process CPU seconds** is spent (both cores count: "20 min of 2-core CPU" = 2400 s), so runs
on a shared machine compare fairly; wall time is printed beside it and grows with other
people's load.

Printed per model: validation macro AUC with its patient-bootstrap 95 % interval (Dice for the
U-Net), CPU seconds, wall seconds, training images per wall second, epochs done, and the same
for the paper recipe after the same budget (``--paper``).

Usage::

    python benchmarks/realdata.py --kermany DIR --lungs DIR [--budget-min 20] [--unet-budget-min 15]
        [--models baseline-resnet50,seme-resnet50,...] [--paper] [--epochs N]
        [--model-arg NAME:KEY=VALUE ...] [--image-size N] [--batch-size N] [--precision P] [--out DIR]

``--epochs`` shortens the quick recipe so its warm-up + cosine schedule ends inside the budget
(a budget that cuts a schedule at its peak learning rate wastes the last epochs). ``--model-arg``
reduces a model where the CPU demands it (e.g. ``se-dpn92:width=0.5``); every such change is
printed next to the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidx.train import TrainConfig, parse_key_values, train  # noqa: E402

CLASSIFIERS = ("baseline-resnet50", "seme-resnet50", "se-dpn92", "mag-sd", "ensemble")


def run_one(model: str, data: str, task: str, recipe: str, budget_s: float, out: Path, epochs: int | None,
            image_size: int | None, model_kwargs: dict, seed: int, steps_per_epoch: int | None = None,
            precision: str | None = None, batch_size: int | None = None) -> dict:
    cfg = TrainConfig(
        model=model, data=[data], task=task, recipe=recipe, epochs=epochs, image_size=image_size,
        val_fraction=0.15, test_fraction=0.0, respect_source_split=False, seed=seed, out=str(out),
        time_budget=budget_s, budget_clock="cpu", model_kwargs=model_kwargs, verbose=2, verify=False,
        report_splits=["val"], steps_per_epoch=steps_per_epoch, precision=precision, batch_size=batch_size,
    )
    t0 = time.perf_counter()
    run_dir = train(cfg)
    total_wall = time.perf_counter() - t0
    budget = json.loads((run_dir / "budget.json").read_text())
    ends = json.loads((run_dir / "end_of_run.json").read_text())
    val = ends[0] if ends else {}
    epochs_done = sum(1 for _ in open(run_dir / "history.csv")) - 1
    saved = json.loads((run_dir / "config.json").read_text())
    return dict(model=model, recipe=recipe, run=str(run_dir), budget=budget, val=val, total_wall_s=total_wall,
                precision=saved["train"]["precision"], batch_size=saved["train"]["batch_size"],
                epochs_done=epochs_done, image_size=saved["preprocess"]["image_size"], model_kwargs=model_kwargs,
                parameters=saved["parameters"])


def fmt(r: dict) -> str:
    v, b = r["val"], r["budget"]
    if v.get("kind") == "segmentation":
        fig = f"val Dice {v['dice']:.3f} (all-lung {v['trivial_dice']:.3f})"
    elif v:
        ci = v.get("ci") or [None, None]
        fig = (f"val macro AUC {v['macro_auc']:.3f} [{ci[0]:.3f}-{ci[1]:.3f}] acc {v['accuracy']:.3f}"
               if v.get("macro_auc") is not None and ci[0] is not None else f"val {v.get('line')}")
    else:
        fig = "no validation figure"
    reduced = f" reduced: {r['model_kwargs']}" if r["model_kwargs"] else ""
    return (f"{r['model']:<20} {r['recipe']:<6} {r['image_size']:>4}px b{r.get('batch_size')} {r.get('precision')} "
            f"{fig:<52} cpu {b['cpu_s']:6.0f}s "
            f"wall {b['wall_s']:6.0f}s (+{r['total_wall_s'] - b['wall_s']:.0f}s setup/eval) "
            f"{b['images_per_wall_s']:5.1f} img/s  {r['epochs_done']} ep{' (budget hit)' if b['exhausted'] else ''}"
            f"{reduced}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kermany", help="Kermany-layout folder (chest_xray/train/...)")
    ap.add_argument("--lungs", help="image/mask pairs folder for the lung U-Net")
    ap.add_argument("--models", default=",".join(CLASSIFIERS))
    ap.add_argument("--budget-min", type=float, default=20.0, help="2-core CPU minutes per classifier")
    ap.add_argument("--unet-budget-min", type=float, default=15.0, help="2-core CPU minutes for the U-Net")
    ap.add_argument("--cores", type=int, default=2, help="a budget of M minutes is M * 60 * cores CPU seconds")
    ap.add_argument("--paper", action="store_true", help="also run the paper recipe with the same budget")
    ap.add_argument("--epochs", type=int, help="override the quick recipe's epochs (fit the schedule to the budget)")
    ap.add_argument("--unet-epochs", type=int)
    ap.add_argument("--steps-per-epoch", type=int, help="short epochs (classifiers): the schedule and validation "
                                                         "fit a small budget; validation then uses that many batches")
    ap.add_argument("--image-size", type=int, help="override the recipes' input size")
    ap.add_argument("--batch-size", type=int, help="override the quick recipe's batch size (classifiers)")
    ap.add_argument("--precision", help="fp32 | bf16 | fp16 | auto for every run (default: the run's own, fp32)")
    ap.add_argument("--unet-image-size", type=int)
    ap.add_argument("--model-arg", action="append", default=[], metavar="MODEL:KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs-realdata")
    args = ap.parse_args(argv)

    kwargs: dict[str, dict] = {}
    for item in args.model_arg:
        name, _, kv = item.partition(":")
        kwargs.setdefault(name, {}).update(parse_key_values([kv]))
    out = Path(args.out)
    results = []
    jobs = []
    if args.kermany:
        for m in [m for m in args.models.split(",") if m]:
            jobs.append((m, args.kermany, "stage1", args.budget_min, args.epochs, args.image_size))
    if args.lungs:
        jobs.append(("lung-unet", args.lungs, "lungs", args.unet_budget_min, args.unet_epochs, args.unet_image_size))
    for model, data, task, minutes, epochs, size in jobs:
        for recipe in ("quick", "paper") if args.paper else ("quick",):
            r = run_one(model, data, task, recipe, minutes * 60 * args.cores, out,
                        epochs if recipe == "quick" else None, size if recipe == "quick" else None,
                        kwargs.get(model, {}), args.seed, args.steps_per_epoch if task != "lungs" else None,
                        args.precision, args.batch_size if recipe == "quick" and task != "lungs" else None)
            results.append(r)
            print("RESULT " + fmt(r), flush=True)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
    print(f"\nbudget: {args.budget_min} (U-Net {args.unet_budget_min}) min of {args.cores}-core CPU per run; "
          f"load average now {os.getloadavg()[0]:.1f}")
    for r in results:
        print(fmt(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
