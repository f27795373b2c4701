"""Dataset sources: real public layouts read into one table.

Every reader returns ``(table, report)``: a :class:`pandas.DataFrame` with the
columns of :data:`COLUMNS` and an :class:`IndexReport` listing every file it
skipped and every metadata row it could not map, each with its reason.

Layouts (``--layout``):

``kermany``  Kermany et al. "Chest X-Ray Images (Pneumonia)":
             ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``; bacterial vs viral from
             the file name (``person12_bacteria_47.jpeg``), patient from ``personN`` / ``IM-NNNN`` /
             ``NORMAL2-IM-NNNN`` (:mod:`covidx.data.patients`).
``cohen``    Cohen "COVID-19 image data collection" (also Actualmed, Figure1): ``metadata.csv``
             (``patientid, finding, view, modality, filename|imagename[, folder]``) + ``images/``.
``covidx``   COVIDx split files: ``patientid filename label source`` per line
             (``train.txt``/``test.txt``/``val.txt`` beside ``train/``, ``test/``, ``val/``).
``folders``  class-per-folder trees, ``ROOT/[split/]CLASS/*``.
``csv``      a CSV manifest: ``path, finding|label[, patient_id, split, source, mask_path, lesion_path]``.
``masks``    segmentation pairs ``images/`` + ``masks/`` (optionally ``lesions/``), matched by file stem.

Readers leave ``patient_id`` empty where the files do not say it; :func:`load_source` then reads it with
a :class:`~covidx.data.patients.PatientRule` (``--patient-pattern`` / ``--patient-table``) or, failing
that, makes the file its own patient and names it in ``IndexReport.no_patient``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from covidx.data.io import IMAGE_EXTENSIONS, check_file, is_dicom
from covidx.data.patients import PatientRule, kermany_patient, record_patient
from covidx.tasks import FINDINGS

COLUMNS = ["path", "finding", "patient_id", "source", "split", "mask_path", "lesion_path"]
LAYOUTS = ("kermany", "cohen", "covidx", "folders", "csv", "masks")


class DatasetError(ValueError):
    """A dataset that cannot be used at all (no images, unknown layout or class); one clear line."""


@dataclass
class IndexReport:
    """What a reader skipped or could not map, with reasons (printed by ``python -m covidx.data``)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (row / path, reason)
    no_patient: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): kept as its own patient
    warnings: list[str] = field(default_factory=list)  # about the split as a whole

    def skip(self, path, reason: str):
        self.skipped.append((str(path), reason))

    def unmap(self, what, reason: str):
        self.unmapped.append((str(what), reason))

    def unknown_patient(self, path, reason: str):
        self.no_patient.append((str(path), reason))

    def warn(self, text: str):
        self.warnings.append(text)

    def extend(self, other: "IndexReport"):
        self.skipped += other.skipped
        self.unmapped += other.unmapped
        self.no_patient += other.no_patient
        self.warnings += other.warnings

    def lines(self) -> list[str]:
        out = [f"skipped  {p}: {r}" for p, r in self.skipped]
        out += [f"unmapped {p}: {r}" for p, r in self.unmapped]
        out += [f"no patient {p}: {r}" for p, r in self.no_patient]
        out += [f"warning  {w}" for w in self.warnings]
        return out


# ------------------------------------------------------------------ finding names

_SYNONYMS = {
    "covid19": "covid19", "covid-19": "covid19", "covid": "covid19", "sars-cov-2": "covid19", "positive": "covid19",
    "normal": "normal", "no finding": "normal", "no_finding": "normal", "nofinding": "normal", "healthy": "normal",
    "viral": "viral", "virus": "viral", "viral pneumonia": "viral", "viral_pneumonia": "viral",
    "bacterial": "bacterial", "bacteria": "bacterial", "bacterial pneumonia": "bacterial",
    "bacterial_pneumonia": "bacterial",
    "pneumonia": "pneumonia",
}
# Organisms in the Cohen collection's hierarchical findings.
_VIRAL = ("sars", "mers", "influenza", "varicella", "herpes", "rsv", "h1n1", "adenovirus", "viral")
_BACTERIAL = (
    "streptococcus", "klebsiella", "legionella", "mycoplasma", "chlamydophila", "e.coli", "staphylococcus",
    "nocardia", "bacterial", "escherichia",
)


