"""Tutorial import path for samples and tiling."""

from hiad_pl.data.sample import HRImage, HRSample, LRPatch
from hiad_pl.data.tiling import (
    HRImageIndex,
    HRImageSpliter,
    MultiResolutionHRImageSpliter,
    MultiResolutionIndex,
    split,
    stitch,
)

__all__ = [
    "HRImage",
    "HRImageIndex",
    "HRImageSpliter",
    "HRSample",
    "LRPatch",
    "MultiResolutionHRImageSpliter",
    "MultiResolutionIndex",
    "split",
    "stitch",
]
