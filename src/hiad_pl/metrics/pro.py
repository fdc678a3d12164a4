"""AUPRO: the per-region overlap up to an FPR limit, exact or binned, streamed image by image.

The per-region overlap (PRO) weighs each defect pixel by ``1 / (size of its
connected region)``: the mean overlap over all regions at a threshold is then
the weighted share of defect pixels above it, so the PRO curve is a weighted ROC
curve and needs no loop over regions or thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from hiad_pl.metrics import curves
from hiad_pl.metrics.binning import Binner, binned_thresholds, count_above, require_both_classes, scan_maps
from hiad_pl.metrics.inputs import (
    DEFAULT_NUM_THRESHOLDS,
    ArrayLike,
    Mode,
    num_pixels,
    pair_up,
    prepared_images,
    resolve_mode,
)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


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
    # torchmetrics states (add_state): lists in exact mode, tensors in binned mode
    preds: list[Tensor]
    target: list[Tensor]
    weights: list[Tensor]
    normal_above: Tensor
    overlap_above: Tensor
    num_normal: Tensor
    num_regions: Tensor

    def __init__(self, binner: Binner | None, fpr_limit: float) -> None:
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
        self.normal_above += count_above(bins, size) - count_above(defect_bins, size)
        self.overlap_above += count_above(defect_bins, size, defect_weight)
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
    device: torch.device | str = "cpu",
    mode: Mode = "auto",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """AUPRO: area under the per-region-overlap curve up to ``fpr_limit``, normalised."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    device = torch.device(device)
    pairs = pair_up(prediction_masks, gt_masks)
    resolved = resolve_mode(mode, num_pixels(pairs), num_thresholds)
    scan = scan_maps(pairs, device, sample=resolved == "binned")
    require_both_classes(scan, ("pro",))
    binner = None
    if resolved == "binned":
        # normal-pixel quantiles only where the FPR is below the limit (plus a
        # margin for the cut), the only part of the curve that is integrated
        top = min(1.0, fpr_limit * 1.05)
        levels = 1 - torch.linspace(0, top, num_thresholds // 2, dtype=torch.float64)
        binner = Binner(binned_thresholds(scan, num_thresholds, levels), scan.low, scan.high)
    curve = _RegionOverlapCurve(binner, fpr_limit).to(device)
    for image in prepared_images(pairs, device):
        weights = np.empty(0) if image.mask is None else _region_weights(image.mask)
        curve.update(image.scores.to(scan.dtype), image.defect_index, torch.from_numpy(weights).to(device))
    return {"pro": float(curve.compute())}

