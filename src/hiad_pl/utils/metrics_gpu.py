"""The tutorial's GPU evaluators (``from hiad_pl.utils import metrics_gpu``).

They compute on ``device`` (default cuda:0) and fall back to the CPU, with one
warning, when CUDA is absent. The implementation lives in :mod:`hiad_pl.metrics`.
"""

from hiad_pl.metrics import (
    UndefinedMetricError,
    compute_imagewise_metrics_gpu,
    compute_pixelwise_metrics_gpu,
    compute_pixelwise_metrics_gpu_resize,
    compute_pro_gpu,
    compute_pro_gpu_resize,
)

__all__ = [
    "UndefinedMetricError",
    "compute_imagewise_metrics_gpu",
    "compute_pixelwise_metrics_gpu",
    "compute_pixelwise_metrics_gpu_resize",
    "compute_pro_gpu",
    "compute_pro_gpu_resize",
]
