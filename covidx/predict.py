"""``python -m covidx.predict --checkpoint RUN|FILE.keras|EXPORT_DIR INPUT [--out results.csv]``.

INPUT is an image (PNG, JPEG, DICOM), a folder (searched recursively) or a CSV with a
``path`` column. Prints and writes one row per image: path, the probability of every
class, the predicted label and a ``warning`` (inputs that do not look like radiographs: binary masks,
colour photographs, tiny images; every row of a model trained on SYNTHETIC data). Unreadable files are
reported with the reason and skipped.
``--explain gradcam`` writes a Grad-CAM overlay per image (Keras checkpoints; for a cascade folder,
one per stage reached, stage 2 on its lung-region input).

``--segmenter SEGMENTER_RUN`` runs the two-stage system of the concatenated-ensemble
paper (Hasan et al., Sec. III, Fig. 2): images the classifier calls COVID-19 or
pneumonia (any class but ``normal`` of the classifier's task) go through the lesion
segmenter (:class:`covidx.systems.TwoStagePredictor`); a mask PNG and a red
overlay (paper Fig. 10) per segmented image go to ``--masks DIR`` and the CSV gets the
columns ``segmented``, ``mask_path`` and ``overlay_path`` (empty for normal images).

A Keras checkpoint is run through the same tf.data preprocessing it was trained
with; an export folder (TF Serving layout) through its ``serving_default``
signature, the way a TF Serving client would call it.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from covidx.data.io import DEFAULT_MAX_PIXELS, ImageReadError, list_inputs, radiograph_warnings, readable, set_max_pixels
from covidx.data.synthetic import generated_images
from covidx.explain.runs import write_overlays
from covidx.precision import PRECISIONS
from covidx.runs import find_checkpoint, load_run, predict_paths
from covidx.serving.client import export_meta, find_export, is_cascade_export, predict_export, serve_files
from covidx.systems import CascadeSEME, TwoStagePredictor, segment_files


def write_results(path, paths, probs, class_names, extra: dict[str, list] | None = None, labels=None):
    """CSV of ``path, p_<class>..., label`` plus the ``extra`` columns (name -> one value per row).

    ``labels`` overrides the arg-max label (the cascade's final label is not stage 1's arg-max).
    """
    extra = extra or {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *[f"p_{c}" for c in class_names], "label", *extra])
        for i, (p, row) in enumerate(zip(paths, probs)):
            label = labels[i] if labels is not None else class_names[int(np.argmax(row))]
            w.writerow([p, *[f"{v:.6f}" for v in row], label, *[values[i] for values in extra.values()]])


def input_warnings(path) -> list[str]:
    """:func:`covidx.data.io.radiograph_warnings`, or the read error (the file was readable a moment ago)."""
    try:
        return radiograph_warnings(path)
    except ImageReadError as e:
        return [str(e)]


def predict_cascade(source: Path, paths, batch_size=16):
    """Cascade-SEME from a cascade folder (``cascade.json``) or its export: stage-1 probabilities, class
    names, final labels and the stage-2 columns."""
    if (source / "cascade.json").is_file():
        cascade = CascadeSEME.load(source)
        res = cascade.predict(paths, batch_size)
        stage1, p2, reached, labels = (res.stage1_probabilities, res.stage2_probability, res.reached_stage2,
                                       list(res.class_name))
        names = list(cascade.stage1_classes)
    else:
        out = serve_files(source, paths, batch_size)
        stage1, p2, reached = out["stage1_probabilities"], out["stage2_probability"], out["reached_stage2"]
        labels = [c.decode() for c in out["class_name"]]
        names = export_meta(source)["stage1_classes"]
    extra = {"reached_stage2": [int(r) for r in reached], "p_covid19_stage2": [f"{v:.6f}" for v in p2]}
    return stage1, names, labels, extra


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m covidx.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="image, folder or CSV with a 'path' column")
    ap.add_argument("--checkpoint", required=True, help="run directory, .keras file or export folder")
    ap.add_argument("--out", default="results.csv", help="CSV of path, probabilities, label")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", choices=PRECISIONS, help="compute in fp32, bf16, fp16 or auto (bf16 on CPUs with bfloat16 units); default: as trained")
    ap.add_argument("--explain", choices=("gradcam", "gradcam++"), help="also write an overlay per image")
    ap.add_argument("--overlays", help="folder for overlays (default: next to --out)")
    ap.add_argument("--segmenter", help="lesion segmenter run (two-stage system): segments images classified "
                                        "COVID-19 or pneumonia")
    ap.add_argument("--masks", help="folder for the segmenter's masks and overlays (default: next to --out)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help=f"refuse larger images, read from the header (default {DEFAULT_MAX_PIXELS:,})")
    args = ap.parse_args(argv)
    set_max_pixels(args.max_pixels)
    # The checkpoint first: a wrong one fails before any input is read.
    source = Path(args.checkpoint)
    if not ((source / "cascade.json").is_file() or find_export(source) is not None):
        try:
            find_checkpoint(source)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        paths = list_inputs(args.input)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    good, bad = readable(paths)
    for p, reason in bad:
        print(f"skipped {p}: {reason}", file=sys.stderr)
    if not good:
        print(f"error: no readable image in {args.input}", file=sys.stderr)
        return 2
    progress = len(good) > args.batch_size
    export_dir = find_export(args.checkpoint)
    extra = None
    labels = None
    run = None
    try:
        cascade_source = export_dir if export_dir is not None else Path(args.checkpoint)
        if (cascade_source / "cascade.json").is_file() or (export_dir is not None and is_cascade_export(export_dir)):
            if args.segmenter or (args.explain and not (cascade_source / "cascade.json").is_file()):
                print("error: --segmenter does not apply to a cascade, --explain needs the cascade folder "
                      "(python -m covidx.cascade), not its export", file=sys.stderr)
                return 2
            probs, names, labels, extra = predict_cascade(cascade_source, good, args.batch_size)
        elif args.segmenter:
            if export_dir is not None:
                print("error: --segmenter needs the classifier's Keras checkpoint (run directory or .keras); "
                      "for TF Serving export both with python -m covidx.export --segmenter", file=sys.stderr)
                return 2
            out = Path(args.out)
            mask_dir = Path(args.masks) if args.masks else out.with_name(out.stem + "_masks")
            run = load_run(args.checkpoint, precision=args.precision, inference=True)
            predictor = TwoStagePredictor.from_runs(run, args.segmenter)
            names = predictor.class_names
            probs, segmented, mask_paths, overlay_paths = segment_files(predictor, good, mask_dir, args.batch_size,
                                                                        progress)
            extra = {"segmented": [int(s) for s in segmented], "mask_path": mask_paths, "overlay_path": overlay_paths}
        elif export_dir is not None:
            if args.explain:
                print("error: --explain needs a Keras checkpoint (run directory or .keras), not an export",
                      file=sys.stderr)
                return 2
            probs, names = predict_export(export_dir, good, args.batch_size, progress)
        else:
            run = load_run(args.checkpoint, precision=args.precision, inference=True)
            probs, run = predict_paths(run, good, args.batch_size, progress)
            names = run.class_names
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    synthetic = False
    if export_dir is not None:
        synthetic = bool(export_meta(export_dir).get("synthetic"))
    elif run is not None:
        synthetic = bool(run.config.synthetic)
    warnings = [input_warnings(p) + (["model trained on SYNTHETIC data, not patients"] if synthetic else [])
                + (["SYNTHETIC image (generated by covidx.data.synthetic), not a patient"] if generated else [])
                for p, generated in zip(good, generated_images(good))]
    extra = {**(extra or {}), "warning": ["; ".join(w) for w in warnings]}
    write_results(args.out, good, probs, names, extra, labels)
    if len(good) <= 20:
        for i, (p, row) in enumerate(zip(good, probs)):
            label = labels[i] if labels is not None else names[int(np.argmax(row))]
            print(f"{p}: {label}  " + "  ".join(f"{c}={v:.3f}" for c, v in zip(names, row))
                  + (f"  WARNING: {'; '.join(warnings[i])}" if warnings[i] else ""))
    if args.explain:
        out = Path(args.out)
        folder = Path(args.overlays) if args.overlays else out.with_name(out.stem + "_overlays")
        if labels is not None:  # a cascade: both stages (stage 2 on its lung-region input)
            records = CascadeSEME.load(cascade_source).explain(good, folder, args.explain, args.batch_size)
            written = [r[s]["overlay"] for r in records for s in ("stage1", "stage2") if r[s] is not None]
        else:
            written = write_overlays(run, good, args.explain, folder, batch_size=args.batch_size)
        print(f"{len(written)} overlays in {folder}")
    if extra is not None and "segmented" in extra:
        print(f"{int(sum(extra['segmented']))} of {len(good)} images segmented; masks and overlays in {mask_dir}")
    flagged = sum(bool(w) for w in warnings)
    print(f"{len(good)} images -> {args.out}" + (f" ({len(bad)} skipped)" if bad else "")
          + (f"; {flagged} with a warning (column 'warning')" if flagged else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
