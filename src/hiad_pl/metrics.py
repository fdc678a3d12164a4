"""Evaluators (image AUROC, pixel AUROC / AP / F1, AUPRO) and metric reports.

Every evaluator has one signature::

    fn(prediction_scores, gt_labels, prediction_masks, gt_masks, device=None, **kwargs)
        -> dict[str, float]

``prediction_scores`` and ``gt_labels`` hold one value per image;
``prediction_masks`` holds one ``[H, W]`` anomaly map per image (higher = more
anomalous) and ``gt_masks`` one ``[H, W]`` mask per image, where any value above
zero marks a defect and ``None`` stands for an all-normal image.

Pixel metrics stream over the images and never concatenate them when binned:

* ``mode="exact"`` keeps every pixel and evaluates every distinct score, like
  scikit-learn;
* ``mode="binned"`` reads the maps twice. A first pass finds the score range and
  draws a fixed-size random sample of normal and of defect pixels; the
  thresholds are the union of quantiles of both samples and an even grid over
  [min, max]. The second pass histograms every pixel against those thresholds
  (torchmetrics' multi-threshold confusion matrix; a lookup table finds most
  pixels' bins in O(1)), so memory is ``O(thresholds)`` whatever the
  resolution. Quantile thresholds bound the share of normal (and of
  defect) pixels that fall between two thresholds, which is what bounds the
  error of the binned AUROC, AP and PRO; an even grid alone fails on
  heavy-tailed maps, where one hot pixel squeezes every other score into the
  first bin;
* ``mode="auto"`` (the default) is exact up to :data:`EXACT_MAX_PIXELS` pixels
  and binned above.

The per-region overlap (PRO) weighs each defect pixel by ``1 / (size of its
connected region)``: the mean overlap over all regions at a threshold is then
the weighted share of defect pixels above it, so the PRO curve is a weighted ROC
curve and needs no loop over regions or thresholds.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryPrecisionRecallCurve
from torchmetrics.utilities.data import dim_zero_cat

from hiad_pl import curves
from hiad_pl.data.tiling import as_pair
from hiad_pl.errors import ConfigTypeError
from hiad_pl.run_folder import atomic_write
from hiad_pl.utils.array_store import Picked

__all__ = [
    "EXACT_MAX_PIXELS",
    "DEFAULT_NUM_THRESHOLDS",
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
    "format_table",
    "image_metrics",
    "pixel_metrics",
    "pro_metric",
    "resize_maps",
    "resolve_evaluator",
    "save_report",
]

log = logging.getLogger("hiad_pl")

ArrayLike = np.ndarray | Tensor
Device = torch.device | str | None
Mode = Literal["auto", "exact", "binned"]
Evaluator = Callable[..., Mapping[str, float]]

#: Largest total pixel count evaluated exactly by ``mode="auto"`` (2**21, e.g.
#: eight 512x512 maps). Exact mode sorts every pixel three times: at this size
#: it takes about 1.5 s and 150 MB on one CPU core, five times the binned
#: mode's time, and both grow with the pixel count (~70 bytes a pixel; 11 s at
#: 8M pixels; benchmarks/bench_metrics.py --calibrate).
EXACT_MAX_PIXELS = 2**21
#: Threshold budget of the binned mode. Half are quantiles of the normal
#: pixels, so the binned AUROC is off by at most half of 1/2000 (measured
#: ~1e-4 on the benchmark maps against 2.5e-4 with 1000 thresholds); binning
#: costs only the logarithm of the number of thresholds.
DEFAULT_NUM_THRESHOLDS = 4000
#: Pixels drawn in the first pass to place the quantile thresholds.
_SAMPLE_SIZE = 2**20
_PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1", "seg_threshold")
_IMAGE_METRICS = ("image_auroc", "image_threshold")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class UndefinedMetricError(ValueError):
    """A metric cannot be computed from this data (e.g. AUROC with one class only)."""

    def __init__(self, metrics: Sequence[str], reason: str) -> None:
        self.metrics = tuple(metrics)
        self.reason = reason
        super().__init__(f"{', '.join(self.metrics) or 'metric'} undefined: {reason}")


class UndefinedMetricWarning(UserWarning):
    """Warned by :func:`evaluate` when a class's metric is recorded as null."""


# --------------------------------------------------------------------------- input


def _map_tensor(value: ArrayLike, index: int, device: torch.device) -> Tensor:
    """One anomaly map as a flat float tensor on ``device``."""
    if isinstance(value, Tensor):
        tensor = value.detach()
    else:
        array = np.ascontiguousarray(value)
        with warnings.catch_warnings():
            # read-only arrays (memory maps) are shared, never written
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
    if tensor.ndim != 2:
        raise ValueError(
            f"prediction_masks[{index}] has shape {tuple(tensor.shape)}; expected a 2-D map [H, W]"
        )
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    return tensor.to(device).reshape(-1)


def _defect_mask(value: ArrayLike | None, index: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """The boolean defect mask of one image, or None when it has no defect pixel."""
    if value is None:
        return None
    array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
    if array.shape != shape:
        raise ValueError(
            f"gt_masks[{index}] has shape {array.shape} but prediction_masks[{index}] has {shape}"
        )
    mask = array > 0
    return mask if mask.any() else None


def _pairs(maps: Sequence[ArrayLike], masks: Sequence[ArrayLike | None] | None) -> Sequence[tuple[ArrayLike, ArrayLike | None]]:
    """Pair maps with masks, checking that both lists have one entry per image.

    The pairs are read on access, so maps and masks held on disk (an
    :class:`~hiad_pl.utils.array_store.ArrayStore`) are loaded one at a time.
    """
    masks = [None] * len(maps) if masks is None else masks
    if len(maps) != len(masks):
        raise ValueError(
            f"prediction_masks has {len(maps)} maps but gt_masks has {len(masks)} masks"
        )
    if len(maps) == 0:
        raise ValueError("prediction_masks is empty: nothing to evaluate")
    return _Paired(maps, masks)


class _Paired(Sequence):
    """``(maps[i], masks[i])`` for each image, read on access."""

    def __init__(self, maps: Sequence[ArrayLike], masks: Sequence[ArrayLike | None]) -> None:
        self.maps, self.masks = maps, masks

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index: int) -> tuple[ArrayLike, ArrayLike | None]:  # type: ignore[override]
        if not 0 <= index < len(self.maps):
            raise IndexError(index)
        return self.maps[index], self.masks[index]


