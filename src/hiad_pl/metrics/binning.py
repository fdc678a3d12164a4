"""The binned mode of the pixel metrics: one scan for range and samples, thresholds, and fast binning.

``mode="binned"`` reads the maps twice. A first pass (:func:`scan_maps`) finds the
score range and draws a fixed-size random sample of normal and of defect pixels;
the thresholds (:func:`binned_thresholds`) are the union of quantiles of both
samples and an even grid over [min, max]. The second pass histograms every pixel
against those thresholds (a lookup table, :class:`Binner`, finds most pixels' bins
in O(1)), so memory is ``O(thresholds)`` whatever the resolution. Quantile
thresholds bound the share of normal (and of defect) pixels that fall between two
thresholds, which is what bounds the error of the binned AUROC, AP and PRO; an
even grid alone fails on heavy-tailed maps, where one hot pixel squeezes every
other score into the first bin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hiad_pl.metrics.inputs import Pairs, PreparedImage, UndefinedMetricError, prepared_images

#: Pixels drawn in the first pass to place the quantile thresholds.
SAMPLE_SIZE = 2**20

@dataclass
class Scan:
    """What the first pass learns: range, dtype, class counts and pixel samples."""

    low: float
    high: float
    dtype: torch.dtype
    num_defect: int
    num_normal: int
    normal_sample: Tensor
    defect_sample: Tensor


def scan_maps(
    pairs: Pairs, device: torch.device, sample: bool
) -> Scan:
    """First pass: validate, count classes and (if ``sample``) draw pixel samples."""
    generator = torch.Generator().manual_seed(0)
    per_image = -(-SAMPLE_SIZE // len(pairs))
    lows, highs, normal, defect = [], [], [], []
    dtype, num_defect, num_normal = torch.float32, 0, 0
    for index, image in enumerate(prepared_images(pairs, device)):
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
    return Scan(
        low=float(torch.stack(lows).min()),
        high=float(torch.stack(highs).max()),
        dtype=dtype,
        num_defect=num_defect,
        num_normal=num_normal,
        normal_sample=torch.cat(normal).to(dtype) if sample else torch.empty(0),
        defect_sample=torch.cat(defect).to(dtype) if sample else torch.empty(0),
    )


def _normal_sample(image: PreparedImage, size: int, generator: torch.Generator) -> Tensor:
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


def binned_thresholds(scan: Scan, num_thresholds: int, normal_levels: Tensor) -> Tensor:
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


class Binner:
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


def count_above(bins: Tensor, size: int, weights: Tensor | None = None) -> Tensor:
    """Per threshold, how many (or what weight of) binned pixels score at least it.

    Binning costs O(log T) per pixel, where torchmetrics' own update makes one
    pass per threshold; suffix sums of the bin counts then give the counts
    above each of the ``size - 1`` thresholds.
    """
    counts = torch.bincount(bins, weights=weights, minlength=size)
    return counts.flip(0).cumsum(0).flip(0)[1:]


def require_both_classes(scan: Scan, metrics: Sequence[str]) -> None:
    """Raise :class:`UndefinedMetricError` unless both normal and defect pixels exist."""
    if scan.num_defect == 0:
        raise UndefinedMetricError(metrics, "the ground-truth masks hold no anomalous pixel")
    if scan.num_normal == 0:
        raise UndefinedMetricError(metrics, "every pixel is anomalous; there is no normal pixel")

