"""The tutorial's CPU evaluators (``from hiad_pl.utils import metrics``).

Every function computes on the CPU, whatever ``device`` it is given; the
``*_gpu`` names the tutorial uses in its CPU example are the same CPU
functions. The implementation lives in :mod:`hiad_pl.metrics.evaluators`.

As in HiAD, the evaluators may be called with keywords and only what they
need (``compute_pixelwise_metrics(prediction_masks=maps, gt_masks=masks)``:
scores and labels are optional), and their results also carry HiAD's key
names (``pixel_pro`` next to ``pro``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from hiad_pl.metrics import evaluators as _metrics
from hiad_pl.metrics.inputs import UndefinedMetricError

#: HiAD's name of a result, by hiad-pl's.
HIAD_RESULT_NAMES = {"pro": "pixel_pro"}


def tutorial_evaluator(evaluator: Callable[..., Mapping[str, float]]) -> Callable[..., dict[str, float]]:
    """``evaluator`` callable with keywords and the inputs it uses alone; results under both names."""

    @functools.wraps(evaluator)
    def face(
        prediction_scores: Any = None,
        gt_labels: Any = None,
        prediction_masks: Any = None,
        gt_masks: Any = None,
        device: Any = None,
        **kwargs: Any,
    ) -> dict[str, float]:
        results = evaluator(prediction_scores, gt_labels, prediction_masks, gt_masks, device, **kwargs)
        return {**results, **{HIAD_RESULT_NAMES[k]: v for k, v in results.items() if k in HIAD_RESULT_NAMES}}

    return face


compute_imagewise_metrics = tutorial_evaluator(_metrics.compute_imagewise_metrics)
compute_pixelwise_metrics = tutorial_evaluator(_metrics.compute_pixelwise_metrics)
compute_pixelwise_metrics_resize = tutorial_evaluator(_metrics.compute_pixelwise_metrics_resize)
compute_pro = tutorial_evaluator(_metrics.compute_pro)
compute_pro_resize = tutorial_evaluator(_metrics.compute_pro_resize)

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
    "tutorial_evaluator",
]