def _num_pixels(pairs: Sequence[tuple[ArrayLike, ArrayLike | None]]) -> int:
    """Total pixel count, from the shapes alone."""
    return sum(math.prod(np.shape(prediction)) for prediction, _ in pairs)


def _resolve_mode(mode: str, num_pixels: int, num_thresholds: int) -> Literal["exact", "binned"]:
    """Turn ``auto`` into ``exact`` or ``binned`` by size, checking the options."""
    if num_thresholds < 8:
        raise ValueError(f"num_thresholds must be at least 8, got {num_thresholds}")
    if mode == "auto":
        return "exact" if num_pixels <= EXACT_MAX_PIXELS else "binned"
    if mode not in ("exact", "binned"):
        raise ValueError(f"mode must be 'auto', 'exact' or 'binned', got {mode!r}")
    return mode  # type: ignore[return-value]


@dataclass
class _Image:
    """One image prepared for a metric update: flat scores and its defect pixels."""

    scores: Tensor
    defect_index: Tensor
    mask: np.ndarray | None


def _images(
    pairs: Sequence[tuple[ArrayLike, ArrayLike | None]], device: torch.device
) -> Iterator[_Image]:
    """Yield the images one at a time, so that at most one map is materialised."""
    for index, (prediction, gt) in enumerate(pairs):
        shape = tuple(np.shape(prediction))
        scores = _map_tensor(prediction, index, device)
        mask = _defect_mask(gt, index, shape)
        flat = np.empty(0, dtype=np.int64) if mask is None else np.flatnonzero(mask)
        yield _Image(scores, torch.from_numpy(flat).to(device), mask)


# --------------------------------------------------------------------- thresholds


@dataclass
class _Scan:
    """What the first pass learns: range, dtype, class counts and pixel samples."""

    low: float
    high: float
    dtype: torch.dtype
    num_defect: int
    num_normal: int
    normal_sample: Tensor
    defect_sample: Tensor


