"""``python -m covidx.evaluate --checkpoint RUN_OR_FILE [--checkpoint ...] [--data PATH --layout L --split S]``.

Without ``--data`` each run is evaluated on the test split it held out (``split.csv``
in its run directory). Classifiers get the papers' report (``metrics.json``,
``metrics.md``, ``metrics.csv``, ``roc.png``, ``confusion.png``, ``calibration.png``);
segmenters a Dice/IoU report. With several checkpoints, every pair is compared
(F-test, McNemar, DeLong) on the cases they share, with overlaid ROC curves.
``--audit`` adds the shortcut audit: the share of Grad-CAM energy inside the lung
mask, per image and per class, flagged when a class's median share is not above its
chance level (the lung-area fraction); see :mod:`covidx.explain.audit`.
Every figure is also reported per source and per (source, class). ``--confounding``
(on by default when the evaluated images come from more than one source) audits
source confounding (:mod:`covidx.evaluation.confounding`): per class, how well the
source alone predicts it and the model's specificity within each source, with the
flags written in words (``confounding.md``). A run trained with ``--test-source`` is
reported as an external validation on its held-out source.

Every classifier evaluation also writes ``report.html`` (one self-contained page: run,
data, metrics with CIs and per source, figures, a Grad-CAM gallery, the audit; with
several checkpoints one page holds them all and their comparison; see
:mod:`covidx.evaluation.html`) and rewrites the run's ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from covidx.data.io import DEFAULT_MAX_PIXELS, set_max_pixels
from covidx.data.sources import DatasetError
from covidx.data.synthetic import is_synthetic
from covidx.explain.runs import AUDIT_INPUTS, run_audit
from covidx.model_card import write_model_card
from covidx.precision import PRECISIONS
from covidx.reports import compare, evaluate_run, evaluation_table, report_section, validation_of, write_report
from covidx.runs import load_run, lung_region_input


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m covidx.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", action="append", required=True, help="run directory or .keras (repeatable)")
    ap.add_argument("--data", action="append", help="evaluate on this dataset instead of the held-out split")
    ap.add_argument("--layout", action="append", help="layout of each --data")
    ap.add_argument("--split", default="test", help="which split to evaluate (default test)")
    ap.add_argument("--out", help="output folder (default: RUN/eval, or evaluation-<time> for several runs)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    ap.add_argument("--audit", action="store_true", help="shortcut audit: Grad-CAM energy inside the lung masks")
    ap.add_argument("--audit-min-enrichment", type=float, default=1.5,
                    help="flag classes whose median (share inside lungs / lung-area fraction) is below this")
    ap.add_argument("--audit-input", default="auto", choices=AUDIT_INPUTS,
                    help="explain full images or their lung region (auto: the lung region for Regional-Learning runs)")
    ap.add_argument("--confounding", action=argparse.BooleanOptionalAction, default=None,
                    help="source-confounding audit (default: on when the images come from more than one source)")
    ap.add_argument("--gallery", type=int, default=2, metavar="N",
                    help="report.html: Grad-CAM of the N most confident correct and wrong cases per class (0: none)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", choices=PRECISIONS, help="compute in fp32, bf16, fp16 or auto (bf16 on CPUs with bfloat16 units); default: as trained")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help=f"refuse larger images, read from the header (default {DEFAULT_MAX_PIXELS:,})")
    args = ap.parse_args(argv)
    set_max_pixels(args.max_pixels)

    several = len(args.checkpoint) > 1
    out_root = Path(args.out) if args.out else None
    if out_root is None and several:
        out_root = Path(f"evaluation-{time.strftime('%Y%m%d-%H%M%S')}")
    results, summaries, sections = {}, {}, {}
    try:
        for ckpt in args.checkpoint:
            run = load_run(ckpt, precision=args.precision, inference=True)
            table = evaluation_table(run, args.data, args.layout, args.split)
            name = run.name
            key = name if name not in results else f"{name}-{len(results)}"
            out = (out_root / key) if several else (out_root or (run.directory or Path(ckpt).parent) / "eval")
            validation = validation_of(run, args.data, args.split)
            start = time.perf_counter()
            m, probs = evaluate_run(run, table, out, args.bootstrap, args.batch_size, confounding=args.confounding,
                                    validation=validation, return_probs=True)
            summaries[key] = m
            evaluated_on = (f"{', '.join(Path(d).name for d in args.data)} ({args.split} split where it has one)"
                            if args.data else f"the run's held-out {args.split} split")
            print(f"{key}: {len(table)} images -> {out}")
            generated = [how for how, yes in (("trained", run.config.synthetic), ("evaluated", is_synthetic(table)))
                         if yes]
            if generated:
                print(f"  SYNTHETIC: {' and '.join(generated)} on generated images, not patients; these figures say "
                      "nothing about real radiographs")
            if validation:
                print(f"  external validation: the test split is every image of source {validation['source']!r}, "
                      "held out of training")
            if run.regional:
                print("  Regional-Learning run: " + ("scored on the lung region X_T = X_O * M (its cascade input)"
                                                     if lung_region_input(run, table) else
                                                     "scored on full images (no lung mask for every image; "
                                                     "python -m covidx.train --lung-masks attaches them)"))
            if "accuracy" in m:
                print(f"  accuracy {m['accuracy']:.4f}" + "".join(
                    f"  {c}: sens {v['sensitivity']:.3f} spec {v['specificity']:.3f}"
                    for c, v in m["per_class"].items() if v.get("sensitivity") is not None))
                results[key] = (run, table)
                for source, r in m.get("per_source", {}).items():
                    print(f"  source {source}: {r['n_samples']} images, accuracy {r['accuracy']:.4f}" + "".join(
                        f"  {c}: sens {v['sensitivity']:.3f} spec {v['specificity']:.3f}" if v["sensitivity"]
                        is not None else f"  {c}: spec {v['specificity']:.3f}"
                        for c, v in r["per_class"].items() if v["specificity"] is not None))
                if "confounding" in m:
                    confounding = m["confounding"]
                    print(f"  source-confounding audit ({', '.join(confounding['sources'])}): flagged: "
                          f"{', '.join(confounding['flagged']) or 'none'} -> {confounding['files']['markdown']}")
                    for line in confounding["summary"]:
                        print(f"    {line}")
            else:
                print(f"  mean Dice {m['mean_dice']:.4f}  mean IoU {m['mean_iou']:.4f}")
            audit = None
            if args.audit:
                audit = run_audit(run, table, out, min_enrichment=args.audit_min_enrichment, batch_size=args.batch_size,
                                  audit_input=args.audit_input)
                summary = {c: f"{v['median_share']:.3f} ({v['median_enrichment']:.2f}x chance)"
                           for c, v in audit["per_class"].items() if v["n"]}
                print(f"  shortcut audit on the {audit['input']} images: median share of Grad-CAM inside the lungs "
                      f"{summary}; flagged: {audit['flagged'] or 'none'}")
            if "accuracy" in m:
                sections[key] = report_section(run, table, m, probs, evaluated_on, audit, args.gallery,
                                               args.batch_size, name=key)
                write_report(out / "report.html", [sections[key]])
            if run.directory is not None:
                card = write_model_card(run.directory, dict(
                    metrics={k: v for k, v in m.items() if k not in ("files", "roc", "per_image")},
                    evaluated_on=evaluated_on, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    audit=None if audit is None else {k: audit[k] for k in ("per_class", "flagged", "input")}))
                print(f"  model card {card}")
            print(f"  evaluated in {time.perf_counter() - start:.1f} s")
        if several and len(results) > 1:
            comparison = compare(results, out_root, args.batch_size)
            if comparison and len(sections) > 1:
                write_report(out_root / "report.html", list(sections.values()), comparison)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
