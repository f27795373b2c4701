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
for the paper recipe after the same budget (``--paper``). Every result records the machine: CPU
model, cores, bfloat16 units, and an fp32 and a bf16 matmul measured before the runs, so a table
says what compute its budget bought (``--table`` prints it above the rows).

Usage::

    python benchmarks/realdata.py --kermany DIR --lungs DIR [--budget-min 20] [--unet-budget-min 15]
        [--models baseline-resnet50,seme-resnet50,...] [--paper] [--epochs N]
        [--model-arg NAME:KEY=VALUE ...] [--image-size N] [--batch-size N] [--precision P] [--augment A]
        [--out DIR]
    python benchmarks/realdata.py --table DIR/results.jsonl [...]   # README's table from earlier runs

``--regional`` measures Regional Learning on real radiographs (Cascade-SEMEnet §4.D): the lung U-Net
(``--lung-masks RUN``, or the one this command trains on ``--lungs``) predicts a lung mask for every
Kermany image; SEME-DenseNet169 (the cascade's stage-2 model) then trains on the stage-1 task twice
with the same data, masks, recipe and budget: with eq. 6 (``--trainer regional``: the loss on the full
image and on its lung region ``X_T = X_O · M``) and without it (``--trainer moex``: full images only).
Kermany has no COVID-19, so the stage-2 question itself cannot be asked of it. Each run is then
explained on its validation images and the shortcut audit prints, per class, the median share of
Grad-CAM energy inside the predicted lungs and its enrichment over the lung-area fraction
(:mod:`covidx.explain.audit`), on full images and, for the eq.-6 run, on its deployed input ``X_T``.

``--epochs`` shortens the quick recipe so its warm-up + cosine schedule ends inside the budget
(a budget that cuts a schedule at its peak learning rate wastes the last epochs). ``--model-arg``
reduces a model where the CPU demands it (e.g. ``se-dpn92:width=0.5``); ``--augment`` replaces the quick
recipe's augmentation preset (e.g. ``none``, to measure what it buys); every such change is printed next to
the result.
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

import numpy as np  # noqa: E402
import cv2  # noqa: E402
import tensorflow as tf  # noqa: E402

from covidx.evaluation.metrics import classification_metrics  # noqa: E402
from covidx.explain.runs import run_audit  # noqa: E402
from covidx.precision import cpu_flags, cpu_model  # noqa: E402
from covidx.runs import load_run, predict_table  # noqa: E402
from covidx.train import TrainConfig, parse_key_values, train  # noqa: E402
from covidx.training.callbacks import kept_checkpoint  # noqa: E402
from covidx.training.report import split_figures  # noqa: E402

CLASSIFIERS = ("baseline-resnet50", "seme-resnet50", "se-dpn92", "mag-sd", "ensemble")


def machine() -> dict:
    """What the budget bought: the CPU, its cores and bfloat16 units, and the fp32 and bf16 4096x4096 matmul
    GFLOP/s measured now in TensorFlow. The budget is CPU seconds, so a figure is only comparable with the
    compute those seconds bought; the matmul rates say it in numbers (a budget on one CPU is worth another's
    by their ratio), the model name alone does not (cloud CPUs hide theirs)."""
    gflops = {}
    for name, dtype in (("fp32", tf.float32), ("bf16", tf.bfloat16)):
        a = tf.cast(tf.random.stateless_normal((4096, 4096), seed=(0, 0)), dtype)
        matmul = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, a), tf.float32)))
        matmul().numpy()  # trace and warm up
        t0 = time.perf_counter()
        for _ in range(3):
            matmul().numpy()
        gflops[name] = round(3 * 2 * 4096 ** 3 / (time.perf_counter() - t0) / 1e9)
    units = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return dict(cpu=cpu_model(), cores=os.cpu_count(), units=units, matmul_gflops=gflops)


def machine_line(m: dict | None) -> str:
    if not m:
        return "machine not recorded"
    g = m["matmul_gflops"]
    return (f"{m['cpu']}, {m['cores']} cores ({', '.join(m['units']) or 'no AVX-512'}); TF 4096x4096 matmul "
            f"{g['fp32']:,} GFLOP/s fp32, {g['bf16']:,} bf16")


