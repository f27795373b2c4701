"""``python -m covidx.export --checkpoint RUN_OR_FILE --out DIR [--version N]``: a SavedModel for TF Serving."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m covidx.export", description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="run directory or .keras file")
    ap.add_argument("--out", required=True, help="model base folder: writes OUT/<model_name>/<version>/")
    ap.add_argument("--version", type=int, help="version number (default: one more than the newest)")
    ap.add_argument("--name", help="model name for TF Serving (default: the registry name)")
    ap.add_argument("--max-pixels", type=int, default=None, help="reject larger images (InvalidArgument)")
    args = ap.parse_args(argv)
    from covidx.serving.export import DEFAULT_MAX_PIXELS, export

    try:
        path = export(args.checkpoint, args.out, args.version, args.max_pixels or DEFAULT_MAX_PIXELS, args.name)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {path}\n  check it: saved_model_cli show --dir {path} --all\n"
          f"  serve it: see README.md, 'Serving with TF Serving'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