def normalize_finding(raw: str) -> str | None:
    """Map a dataset's label text to one of :data:`covidx.tasks.FINDINGS` (``None`` if unknown).

    Handles flat (``COVID-19``, ``No finding``, ``Pneumonia``) and hierarchical findings
    (``Pneumonia/Viral/COVID-19``, ``Pneumonia/Bacterial/Streptococcus``); the most specific
    recognised part wins.
    """
    text = str(raw).strip().lower()
    if not text or text == "nan":
        return None
    if text in _SYNONYMS:
        return _SYNONYMS[text]
    parts = [p.strip() for p in re.split(r"[/,;]", text) if p.strip()]
    if any("covid" in p or "sars-cov-2" in p for p in parts):
        return "covid19"
    if any(p in ("no finding", "normal") for p in parts):
        return "normal"
    if any(any(v in p for v in _VIRAL) for p in parts):
        return "viral"
    if any(any(b in p for b in _BACTERIAL) for p in parts):
        return "bacterial"
    if parts and parts[-1] == "pneumonia":
        return "pneumonia"
    return None


def _table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("split", "mask_path", "lesion_path", "source", "patient_id"):
        df[c] = df[c].fillna("").astype(str)
    return df


def _image_files(folder: Path):
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _admit(path: Path, report: IndexReport) -> bool:
    reason = check_file(path)
    if reason:
        report.skip(path, reason)
        return False
    return True


# ------------------------------------------------------------------ Kermany

def _kermany_root(root: Path) -> Path:
    for cand in (root / "chest_xray", root):
        if any((cand / s).is_dir() for s in ("train", "test", "val")):
            return cand
    raise DatasetError(f"{root}: not a Kermany layout (expected chest_xray/{{train,val,test}}/{{NORMAL,PNEUMONIA}})")


def read_kermany(root: str | Path) -> tuple[pd.DataFrame, IndexReport]:
    """Kermany "Chest X-Ray Images (Pneumonia)"; the source's own train/val/test split is kept."""
    base = _kermany_root(Path(root))
    report, rows = IndexReport(), []
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            folder = base / split / cls
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if p.name.startswith(".") or not p.is_file():
                    continue
                if p.suffix.lower() not in IMAGE_EXTENSIONS:
                    report.skip(p, f"not an image file extension ({p.suffix or 'none'})")
                    continue
                patient, organism = kermany_patient(p.stem)
                if cls == "PNEUMONIA":
                    if organism is None:
                        report.unmap(p, "PNEUMONIA file name does not say bacteria or virus")
                        continue
                    finding = "bacterial" if organism == "bacteria" else "viral"
                else:
                    finding = "normal"
                if _admit(p, report):
                    # An unreadable name leaves the patient empty: load_source reports it (or applies a rule).
                    rows.append(dict(path=str(p), finding=finding, patient_id=f"kermany:{patient}" if patient else "",
                                     source="kermany", split=split))
    return _table(rows), report


# ------------------------------------------------------------------ Cohen

DEFAULT_VIEWS = ("PA", "AP")  # the frontal views
UNKNOWN_VIEW = "unknown"  # in ``views``: keep rows whose view is missing
ALL_VIEWS = "all"  # in ``views``: keep every view


def parse_views(text: str | None) -> tuple[str, ...]:
    """``--views PA,AP,unknown`` -> ``("PA", "AP", "unknown")``; empty/None gives the frontal default."""
    if not text:
        return DEFAULT_VIEWS
    views = tuple(v.strip() for v in str(text).split(",") if v.strip())
    return tuple(v.lower() if v.lower() in (UNKNOWN_VIEW, ALL_VIEWS) else v.upper() for v in views) or DEFAULT_VIEWS


def view_kept(view: str, views: tuple[str, ...]) -> bool:
    """Whether a row of ``view`` is kept: ``AP`` admits ``AP Supine`` / ``AP Erect``; ``unknown`` admits a missing
    view; ``all`` admits everything."""
    view = view.strip().upper()
    if ALL_VIEWS in views:
        return True
    if not view:
        return UNKNOWN_VIEW in views
    return any(view == v.upper() or view.startswith(v.upper() + " ") for v in views if v not in (UNKNOWN_VIEW,))