def run_one(model: str, data: str, task: str, recipe: str, budget_s: float, out: Path, epochs: int | None,
            image_size: int | None, model_kwargs: dict, seed: int, steps_per_epoch: int | None = None,
            precision: str | None = None, batch_size: int | None = None, trainer: str | None = None,
            lung_masks: str | None = None, augment: str | None = None) -> dict:
    cfg = TrainConfig(
        model=model, data=[data], task=task, recipe=recipe, epochs=epochs, image_size=image_size,
        val_fraction=0.15, test_fraction=0.0, respect_source_split=False, seed=seed, out=str(out),
        time_budget=budget_s, budget_clock="cpu", model_kwargs=model_kwargs, verbose=2, verify=False,
        report_splits=["val"], steps_per_epoch=steps_per_epoch, precision=precision, batch_size=batch_size,
        trainer=trainer, lung_masks=lung_masks, augment=augment,
    )
    t0 = time.perf_counter()
    run_dir = train(cfg)
    total_wall = time.perf_counter() - t0
    budget = json.loads((run_dir / "budget.json").read_text())
    ends = json.loads((run_dir / "end_of_run.json").read_text())
    val = ends[0] if ends else {}
    epochs_done = sum(1 for _ in open(run_dir / "history.csv")) - 1
    saved = json.loads((run_dir / "config.json").read_text())
    # best.keras is the epoch with the best validation figure: the last epoch's, beside it, shows what that
    # choice (made on the same validation images) adds.
    kept = kept_checkpoint(run_dir)
    last = val if kept["epoch"] == epochs_done else split_figures(run_dir / "last.keras", "val", seed)
    return dict(model=model, recipe=recipe, run=str(run_dir), budget=budget, val=val, total_wall_s=total_wall,
                kept=kept, val_last=last,
                precision=saved["train"]["precision"], batch_size=saved["train"]["batch_size"],
                epochs_done=epochs_done, image_size=saved["preprocess"]["image_size"], model_kwargs=model_kwargs,
                parameters=saved["parameters"], trainer=saved["trainer"], augment=augment)  # the override, if any


def audit_one(r: dict, inputs: tuple[str, ...]) -> dict:
    """The shortcut audit of run ``r`` on its validation images, for each audit input."""
    run = load_run(r["run"])
    table = run.split_table()
    table = table[table["split"] == "val"].reset_index(drop=True)
    fractions = np.array([(cv2.imread(m, cv2.IMREAD_GRAYSCALE) > 127).mean() for m in table["mask_path"]])
    out = {"lung_fraction": dict(median=float(np.median(fractions)), p05=float(np.percentile(fractions, 5)),
                                 p95=float(np.percentile(fractions, 95)), empty=int((fractions == 0).sum()))}
    if run.regional:  # its validation figure is on X_T (its cascade input); the full image too, to compare
        probs, _ = predict_table(run, table, lung_region=False)
        m = classification_metrics(table["label_index"].to_numpy().astype(int), probs, run.class_names,
                                   patient_ids=list(table["patient_id"]), positive_class=None)
        out["full_image_macro_auc"], out["full_image_ci"] = m["macro"]["auc"], m["ci"].get("macro_auc")
    for audit_input in inputs:
        res = run_audit(run, table, Path(r["run"]) / f"audit-{audit_input}", audit_input=audit_input)
        out[audit_input] = {c: (v["median_share"], v["median_enrichment"]) for c, v in res["per_class"].items()
                            if v["n"]}
    return out


def fmt_audit(r: dict) -> str:
    a = r["audit"]
    f = a["lung_fraction"]
    lines = [f"  lung-area fraction of the predicted masks: median {f['median']:.2f} (5-95 %: {f['p05']:.2f}-"
             f"{f['p95']:.2f}), {f['empty']} empty"]
    if "full_image_macro_auc" in a:
        lo, hi = a["full_image_ci"]
        lines.append(f"  validation macro AUC on full images (not X_T): {a['full_image_macro_auc']:.3f} [{lo:.3f}-{hi:.3f}]")
    for key in ("full", "lung-region"):
        if key in a:
            lines.append(f"  audit on {key} images, median share inside lungs (enrichment): " + ", ".join(
                f"{c} {s:.2f} ({e:.2f}x)" for c, (s, e) in a[key].items()))
    return "\n".join(lines)


