"""``python -m covidx.evaluate --checkpoint RUN_OR_FILE [--checkpoint ...] [--data PATH --layout L --split S]``.

Without ``--data`` each run is evaluated on the test split it held out (``split.csv``
in its run directory). Classifiers get the papers' report (``metrics.json``,
``metrics.md``, ``metrics.csv``, ``roc.png``, ``confusion.png``, ``calibration.png``);
segmenters a Dice/IoU report. With several checkpoints, every pair is compared
(F-test, McNemar, DeLong) on the cases they share, with overlaid ROC curves.
``--audit`` adds the shortcut audit: the share of Grad-CAM energy inside the lung
mask, per image and per class, flagged when a class's median share is not above its
chance level (the lung-area fraction); see :mod:`covidx.explain.audit`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from covidx.data.sources import DatasetError
from covidx.explain.runs import AUDIT_INPUTS, run_audit
from covidx.reports import compare, evaluate_run, evaluation_table
from covidx.precision import PRECISIONS
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
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", choices=PRECISIONS, help="compute in fp32, bf16, fp16 or auto (bf16 on CPUs with bfloat16 units); default: as trained")
    args = ap.parse_args(argv)

    several = len(args.checkpoint) > 1
    out_root = Path(args.out) if args.out else None
    if out_root is None and several:
        out_root = Path(f"evaluation-{time.strftime('%Y%m%d-%H%M%S')}")
    results, summaries = {}, {}
    try:
        for ckpt in args.checkpoint:
            run = load_run(ckpt, precision=args.precision)
            table = evaluation_table(run, args.data, args.layout, args.split)
            name = run.name
            key = name if name not in results else f"{name}-{len(results)}"
            out = (out_root / key) if several else (out_root or (run.directory or Path(ckpt).parent) / "eval")
            m = evaluate_run(run, table, out, args.bootstrap, args.batch_size)
            summaries[key] = m
            print(f"{key}: {len(table)} images -> {out}")
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
            else:
                print(f"  mean Dice {m['mean_dice']:.4f}  mean IoU {m['mean_iou']:.4f}")
            if args.audit:
                audit = run_audit(run, table, out, min_enrichment=args.audit_min_enrichment, batch_size=args.batch_size,
                                  audit_input=args.audit_input)
                summary = {c: f"{v['median_share']:.3f} ({v['median_enrichment']:.2f}x chance)"
                           for c, v in audit["per_class"].items() if v["n"]}
                print(f"  shortcut audit on the {audit['input']} images: median share of Grad-CAM inside the lungs "
                      f"{summary}; flagged: {audit['flagged'] or 'none'}")
        if several and len(results) > 1:
            compare(results, out_root, args.batch_size)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
