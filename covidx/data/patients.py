"""Patient identity: from the file-name forms of the published sets, or a pattern / table given by the user.

Splits are grouped by patient, so a patient read wrongly is a leak: Kermany's normal files come as
``IM-0011-0001``, ``IM-0011-0001-0001`` and ``NORMAL2-IM-0011-0001[-0001]``, and taking the whole file
name as the id turns one patient into two. The forms known here:

==========================  ==========================================  =====================
set                         file name / record id                       patient
==========================  ==========================================  =====================
Kermany pneumonia           ``person447_virus_921[_1]``                 ``person447``
Kermany normal              ``IM-0011-0001[-0001]``                     ``IM-0011``
Kermany normal (2nd batch)  ``NORMAL2-IM-0465-0001[-0001]``             ``NORMAL2-IM-0465``
Figure1 / Cohen records     ``COVID-00003a``, ``COVID-00003b``          ``COVID-00003``
==========================  ==========================================  =====================

Other folders (class-per-folder trees, image/mask pairs, manifests without ``patient_id``) carry no
patient: a :class:`PatientRule` reads it from the file name (a regular expression) or from a table
(CSV ``path|filename, patient_id``). A file whose patient cannot be read is reported by the readers,
never silently made its own patient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

KERMANY_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_\d+(?:_\d+)*$", re.I)
KERMANY_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+(?:-\d+)*$", re.I)
# Figure1 (and Cohen) give each image of one patient the patient's number plus a letter: COVID-00003a, -00003b.
LETTER_SUFFIX = re.compile(r"^(.*\d)[a-z]$")


def kermany_patient(stem: str) -> tuple[str | None, str | None]:
    """(patient, organism) from a Kermany file stem; organism is ``bacteria``/``virus`` or ``None`` for normal files.

    >>> kermany_patient("person447_virus_921_1")
    ('person447', 'virus')
    >>> kermany_patient("NORMAL2-IM-0465-0001-0002")
    ('NORMAL2-IM-0465', None)
    """
    m = KERMANY_PNEUMONIA.match(stem)
    if m:
        return m.group(1), m.group(2).lower()
    m = KERMANY_NORMAL.match(stem)
    if m:
        return m.group(1), None
    return None, None


def record_patient(record_id: str) -> str:
    """Patient of a Figure1/Cohen record id: a trailing letter after a number marks one image of the patient."""
    rid = str(record_id).strip()
    m = LETTER_SUFFIX.match(rid)
    return m.group(1) if m else rid


@dataclass
class PatientRule:
    """How to read the patient of a file that does not say it: ``pattern`` and/or ``table``.

    ``pattern``: a regular expression searched in the file name (with extension); the patient is the group
    named ``patient``, else group 1, else the whole match (``--patient-pattern '^(\\d+)_'``).
    ``table``: a CSV with ``patient_id`` and ``path`` (relative paths are taken from the CSV's folder) or
    ``filename`` (matched on the file name alone) (``--patient-table patients.csv``). The table wins when both
    know a file.
    """

    pattern: str | None = None
    table: str | None = None
    _regex: re.Pattern | None = field(default=None, init=False, repr=False)
    _by_path: dict = field(default_factory=dict, init=False, repr=False)
    _by_name: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.pattern:
            try:
                self._regex = re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"--patient-pattern {self.pattern!r} is not a regular expression: {e}") from None
        if self.table:
            path = Path(self.table)
            if not path.is_file():
                raise ValueError(f"{path}: no such patient table")
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
            key = "path" if "path" in df.columns else "filename" if "filename" in df.columns else None
            if key is None or "patient_id" not in df.columns:
                raise ValueError(f"{path}: a patient table needs columns 'patient_id' and 'path' (or 'filename')")
            for k, pid in zip(df[key].str.strip(), df["patient_id"].str.strip()):
                if not k or not pid:
                    continue
                if key == "path":
                    p = Path(k) if Path(k).is_absolute() else path.parent / k
                    self._by_path[str(p.resolve())] = pid
                else:
                    self._by_name[k] = pid

    def __bool__(self):
        return bool(self.pattern or self.table)

    def patient_of(self, path: str | Path) -> str | None:
        p = Path(path)
        if self._by_path or self._by_name:
            pid = self._by_path.get(str(p.resolve())) or self._by_name.get(p.name)
            if pid:
                return pid
        if self._regex is not None:
            m = self._regex.search(p.name)
            if m:
                if "patient" in self._regex.groupindex:
                    return m.group("patient")
                return m.group(1) if self._regex.groups else m.group(0)
        return None