def kept_text(r: dict) -> str:
    """Which epoch best.keras is and, when it is not the last, the last epoch's validation figure."""
    kept, last = r.get("kept"), r.get("val_last")
    if not kept:  # results recorded before runs kept their best validation figure
        return ""
    if kept["epoch"] == r["epochs_done"]:
        return f" (epoch {kept['epoch']}, the last)"
    figure = last.get("dice") if last.get("kind") == "segmentation" else last.get("macro_auc")
    return f" (epoch {kept['epoch']}; last epoch {figure:.3f})"


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
    fig += kept_text(r)
    reduced = f" reduced: {r['model_kwargs']}" if r["model_kwargs"] else ""
    trainer = f" trainer {r['trainer']}" if r.get("trainer") else ""
    trainer += f" augment {r['augment']}" if r.get("augment") else ""
    return (f"{r['model']:<20} {r['recipe']:<6}{trainer} {r['image_size']:>4}px b{r.get('batch_size')} "
            f"{r.get('precision')} {fig:<52} cpu {b['cpu_s']:6.0f}s "
            f"wall {b['wall_s']:6.0f}s (+{r['total_wall_s'] - b['wall_s']:.0f}s setup/eval) "
            f"{b['images_per_wall_s']:5.1f} img/s  {r['epochs_done']} ep{' (budget hit)' if b['exhausted'] else ''}"
            f"{reduced}" + ("\n" + fmt_audit(r) if r.get("audit") else ""))