def _find_record_image(root: Path, record: str) -> Path:
    # Figure1's metadata names no file: the image is images/<patientid>.<ext>.
    for ext in (".jpg", ".jpeg", ".png"):
        if (root / "images" / f"{record}{ext}").exists():
            return root / "images" / f"{record}{ext}"
    return root / "images" / f"{record}.jpg"


def read_cohen(
    root: str | Path, views: tuple[str, ...] = DEFAULT_VIEWS, modality: str = "X-ray", source: str = "cohen"
) -> tuple[pd.DataFrame, IndexReport]:
    """Cohen COVID-19 image data collection schema (``metadata.csv`` + images); also Figure1 and Actualmed.

    Keeps ``modality`` rows only and the views in ``views`` (:func:`view_kept`: ``AP`` admits ``AP Supine``
    and ``AP Erect``; laterals ``L`` are dropped; a row without a view is reported as "view missing" unless
    ``views`` holds ``unknown``). Without a ``filename``/``imagename`` column (Figure1) the image is
    ``images/<patientid>.jpg|png``. Record ids with a letter suffix (``COVID-00003a``) name one patient.
    """
    root = Path(root)
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise DatasetError(f"{root}: no metadata.csv (Cohen layout expects metadata.csv + images/)")
    df = pd.read_csv(meta, dtype=str, keep_default_na=False)
    name_col = "filename" if "filename" in df.columns else "imagename" if "imagename" in df.columns else None
    missing = [c for c in ("patientid", "finding") if c not in df.columns]
    if missing:
        raise DatasetError(f"{meta}: missing column(s) {missing}")
    if name_col is None and not (root / "images").is_dir():
        raise DatasetError(f"{meta}: no filename|imagename column and no images/ folder to find <patientid>.jpg in")
    report, rows = IndexReport(), []
    for i, r in df.iterrows():
        fname = r[name_col].strip() if name_col else _find_record_image(root, r["patientid"].strip()).name
        where = f"{meta.name} row {i + 2} ({fname or 'no file name'})"
        if "modality" in df.columns and r["modality"].strip().lower() != modality.lower():
            report.unmap(where, f"modality {r['modality']!r} is not {modality}")
            continue
        view = r.get("view", "").strip()
        if not view_kept(view, views):
            report.unmap(where, f"view {r['view']!r} not in {'/'.join(views)}" if view else
                         "view missing (keep such rows with --views ...,unknown)")
            continue
        finding = normalize_finding(r["finding"])
        if finding is None:
            report.unmap(where, f"finding {r['finding']!r} maps to none of {', '.join(FINDINGS)}")
            continue
        folder = r.get("folder", "").strip() or "images"
        path = root / folder / fname
        if not path.exists() and (root / "images" / fname).exists():
            path = root / "images" / fname
        if _admit(path, report):
            pid = record_patient(r["patientid"])
            rows.append(dict(path=str(path), finding=finding, patient_id=f"{source}:{pid}" if pid else "",
                             source=source, split=""))
    return _table(rows), report


# ------------------------------------------------------------------ COVIDx split files

