"""The CPU evaluators: one signature for image, pixel and PRO metrics.

Every evaluator has one signature::

    fn(prediction_scores, gt_labels, prediction_masks, gt_masks, device=None, **kwargs)
        -> dict[str, float]

``prediction_scores`` and ``gt_labels`` hold one value per image;
``prediction_masks`` and ``gt_masks`` one map and one mask (or ``None``) per
image (:mod:`hiad_pl.metrics.inputs`). Pixel metrics take ``mode``:

* ``"exact"`` keeps every pixel and evaluates every distinct score, like scikit-learn;
* ``"binned"`` streams the maps against fixed thresholds (:mod:`hiad_pl.metrics.binning`),
  in memory ``O(thresholds)`` whatever the resolution;
* ``"auto"`` (the default) is exact up to :data:`~hiad_pl.metrics.inputs.EXACT_MAX_PIXELS`
  pixels and binned above.

The evaluators compute on the CPU whatever ``device`` they are given (they take no
accelerator memory while a model trains); their GPU twins
(:mod:`hiad_pl.metrics.gpu`) run the same code on an accelerator.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import torch

from hiad_pl.metrics.image import image_metrics
from hiad_pl.metrics.inputs import DEFAULT_NUM_THRESHOLDS, ArrayLike, Device, Evaluator, Mode, resize_maps
from hiad_pl.metrics.pixel import PIXEL_METRICS, pixel_metrics
from hiad_pl.metrics.pro import pro_metric

CPU = torch.device("cpu")
#: Where the evaluators compute: the CPU, unless a GPU twin (:func:`hiad_pl.metrics.gpu.on_accelerator`) is running.
TARGET: ContextVar[torch.device] = ContextVar("hiad_pl_metrics_target", default=CPU)

def compute_imagewise_metrics(
    prediction_scores: ArrayLike | Sequence[float],
    gt_labels: ArrayLike | Sequence[int],
    prediction_masks: Sequence[ArrayLike] | None = None,
    gt_masks: Sequence[ArrayLike | None] | None = None,
    device: Device = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Image AUROC and ``image_threshold`` (the score maximising TPR - FPR), on the CPU.

    ``device`` belongs to the evaluator signature and is ignored: the CPU
    evaluators take no accelerator memory (e.g. while a model trains).
    """
    return image_metrics(prediction_scores, gt_labels, device=TARGET.get())


def compute_pixelwise_metrics(
    prediction_scores: Any,
    gt_labels: Any,
    prediction_masks: Sequence[ArrayLike],
    gt_masks: Sequence[ArrayLike | None] | None,
    device: Device = None,
    *,
    mode: Mode = "auto",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
    **kwargs: Any,
) -> dict[str, float]:
    """``pixel_auroc``, ``pixel_ap``, ``pixel_f1`` (best F1) and ``seg_threshold``, on the CPU.

    ``mode`` is 'auto', 'exact' or 'binned' (see the module docstring);
    ``device`` is ignored.
    """
    return pixel_metrics(prediction_masks, gt_masks, device=TARGET.get(), mode=mode, num_thresholds=num_thresholds)


def compute_pixelwise_metrics_resize(
    prediction_scores: Any,
    gt_labels: Any,
    prediction_masks: Sequence[ArrayLike],
    gt_masks: Sequence[ArrayLike | None] | None,
    device: Device = None,
    *,
    resize: int | Sequence[int],
    mode: Mode = "auto",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
    **kwargs: Any,
) -> dict[str, float]:
    """:func:`compute_pixelwise_metrics` on maps resized to ``resize`` (int or (width, height)).

    Maps are resized bilinearly and masks by nearest neighbour.
    """
    maps, masks = resize_maps(prediction_masks, gt_masks, resize, TARGET.get())
    return pixel_metrics(maps, masks, device=TARGET.get(), mode=mode, num_thresholds=num_thresholds)


def compute_pro(
    prediction_scores: Any,
    gt_labels: Any,
    prediction_masks: Sequence[ArrayLike],
    gt_masks: Sequence[ArrayLike | None] | None,
    device: Device = None,
    *,
    mode: Mode = "auto",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
    fpr_limit: float = 0.3,
    **kwargs: Any,
) -> dict[str, float]:
    """``pro``: area under the per-region-overlap curve up to FPR 0.3, normalised, on the CPU."""
    return pro_metric(
        prediction_masks, gt_masks, device=TARGET.get(), mode=mode, num_thresholds=num_thresholds, fpr_limit=fpr_limit
    )


def compute_pro_resize(
    prediction_scores: Any,
    gt_labels: Any,
    prediction_masks: Sequence[ArrayLike],
    gt_masks: Sequence[ArrayLike | None] | None,
    device: Device = None,
    *,
    resize: int | Sequence[int],
    mode: Mode = "auto",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
    fpr_limit: float = 0.3,
    **kwargs: Any,
) -> dict[str, float]:
    """:func:`compute_pro` on maps resized to ``resize`` (bilinear maps, nearest masks)."""
    maps, masks = resize_maps(prediction_masks, gt_masks, resize, TARGET.get())
    return pro_metric(
        maps, masks, device=TARGET.get(), mode=mode, num_thresholds=num_thresholds, fpr_limit=fpr_limit
    )


def default_evaluators() -> list[Evaluator]:
    """The default evaluation: image metrics, pixel metrics and AUPRO at full resolution."""
    return [compute_imagewise_metrics, compute_pixelwise_metrics, compute_pro]


#: Evaluators that read image scores and labels only: they see every image, masks or not.
IMAGE_EVALUATORS = ("compute_imagewise_metrics", "compute_imagewise_metrics_gpu")
#: The metrics of this module's pixel evaluators, by name prefix (recorded as skipped without calling them).
PIXEL_EVALUATOR_KEYS = {"compute_pixelwise_metrics": PIXEL_METRICS, "compute_pro": ("pro",)}


def own_name(evaluator: Evaluator) -> str | None:
    """The name of ``evaluator`` (or of the function a partial binds) when it is one of this module's evaluators.

    Their GPU twins and the tutorial's faces (``functools.wraps``) carry this module's name too.
    """
    while isinstance(evaluator, functools.partial):
        evaluator = evaluator.func
    return getattr(evaluator, "__name__", None) if getattr(evaluator, "__module__", None) == __name__ else None


def is_image_evaluator(evaluator: Evaluator) -> bool:
    """Whether ``evaluator`` is one of :data:`IMAGE_EVALUATORS`."""
    return own_name(evaluator) in IMAGE_EVALUATORS


def skipped_keys(evaluator: Evaluator, name: str) -> tuple[str, ...]:
    """The metrics a pixel evaluator would produce (its name for an evaluator of another module)."""
    own = own_name(evaluator) or ""
    return next((keys for prefix, keys in PIXEL_EVALUATOR_KEYS.items() if own.startswith(prefix)), (name,))
