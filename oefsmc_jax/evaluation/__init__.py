"""Evaluation: accuracy metrics (top-1, balanced, per-class, many/medium/few), paired comparisons, reports."""

from oefsmc_jax.evaluation.metrics import (
    GROUPS,
    agreement,
    class_order,
    classification_metrics,
    confusion_matrix,
    paired_difference,
    shot_groups,
    t_critical,
)
from oefsmc_jax.evaluation.report import (
    format_count,
    format_percent,
    format_ratio,
    format_signed,
    format_table,
    plot_per_class,
    side_by_side,
    write_report,
)

__all__ = [
    "GROUPS",
    "agreement",
    "class_order",
    "classification_metrics",
    "confusion_matrix",
    "format_count",
    "format_percent",
    "format_ratio",
    "format_signed",
    "format_table",
    "paired_difference",
    "plot_per_class",
    "shot_groups",
    "side_by_side",
    "t_critical",
    "write_report",
]