def _scan(
    pairs: Sequence[tuple[ArrayLike, ArrayLike | None]], device: torch.device, sample: bool
) -> _Scan:
    """First pass: validate, count classes and (if ``sample``) draw pixel samples."""
    generator = torch.Generator().manual_seed(0)
    per_image = -(-_SAMPLE_SIZE // len(pairs))
    lows, highs, normal, defect = [], [], [], []
    dtype, num_defect, num_normal = torch.float32, 0, 0
    for index, image in enumerate(_images(pairs, device)):
        low, high = torch.aminmax(image.scores)
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise ValueError(f"prediction_masks[{index}] contains NaN or infinite scores")
        lows.append(low)
        highs.append(high)
        if image.scores.dtype == torch.float64:
            dtype = torch.float64
        num_defect += image.defect_index.numel()
        num_normal += image.scores.numel() - image.defect_index.numel()
        if sample:
            normal.append(_normal_sample(image, per_image, generator))
            defect.append(_random_subset(image.scores[image.defect_index], per_image, generator))
    return _Scan(
        low=float(torch.stack(lows).min()),
        high=float(torch.stack(highs).max()),
        dtype=dtype,
        num_defect=num_defect,
        num_normal=num_normal,
        normal_sample=torch.cat(normal).to(dtype) if sample else torch.empty(0),
        defect_sample=torch.cat(defect).to(dtype) if sample else torch.empty(0),
    )


def _normal_sample(image: _Image, size: int, generator: torch.Generator) -> Tensor:
    """Up to ``size`` random scores of normal pixels, drawn with replacement."""
    drawn = torch.randint(0, image.scores.numel(), (size,), generator=generator)
    if image.mask is not None:
        drawn = drawn[torch.from_numpy(~image.mask.reshape(-1)[drawn.numpy()])]
    return image.scores[drawn.to(image.scores.device)]


def _random_subset(values: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """``values`` itself when short enough, else ``size`` of them drawn at random."""
    if values.numel() <= size:
        return values
    drawn = torch.randperm(values.numel(), generator=generator)[:size]
    return values[drawn.to(values.device)]


def _quantiles(sample: Tensor, levels: Tensor) -> Tensor:
    """Sample values at the given levels (nearest rank), so ties stay exact."""
    if sample.numel() == 0:
        return sample
    ordered = torch.sort(sample).values
    ranks = (levels.to(ordered.device) * (ordered.numel() - 1)).round().long()
    return ordered[ranks]


def _binned_thresholds(scan: _Scan, num_thresholds: int, normal_levels: Tensor) -> Tensor:
    """Sorted thresholds: quantiles of normal and defect pixels plus an even grid.

    Half the budget goes to the normal pixels' quantiles at ``normal_levels``, a
    quarter to the defect pixels' quantiles and a quarter to [min, max]. One
    threshold just above the maximum starts every curve at (0, 0).
    """
    device = scan.normal_sample.device
    quarter = num_thresholds // 4
    even = torch.linspace(scan.low, scan.high, num_thresholds - 3 * quarter, dtype=torch.float64)
    high = torch.tensor(scan.high, dtype=scan.dtype)
    above = torch.nextafter(high, torch.tensor(math.inf, dtype=scan.dtype))
    parts = [
        _quantiles(scan.normal_sample, normal_levels),
        _quantiles(scan.defect_sample, torch.linspace(0, 1, quarter, dtype=torch.float64)),
        even.to(device=device, dtype=scan.dtype),
        above.to(device).reshape(1),
    ]
    return torch.unique(torch.cat([part.to(scan.dtype) for part in parts]))


class _Binner:
    """``torch.bucketize(scores, thresholds, right=True)``, mostly by table lookup.

    [low, high] is cut into equal cells. Every score in a cell that no threshold
    comes near falls in the same bin, read from a table in O(1); the scores in
    the few cells a threshold touches are bucketized exactly. The result is
    bucketize's, three times as fast on a CPU.
    """

    cells = 2**17
    #: A threshold within this many cells of a cell makes it inexact. Rounding
    #: moves a float32 score's computed cell by at most ~3 * 2**-24 * cells
    #: (0.024) cells; the margin is ten times that.
    margin = 0.25

    def __init__(self, thresholds: Tensor, low: float, high: float) -> None:
        self.thresholds = thresholds
        self.low = low
        self.scale = self.cells / (high - low) if high > low else 0.0
        self.table: Tensor | None = None
        if self.scale:
            index = torch.arange(self.cells, dtype=torch.float64, device=thresholds.device)
            exact = thresholds.double()
            below = torch.bucketize(low + (index - self.margin) / self.scale, exact, right=True)
            above = torch.bucketize(low + (index + 1 + self.margin) / self.scale, exact, right=True)
            # int32 throughout: half the memory traffic of int64, 1.5x faster
            self.table = torch.where(below == above, below, -1).int()

    def __call__(self, scores: Tensor) -> Tensor:
        """The bin of each score (int32): how many thresholds are at or below it."""
        if self.table is None:
            return torch.bucketize(scores, self.thresholds, right=True, out_int32=True)
        cell = scores.sub(self.low).mul_(self.scale).int().clamp_(0, self.cells - 1)
        bins = self.table[cell]
        inexact = torch.nonzero(bins < 0).squeeze(1)
        bins[inexact] = torch.bucketize(scores[inexact], self.thresholds, right=True, out_int32=True)
        return bins


def _above(bins: Tensor, size: int, weights: Tensor | None = None) -> Tensor:
    """Per threshold, how many (or what weight of) binned pixels score at least it.

    Binning costs O(log T) per pixel, where torchmetrics' own update makes one
    pass per threshold; suffix sums of the bin counts then give the counts
    above each of the ``size - 1`` thresholds.
    """
    counts = torch.bincount(bins, weights=weights, minlength=size)
    return counts.flip(0).cumsum(0).flip(0)[1:]


# ----------------------------------------------------------------- pixel metrics


class _PixelCurve(BinaryPrecisionRecallCurve):
    """torchmetrics' binary PR curve fed with raw scores and defect pixel indexes.

    Scores are used as given (no sigmoid, whatever their range). With a
    binner the update adds a histogram-built multi-threshold confusion matrix,
    identical to torchmetrics' own but one pass per image; without, the scores
    and targets are kept for an exact curve.
    """

    def __init__(self, binner: _Binner | None) -> None:
        super().__init__(thresholds=None if binner is None else binner.thresholds, validate_args=False)
        self.binner = binner

    def update(self, scores: Tensor, defect_index: Tensor) -> None:  # type: ignore[override]
        """Add one image: flat scores and the flat indexes of its defect pixels."""
        if self.binner is None:
            target = torch.zeros(scores.numel(), dtype=torch.uint8, device=scores.device)
            target[defect_index] = 1
            self.preds.append(scores)
            self.target.append(target)
            return
        bins = self.binner(scores)
        size = self.thresholds.numel() + 1
        predicted, true_positive = _above(bins, size), _above(bins[defect_index], size)
        num_defect = defect_index.numel()
        self.confmat[:, 1, 1] += true_positive
        self.confmat[:, 0, 1] += predicted - true_positive
        self.confmat[:, 1, 0] += num_defect - true_positive
        self.confmat[:, 0, 0] += scores.numel() - num_defect - (predicted - true_positive)

    def state(self) -> Tensor | tuple[Tensor, Tensor]:
        """Every score and its label, or the ``[T, 2, 2]`` counts at the binned thresholds (float64)."""
        if self.binner is None:
            return dim_zero_cat(self.preds), dim_zero_cat(self.target)
        return self.confmat.double()


def pixel_metrics(
    prediction_masks: Sequence[ArrayLike],
    gt_masks: Sequence[ArrayLike | None] | None,
    *,
    device: Device = "cpu",
    mode: Mode = "auto",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
) -> dict[str, float]:
    """Pixel AUROC, AP, best F1 and its threshold (``seg_threshold``) over all maps."""
    device = torch.device(device)
    pairs = _pairs(prediction_masks, gt_masks)
    resolved = _resolve_mode(mode, _num_pixels(pairs), num_thresholds)
    scan = _scan(pairs, device, sample=resolved == "binned")
    _require_both_classes(scan, _PIXEL_METRICS)
    binner = None
    if resolved == "binned":
        levels = torch.linspace(0, 1, num_thresholds // 2, dtype=torch.float64)
        binner = _Binner(_binned_thresholds(scan, num_thresholds, levels), scan.low, scan.high)
    curve = _PixelCurve(binner).to(device)
    for image in _images(pairs, device):
        curve.update(image.scores.to(scan.dtype), image.defect_index)
    state = curve.state()
    if isinstance(state, tuple):  # every score: exact curves
        precision, recall, curve_thresholds = curves.pr_from_scores(*state)
        auroc = curves.area(*curves.roc_from_scores(*state)[:2])
    else:
        precision, recall = curves.pr_from_counts(state)
        curve_thresholds = curve.thresholds
        auroc = curves.area(*curves.roc_from_counts(state))
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall), nan=0.0)[:-1]
    best = int(torch.argmax(f1))
    return {
        "pixel_auroc": auroc,
        "pixel_ap": curves.average_precision(precision, recall),
        "pixel_f1": float(f1[best]),
        "seg_threshold": float(curve_thresholds[best]),
    }


def _require_both_classes(scan: _Scan, metrics: Sequence[str]) -> None:
    """Raise :class:`UndefinedMetricError` unless both normal and defect pixels exist."""
    if scan.num_defect == 0:
        raise UndefinedMetricError(metrics, "the ground-truth masks hold no anomalous pixel")
    if scan.num_normal == 0:
        raise UndefinedMetricError(metrics, "every pixel is anomalous; there is no normal pixel")


# ----------------------------------------------------------------------------- PRO


def _region_weights(mask: np.ndarray) -> np.ndarray:
    """``1 / size of its 8-connected region`` for each defect pixel, in row-major order."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    # labelling only the defects' bounding box keeps this cheap on large maps
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    labels, _ = ndimage.label(crop, structure=_EIGHT_CONNECTED)
    region = labels[crop]
    return 1.0 / np.bincount(region)[region]


class _RegionOverlapCurve(Metric):
    """Streaming per-region-overlap curve: PRO and FPR against the threshold.

    Normal pixels count once towards the FPR; defect pixels count
    ``1 / region size`` towards the PRO, so the weighted share of defect
    pixels above a threshold is the mean overlap of all regions.
    """

    full_state_update = False

    def __init__(self, binner: _Binner | None, fpr_limit: float) -> None:
        super().__init__()
        self.fpr_limit = fpr_limit
        self.binner = binner
        if binner is None:
            for name in ("preds", "target", "weights"):
                self.add_state(name, default=[], dist_reduce_fx="cat")
        else:
            size = binner.thresholds.numel()
            self.add_state("normal_above", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("overlap_above", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("num_normal", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("num_regions", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Tensor, defect_index: Tensor, defect_weight: Tensor) -> None:
        """Add one image: flat scores, its defect pixels and their region weights."""
        if self.binner is None:
            target = torch.zeros(scores.numel(), dtype=torch.uint8, device=scores.device)
            target[defect_index] = 1
            weights = torch.ones(scores.numel(), dtype=torch.float64, device=scores.device)
            weights[defect_index] = defect_weight
            self.preds.append(scores)
            self.target.append(target)
            self.weights.append(weights)
            return
        bins = self.binner(scores)
        defect_bins = bins[defect_index]
        size = self.binner.thresholds.numel() + 1
        self.normal_above += _above(bins, size) - _above(defect_bins, size)
        self.overlap_above += _above(defect_bins, size, defect_weight)
        self.num_normal += scores.numel() - defect_index.numel()
        self.num_regions += defect_weight.sum()

    def compute(self) -> Tensor:
        """Area under the PRO-vs-FPR curve up to ``fpr_limit``, divided by it."""
        fpr, pro = self._curve()
        return _area_up_to(fpr, pro, self.fpr_limit)

    def _curve(self) -> tuple[Tensor, Tensor]:
        """(FPR, PRO) points in ascending FPR, from (0, 0) to (1, 1)."""
        if self.binner is None:
            normal, overlap, _ = curves.cumulative_counts(
                dim_zero_cat(self.preds), dim_zero_cat(self.target), dim_zero_cat(self.weights)
            )
            zero = normal.new_zeros(1)
            return torch.cat([zero, normal / normal[-1]]), torch.cat([zero, overlap / overlap[-1]])
        fpr = self.normal_above.double() / self.num_normal
        return fpr.flip(0), (self.overlap_above / self.num_regions).flip(0)


def _area_up_to(fpr: Tensor, tpr: Tensor, limit: float) -> Tensor:
    """Trapezoidal area under ``tpr(fpr)`` on [0, limit], divided by ``limit``.

    The curve is cut at ``limit`` with its value interpolated there.
    """
    limit_t = torch.tensor(limit, dtype=fpr.dtype, device=fpr.device)
    stop = int(torch.searchsorted(fpr, limit_t))  # first point at or beyond the limit
    x0, x1, y0, y1 = fpr[stop - 1], fpr[stop], tpr[stop - 1], tpr[stop]
    cut = y0 + (y1 - y0) * (limit_t - x0) / (x1 - x0)
    x = torch.cat([fpr[:stop], limit_t.reshape(1)])
    y = torch.cat([tpr[:stop], cut.reshape(1)])
    return torch.trapezoid(y, x) / limit


def pro_metric(
    prediction_masks: Sequence[ArrayLike],
    gt_masks: Sequence[ArrayLike | None] | None,
    *,
    device: Device = "cpu",
    mode: Mode = "auto",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """AUPRO: area under the per-region-overlap curve up to ``fpr_limit``, normalised."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    device = torch.device(device)
    pairs = _pairs(prediction_masks, gt_masks)
    resolved = _resolve_mode(mode, _num_pixels(pairs), num_thresholds)
    scan = _scan(pairs, device, sample=resolved == "binned")
    _require_both_classes(scan, ("pro",))
    binner = None
    if resolved == "binned":
        # normal-pixel quantiles only where the FPR is below the limit (plus a
        # margin for the cut), the only part of the curve that is integrated
        top = min(1.0, fpr_limit * 1.05)
        levels = 1 - torch.linspace(0, top, num_thresholds // 2, dtype=torch.float64)
        binner = _Binner(_binned_thresholds(scan, num_thresholds, levels), scan.low, scan.high)
    curve = _RegionOverlapCurve(binner, fpr_limit).to(device)
    for image in _images(pairs, device):
        weights = np.empty(0) if image.mask is None else _region_weights(image.mask)
        curve.update(image.scores.to(scan.dtype), image.defect_index, torch.from_numpy(weights).to(device))
    return {"pro": float(curve.compute())}


# ----------------------------------------------------------------- image metrics


def image_metrics(
    prediction_scores: ArrayLike | Sequence[float],
    gt_labels: ArrayLike | Sequence[int],
    *,
    device: Device = "cpu",
) -> dict[str, float]:
    """Image AUROC and the threshold that maximises ``TPR - FPR`` (Youden's J)."""
    scores = torch.as_tensor(np.asarray(prediction_scores, dtype=np.float64), device=device).reshape(-1)
    labels = torch.as_tensor(np.asarray(gt_labels), device=device).reshape(-1)
    if scores.numel() != labels.numel():
        raise ValueError(
            f"prediction_scores has {scores.numel()} values but gt_labels has {labels.numel()}"
        )
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("prediction_scores contains NaN or infinite values")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"gt_labels must be 0 or 1, got values {sorted(set(labels.tolist()))}")
    num_anomalous = int(labels.sum())
    if num_anomalous in (0, labels.numel()):
        kind = "anomalous" if num_anomalous == 0 else "normal"
        raise UndefinedMetricError(_IMAGE_METRICS, f"there is no {kind} image")
    fpr, tpr, thresholds = curves.roc_from_scores(scores, labels)
    # index 0 is the (0, 0) point above every score; its threshold is no score
    best = 1 + int(torch.argmax((tpr - fpr)[1:]))
    return {
        "image_auroc": curves.area(fpr, tpr),
        "image_threshold": float(thresholds[best]),
    }


# ----------------------------------------------------------------------- resizing


def resize_maps(
    prediction_masks: Sequence[ArrayLike],
    gt_masks: Sequence[ArrayLike | None] | None,
    resize: int | Sequence[int],
    device: Device = "cpu",
) -> tuple[list[Tensor], list[np.ndarray | None]]:
    """Maps resized bilinearly (on ``device``) and masks by nearest neighbour.

    ``resize`` is an int (square) or ``(width, height)``.
    """
    width, height = as_pair(resize, "resize")
    device = torch.device(device)
    maps, masks = [], []
    for index, (prediction, gt) in enumerate(_pairs(prediction_masks, gt_masks)):
        shape = tuple(np.shape(prediction))
        scores = _map_tensor(prediction, index, device).reshape(shape)
        maps.append(_resize(scores, height, width, "bilinear"))
        mask = _defect_mask(gt, index, shape)
        if mask is not None:
            small = _resize(torch.from_numpy(mask).to(torch.uint8), height, width, "nearest-exact")
            mask = small.numpy().astype(bool)
        masks.append(mask)
    return maps, masks


def _resize(image: Tensor, height: int, width: int, mode: str) -> Tensor:
    """Resize one [H, W] tensor (unchanged if already that size)."""
    if tuple(image.shape) == (height, width):
        return image
    options = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(image[None, None], size=(height, width), mode=mode, **options)[0, 0]


# ----------------------------------------------------------------------- evaluators

_CPU = torch.device("cpu")
#: Where the evaluators compute: the CPU, unless a GPU twin (see :func:`_on_accelerator`) is running.
_TARGET: ContextVar[torch.device] = ContextVar("hiad_pl_metrics_target", default=_CPU)


@functools.cache
def _warn_cuda_absent() -> None:
    """Warn, once per process, that the GPU evaluators fall back to the CPU."""
    warnings.warn(
        "CUDA is not available: the GPU evaluators compute on the CPU", RuntimeWarning, stacklevel=4
    )


def _gpu(device: Device) -> torch.device:
    """``device`` (default cuda:0), or the CPU with a warning when CUDA is absent."""
    wanted = torch.device("cuda:0" if device is None else device)
    if wanted.type == "cuda" and not torch.cuda.is_available():
        _warn_cuda_absent()
        return _CPU
    return wanted


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
    return image_metrics(prediction_scores, gt_labels, device=_TARGET.get())


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
    return pixel_metrics(prediction_masks, gt_masks, device=_TARGET.get(), mode=mode, num_thresholds=num_thresholds)


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
    maps, masks = resize_maps(prediction_masks, gt_masks, resize, _TARGET.get())
    return pixel_metrics(maps, masks, device=_TARGET.get(), mode=mode, num_thresholds=num_thresholds)


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
        prediction_masks, gt_masks, device=_TARGET.get(), mode=mode, num_thresholds=num_thresholds, fpr_limit=fpr_limit
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
    maps, masks = resize_maps(prediction_masks, gt_masks, resize, _TARGET.get())
    return pro_metric(
        maps, masks, device=_TARGET.get(), mode=mode, num_thresholds=num_thresholds, fpr_limit=fpr_limit
    )


def _on_accelerator(evaluator: Evaluator, name: str, note: str = "") -> Evaluator:
    """The GPU twin of a CPU evaluator: the same arguments, computed on ``device``.

    ``device`` defaults to cuda:0; without CUDA the twin computes on the CPU
    and warns once.
    """
    signature = inspect.signature(evaluator)

    @functools.wraps(evaluator)
    def twin(*args: Any, **kwargs: Any) -> dict[str, float]:
        token = _TARGET.set(_gpu(signature.bind(*args, **kwargs).arguments.get("device")))
        try:
            return evaluator(*args, **kwargs)
        finally:
            _TARGET.reset(token)

    twin.__name__ = twin.__qualname__ = name
    twin.__doc__ = f":func:`{evaluator.__name__}` on ``device`` (default cuda:0, else the CPU){note}."
    return twin


compute_imagewise_metrics_gpu = _on_accelerator(compute_imagewise_metrics, "compute_imagewise_metrics_gpu")
compute_pixelwise_metrics_gpu = _on_accelerator(compute_pixelwise_metrics, "compute_pixelwise_metrics_gpu")
compute_pixelwise_metrics_gpu_resize = _on_accelerator(
    compute_pixelwise_metrics_resize, "compute_pixelwise_metrics_gpu_resize"
)
compute_pro_gpu = _on_accelerator(compute_pro, "compute_pro_gpu", "; regions are labelled on the CPU")
compute_pro_gpu_resize = _on_accelerator(compute_pro_resize, "compute_pro_gpu_resize")


def default_evaluators() -> list[Evaluator]:
    """The default evaluation: image metrics, pixel metrics and AUPRO at full resolution."""
    return [compute_imagewise_metrics, compute_pixelwise_metrics, compute_pro]


# ------------------------------------------------------------ resolving evaluators

_TARGET_KEYS = ("class_path", "function")
_ARGUMENT_KEYS = ("init_args", "kwargs")


def resolve_evaluator(spec: Evaluator | str | Mapping[str, Any]) -> Evaluator:
    """An evaluator from a callable, an import path or a ``class_path``/``function`` dict.

    ``"pkg.module.fn"`` (or ``"pkg.module:fn"``) names a function;
    ``{"function": "pkg.module.fn", "kwargs": {...}}`` binds keyword arguments
    with :func:`functools.partial`; ``{"class_path": ..., "init_args": {...}}``
    naming a class instantiates it (the instance must be callable).
    """
    if isinstance(spec, str):
        evaluator = _import_object(spec)
    elif isinstance(spec, Mapping):
        evaluator = _from_mapping(spec)
    elif callable(spec):
        evaluator = spec
    else:
        raise ConfigTypeError(f"an evaluator must be a callable, an import path or a dict, got {spec!r}")
    if not callable(evaluator):
        raise ConfigTypeError(f"evaluator {spec!r} resolves to {evaluator!r}, which is not callable")
    _check_signature(evaluator, spec)
    return evaluator


def _import_object(path: str) -> Any:
    """The object at ``pkg.module.name`` or ``pkg.module:name``."""
    module_name, _, name = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"unknown evaluator {path!r}: expected an import path like 'pkg.module.function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"unknown evaluator {path!r}: cannot import module {module_name!r} ({error})"
        ) from error
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"unknown evaluator {path!r}: module {module_name!r} has no {name!r}") from None


