"""The evaluators' inputs: maps and masks paired per image, read one at a time, and resized.

``prediction_masks`` holds one ``[H, W]`` anomaly map per image (higher = more
anomalous) and ``gt_masks`` one ``[H, W]`` mask per image, where any value above
zero marks a defect and ``None`` stands for an all-normal image. Maps and masks
held on disk (an :class:`~hiad_pl.utils.array_store.ArrayStore`) are loaded one
image at a time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hiad_pl.data.tiling import as_pair

ArrayLike = np.ndarray | Tensor
Device = torch.device | str | None
Mode = Literal["auto", "exact", "binned"]
Evaluator = Callable[..., Mapping[str, float]]
Pairs = Sequence[tuple[ArrayLike, ArrayLike | None]]


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


class UndefinedMetricError(ValueError):
    """A metric cannot be computed from this data (e.g. AUROC with one class only)."""

    def __init__(self, metrics: Sequence[str], reason: str) -> None:
        self.metrics = tuple(metrics)
        self.reason = reason
        super().__init__(f"{', '.join(self.metrics) or 'metric'} undefined: {reason}")


class UndefinedMetricWarning(UserWarning):
    """Warned by :func:`~hiad_pl.metrics.evaluation.evaluate` when a class's metric is recorded as null."""


def map_tensor(value: ArrayLike, index: int, device: torch.device) -> Tensor:
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


def defect_mask(value: ArrayLike | None, index: int, shape: tuple[int, ...]) -> np.ndarray | None:
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


def pair_up(maps: Sequence[ArrayLike], masks: Sequence[ArrayLike | None] | None) -> Pairs:
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
    return Paired(maps, masks)


class Paired(Sequence):
    """``(maps[i], masks[i])`` for each image, read on access."""

    def __init__(self, maps: Sequence[ArrayLike], masks: Sequence[ArrayLike | None]) -> None:
        self.maps, self.masks = maps, masks

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index: int) -> tuple[ArrayLike, ArrayLike | None]:  # type: ignore[override]
        if not 0 <= index < len(self.maps):
            raise IndexError(index)
        return self.maps[index], self.masks[index]


def num_pixels(pairs: Pairs) -> int:
    """Total pixel count, from the shapes alone."""
    return sum(math.prod(np.shape(prediction)) for prediction, _ in pairs)


def resolve_mode(mode: str, num_pixels: int, num_thresholds: int) -> Literal["exact", "binned"]:
    """Turn ``auto`` into ``exact`` or ``binned`` by size, checking the options."""
    if num_thresholds < 8:
        raise ValueError(f"num_thresholds must be at least 8, got {num_thresholds}")
    if mode == "auto":
        return "exact" if num_pixels <= EXACT_MAX_PIXELS else "binned"
    if mode not in ("exact", "binned"):
        raise ValueError(f"mode must be 'auto', 'exact' or 'binned', got {mode!r}")
    return mode  # type: ignore[return-value]


@dataclass
class PreparedImage:
    """One image prepared for a metric update: flat scores and its defect pixels."""

    scores: Tensor
    defect_index: Tensor
    mask: np.ndarray | None


def prepared_images(
    pairs: Pairs, device: torch.device
) -> Iterator[PreparedImage]:
    """Yield the images one at a time, so that at most one map is materialised."""
    for index, (prediction, gt) in enumerate(pairs):
        shape = tuple(np.shape(prediction))
        scores = map_tensor(prediction, index, device)
        mask = defect_mask(gt, index, shape)
        flat = np.empty(0, dtype=np.int64) if mask is None else np.flatnonzero(mask)
        yield PreparedImage(scores, torch.from_numpy(flat).to(device), mask)


def resize_maps(
    prediction_masks: Sequence[ArrayLike],
    gt_masks: Sequence[ArrayLike | None] | None,
    resize: int | Sequence[int],
    device: torch.device | str = "cpu",
) -> tuple[list[Tensor], list[np.ndarray | None]]:
    """Maps resized bilinearly (on ``device``) and masks by nearest neighbour.

    ``resize`` is an int (square) or ``(width, height)``.
    """
    width, height = as_pair(resize, "resize")
    device = torch.device(device)
    maps, masks = [], []
    for index, (prediction, gt) in enumerate(pair_up(prediction_masks, gt_masks)):
        shape = tuple(np.shape(prediction))
        scores = map_tensor(prediction, index, device).reshape(shape)
        maps.append(_resize(scores, height, width, "bilinear"))
        mask = defect_mask(gt, index, shape)
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

