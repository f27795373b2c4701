"""Reports on trained runs: what to evaluate a run on, its metrics report, pairwise comparisons.

The library behind ``python -m covidx.evaluate``: predictions come from :func:`covidx.runs.predict_table`
(the run's own preprocessing), figures and tables from :mod:`covidx.evaluation`, the shortcut audit
from :func:`covidx.explain.runs.run_audit`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from covidx.data import load_sources, select_task
from covidx.data.verify import verify_table
from covidx.evaluation import (
    confounding_audit,
    write_classification_report,
    write_comparison_report,
    write_confounding_report,
    write_segmentation_report,
)
from covidx.runs import lung_region_input, predict_table


def evaluation_table(run, data=None, layouts=None, split: str | None = "test") -> pd.DataFrame:
    """The rows to evaluate ``run`` on: its held-out split, or ``data`` (a split of it when it has one)."""
    if data:
        table, report = load_sources(data, layouts)
        table = verify_table(table, report)
        for line in report.lines()[:20]:
            print(f"  {line}", file=sys.stderr)
        table = select_task(table, run.task)
        if split and (table["split"] == split).any():
            table = table[table["split"] == split]
        return table.reset_index(drop=True)
    table = run.split_table()
    if table is None:
        raise FileNotFoundError(f"{run.checkpoint}: no split.csv beside it; pass --data to say what to evaluate on")
    split = split or "test"
    table = table[table["split"] == split]
    if table.empty:
        raise ValueError(f"{run.checkpoint}: its {split} split is empty")
    return table.reset_index(drop=True)


def validation_of(run, data=None, split: str | None = "test") -> dict | None:
    """``{"kind": "external", "source": S}`` when ``run`` held source S out (``--test-source``) and is
    evaluated on that held-out split; ``None`` otherwise."""
    if run.config.test_source and not data and (split or "test") == "test":
        return run.config.validation
    return None


def evaluate_run(run, table: pd.DataFrame, out_dir: Path, n_bootstrap: int = 1000, batch_size: int = 16,
                 confounding: bool | None = None, validation: dict | None = None) -> dict:
    """A run's report on ``table``; a Regional-Learning run is scored on the lung region when every row
    has a lung mask (:func:`covidx.runs.lung_region_input`), the input the cascade gives it.

    Classifiers are also scored per source (the table's ``source`` column). ``confounding`` (``None``: when
    ``table`` holds more than one source) adds the source-confounding audit
    (:func:`covidx.evaluation.confounding_audit`) as ``m["confounding"]`` and ``confounding.json/.md``;
    ``validation`` (:func:`validation_of`) is recorded in the report."""
    probs, targets = predict_table(run, table, batch_size, lung_region=lung_region_input(run, table))
    name = run.name
    if run.config.kind == "segmentation" or probs.ndim == 4:
        pred = probs.argmax(-1)
        return write_segmentation_report(targets, pred, out_dir, ids=list(table["path"]))
    y_true = table["label_index"].to_numpy().astype(int)
    sources = table["source"].astype(str).to_numpy() if "source" in table else None
    m = write_classification_report(y_true, probs, run.class_names, out_dir,
                                    patient_ids=list(table["patient_id"]), model_name=name,
                                    n_bootstrap=n_bootstrap, sources=sources, validation=validation)
    if confounding is None:
        confounding = sources is not None and len(set(sources)) > 1
    if confounding:
        if sources is None:
            raise ValueError("the confounding audit needs the source of every image (a 'source' column)")
        audit = confounding_audit(y_true, probs, run.class_names, sources)
        audit["files"] = write_confounding_report(audit, out_dir, model_name=name)
        m["confounding"] = audit
    return m


def compare(results: dict, out_root: Path, batch_size: int = 16):
    """Pairwise comparison on the cases every run was evaluated on."""
    common = set.intersection(*(set(t["path"]) for _, t in results.values()))
    classes = {tuple(r.class_names) for r, _ in results.values()}
    if len(classes) > 1:
        print("  (no comparison: the runs have different classes)")
        return
    if not common:
        print("  (no comparison: the runs share no evaluation images; pass --data)")
        return
    paired = {}
    for key, (run, table) in results.items():
        t = table[table["path"].isin(common)].sort_values("path").reset_index(drop=True)
        probs, _ = predict_table(run, t, batch_size, lung_region=lung_region_input(run, t))
        paired[key] = (t["label_index"].to_numpy().astype(int), probs)
    report = write_comparison_report(paired, list(classes.pop()), out_root)
    print(f"comparison of {len(paired)} models on {len(common)} shared images -> {report['files']['markdown']}")
    (out_root / "comparison.json").write_text(json.dumps(report["rows"], indent=2, default=float))