def _from_mapping(spec: Mapping[str, Any]) -> Evaluator:
    """An evaluator from ``{"class_path"|"function": path, "init_args"|"kwargs": {...}}``."""
    unknown = set(spec) - set(_TARGET_KEYS) - set(_ARGUMENT_KEYS)
    targets = [key for key in _TARGET_KEYS if key in spec]
    arguments = [key for key in _ARGUMENT_KEYS if key in spec]
    if unknown or len(targets) != 1 or len(arguments) > 1:
        raise ValueError(
            f"evaluator spec {dict(spec)!r} must have exactly one of {_TARGET_KEYS} "
            f"and at most one of {_ARGUMENT_KEYS}, nothing else"
        )
    target = _import_object(spec[targets[0]])
    kwargs = dict(spec[arguments[0]] or {}) if arguments else {}
    if inspect.isclass(target):
        return target(**kwargs)
    return functools.partial(target, **kwargs) if kwargs else target


def _check_signature(evaluator: Evaluator, spec: object) -> None:
    """Fail early unless ``evaluator`` takes the four evaluator arguments and ``device``."""
    try:
        signature = inspect.signature(evaluator)
    except (TypeError, ValueError):  # some builtins expose no signature
        return
    try:
        signature.bind(None, None, None, None, device=None)
    except TypeError as error:
        raise ConfigTypeError(
            f"evaluator {spec!r} cannot be called as fn(prediction_scores, gt_labels, "
            f"prediction_masks, gt_masks, device=...): {error}"
        ) from None


