"""The tutorial's GPU evaluators (``from hiad_pl.utils import metrics_gpu``).

They compute on ``device`` (default cuda:0) and fall back to the CPU, with one
warning, when CUDA is absent. The implementation lives in :mod:`hiad_pl.metrics.gpu`;
like :mod:`hiad_pl.utils.metrics` they take keywords and the inputs they use alone,
and report HiAD's key names too (``pixel_pro``).
"""

from hiad_pl.metrics import gpu as _metrics
from hiad_pl.metrics.inputs import UndefinedMetricError
from hiad_pl.utils.metrics import tutorial_evaluator

compute_imagewise_metrics_gpu = tutorial_evaluator(_metrics.compute_imagewise_metrics_gpu)
compute_pixelwise_metrics_gpu = tutorial_evaluator(_metrics.compute_pixelwise_metrics_gpu)
compute_pixelwise_metrics_gpu_resize = tutorial_evaluator(_metrics.compute_pixelwise_metrics_gpu_resize)
compute_pro_gpu = tutorial_evaluator(_metrics.compute_pro_gpu)
compute_pro_gpu_resize = tutorial_evaluator(_metrics.compute_pro_gpu_resize)

__all__ = [
    "UndefinedMetricError",
    "compute_imagewise_metrics_gpu",
    "compute_pixelwise_metrics_gpu",
    "compute_pixelwise_metrics_gpu_resize",
    "compute_pro_gpu",
    "compute_pro_gpu_resize",
]
