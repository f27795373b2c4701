"""``python -m covidx.cascade --stage1 RUN --stage2 RUN [--lung RUN] --out DIR``: assemble Cascade-SEME.

Calibrates Th_vir (Lv et al. 2021, eq. 1) on stage 1's training split, saves the cascade
(``stage1.keras``, ``stage2.keras``, ``lung.keras``, ``cascade.json``) and optionally exports it
(:class:`covidx.systems.CascadeSEME`, :func:`covidx.serving.systems.export_cascade`).
"""

from __future__ import annotations

import argparse
import sys

from covidx.serving.systems import export_cascade
from covidx.systems.cascade import REFERENCES, CascadeSEME


def main(argv=None) -> int:
    """``python -m covidx.cascade --stage1 RUN --stage2 RUN [--lung RUN] --out DIR``."""
    ap = argparse.ArgumentParser(prog="python -m covidx.cascade",
                                 description="Assemble trained Cascade-SEME stages and calibrate Th_vir (eq. 1).")
    ap.add_argument("--stage1", required=True, help="stage-1 run (seme-resnet50, task stage1): directory or .keras")
    ap.add_argument("--stage2", required=True, help="stage-2 run (seme-densenet169, task stage2)")
    ap.add_argument("--lung", help="lung U-Net run: stage 2 then sees the lung region (Regional Learning)")
    ap.add_argument("--out", required=True, help="cascade directory to write")
    ap.add_argument("--reference", choices=REFERENCES, default="all",
                    help="images averaged for Th_vir: all of the split (default) or only the viral ones")
    ap.add_argument("--split", default="train", help="split of stage 1's split.csv used for Th_vir (default train)")
    ap.add_argument("--threshold", type=float, help="use this Th_vir instead of calibrating")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--export", metavar="DIR", help="also export for TF Serving to DIR/cascade-seme/<version>/")
    args = ap.parse_args(argv)
    try:
        cascade = CascadeSEME.from_runs(args.stage1, args.stage2, args.lung, args.reference, args.split,
                                        args.threshold, args.batch_size)
        out = cascade.save(args.out)
        cal = cascade.calibration
        how = (f"mean P(viral) of {cal['size']} {cal['reference']!r} {cal['split']!r} images"
               if "size" in cal else "given")
        print(f"cascade written to {out.resolve()}\n  Th_vir = {cascade.threshold:.6f} ({how})")
        if args.export:
            print(f"  exported {export_cascade(out, args.export)}")
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