def _evaluator_name(evaluator: Evaluator) -> str:
    """A readable name for messages, with bound keyword arguments."""
    if isinstance(evaluator, functools.partial):
        bound = ", ".join(f"{key}={value!r}" for key, value in evaluator.keywords.items())
        return f"{_evaluator_name(evaluator.func)}({bound})"
    return getattr(evaluator, "__qualname__", type(evaluator).__name__)


# -------------------------------------------------------------------------- reports

MetricValues = dict[str, float | None]
_TABLE_ORDER = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1", "pro")
MEAN_ROW = "mean"


class MetricReport(dict[str, MetricValues]):
    """Metrics per class name plus a ``'mean'`` row; ``None`` marks an undefined value.

    ``notes[clsname][metric]`` says why a value is ``None`` (or what a mean
    left out, or over which images a pixel metric was computed).
    ``pixel_ground_truth[clsname]`` describes, for the classes where some
    defective images have no mask, how the pixel metrics were computed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.notes: dict[str, dict[str, str]] = {}
        self.pixel_ground_truth: dict[str, dict[str, Any]] = {}


#: Evaluators that read image scores and labels only: they see every image, masks or not.
_IMAGE_EVALUATORS = ("compute_imagewise_metrics", "compute_imagewise_metrics_gpu")


#: The metrics of this module's pixel evaluators, by name prefix (recorded as skipped without calling them).
_PIXEL_EVALUATOR_KEYS = {"compute_pixelwise_metrics": _PIXEL_METRICS, "compute_pro": ("pro",)}


def _own_name(evaluator: Evaluator) -> str | None:
    """The name of ``evaluator`` (or of the function a partial binds) when it is defined in this module."""
    while isinstance(evaluator, functools.partial):
        evaluator = evaluator.func
    return getattr(evaluator, "__name__", None) if getattr(evaluator, "__module__", None) == __name__ else None


def _is_image_evaluator(evaluator: Evaluator) -> bool:
    """Whether ``evaluator`` is one of :data:`_IMAGE_EVALUATORS`."""
    return _own_name(evaluator) in _IMAGE_EVALUATORS


def _skipped_keys(evaluator: Evaluator, name: str) -> tuple[str, ...]:
    """The metrics a pixel evaluator would produce (its name for an evaluator of another module)."""
    own = _own_name(evaluator) or ""
    return next((keys for prefix, keys in _PIXEL_EVALUATOR_KEYS.items() if own.startswith(prefix)), (name,))


@dataclass
class _PixelTruth:
    """Which of a class's images have pixel ground truth: normal images, and defective images with a mask."""

    known: list[int]
    defective: int
    unlabelled: int

    @property
    def complete(self) -> bool:
        return self.unlabelled == 0

    @property
    def skipped(self) -> bool:
        """No defective image has a mask: pixel metrics cannot be computed at all."""
        return 0 < self.unlabelled == self.defective

    def reason(self) -> str:
        """Why pixel metrics are skipped or partial, for notes and the log."""
        missing = f"{self.unlabelled} of {self.defective} defective test images have no mask (image labels only)"
        if self.skipped:
            return f"pixel metrics skipped: {missing}"
        return f"pixel metrics over the {len(self.known)} test images with pixel ground truth: {missing}"

    def summary(self) -> dict[str, Any]:
        """The ``metrics.json`` entry of this class."""
        return {
            "defective_images": self.defective,
            "defective_without_mask": self.unlabelled,
            "pixel_metrics": "skipped" if self.skipped else f"over {len(self.known)} images with pixel ground truth",
        }