def read_covidx(root: str | Path) -> tuple[pd.DataFrame, IndexReport]:
    """COVIDx split files (``patientid filename label source`` per line) beside ``train/``, ``test/``…"""
    root = Path(root)
    split_files = sorted(p for p in root.glob("*.txt") if _split_of(p.stem))
    if not split_files:
        raise DatasetError(f"{root}: no COVIDx split files (train*.txt / test*.txt / val*.txt)")
    report, rows = IndexReport(), []
    for sf in split_files:
        split = _split_of(sf.stem)
        for n, line in enumerate(sf.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 3:
                report.unmap(f"{sf.name}:{n}", "expected 'patientid filename label [source]'")
                continue
            pid, fname, label = fields[0], fields[1], fields[2]
            src = fields[3] if len(fields) > 3 else "covidx"
            finding = normalize_finding(label)
            if finding is None:
                report.unmap(f"{sf.name}:{n} ({fname})", f"label {label!r} maps to none of {', '.join(FINDINGS)}")
                continue
            path = root / split / fname
            if not path.exists() and (root / fname).exists():
                path = root / fname
            if _admit(path, report):
                rows.append(dict(path=str(path), finding=finding, patient_id=f"{src}:{record_patient(pid)}",
                                 source=f"covidx-{src}", split=split))
    return _table(rows), report


def _split_of(stem: str) -> str | None:
    s = stem.lower()
    for split in ("train", "val", "test"):
        if s.startswith(split) or s.endswith(split) or f"_{split}" in s:
            return split
    return None


# ------------------------------------------------------------------ class-per-folder trees

def read_folders(root: str | Path) -> tuple[pd.DataFrame, IndexReport]:
    """``ROOT/CLASS/*`` or ``ROOT/SPLIT/CLASS/*``; class folder names like ``COVID``, ``Normal``, ``Viral Pneumonia``.

    Such trees carry no patient: ``patient_id`` is left empty for :func:`load_source` (a patient rule, or
    each file its own patient, reported).
    """
    root = Path(root)
    report, rows = IndexReport(), []
    top = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
    if not top:
        raise DatasetError(f"{root}: no class folders")
    if all(_split_of(d.name) == d.name.lower() for d in top):
        groups = [(d.name.lower(), c) for d in top for c in sorted(x for x in d.iterdir() if x.is_dir())]
    else:
        groups = [("", d) for d in top]
    for split, cdir in groups:
        finding = normalize_finding(cdir.name.replace("_", " "))
        if finding is None:
            raise DatasetError(
                f"{cdir}: unknown class folder {cdir.name!r}; expected one of covid19, viral, bacterial, normal, "
                "pneumonia (or synonyms such as COVID, Normal, Viral Pneumonia)"
            )
        for p in _image_files(cdir):
            if _admit(p, report):
                rows.append(dict(path=str(p), finding=finding, patient_id="", source="folders", split=split))
    return _table(rows), report


# ------------------------------------------------------------------ CSV manifest

def read_csv_manifest(path: str | Path) -> tuple[pd.DataFrame, IndexReport]:
    """A CSV with ``path`` and ``finding`` (or ``label``); optional ``patient_id, split, source,
    mask_path, lesion_path``. Relative paths are resolved against the CSV's folder."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.csv"))
        if len(candidates) != 1:
            raise DatasetError(f"{path}: expected exactly one manifest .csv, found {len(candidates)}")
        path = candidates[0]
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    label_col = "finding" if "finding" in df.columns else "label" if "label" in df.columns else None
    if "path" not in df.columns or label_col is None:
        raise DatasetError(f"{path}: a manifest needs columns 'path' and 'finding' (or 'label')")
    base = path.parent
    report, rows = IndexReport(), []

    def resolve(v):
        return str((base / v) if v and not Path(v).is_absolute() else v) if v else ""

    for i, r in df.iterrows():
        p = Path(resolve(r["path"].strip()))
        finding = normalize_finding(r[label_col])
        if finding is None:
            report.unmap(f"{path.name} row {i + 2} ({p.name})", f"label {r[label_col]!r} is not a known finding")
            continue
        if not _admit(p, report):
            continue
        rows.append(dict(
            path=str(p), finding=finding,
            patient_id=r.get("patient_id", "").strip(),
            source=r.get("source", "").strip() or "csv",
            split=r.get("split", "").strip().lower(),
            mask_path=resolve(r.get("mask_path", "").strip()),
            lesion_path=resolve(r.get("lesion_path", "").strip()),
        ))
    return _table(rows), report


# ------------------------------------------------------------------ image / mask folder pairs

def read_masks(root: str | Path) -> tuple[pd.DataFrame, IndexReport]:
    """``images/`` + ``masks/`` (lung masks) and optionally ``lesions/``, matched by file stem."""
    root = Path(root)
    img_dir, mask_dir, lesion_dir = root / "images", root / "masks", root / "lesions"
    if not img_dir.is_dir() or not (mask_dir.is_dir() or lesion_dir.is_dir()):
        raise DatasetError(f"{root}: the masks layout needs images/ and masks/ (or lesions/) folders")

    def by_stem(folder):
        return {p.stem: p for p in _image_files(folder)} if folder.is_dir() else {}

    masks, lesions = by_stem(mask_dir), by_stem(lesion_dir)
    report, rows = IndexReport(), []
    for p in _image_files(img_dir):
        m, l = masks.get(p.stem), lesions.get(p.stem)
        if m is None and l is None:
            report.skip(p, "no mask with the same file stem")
            continue
        if _admit(p, report):
            rows.append(dict(path=str(p), finding="", patient_id="", source="masks", split="",
                             mask_path=str(m) if m else "", lesion_path=str(l) if l else ""))
    stems = {p.stem for p in _image_files(img_dir)}
    for stem, m in sorted({**masks, **lesions}.items()):
        if stem not in stems:
            report.skip(m, "mask without an image of the same stem")
    return _table(rows), report


READERS = {
    "kermany": read_kermany,
    "cohen": read_cohen,
    "covidx": read_covidx,
    "folders": read_folders,
    "csv": read_csv_manifest,
    "masks": read_masks,
}


def detect_layout(root: str | Path) -> str:
    """Guess the layout of a dataset folder (or CSV file)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv"
        raise DatasetError(f"{root}: a file dataset must be a CSV manifest")
    if (root / "metadata.csv").is_file():
        return "cohen"
    if (root / "chest_xray").is_dir() or all((root / s).is_dir() for s in ("train", "test")) and any(
        (root / s / "PNEUMONIA").is_dir() for s in ("train", "test")
    ):
        return "kermany"
    if any(_split_of(p.stem) for p in root.glob("*.txt")):
        return "covidx"
    if (root / "images").is_dir() and ((root / "masks").is_dir() or (root / "lesions").is_dir()):
        return "masks"
    if len(list(root.glob("*.csv"))) == 1:
        return "csv"
    if any(d.is_dir() for d in root.iterdir()):
        return "folders"
    raise DatasetError(f"{root}: cannot tell the dataset layout; pass --layout ({'|'.join(LAYOUTS)})")


def assign_patients(table: pd.DataFrame, report: IndexReport, rule: PatientRule | None = None) -> pd.DataFrame:
    """Fill empty ``patient_id`` values: from ``rule``, else the file is its own patient and is named in
    ``report.no_patient`` (never silently)."""
    empty = table["patient_id"] == ""
    if not empty.any():
        return table
    ids = []
    for path, source in zip(table.loc[empty, "path"], table.loc[empty, "source"]):
        pid = rule.patient_of(path) if rule else None
        if pid:
            ids.append(f"{source}:{pid}")
        else:
            ids.append(f"{source}:{Path(path).name}")
            report.unknown_patient(path, ("patient not found by --patient-pattern/--patient-table"
                                          if rule else "the file does not say its patient (give --patient-pattern "
                                          "or --patient-table)") + "; treated as its own patient")
    table.loc[empty, "patient_id"] = ids
    return table


def load_source(root: str | Path, layout: str | None = None, views: tuple[str, ...] | None = None,
                patients: PatientRule | None = None) -> tuple[pd.DataFrame, IndexReport]:
    """Read one dataset folder in ``layout`` (detected when ``None``).

    ``views`` (Cohen schema): the views kept (:func:`parse_views`); ``patients``: how to read the patient
    of files that do not say it (folders, masks, manifests without ``patient_id``)."""
    layout = layout or detect_layout(root)
    if layout not in READERS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    kwargs = {"views": views} if layout == "cohen" and views is not None else {}
    table, report = READERS[layout](root, **kwargs)
    if table.empty:
        raise DatasetError(f"{root}: no usable images found in the {layout} layout"
                           + (f" ({len(report.skipped)} skipped, {len(report.unmapped)} unmapped)"
                              if report.skipped or report.unmapped else ""))
    table = assign_patients(table, report, patients)
    table["dicom"] = [is_dicom(p) for p in table["path"]]
    return table, report


def load_sources(paths, layouts=None, views: tuple[str, ...] | None = None,
                 patients: PatientRule | None = None) -> tuple[pd.DataFrame, IndexReport]:
    """Read and concatenate several dataset folders (``--data A --data B``); see :func:`load_source`."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    layouts = list(layouts or [])
    if len(layouts) == 1 and len(paths) > 1:
        layouts *= len(paths)
    layouts += [None] * (len(paths) - len(layouts))
    tables, report = [], IndexReport()
    for p, lay in zip(paths, layouts):
        t, r = load_source(p, lay, views=views, patients=patients)
        tables.append(t)
        report.extend(r)
    table = pd.concat(tables, ignore_index=True)
    dup = table["path"].duplicated()
    for p in table.loc[dup, "path"]:
        report.skip(p, "listed twice (duplicate path)")
    return table.loc[~dup].reset_index(drop=True), report