def markdown(results: list[dict]) -> str:
    """The rows as README's table (``--table`` renders it from results.jsonl files of earlier runs), below the
    machine(s) they ran on."""
    machines = list(dict.fromkeys(machine_line(r.get("machine")) for r in results))
    lines = [f"Measured on: {'; '.join(machines)}.", ""]
    lines += ["| model | recipe (trainer) | size, batch, precision | validation figure [patient-bootstrap 95 % CI] "
             "| CPU s | wall s | img/s | epochs |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        v, b = r["val"], r["budget"]
        if v.get("kind") == "segmentation":
            fig = f"Dice **{v['dice']:.3f}** (all-lung {v['trivial_dice']:.3f})"
        elif v.get("macro_auc") is not None:
            ci = v.get("ci") or [float("nan")] * 2
            fig = f"macro AUC **{v['macro_auc']:.3f}** [{ci[0]:.3f}-{ci[1]:.3f}], accuracy {v['accuracy']:.3f}"
            if "(lung region)" in v.get("line", ""):
                fig += " on the lung region X_T"
            if r.get("audit", {}).get("full_image_macro_auc") is not None:
                lo, hi = r["audit"]["full_image_ci"]
                fig += f"; on full images {r['audit']['full_image_macro_auc']:.3f} [{lo:.3f}-{hi:.3f}]"
        else:
            fig = "none"
        fig += kept_text(r)
        recipe = r["recipe"] + (f" ({r['trainer']})" if r.get("trainer") and r["trainer"] != "standard" else "")
        recipe += f", augment {r['augment']}" if r.get("augment") else ""
        reduced = f", {r['model_kwargs']}" if r.get("model_kwargs") else ""
        size = f"{r['image_size']} px, {r.get('batch_size') or '—'}, {r.get('precision') or 'fp32'}"
        lines.append(f"| {r['model']}{reduced} | {recipe} | {size} | {fig} | {b['cpu_s']:,.0f} | {b['wall_s']:,.0f} "
                     f"| {b['images_per_wall_s']:.1f} | {r['epochs_done']}{' (budget hit)' if b['exhausted'] else ''} |")
    audited = [r for r in results if r.get("audit")]
    if audited:
        lines += ["", "| run (trainer) | audited input | median share of Grad-CAM inside the lungs (enrichment over "
                      "the lung-area fraction) per class |", "|---|---|---|"]
        for r in audited:
            for key in ("full", "lung-region"):
                if key in r["audit"]:
                    lines.append(f"| {r['model']} ({r['trainer']}) | {key} | " + ", ".join(
                        f"{c} {share:.2f} ({rich:.2f}x)" for c, (share, rich) in r["audit"][key].items()) + " |")
    return "\n".join(lines)


def record(out: Path, r: dict) -> None:
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kermany", help="Kermany-layout folder (chest_xray/train/...)")
    ap.add_argument("--lungs", help="image/mask pairs folder for the lung U-Net")
    ap.add_argument("--models", default=",".join(CLASSIFIERS))
    ap.add_argument("--budget-min", type=float, default=20.0, help="2-core CPU minutes per classifier")
    ap.add_argument("--unet-budget-min", type=float, default=15.0, help="2-core CPU minutes for the U-Net")
    ap.add_argument("--cores", type=int, default=2, help="a budget of M minutes is M * 60 * cores CPU seconds")
    ap.add_argument("--paper", action="store_true", help="also run the paper recipe with the same budget")
    ap.add_argument("--recipes", help="comma-separated recipes to run (default: quick, or quick,paper with --paper)")
    ap.add_argument("--epochs", type=int, help="override the quick recipe's epochs (fit the schedule to the budget)")
    ap.add_argument("--unet-epochs", type=int)
    ap.add_argument("--steps-per-epoch", type=int, help="short epochs (classifiers): the schedule and validation "
                                                         "fit a small budget; validation then uses that many batches")
    ap.add_argument("--image-size", type=int, help="override the recipes' input size")
    ap.add_argument("--batch-size", type=int, help="override the quick recipe's batch size (classifiers)")
    ap.add_argument("--precision",
                    help="fp32 | bf16 | fp16 | auto for every run (default: each recipe's own: quick auto, paper fp32)")
    ap.add_argument("--unet-image-size", type=int)
    ap.add_argument("--model-arg", action="append", default=[], metavar="MODEL:KEY=VALUE")
    ap.add_argument("--trainer", help="override the recipes' train step for --models (e.g. moex for "
                                      "seme-densenet169, whose regional step needs lung masks)")
    ap.add_argument("--augment", help="override the quick recipe's augmentation preset for --models (none, light, ...)")
    ap.add_argument("--regional", action="store_true",
                    help="Regional Learning on --kermany: SEME-DenseNet169 with and without eq. 6, audited")
    ap.add_argument("--lung-masks", metavar="LUNG_RUN",
                    help="lung U-Net run for --regional (default: the one trained here on --lungs)")
    ap.add_argument("--regional-budget-min", type=float, help="2-core CPU minutes per --regional run "
                                                                "(default --budget-min)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs-realdata")
    ap.add_argument("--table", nargs="+", metavar="RESULTS_JSONL",
                    help="print the markdown table of earlier runs' results.jsonl files and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown([json.loads(line) for f in args.table for line in Path(f).read_text().splitlines() if line]))
        return 0

    kwargs: dict[str, dict] = {}
    for item in args.model_arg:
        name, _, kv = item.partition(":")
        kwargs.setdefault(name, {}).update(parse_key_values([kv]))
    out = Path(args.out)
    recipes = args.recipes.split(",") if args.recipes else ["quick", "paper"] if args.paper else ["quick"]
    results = []
    jobs = []
    measured_on = machine()
    print(f"machine: {machine_line(measured_on)}", flush=True)
    if args.kermany:
        for m in [m for m in args.models.split(",") if m]:
            jobs.append((m, args.kermany, "stage1", args.budget_min, args.epochs, args.image_size))
    if args.regional and not (args.kermany and (args.lung_masks or args.lungs)):
        ap.error("--regional needs --kermany and a lung U-Net: --lung-masks RUN or --lungs DIR to train one")
    if args.lungs:
        jobs.append(("lung-unet", args.lungs, "lungs", args.unet_budget_min, args.unet_epochs, args.unet_image_size))
    for model, data, task, minutes, epochs, size in jobs:
        for recipe in recipes:
            r = run_one(model, data, task, recipe, minutes * 60 * args.cores, out,
                        epochs if recipe == "quick" else None, size if recipe == "quick" else None,
                        kwargs.get(model, {}), args.seed, args.steps_per_epoch if task != "lungs" else None,
                        args.precision, args.batch_size if recipe == "quick" and task != "lungs" else None,
                        args.trainer if task != "lungs" else None,
                        augment=args.augment if recipe == "quick" and task != "lungs" else None)
            r["machine"] = measured_on
            results.append(r)
            print("RESULT " + fmt(r), flush=True)
            record(out, r)
    if args.regional:
        lung_run = args.lung_masks or next(r["run"] for r in results if r["model"] == "lung-unet")
        minutes = args.regional_budget_min or args.budget_min
        for trainer in ("regional", "moex"):  # with eq. 6, and without it (same MoEx step, full images only)
            r = run_one("seme-densenet169", args.kermany, "stage1", "quick", minutes * 60 * args.cores, out,
                        args.epochs, args.image_size, kwargs.get("seme-densenet169", {}), args.seed,
                        args.steps_per_epoch, args.precision, args.batch_size, trainer=trainer,
                        lung_masks=str(Path(lung_run).resolve()))
            r["audit"] = audit_one(r, ("full", "lung-region") if trainer == "regional" else ("full",))
            r["machine"] = measured_on
            results.append(r)
            print("RESULT " + fmt(r), flush=True)
            record(out, r)
    print(f"\nbudget: {args.budget_min} (U-Net {args.unet_budget_min}) min of {args.cores}-core CPU per run; "
          f"load average now {os.getloadavg()[0]:.1f}")
    for r in results:
        print(fmt(r))
    print("\n" + markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