def evaluate(
    evaluators: Sequence[Evaluator | str | Mapping[str, Any]],
    image_scores: ArrayLike | Sequence[float],
    labels: ArrayLike | Sequence[int],
    maps: Sequence[ArrayLike],
    masks: Sequence[ArrayLike | None] | None,
    clsnames: Sequence[str] | None = None,
    device: Device = None,
    has_mask: Sequence[bool] | None = None,
) -> MetricReport:
    """Run every evaluator on each class's images, then add the ``'mean'`` row.

    ``clsnames`` gives each image's class (default: all ``'unknown'``). A metric
    that a class's data cannot define (one image class only, no defect pixel)
    is recorded as ``None`` with its reason in ``notes``, and warned about.

    A defective image (label 1) without a mask has a known label but unknown
    defect pixels (``has_mask`` says which images have a mask; default: those
    whose entry in ``masks`` is not ``None``). The image evaluators
    (:func:`compute_imagewise_metrics` and its GPU twin) see every image; every
    other evaluator sees only the images with pixel ground truth (the normal
    images and the defective ones with a mask). When no defective image of a
    class has a mask, its pixel metrics are recorded as ``None`` ("skipped");
    either way one log line per class and ``notes`` say so.
    """
    resolved = [resolve_evaluator(spec) for spec in evaluators]
    count = len(maps)
    names = ["unknown"] * count if clsnames is None else [str(name) for name in clsnames]
    masks = [None] * count if masks is None else masks
    scores = np.asarray(image_scores, dtype=np.float64).reshape(-1)
    targets = np.asarray(labels).reshape(-1)
    if has_mask is None:
        has_mask = [masks[index] is not None for index in range(count)]
    sizes = {
        "image_scores": scores.size, "labels": targets.size, "masks": len(masks), "clsnames": len(names),
        "has_mask": len(has_mask),
    }
    for what, size in sizes.items():
        if size != count:
            raise ValueError(f"{what} has {size} entries but maps has {count}")
    if MEAN_ROW in names:
        raise ValueError(f"class name {MEAN_ROW!r} is reserved for the mean row")
    report = MetricReport()
    for clsname in sorted(set(names)):
        chosen = [index for index, name in enumerate(names) if name == clsname]
        defective = [index for index in chosen if targets[index] == 1]
        truth = _PixelTruth(
            known=[index for index in chosen if targets[index] != 1 or has_mask[index]],
            defective=len(defective),
            unlabelled=sum(1 for index in defective if not has_mask[index]),
        )
        if not truth.complete:
            log.info("%s: %s", clsname, truth.reason())
            report.pixel_ground_truth[clsname] = truth.summary()
        values, notes = _evaluate_class(
            resolved, clsname, (scores, targets, maps, masks), chosen, truth, device
        )
        report[clsname] = values
        if notes:
            report.notes[clsname] = notes
    _add_mean(report)
    return report


