"""What ``--precision bf16`` (or fp16) does to a trained run's predictions, against its float32 predictions.

The same checkpoint is loaded three times (:func:`covidx.runs.load_run`: as saved, and the inference copies
with ``precision="fp32"`` and with the precision asked for, both with BN folded into the convolutions) and run
over one split of its ``split.csv`` through its own evaluation preprocessing. Printed: macro AUC (one-vs-rest)
and accuracy of each, and for each inference copy against the checkpoint as saved the AUC change, the share of
images whose predicted class changes (argmax flips) and the largest probability difference; images/s of each.

Usage::

    python benchmarks/precision_effect.py RUN_DIR [--split val] [--precision bf16] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from covidx.precision import cpu_flags  # noqa: E402
from covidx.runs import load_run, predict_table  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--split", default="val")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    results = {}
    # "saved": the checkpoint as training wrote it (BN layers unfolded); then the inference copies that
    # evaluate / predict / export run: fp32 (BN folded) and the low precision asked for.
    for name, kwargs in (("saved", {}), ("fp32", {"precision": "fp32"}), (args.precision, {"precision": args.precision})):
        run = load_run(args.run, **kwargs)
        table = run.split_table()
        table = table[table["split"] == args.split].reset_index(drop=True)
        predict_table(run, table.head(args.batch_size), args.batch_size)  # trace before timing
        t0 = time.perf_counter()
        probs, targets = predict_table(run, table, args.batch_size)
        results[name] = (np.asarray(probs, np.float64), len(table) / (time.perf_counter() - t0))
    y = np.asarray(targets).argmax(1)
    auc = {k: roc_auc_score(y, p, multi_class="ovr", average="macro") for k, (p, _) in results.items()}
    acc = {k: float((p.argmax(1) == y).mean()) for k, (p, _) in results.items()}
    units = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in cpu_flags()) or "no bf16 units"
    print(f"{args.run}: {len(y)} {args.split!r} images, classes {run.class_names} ({units})")
    for k in results:
        print(f"  {k:<5} macro AUC {auc[k]:.4f}  accuracy {acc[k]:.4f}  {results[k][1]:.1f} img/s")
    reference = results["saved"][0]
    for k in ("fp32", args.precision):
        flips = int((reference.argmax(1) != results[k][0].argmax(1)).sum())
        print(f"  {k} against saved: AUC change {auc[k] - auc['saved']:+.4f}; argmax flips {flips} of {len(y)} "
              f"({100 * flips / len(y):.2f} %); largest probability difference "
              f"{np.abs(reference - results[k][0]).max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
