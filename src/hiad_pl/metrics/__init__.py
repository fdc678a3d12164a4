"""Evaluators (image AUROC, pixel AUROC / AP / F1, AUPRO) and metric reports.

One module per role:

- :mod:`~hiad_pl.metrics.curves`: ROC and precision-recall curves and their areas, exact or from binned counts;
- :mod:`~hiad_pl.metrics.inputs`: maps and masks per image, read one at a time; resizing;
- :mod:`~hiad_pl.metrics.binning`: the binned mode's scan, thresholds and binning;
- :mod:`~hiad_pl.metrics.image`, :mod:`~hiad_pl.metrics.pixel`, :mod:`~hiad_pl.metrics.pro`: the metrics;
- :mod:`~hiad_pl.metrics.evaluators`: the CPU evaluators (one signature); :mod:`~hiad_pl.metrics.gpu`: their GPU twins;
- :mod:`~hiad_pl.metrics.resolve`: evaluators from import paths and config dicts;
- :mod:`~hiad_pl.metrics.evaluation`: every evaluator on each class's images;
- :mod:`~hiad_pl.metrics.report`: the per-class report, its tables, ``metrics.json`` and ``metrics.md``.

This package re-exports the names callers use, so ``hiad_pl.metrics.compute_pro`` and
the like stay valid import paths (configs name evaluators that way).
"""

from __future__ import annotations

from hiad_pl.metrics.evaluation import evaluate
from hiad_pl.metrics.evaluators import (
    compute_imagewise_metrics,
    compute_pixelwise_metrics,
    compute_pixelwise_metrics_resize,
    compute_pro,
    compute_pro_resize,
    default_evaluators,
)
from hiad_pl.metrics.gpu import (
    compute_imagewise_metrics_gpu,
    compute_pixelwise_metrics_gpu,
    compute_pixelwise_metrics_gpu_resize,
    compute_pro_gpu,
    compute_pro_gpu_resize,
)
from hiad_pl.metrics.image import image_metrics
from hiad_pl.metrics.inputs import (
    DEFAULT_NUM_THRESHOLDS,
    EXACT_MAX_PIXELS,
    Evaluator,
    UndefinedMetricError,
    UndefinedMetricWarning,
    resize_maps,
)
from hiad_pl.metrics.pixel import pixel_metrics
from hiad_pl.metrics.pro import pro_metric
from hiad_pl.metrics.report import (
    DECISION_COLUMNS,
    MEAN_ROW,
    MetricReport,
    MetricValues,
    format_decisions,
    format_table,
    save_report,
)
from hiad_pl.metrics.resolve import resolve_evaluator

__all__ = [
    "DECISION_COLUMNS",
    "DEFAULT_NUM_THRESHOLDS",
    "EXACT_MAX_PIXELS",
    "MEAN_ROW",
    "Evaluator",
    "MetricReport",
    "MetricValues",
    "UndefinedMetricError",
    "UndefinedMetricWarning",
    "compute_imagewise_metrics",
    "compute_imagewise_metrics_gpu",
    "compute_pixelwise_metrics",
    "compute_pixelwise_metrics_gpu",
    "compute_pixelwise_metrics_gpu_resize",
    "compute_pixelwise_metrics_resize",
    "compute_pro",
    "compute_pro_gpu",
    "compute_pro_gpu_resize",
    "compute_pro_resize",
    "default_evaluators",
    "evaluate",
    "format_decisions",
    "format_table",
    "image_metrics",
    "pixel_metrics",
    "pro_metric",
    "resize_maps",
    "resolve_evaluator",
    "save_report",
]