def _evaluate_class(
    evaluators: Sequence[Evaluator],
    clsname: str,
    inputs: tuple[Any, Any, Any, Any],
    chosen: list[int],
    truth: _PixelTruth,
    device: Device,
) -> tuple[MetricValues, dict[str, str]]:
    """One class's metrics (the images ``chosen`` of ``inputs``) and the reasons for those left undefined."""
    values: MetricValues = {}
    notes: dict[str, str] = {}
    scores, targets, maps, masks = inputs

    def subset(indexes: list[int]) -> tuple[Any, Any, Any, Any]:
        return scores[indexes], targets[indexes], Picked(maps, indexes), Picked(masks, indexes)

    every_image = subset(chosen)
    pixel_images = every_image if truth.complete else subset(truth.known)

    def record(key: str, value: float | None, evaluator: str, reason: str | None = None, warn: bool = True) -> None:
        if key in values:
            raise ValueError(f"metric {key!r} of class {clsname!r} is produced twice (again by {evaluator})")
        values[key] = value
        if reason is not None:
            notes[key] = reason
            if warn:
                warnings.warn(
                    f"class {clsname!r}: {key} is undefined ({reason}); recorded as null",
                    UndefinedMetricWarning,
                    stacklevel=4,
                )

    for evaluator in evaluators:
        name = _evaluator_name(evaluator)
        image_level = _is_image_evaluator(evaluator)
        if truth.skipped and not image_level:
            # skipped by design, not undefined: the class's one log line said so (no warning per metric)
            for key in _skipped_keys(evaluator, name):
                record(key, None, name, truth.reason(), warn=False)
            continue
        try:
            produced = evaluator(*(every_image if image_level else pixel_images), device=device)
        except UndefinedMetricError as error:
            for key in error.metrics or (name,):
                record(key, None, name, error.reason)
            continue
        if not isinstance(produced, Mapping):
            raise ConfigTypeError(f"evaluator {name} returned {type(produced).__name__}, expected a dict of floats")
        for key, value in produced.items():
            number = _as_float(value, key, name)
            if math.isfinite(number):
                record(key, number, name)
                if not image_level and not truth.complete:
                    notes[key] = truth.reason()
            else:
                record(key, None, name, f"{name} returned {number}")
    return values, notes


