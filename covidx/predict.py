"""``python -m covidx.predict --checkpoint RUN|FILE.keras|EXPORT_DIR INPUT [--out results.csv]``.

INPUT is an image (PNG, JPEG, DICOM), a folder (searched recursively) or a CSV with a
``path`` column. Prints and writes one row per image: path, the probability of every
class, the predicted label. Unreadable files are reported with the reason and skipped.
``--explain gradcam`` writes a Grad-CAM overlay per image (Keras checkpoints; for a cascade folder,
one per stage reached, stage 2 on its lung-region input).

``--segmenter SEGMENTER_RUN`` runs the two-stage system of the concatenated-ensemble
paper (Hasan et al., Sec. III, Fig. 2): images the classifier calls COVID-19 or
pneumonia (any class but ``normal`` of the classifier's task) go through the lesion
segmenter (:class:`covidx.models.two_stage.TwoStagePredictor`); a mask PNG and a red
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from covidx.data.io import IMAGE_EXTENSIONS, ImageReadError, read_image


def list_inputs(target: str | Path) -> list[str]:
    p = Path(target)
    if p.is_dir():
        return [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if p.suffix.lower() == ".csv":
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
        if "path" not in df.columns:
            raise ValueError(f"{p}: the CSV needs a 'path' column")
        return [str((p.parent / v) if not Path(v).is_absolute() else v) for v in df["path"]]
    return [str(p)]


def readable(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split into readable files and (path, reason) of the rest (full decode, in threads)."""
    def check(path):
        try:
            read_image(path)
            return None
        except ImageReadError as e:
            return str(e).split(": ", 1)[-1]

    with ThreadPoolExecutor(4) as pool:
        reasons = list(pool.map(check, paths))
    good = [p for p, r in zip(paths, reasons) if r is None]
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    return good, bad


def find_export(path: str | Path) -> Path | None:
    """The SavedModel folder of an export: the folder itself or its newest numeric version."""
    p = Path(path)
    if (p / "saved_model.pb").is_file():
        return p
    versions = sorted((int(v.name), v) for v in p.glob("*") if v.name.isdigit() and (v / "saved_model.pb").is_file())
    return versions[-1][1] if versions else None


def predict_keras(checkpoint, paths, batch_size=16, progress=True):
    from covidx.runs import load_run, predict_table

    run = load_run(checkpoint)
    table = pd.DataFrame(dict(path=paths))
    table["dicom"] = [p.lower().endswith((".dcm", ".dicom")) for p in paths]
    probs, _ = predict_table(run, table, batch_size, progress)
    return probs, run.class_names, run


def _encoded(path: str) -> bytes:
    """File bytes for the serving signature: PNG/JPEG as they are, DICOM as a 16-bit PNG of its display pixels."""
    import cv2

    from covidx.data.io import is_dicom

    if not is_dicom(path):
        return Path(path).read_bytes()
    img = np.round(read_image(path) * 257.0).astype(np.uint16)
    return cv2.imencode(".png", img)[1].tobytes()


def predict_export(export_dir: Path, paths, batch_size=16, progress=True):
    import tensorflow as tf

    fn = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    probs, names = [], None
    chunks = range(0, len(paths), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="predicting", unit="batch", file=sys.stderr)
    for i in chunks:
        out = fn(image_bytes=tf.constant([_encoded(p) for p in paths[i:i + batch_size]]))
        probs.append(out["probabilities"].numpy())
    import json

    meta = export_dir / "assets.extra" / "covidx.json"
    names = json.loads(meta.read_text())["classes"] if meta.is_file() else [f"class_{k}" for k in range(probs[0].shape[1])]
    return np.concatenate(probs), names


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


def is_cascade(source: Path) -> bool:
    """A cascade folder (``python -m covidx.cascade``) or a Cascade-SEME export."""
    import json

    meta = source / "assets.extra" / "covidx.json"
    return (source / "cascade.json").is_file() or (meta.is_file() and "stage1_classes" in json.loads(meta.read_text()))


