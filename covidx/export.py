"""``python -m covidx.export --checkpoint RUN_OR_FILE --out DIR [--version N]``: a SavedModel for TF Serving.

With ``--segmenter SEGMENTER_RUN`` the export is the two-stage system of the
concatenated-ensemble paper (Hasan et al., Sec. III, Fig. 2): the classifier, then the
lesion segmenter for images classified COVID-19 or pneumonia
(:func:`covidx.serving.systems.export_two_stage`; outputs ``probabilities``,
``class_index``, ``class_name``, ``mask``, ``segmented``). A cascade folder written by
``python -m covidx.cascade`` (it holds ``cascade.json``) exports Cascade-SEME as one model
(:func:`covidx.serving.systems.export_cascade`; outputs ``stage1_probabilities``,
``stage2_probability`` (-1 when stage 2 was not reached), ``reached_stage2``, ``class_index``,
``class_name``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covidx.data.io import DEFAULT_MAX_PIXELS
from covidx.precision import PRECISIONS
from covidx.serving.export import export
from covidx.serving.systems import export_cascade, export_two_stage


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m covidx.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True,
                    help="run directory or .keras file (the classifier), or a cascade folder")
    ap.add_argument("--segmenter", help="lesion segmenter run: export the two-stage classify -> segment system")
    ap.add_argument("--out", required=True, help="model base folder: writes OUT/<model_name>/<version>/")
    ap.add_argument("--version", type=int, help="version number (default: one more than the newest)")
    ap.add_argument("--name", help="model name for TF Serving (default: the registry name; two_stage with "
                                   "--segmenter)")
    ap.add_argument("--max-pixels", type=int, default=None, help="reject larger images (InvalidArgument)")
    ap.add_argument("--precision", choices=PRECISIONS, help="compute in fp32, bf16, fp16 or auto (bf16 on CPUs with bfloat16 units); default: as trained")
    args = ap.parse_args(argv)
    try:
        if (Path(args.checkpoint) / "cascade.json").is_file():
            path = export_cascade(args.checkpoint, args.out, args.version, args.max_pixels or DEFAULT_MAX_PIXELS,
                                  name=args.name or "cascade-seme")
        elif args.segmenter:
            path = export_two_stage(args.checkpoint, args.segmenter, args.out, name=args.name or "two_stage",
                                    version=args.version, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
        else:
            path = export(args.checkpoint, args.out, args.version, args.max_pixels or DEFAULT_MAX_PIXELS, args.name,
                          args.precision)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {path}\n  check it: saved_model_cli show --dir {path} --all\n"
          f"  serve it: see README.md, 'Serving with TF Serving'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