def _as_float(value: Any, key: str, evaluator: str) -> float:
    """``value`` as a Python float, or a TypeError naming the metric."""
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise ConfigTypeError(f"evaluator {evaluator} returned {value!r} for {key!r}, not a number") from error


def _is_threshold(key: str) -> bool:
    """Thresholds are saved but neither averaged nor tabulated."""
    return key.endswith("_threshold")


def _metric_columns(results: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """Metric names to tabulate: the usual ones first, then others as they appear."""
    seen = dict.fromkeys(key for values in results.values() for key in values if not _is_threshold(key))
    return [key for key in _TABLE_ORDER if key in seen] + [key for key in seen if key not in _TABLE_ORDER]


def _add_mean(report: MetricReport) -> None:
    """Add the mean over classes of each metric, over the classes that define it."""
    classes = list(report)
    mean: MetricValues = {}
    for key in _metric_columns(report):
        defined = [report[name][key] for name in classes if report[name].get(key) is not None]
        missing = [name for name in classes if report[name].get(key) is None]
        mean[key] = float(np.mean(defined)) if defined else None
        if missing:
            reason = (
                f"mean over {len(defined)} of {len(classes)} classes; undefined for: {', '.join(missing)}"
                if defined
                else "undefined for every class"
            )
            report.notes.setdefault(MEAN_ROW, {})[key] = reason
    report[MEAN_ROW] = mean


def _format_value(value: float | None) -> str:
    """Six significant digits like the tutorial's table; ``n/a`` when undefined."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:g}"


def format_table(results: Mapping[str, Mapping[str, float | None]]) -> str:
    """A centred Markdown table: ``clsname`` then each metric (thresholds left out)."""
    columns = _metric_columns(results)
    header = ["clsname", *columns]
    rows = [[name, *(_format_value(values.get(key)) for key in columns)] for name, values in results.items()]
    # two spaces of air around each header, as in the tutorial's output
    widths = [max([len(title) + 2] + [len(row[i]) for row in rows]) for i, title in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {cell:^{width}} " for cell, width in zip(cells, widths)) + "|"

    rule = "|" + "|".join(f":{'-' * width}:" for width in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


#: Columns of the decisions table: the image decision at the image threshold, then the pixels at the pixel threshold.
DECISION_COLUMNS = (
    "image_threshold", "tp", "fp", "tn", "fn", "precision", "recall", "f1",
    "pixel_threshold", "pixel_precision", "pixel_recall", "pixel_f1",
)


def format_decisions(decisions: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of each class's decisions at its thresholds (a class without thresholds shows its note)."""
    header = ["clsname", "rule", *DECISION_COLUMNS]
    rows = []
    for name, values in decisions.items():
        if "note" in values:
            rows.append([name, "none", *["-"] * len(DECISION_COLUMNS)])
            continue
        cells = [str(values[k]) if isinstance(values.get(k), int) else _format_value(values.get(k)) for k in DECISION_COLUMNS]
        rows.append([name, str(values.get("rule")), *cells])
    widths = [max([len(title)] + [len(row[i]) for row in rows]) for i, title in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|"
    notes = [f"- {name}: {values['note']}" for name, values in decisions.items() if "note" in values]
    return "\n".join([line(header), rule, *(line(row) for row in rows), *([""] + notes if notes else [])])


def save_report(
    results: Mapping[str, Mapping[str, float | None]],
    run_dir: str | os.PathLike[str],
    decisions: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Write ``metrics.json`` (values, thresholds, notes, ``decisions`` at the run's thresholds when
    given and, where some defective images have no mask, ``pixel_ground_truth``) and ``metrics.md`` atomically.

    Returns both paths. Undefined or non-finite values are written as null.
    """
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {
        name: {key: _finite_or_none(value) for key, value in values.items()}
        for name, values in results.items()
    }
    payload: dict[str, Any] = {"metrics": metrics, "notes": getattr(results, "notes", {})}
    pixel_ground_truth = getattr(results, "pixel_ground_truth", {})
    if pixel_ground_truth:
        payload["pixel_ground_truth"] = pixel_ground_truth
    table = format_table(results) + "\n"
    if decisions is not None:
        payload["decisions"] = {
            name: {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in values.items()}
            for name, values in decisions.items()
        }
        table += "\nDecisions at the run's thresholds (NG: score above the threshold; pixel_*: pixels above the pixel threshold):\n\n"
        table += format_decisions(decisions) + "\n"
    json_path, table_path = folder / "metrics.json", folder / "metrics.md"
    atomic_write(json_path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write(table_path, table)
    return json_path, table_path


def _finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or None when undefined or not finite (JSON has no NaN)."""
    return None if value is None or not math.isfinite(value) else float(value)
