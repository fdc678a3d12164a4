"""The tutorial's CPU evaluators (``from hiad_pl.utils import metrics``).

Every function computes on the CPU, whatever ``device`` it is given; the
``*_gpu`` names the tutorial uses in its CPU example are the same CPU
functions. The implementation lives in :mod:`hiad_pl.metrics`.
"""

from hiad_pl.metrics import (
    UndefinedMetricError,
    compute_imagewise_metrics,
    compute_pixelwise_metrics,
    compute_pixelwise_metrics_resize,
    compute_pro,
    compute_pro_resize,
)

compute_imagewise_metrics_gpu = compute_imagewise_metrics
compute_pixelwise_metrics_gpu = compute_pixelwise_metrics
compute_pixelwise_metrics_gpu_resize = compute_pixelwise_metrics_resize
compute_pro_gpu = compute_pro
compute_pro_gpu_resize = compute_pro_resize

__all__ = [
    "UndefinedMetricError",
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
]