def predict_cascade(source: Path, paths, batch_size=16):
    """Cascade-SEME from a cascade folder (``cascade.json``) or its export: stage-1 probabilities, class
    names, final labels and the stage-2 columns."""
    import json

    import tensorflow as tf

    if (source / "cascade.json").is_file():
        from covidx.models.cascade import CascadeSEME

        cascade = CascadeSEME.load(source)
        res = cascade.predict(paths)
        stage1, p2, reached, labels = (res.stage1_probabilities, res.stage2_probability, res.reached_stage2,
                                       list(res.class_name))
        names = list(cascade.stage1_classes)
    else:
        fn = tf.saved_model.load(str(source)).signatures["serving_default"]
        outs = [fn(image_bytes=tf.constant([_encoded(p) for p in paths[i:i + batch_size]]))
                for i in range(0, len(paths), batch_size)]
        stage1 = np.concatenate([o["stage1_probabilities"].numpy() for o in outs])
        p2 = np.concatenate([o["stage2_probability"].numpy() for o in outs])
        reached = np.concatenate([o["reached_stage2"].numpy() for o in outs])
        labels = [c.decode() for o in outs for c in o["class_name"].numpy()]
        names = json.loads((source / "assets.extra" / "covidx.json").read_text())["stage1_classes"]
    extra = {"reached_stage2": [int(r) for r in reached], "p_covid19_stage2": [f"{v:.6f}" for v in p2]}
    return stage1, names, labels, extra


# Classes routed to the segmenter: "COVID-19 or pneumonia" (ensemble paper Sec. III); with a
# 4-class or stage classifier, pneumonia is its bacterial and viral classes.
SEGMENTED_CLASSES = ("covid19", "pneumonia", "bacterial", "viral")


def segmented_classes(class_names) -> list[str]:
    """The classifier's classes whose images go to the segmenter (all but ``normal`` in covidx's tasks)."""
    routed = [c for c in class_names if c in SEGMENTED_CLASSES]
    if not routed:
        raise ValueError(f"the classifier's classes {list(class_names)} include none of {list(SEGMENTED_CLASSES)}: "
                         "nothing would be segmented")
    return routed


