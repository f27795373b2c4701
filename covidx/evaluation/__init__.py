"""The papers' evaluation: metrics, significance tests, figures and written reports.

Light on dependencies (NumPy, SciPy, scikit-learn, matplotlib): importing it
does not import TensorFlow.
"""

from covidx.evaluation.confounding import confounding_audit, confounding_markdown, write_confounding_report
from covidx.evaluation.metrics import (
    binary_metrics,
    calibration,
    classification_metrics,
    positive_class_metrics,
    roc_curves,
    segmentation_metrics,
)
from covidx.evaluation.plots import plot_calibration, plot_confusion, plot_roc, plot_roc_comparison
from covidx.evaluation.report import (
    write_classification_report,
    write_comparison_report,
    write_segmentation_report,
)
from covidx.evaluation.sources import one_vs_rest_counts, per_source_metrics, source_label_counts
from covidx.evaluation.stats import (
    compare_models,
    delong_auc_variance,
    delong_macro_test,
    delong_test,
    f_test,
    mcnemar,
    mcnemar_table,
    mcnemar_test,
)

__all__ = [
    "binary_metrics",
    "calibration",
    "classification_metrics",
    "compare_models",
    "confounding_audit",
    "confounding_markdown",
    "delong_auc_variance",
    "delong_macro_test",
    "delong_test",
    "f_test",
    "mcnemar",
    "mcnemar_table",
    "mcnemar_test",
    "one_vs_rest_counts",
    "per_source_metrics",
    "plot_calibration",
    "plot_confusion",
    "plot_roc",
    "plot_roc_comparison",
    "positive_class_metrics",
    "roc_curves",
    "segmentation_metrics",
    "source_label_counts",
    "write_classification_report",
    "write_comparison_report",
    "write_confounding_report",
    "write_segmentation_report",
]
