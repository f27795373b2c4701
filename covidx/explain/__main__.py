"""``python -m covidx.explain``: overlays for any checkpoint.

``--method gradcam | gradcam++`` (any classifier; the target layer is the model's registered
``gradcam_layer`` unless ``--layer`` names one), ``lime`` (SE-DPN Fig. 7) or ``attention``
(MAG-SD). One PNG per image, and a contact sheet for a folder (:mod:`covidx.explain.runs`).
"""

from __future__ import annotations

import argparse
import sys

from covidx.data.io import list_inputs, readable
from covidx.explain.runs import METHODS, write_overlays
from covidx.runs import load_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m covidx.explain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="run directory or .keras file")
    ap.add_argument("--image", required=True, help="an image, a folder or a CSV with a 'path' column")
    ap.add_argument("--method", default="gradcam", choices=METHODS)
    ap.add_argument("--out", help="output folder (default: RUN/explanations, the run folder's)")
    ap.add_argument("--layer", help="Grad-CAM target layer (default: the model's registered layer)")
    ap.add_argument("--class", dest="class_name", help="explain this class (default: the predicted one)")
    ap.add_argument("--lime-samples", type=int, default=1000, help="LIME perturbations per image")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    try:
        run = load_run(args.checkpoint)
        paths, bad = readable(list_inputs(args.image))
        for p, reason in bad:
            print(f"skipped {p}: {reason}", file=sys.stderr)
        if not paths:
            raise ValueError(f"no readable image in {args.image}")
        class_index = None
        if args.class_name:
            if args.class_name not in run.class_names:
                raise ValueError(f"unknown class {args.class_name!r}; the model's classes: {run.class_names}")
            class_index = run.class_names.index(args.class_name)
        out = args.out or ((run.directory or run.checkpoint.parent) / "explanations")
        written = write_overlays(run, paths, args.method, out, args.batch_size, args.layer, class_index,
                                 args.lime_samples)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(written)} overlays in {out}" + (" (+ contact_sheet.png)" if len(written) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