def predict_two_stage(classifier, segmenter, paths, mask_dir, batch_size=16, progress=True):
    """Classify ``paths``, segment the sick, write masks and overlays into ``mask_dir``.

    ``classifier`` and ``segmenter`` are runs (:class:`covidx.runs.Run`, run directories or
    ``.keras`` files). Returns ``(probabilities (N, K), class names, segmented (N,) bool,
    mask paths, overlay paths)``
    (empty strings for images that were not segmented). Masks are 0/255 PNGs (255 = lesion);
    with the segmenter's ``stretch`` resize they are brought back to the image's own size
    (nearest neighbour) and the overlay is drawn on the original image, with ``crop`` they
    cover the centre crop the segmenter saw, at its input size.
    """
    import cv2

    from covidx.explain.masks import _unique_stems
    from covidx.explain.overlay import save_png
    from covidx.models.two_stage import TwoStagePredictor, overlay_mask
    from covidx.runs import Run, load_run

    clf = classifier if isinstance(classifier, Run) else load_run(classifier)
    predictor = TwoStagePredictor.from_runs(clf, segmenter, segmented_classes(clf.class_names))
    if len(predictor.segmenter.outputs[0].shape) != 4:
        raise ValueError(f"--segmenter {segmenter} is not a segmenter (output {predictor.segmenter.outputs[0].shape}, "
                         "expected per-pixel probabilities)")
    stretch = predictor.segmenter_preprocess.resize == "stretch"
    mask_dir = Path(mask_dir)
    mask_dir.mkdir(parents=True, exist_ok=True)
    stems = _unique_stems(paths)
    probs = np.zeros((len(paths), len(clf.class_names)), np.float32)
    segmented = np.zeros(len(paths), bool)
    mask_paths, overlay_paths = [""] * len(paths), [""] * len(paths)
    chunks = range(0, len(paths), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="predicting", unit="batch", file=sys.stderr)
    for start in chunks:
        index = list(range(start, min(start + batch_size, len(paths))))
        images = {i: read_image(paths[i]) for i in index}
        by_shape: dict[tuple, list[int]] = {}
        for i in index:  # one predictor call per image size (a batch is one array)
            by_shape.setdefault(images[i].shape, []).append(i)
        for group in by_shape.values():
            result = predictor.predict(np.stack([images[i] for i in group]), batch_size)
            for j, i in enumerate(group):
                probs[i] = result.probabilities[j]
                mask = result.masks[j]
                if mask is None:
                    continue
                overlay = result.overlays[j]
                if stretch:
                    h, w = images[i].shape
                    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
                    overlay = overlay_mask(images[i], mask)
                segmented[i] = True
                mask_paths[i] = str(save_png(mask_dir / f"{stems[i]}_mask.png", mask * 255))
                overlay_paths[i] = str(save_png(mask_dir / f"{stems[i]}_overlay.png", overlay))
    return probs, clf.class_names, segmented, mask_paths, overlay_paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m covidx.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="image, folder or CSV with a 'path' column")
    ap.add_argument("--checkpoint", required=True, help="run directory, .keras file or export folder")
    ap.add_argument("--out", default="results.csv", help="CSV of path, probabilities, label")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--explain", choices=("gradcam", "gradcam++"), help="also write an overlay per image")
    ap.add_argument("--overlays", help="folder for overlays (default: next to --out)")
    ap.add_argument("--segmenter", help="lesion segmenter run (two-stage system): segments images classified "
                                        "COVID-19 or pneumonia")
    ap.add_argument("--masks", help="folder for the segmenter's masks and overlays (default: next to --out)")
    args = ap.parse_args(argv)
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
    try:
        cascade_source = export_dir if export_dir is not None else Path(args.checkpoint)
        if is_cascade(cascade_source):
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
            from covidx.runs import load_run

            run = load_run(args.checkpoint)
            probs, names, segmented, mask_paths, overlay_paths = predict_two_stage(
                run, args.segmenter, good, mask_dir, args.batch_size, progress)
            extra = {"segmented": [int(s) for s in segmented], "mask_path": mask_paths, "overlay_path": overlay_paths}
        elif export_dir is not None:
            if args.explain:
                print("error: --explain needs a Keras checkpoint (run directory or .keras), not an export",
                      file=sys.stderr)
                return 2
            probs, names = predict_export(export_dir, good, args.batch_size, progress)
        else:
            probs, names, run = predict_keras(args.checkpoint, good, args.batch_size, progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_results(args.out, good, probs, names, extra, labels)
    if len(good) <= 20:
        for i, (p, row) in enumerate(zip(good, probs)):
            label = labels[i] if labels is not None else names[int(np.argmax(row))]
            print(f"{p}: {label}  " + "  ".join(f"{c}={v:.3f}" for c, v in zip(names, row)))
    if args.explain:
        out = Path(args.out)
        folder = Path(args.overlays) if args.overlays else out.with_name(out.stem + "_overlays")
        if labels is not None:  # a cascade: both stages (stage 2 on its lung-region input)
            from covidx.models.cascade import CascadeSEME

            records = CascadeSEME.load(cascade_source).explain(good, folder, args.explain, args.batch_size)
            written = [r[s]["overlay"] for r in records for s in ("stage1", "stage2") if r[s] is not None]
        else:
            from covidx.explain.cli import write_overlays

            written = write_overlays(run, good, args.explain, folder, batch_size=args.batch_size)
        print(f"{len(written)} overlays in {folder}")
    if extra is not None and "segmented" in extra:
        print(f"{int(sum(extra['segmented']))} of {len(good)} images segmented; masks and overlays in {mask_dir}")
    print(f"{len(good)} images -> {args.out}" + (f" ({len(bad)} skipped)" if bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
