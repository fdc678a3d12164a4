"""Anomaly synthesisers: defects drawn onto normal patches.

They build the validation set (held-out training patches, some made anomalous)
that selects checkpoints and normalises scores, and they can feed
synthetic-anomaly training. Every synthesiser maps an :class:`LRPatch` to a new
one; with probability ``p`` it paints a defect, sets ``mask`` to the pixels it
changed and ``label`` to 1, and writes the same change into the patch's
low-resolution crops so every resolution a detector sees agrees.

Randomness comes from one ``numpy.random.Generator``: the synthesiser's own
(seeded by ``seed``), or one passed per call. Inside DataLoader workers every
worker holds a copy of the synthesiser's generator, so pass
``rng=np.random.default_rng(item_index)`` for draws that are distinct per item
and identical from run to run.

Sizes given as a ``(min, max)`` range follow one rule: when both values are at
most 1 they are fractions of the patch side, otherwise pixels.

:func:`build_synthesizer` builds one from a config entry (``{class_path,
init_args}`` or the original project's ``{name, kwargs}``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import albumentations as A
import cv2
import numpy as np

from hiad_pl.data.sample import IMAGE_SUFFIXES, LRPatch, read_image
from hiad_pl.data.tiling import HRImageIndex
from hiad_pl.errors import MissingFileError

Range = tuple[float, float]
Synthesis = tuple[np.ndarray, np.ndarray]

log = logging.getLogger(__name__)

__all__ = [
    "AnomalySynthesizer",
    "ImageBlendingSynthesizer",
    "RandomeBoxSynthesizer",
    "RandomBoxSynthesizer",
    "CutPasteAnomalySynthesizer",
    "ColorShiftSynthesizer",
    "SimplexNoiseSynthesizer",
    "build_synthesizer",
    "procedural_texture",
    "simplex_noise",
    "fractal_simplex_noise",
    "perlin_noise",
    "perlin_mask",
    "ellipse_mask",
    "paste_into_low_resolution",
]


# ---------------------------------------------------------------- helpers


def _check_probability(p: float) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p!r}")
    return float(p)


def _check_range(value: Sequence[float], name: str, low: float = 0.0) -> Range:
    """A ``(min, max)`` pair with ``low <= min <= max``."""
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not low <= pair[0] <= pair[1]:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {tuple(value)!r}")
    return pair[0], pair[1]


def _is_fraction(value: Range) -> bool:
    return max(value) <= 1.0


def _pixels(value: float, side: int, fraction: bool) -> int:
    """A size in pixels, from a fraction of ``side`` or from pixels, within ``[1, side]``."""
    return int(np.clip(round(value * side if fraction else value), 1, side))


Transform = TypeVar("Transform", A.BaseCompose, A.BasicTransform)


def _seeded(transform: Transform, rng: np.random.Generator) -> Transform:
    """``transform`` drawing its parameters from a seed taken from ``rng``.

    Albumentations keeps its own generators; reseeding them from ``rng`` on
    every call makes the whole synthesis a function of ``rng`` alone.
    """
    seed = int(rng.integers(2**32))
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


def _list_images(folder: str | Path) -> list[str]:
    """Every image file below ``folder``, sorted so that draws are reproducible."""
    root = Path(folder)
    if not root.is_dir():
        raise MissingFileError(f"anomaly_source {root}: folder not found")
    files = sorted(str(f) for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"anomaly_source {root}: no images ({', '.join(IMAGE_SUFFIXES)}) found in the folder")
    return files


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"patch image must be a uint8 [h, w, 3] array, got {dtype} of shape {shape}")
    return image


# ---------------------------------------------------------------- masks


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], cells: tuple[float, float], rng: np.random.Generator, angle: float = 0.0
) -> np.ndarray:
    """2-D Perlin noise of ``shape`` (h, w), values in about ``[-1, 1]``.

    ``cells`` is the number of lattice cells along (y, x); the lattice is
    rotated by ``angle`` radians about the centre. The field is evaluated at
    rotated pixel coordinates, so unlike rotating a finished noise image it
    has no empty corners.
    """
    height, width = shape
    cell_h, cell_w = height / cells[0], width / cells[1]
    ys, xs = np.meshgrid(np.arange(height) + 0.5 - height / 2, np.arange(width) + 0.5 - width / 2, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    u = (cos * xs - sin * ys) / cell_w
    v = (sin * xs + cos * ys) / cell_h
    u -= u.min()
    v -= v.min()
    iu, iv = u.astype(np.int64), v.astype(np.int64)
    fu, fv = u - iu, v - iv
    theta = rng.uniform(0.0, 2.0 * math.pi, size=(iv.max() + 2, iu.max() + 2))
    grad_u, grad_v = np.cos(theta), np.sin(theta)

    def corner(dv: int, du: int) -> np.ndarray:
        return grad_u[iv + dv, iu + du] * (fu - du) + grad_v[iv + dv, iu + du] * (fv - dv)

    tu, tv = _fade(fu), _fade(fv)
    top = corner(0, 0) + tu * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + tu * (corner(1, 1) - corner(1, 0))
    return math.sqrt(2.0) * (top + tv * (bottom - top))


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[int, int] = (0, 6),
    threshold: float = 0.5,
) -> np.ndarray:
    """Boolean blobs: Perlin noise above ``threshold``, as in DRAEM.

    The lattice has ``2**k`` cells along each axis, ``k`` drawn per axis from
    ``[scale[0], scale[1])``, and a random rotation in ``[-90, 90)`` degrees.
    The mask may be empty; callers draw again.
    """
    cells = 2.0 ** rng.integers(scale[0], scale[1], size=2)
    angle = rng.uniform(-math.pi / 2, math.pi / 2)
    return perlin_noise(shape, (cells[0], cells[1]), rng, angle) > threshold


def ellipse_mask(shape: tuple[int, int], rng: np.random.Generator, axes: Range = (0.1, 0.4)) -> np.ndarray:
    """A filled, randomly rotated ellipse; ``axes`` are semi-axis lengths (fraction or pixels)."""
    height, width = shape
    fraction = _is_fraction(axes)
    side = min(height, width)
    a, b = (_pixels(rng.uniform(*axes), side, fraction) for _ in range(2))
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    angle = rng.uniform(0.0, math.pi)
    ys, xs = np.meshgrid(np.arange(height) + 0.5 - cy, np.arange(width) + 0.5 - cx, indexing="ij")
    along = xs * math.cos(angle) + ys * math.sin(angle)
    across = -xs * math.sin(angle) + ys * math.cos(angle)
    return (along / a) ** 2 + (across / b) ** 2 <= 1.0


# ---------------------------------------------------------------- noise and textures

#: Skew and unskew factors of 2-D simplex noise.
_SIMPLEX_F2 = 0.5 * (math.sqrt(3.0) - 1.0)
_SIMPLEX_G2 = (3.0 - math.sqrt(3.0)) / 6.0
#: The 12 gradient directions of simplex noise (the 3-D edge midpoints, projected on the plane).
_SIMPLEX_GRADIENTS = np.array(
    [[1, 1], [-1, 1], [1, -1], [-1, -1], [1, 0], [-1, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [0, 1], [0, -1]],
    dtype=np.float64,
)


def simplex_noise(xs: np.ndarray, ys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """2-D simplex noise (Perlin 2001) at the points ``(xs, ys)``, values in about ``[-1, 1]``.

    The gradient table is a permutation drawn from ``rng``; the whole field is
    computed with array operations.
    """
    perm = np.tile(rng.permutation(256), 2)
    skew = (xs + ys) * _SIMPLEX_F2
    i, j = np.floor(xs + skew).astype(np.int64), np.floor(ys + skew).astype(np.int64)
    unskew = (i + j) * _SIMPLEX_G2
    x0, y0 = xs - (i - unskew), ys - (j - unskew)
    upper = (x0 > y0).astype(np.int64)  # which triangle of the skewed cell holds the point
    offsets = ((0, 0), (upper, 1 - upper), (1, 1))
    total = np.zeros_like(xs, dtype=np.float64)
    ii, jj = i & 255, j & 255
    for corner, (di, dj) in enumerate(offsets):
        dx = x0 - di + corner * _SIMPLEX_G2
        dy = y0 - dj + corner * _SIMPLEX_G2
        gradient = _SIMPLEX_GRADIENTS[perm[ii + di + perm[jj + dj]] % 12]
        falloff = np.maximum(0.5 - dx * dx - dy * dy, 0.0)
        total += falloff**4 * (gradient[..., 0] * dx + gradient[..., 1] * dy)
    return 70.0 * total


def fractal_simplex_noise(
    shape: tuple[int, int], rng: np.random.Generator, octaves: int = 6, persistence: float = 0.6, period: float = 32.0
) -> np.ndarray:
    """Sum of ``octaves`` simplex layers: period ``period / 2**k`` pixels, amplitude ``persistence**k``."""
    ys, xs = np.meshgrid(np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64), indexing="ij")
    noise = np.zeros(shape, dtype=np.float64)
    for octave in range(octaves):
        scale = 2.0**octave / period
        noise += persistence**octave * simplex_noise(xs * scale, ys * scale, rng)
    return noise


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random uint8 ``[h, w, 3]`` texture: coloured fractal noise, optionally crossed with a grating.

    The built-in stand-in for a texture data set (DTD), so that image blending
    runs without any download: each call mixes two random colours by
    multi-scale Perlin noise and, half of the time, adds a rotated sine
    grating (stripes, weaves).
    """
    height, width = shape
    field = np.zeros(shape)
    for octave in range(int(rng.integers(2, 5))):
        cells = 2.0 ** (octave + rng.integers(0, 3))
        field += 0.6**octave * perlin_noise(shape, (cells, cells), rng, rng.uniform(-math.pi, math.pi))
    if rng.random() < 0.5:
        angle = rng.uniform(0.0, math.pi)
        ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        period = rng.uniform(4.0, max(5.0, min(height, width) / 4))
        field += np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
    weight = (field - field.min()) / max(1e-9, float(np.ptp(field)))
    low, high = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    return np.rint(low + weight[..., None] * (high - low)).astype(np.uint8)


# ---------------------------------------------------------------- low resolution


def _paste_window(low: np.ndarray, window: HRImageIndex, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``low`` with ``image`` resized into ``window`` wherever the resized mask is set."""
    crop_h, crop_w = low.shape[:2]
    if window.x < 0 or window.y < 0 or window.x + window.width > crop_w or window.y + window.height > crop_h:
        raise ValueError(f"low-resolution window {window} lies outside its {crop_w}x{crop_h} crop")
    size = (window.width, window.height)
    shrinking = window.width * window.height < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image, size, interpolation=interpolation).reshape(window.height, window.width, -1)
    # Any low-resolution pixel touched by a changed pixel takes the new value, so
    # the crop never keeps a stale copy of the defect's border.
    touched = cv2.resize(mask.astype(np.float32), size, interpolation=interpolation).reshape(size[::-1]) > 0
    out = low.copy()
    region = out[window.slices]
    region[touched] = resized[touched]
    return out


def paste_into_low_resolution(
    images: Sequence[np.ndarray], windows: Sequence[HRImageIndex], image: np.ndarray, mask: np.ndarray
) -> list[np.ndarray]:
    """Write a changed patch into each low-resolution crop, only where ``mask`` is set.

    ``windows[i]`` is where the patch lies inside ``images[i]``; the patch and
    its mask are resized to that window (area when shrinking, bilinear when
    enlarging). Pixels outside the window, or untouched by the mask, stay as
    they were.
    """
    if len(images) != len(windows):
        raise ValueError(f"{len(images)} low-resolution images but {len(windows)} low-resolution indexes")
    return [_paste_window(low, window, image, mask) for low, window in zip(images, windows)]


# ---------------------------------------------------------------- base class


class AnomalySynthesizer(ABC):
    """Turn a normal patch into an anomalous one with probability ``p``.

    Subclasses implement :meth:`synthesize`. Only pixels whose largest channel
    change reaches ``min_change`` grey levels count as anomalous; smaller
    changes are undone, so pixels outside the returned mask are exactly the
    input's and the label is only 1 for a visible defect.
    """

    #: draws of :meth:`synthesize` before giving up and returning a normal patch
    max_attempts: int = 10
    #: smallest defect, as a fraction of the patch area (at least one pixel)
    min_area: float = 0.001

    def __init__(self, p: float = 0.5, seed: int | None = None, min_change: int = 10):
        """``p``: probability of a defect; ``seed``: seed of the own generator;
        ``min_change``: grey levels a pixel must move to count as changed."""
        self.p = _check_probability(p)
        self.seed = seed
        if not 1 <= int(min_change) <= 255:
            raise ValueError(f"min_change must lie in [1, 255] grey levels, got {min_change!r}")
        self.min_change = int(min_change)
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> Synthesis:
        """Return ``(new_image, mask)``: the uint8 ``[h, w, 3]`` image with a defect and where it is."""

    def __call__(self, patch: LRPatch, rng: np.random.Generator | None = None) -> LRPatch:
        """A new patch: anomalous (label 1, mask of changed pixels) with probability ``p``, else normal."""
        image = _check_image(patch.image)
        rng = self.rng if rng is None else rng
        if rng.random() < self.p:
            smallest = max(1, math.ceil(self.min_area * image.shape[0] * image.shape[1]))
            for _ in range(self.max_attempts):
                changed, mask = self._visible(image, *self.synthesize(image, rng))
                if mask.sum() >= smallest:
                    return self._new_patch(patch, changed, mask)
        return self._new_patch(patch, image.copy(), np.zeros(image.shape[:2], np.uint8))

    def anomaly_synthesize(self, sample: LRPatch) -> LRPatch:
        """The original project's name for calling the synthesiser."""
        return self(sample)

    def _visible(self, image: np.ndarray, changed: np.ndarray, mask: np.ndarray) -> Synthesis:
        """Keep the masked pixels that moved by ``min_change``; restore all others."""
        change = np.abs(changed.astype(np.int16) - image.astype(np.int16)).max(axis=-1)
        keep = mask.astype(bool) & (change >= self.min_change)
        return np.where(keep[..., None], changed, image), keep.astype(np.uint8)

    @staticmethod
    def _new_patch(patch: LRPatch, image: np.ndarray, mask: np.ndarray) -> LRPatch:
        """A copy of ``patch`` with ``image`` and ``mask``, its crops updated to match."""
        lows = patch.low_resolution_images
        if lows is not None:
            lows = paste_into_low_resolution(lows, patch.low_resolution_indexes or [], image, mask)
        return dataclasses.replace(
            patch,
            image=image,
            mask=mask,
            label=int(mask.any()),
            low_resolution_images=lows,
            low_resolution_indexes=None if patch.low_resolution_indexes is None else list(patch.low_resolution_indexes),
        )

    def __repr__(self) -> str:
        hidden = ("rng", "anomaly_files", "texture_source")
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k not in hidden)
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------- synthesisers


def _source_augmentations() -> list[A.BasicTransform]:
    """The colour and geometric changes DRAEM applies to its texture sources."""
    return [
        A.RandomGamma(gamma_limit=(50, 200), p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0),
        A.Sharpen(p=1.0),
        A.HueSaturationValue(hue_shift_limit=50, sat_shift_limit=50, val_shift_limit=0, p=1.0),
        A.Solarize(threshold_range=(32 / 255, 128 / 255), p=1.0),
        A.Posterize(num_bits=(4, 6), p=1.0),
        A.InvertImg(p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
        A.Affine(rotate=(-45, 45), border_mode=cv2.BORDER_REFLECT_101, p=1.0),
    ]


@functools.cache
def _warn_procedural_fallback() -> None:
    """Say once per process that blended textures are procedural, not the papers' DTD images."""
    log.warning(
        "anomaly_source is not set: training anomalies blend built-in procedural textures, not DTD images "
        "as the papers do; set anomaly_source to a DTD folder (<folder>/images/<category>/*.jpg) for the papers' setting"
    )


class ImageBlendingSynthesizer(AnomalySynthesizer):
    """Blend a texture into Perlin-noise blobs of the patch (DRAEM-style).

    The texture source (``anomaly_source``) is one of:

    a folder
        a random image from it (searched recursively), resized to the patch. The
        papers and the original project use the Describable Textures Dataset (DTD):
        unpack it so that its images lie in ``<folder>/images/<category>/*.jpg``
        (e.g. ``data/dtd/images/banded/banded_0002.jpg``) and give ``<folder>``;
    ``None`` (the default) or ``"procedural"``
        a built-in procedural texture (:func:`procedural_texture`), so that
        synthesis runs offline; ``None`` logs one warning per process saying so;
    ``"self"``
        the patch itself (subtler defects, no extra data).

    The texture is changed by ``num_augmentations`` random albumentations
    transforms, and the blob mixes ``factor * texture + (1 - factor) * patch``
    with ``factor`` drawn from ``blend_factor`` (the original project calls it
    ``transparency_range``). :attr:`texture_source` says which source is used.
    """

    def __init__(
        self,
        p: float = 0.5,
        anomaly_source: str | Path | None = None,
        blend_factor: tuple[float, float] = (0.5, 1.0),
        perlin_scale: int = 6,
        min_perlin_scale: int = 0,
        perlin_threshold: float = 0.5,
        num_augmentations: int = 3,
        seed: int | None = None,
        min_change: int = 10,
        transparency_range: tuple[float, float] | None = None,
    ):
        """``perlin_scale``/``min_perlin_scale``: the lattice has ``2**k`` cells per axis,
        ``min_perlin_scale <= k < perlin_scale``; ``perlin_threshold``: noise level inside blobs;
        ``transparency_range``: the original project's name of ``blend_factor`` (wins when given)."""
        super().__init__(p, seed, min_change)
        source = None if anomaly_source is None else str(anomaly_source)
        if source is None:
            _warn_procedural_fallback()
        self.anomaly_source = source
        in_built = source in (None, "procedural", "self")
        self.anomaly_files = [] if in_built else _list_images(source)  # type: ignore[arg-type]
        #: ``"folder"``, ``"procedural"`` or ``"self"``: where blended textures come from.
        self.texture_source = "folder" if not in_built else ("self" if source == "self" else "procedural")
        blend_factor = blend_factor if transparency_range is None else transparency_range
        self.blend_factor = _check_range(blend_factor, "blend_factor")
        if self.blend_factor[1] > 1.0:
            raise ValueError(f"blend_factor must lie in [0, 1], got {blend_factor!r}")
        if not 0 <= min_perlin_scale < perlin_scale:
            raise ValueError(f"need 0 <= min_perlin_scale < perlin_scale, got {min_perlin_scale}, {perlin_scale}")
        self.perlin_scale = int(perlin_scale)
        self.min_perlin_scale = int(min_perlin_scale)
        self.perlin_threshold = float(perlin_threshold)
        augmentations = _source_augmentations()
        if not 1 <= num_augmentations <= len(augmentations):
            raise ValueError(f"num_augmentations must lie in [1, {len(augmentations)}], got {num_augmentations}")
        self.num_augmentations = int(num_augmentations)
        self._augment = A.SomeOf(augmentations, n=self.num_augmentations, replace=False, p=1.0)

    def _texture(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.texture_source == "self":
            return image
        if self.texture_source == "procedural":
            return procedural_texture(image.shape[:2], rng)
        source = read_image(self.anomaly_files[rng.integers(len(self.anomaly_files))])
        return cv2.resize(source, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)

    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> Synthesis:
        """Blend an augmented texture into Perlin blobs."""
        scale = (self.min_perlin_scale, self.perlin_scale)
        mask = perlin_mask(image.shape[:2], rng, scale, self.perlin_threshold)
        if not mask.any():
            return image, mask
        texture = _seeded(self._augment, rng)(image=self._texture(image, rng))["image"]
        factor = rng.uniform(*self.blend_factor)
        blended = np.rint(factor * texture.astype(np.float32) + (1.0 - factor) * image).astype(np.uint8)
        return np.where(mask[..., None], blended, image), mask


class RandomeBoxSynthesizer(AnomalySynthesizer):
    """Paint up to ``max_patch_num`` rectangles of one grey value each, as the original project's validation boxes.

    The first box is always tried, each further one with probability 1/2 (so 1 to
    ``max_patch_num`` boxes, 3 on average for 5). A box picks one of ``anomaly_sizes``
    ranges at random and draws its height and width independently from it; a grey
    value (0-255, the same in the three channels) and a position wholly inside the
    patch are drawn until the mean absolute difference between the box and the
    pixels it covers lies within ``diff_threshold`` (grey levels, over the box's
    pixels and channels), at most ``max_attempts_per_box`` times; a box that finds
    none, or does not fit in the patch, is left out. Each box sees the earlier ones.
    The mask is every pixel the boxes changed by at least ``min_change`` grey levels
    (1 by default: the whole box but the pixels that already had its grey value).

    Sizes are pixels of the patch (fractions of its side when both values of a range
    are at most 1). The spelling follows the original project; :data:`RandomBoxSynthesizer`
    is the same class. The original's run scripts pass ``diff_threshold=(20, 50)``.
    """

    #: boxes of 16 px are smaller than the base class's smallest defect on 512-px patches
    min_area: float = 0.0
    #: grey values and positions drawn per box before it is left out (the original's 50)
    max_attempts_per_box: int = 50

    def __init__(
        self,
        p: float = 0.5,
        max_patch_num: int = 5,
        anomaly_sizes: Sequence[Sequence[float]] = ((16, 40), (80, 100)),
        diff_threshold: tuple[float, float] = (20, 60),
        seed: int | None = None,
        min_change: int = 1,
    ):
        """``max_patch_num``: most boxes per patch; ``anomaly_sizes``: (min, max) side ranges, one drawn per box;
        ``diff_threshold``: (min, max) mean grey-level difference a box must make."""
        super().__init__(p, seed, min_change)
        if not isinstance(max_patch_num, int) or max_patch_num < 1:
            raise ValueError(f"max_patch_num must be a positive integer, got {max_patch_num!r}")
        self.max_patch_num = max_patch_num
        sizes = np.asarray(anomaly_sizes, dtype=float)
        ranges = [sizes.tolist()] if sizes.ndim == 1 else sizes.tolist()
        self.anomaly_sizes = [_check_range(r, "anomaly_sizes", low=1e-6) for r in ranges]
        self.diff_threshold = _check_range(diff_threshold, "diff_threshold")
        if self.diff_threshold[1] > 255:
            raise ValueError(f"diff_threshold must lie in [0, 255] grey levels, got {tuple(diff_threshold)!r}")

    def _side(self, size_range: Range, side: int, rng: np.random.Generator) -> int:
        """A box side drawn uniformly from ``size_range`` (pixels, or fractions of ``side``)."""
        low, high = (v * side for v in size_range) if _is_fraction(size_range) else size_range
        return max(1, int(rng.uniform(low, high)))

    def _box(self, image: np.ndarray, rng: np.random.Generator) -> tuple[slice, slice] | None:
        """Paint one box into ``image`` in place; its rows and columns, or ``None`` when none was accepted."""
        height, width = image.shape[:2]
        size_range = self.anomaly_sizes[int(rng.integers(len(self.anomaly_sizes)))]
        box_h, box_w = self._side(size_range, height, rng), self._side(size_range, width, rng)
        if box_h > height or box_w > width:
            return None
        low, high = self.diff_threshold
        for _ in range(self.max_attempts_per_box):
            grey = int(rng.integers(256))
            top, left = int(rng.integers(height - box_h + 1)), int(rng.integers(width - box_w + 1))
            rows, cols = slice(top, top + box_h), slice(left, left + box_w)
            difference = float(np.abs(image[rows, cols].astype(np.float32) - grey).mean())
            if low <= difference <= high:
                image[rows, cols] = grey
                return rows, cols
        return None

    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> Synthesis:
        """One to ``max_patch_num`` grey boxes and their mask."""
        out = image.copy()
        mask = np.zeros(image.shape[:2], np.uint8)
        for i in range(self.max_patch_num):
            if i > 0 and rng.random() < 0.5:
                continue
            box = self._box(out, rng)
            if box is not None:
                mask[box] = 1
        return out, mask


RandomBoxSynthesizer = RandomeBoxSynthesizer

CUTPASTE_VARIANTS = ("normal", "scar", "mixed")


class CutPasteAnomalySynthesizer(AnomalySynthesizer):
    """CutPaste: cut a rectangle of the patch, augment it, paste it elsewhere.

    ``variant="normal"`` cuts a block of ``area_ratio`` of the patch with
    aspect ratio log-uniform in ``[aspect_ratio, 1 / aspect_ratio]``;
    ``"scar"`` cuts a thin strip (``scar_width`` x ``scar_length``, fractions
    or pixels) rotated by up to ``rotation`` degrees; ``"mixed"`` picks either
    at random. The piece is colour-jittered (``color_jitter``) and flipped.
    """

    def __init__(
        self,
        p: float = 0.5,
        area_ratio: tuple[float, float] = (0.02, 0.15),
        aspect_ratio: float = 0.3,
        variant: str = "normal",
        scar_width: tuple[float, float] = (0.01, 0.06),
        scar_length: tuple[float, float] = (0.04, 0.1),
        rotation: float = 45.0,
        color_jitter: float = 0.1,
        seed: int | None = None,
        min_change: int = 10,
    ):
        """Sizes follow the CutPaste paper (scar sizes scaled from its 256-pixel images)."""
        super().__init__(p, seed, min_change)
        if variant not in CUTPASTE_VARIANTS:
            raise ValueError(f"variant must be one of {CUTPASTE_VARIANTS}, got {variant!r}")
        if not 0.0 < aspect_ratio <= 1.0:
            raise ValueError(f"aspect_ratio must lie in (0, 1], got {aspect_ratio!r}")
        self.area_ratio = _check_range(area_ratio, "area_ratio", low=1e-6)
        if self.area_ratio[1] > 1.0:
            raise ValueError(f"area_ratio must lie in (0, 1], got {area_ratio!r}")
        self.aspect_ratio = float(aspect_ratio)
        self.variant = variant
        self.scar_width = _check_range(scar_width, "scar_width", low=1e-6)
        self.scar_length = _check_range(scar_length, "scar_length", low=1e-6)
        self.rotation = float(rotation)
        self.color_jitter = float(color_jitter)
        jitter = A.ColorJitter(color_jitter, color_jitter, color_jitter, min(color_jitter, 0.5), p=1.0)
        flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
        self._augment_block = A.Compose([jitter, *flips])
        rotate = A.Affine(
            rotate=(-self.rotation, self.rotation),
            fit_output=True,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
            p=1.0,
        )
        self._augment_scar = A.Compose([jitter, *flips, rotate])

    def _block_size(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        area = rng.uniform(*self.area_ratio) * height * width
        aspect = math.exp(rng.uniform(math.log(self.aspect_ratio), -math.log(self.aspect_ratio)))
        return _pixels(math.sqrt(area / aspect), height, False), _pixels(math.sqrt(area * aspect), width, False)

    def _scar_size(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        side = min(height, width)
        thin = _pixels(rng.uniform(*self.scar_width), side, _is_fraction(self.scar_width))
        long = _pixels(rng.uniform(*self.scar_length), side, _is_fraction(self.scar_length))
        return min(thin, height), min(long, width)

    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> Synthesis:
        """Paste an augmented piece of the patch at another place."""
        height, width = image.shape[:2]
        scar = self.variant == "scar" or (self.variant == "mixed" and rng.random() < 0.5)
        cut_h, cut_w = (self._scar_size if scar else self._block_size)(height, width, rng)
        y, x = rng.integers(0, height - cut_h + 1), rng.integers(0, width - cut_w + 1)
        augment = _seeded(self._augment_scar if scar else self._augment_block, rng)
        piece = augment(image=image[y : y + cut_h, x : x + cut_w], mask=np.ones((cut_h, cut_w), np.uint8))
        # Rotation may enlarge the piece beyond the patch; keep what fits.
        piece_image, piece_mask = piece["image"][:height, :width], piece["mask"][:height, :width]
        piece_h, piece_w = piece_mask.shape
        y, x = rng.integers(0, height - piece_h + 1), rng.integers(0, width - piece_w + 1)
        changed, mask = image.copy(), np.zeros((height, width), np.uint8)
        target = changed[y : y + piece_h, x : x + piece_w]
        target[:] = np.where(piece_mask[..., None] > 0, piece_image, target)
        mask[y : y + piece_h, x : x + piece_w] = piece_mask > 0
        return changed, mask


COLOR_SHIFT_REGIONS = ("perlin", "ellipse")


class ColorShiftSynthesizer(AnomalySynthesizer):
    """Shift the colour or brightness of a region: a discolouration or stain.

    One of albumentations' HueSaturationValue, RandomBrightnessContrast or
    RGBShift is applied to the patch and composited through a mask: Perlin
    blobs (``region="perlin"``) or a rotated ellipse whose semi-axes are drawn
    from ``ellipse_axes`` (fractions or pixels).
    """

    def __init__(
        self,
        p: float = 0.5,
        region: str = "perlin",
        ellipse_axes: tuple[float, float] = (0.1, 0.4),
        hue_shift: int = 20,
        saturation_shift: int = 40,
        value_shift: int = 40,
        brightness: float = 0.3,
        contrast: float = 0.3,
        rgb_shift: int = 40,
        seed: int | None = None,
        min_change: int = 10,
    ):
        """Shift limits are albumentations' (grey levels for hue/saturation/value and RGB,
        fractions for brightness and contrast)."""
        super().__init__(p, seed, min_change)
        if region not in COLOR_SHIFT_REGIONS:
            raise ValueError(f"region must be one of {COLOR_SHIFT_REGIONS}, got {region!r}")
        self.region = region
        self.ellipse_axes = _check_range(ellipse_axes, "ellipse_axes", low=1e-6)
        self.hue_shift, self.saturation_shift = int(hue_shift), int(saturation_shift)
        self.value_shift = int(value_shift)
        self.brightness, self.contrast, self.rgb_shift = float(brightness), float(contrast), int(rgb_shift)
        self._shift = A.OneOf(
            [
                A.HueSaturationValue(self.hue_shift, self.saturation_shift, self.value_shift, p=1.0),
                A.RandomBrightnessContrast(self.brightness, self.contrast, p=1.0),
                A.RGBShift(self.rgb_shift, self.rgb_shift, self.rgb_shift, p=1.0),
            ],
            p=1.0,
        )

    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> Synthesis:
        """The patch with one region's colour shifted."""
        if self.region == "perlin":
            mask = perlin_mask(image.shape[:2], rng)
        else:
            mask = ellipse_mask(image.shape[:2], rng, self.ellipse_axes)
        shifted = _seeded(self._shift, rng)(image=image)["image"]
        return np.where(mask[..., None], shifted, image), mask


class SimplexNoiseSynthesizer(AnomalySynthesizer):
    """Add fractal simplex noise inside a random box (RD++'s training corruption).

    A box with sides drawn from ``box_size`` (fractions of the patch side when
    both values are at most 1, else pixels) receives ``amplitude * 255 *
    noise`` per channel, where ``noise`` is :func:`fractal_simplex_noise` with
    ``octaves`` and ``persistence``, drawn independently per channel. The
    paper's values: boxes of 10 px to 1/8 of a 256-px patch, amplitude 0.2,
    6 octaves, persistence 0.6.
    """

    def __init__(
        self,
        p: float = 1.0,
        box_size: tuple[float, float] = (0.04, 0.125),
        amplitude: float = 0.2,
        octaves: int = 6,
        persistence: float = 0.6,
        seed: int | None = None,
        min_change: int = 10,
    ):
        """``box_size``: (min, max) box side; ``amplitude``: noise scale in units of the full grey range."""
        super().__init__(p, seed, min_change)
        self.box_size = _check_range(box_size, "box_size", low=1e-6)
        if not amplitude > 0:
            raise ValueError(f"amplitude must be positive, got {amplitude!r}")
        if int(octaves) < 1 or not 0 < persistence <= 1:
            raise ValueError(f"need octaves >= 1 and 0 < persistence <= 1, got {octaves}, {persistence}")
        self.amplitude = float(amplitude)
        self.octaves = int(octaves)
        self.persistence = float(persistence)

    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> Synthesis:
        """Noise added in one box, and the box as mask."""
        height, width = image.shape[:2]
        fraction = _is_fraction(self.box_size)
        box_h = _pixels(rng.uniform(*self.box_size), height, fraction)
        box_w = _pixels(rng.uniform(*self.box_size), width, fraction)
        top, left = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
        noise = np.stack(
            [fractal_simplex_noise((box_h, box_w), rng, self.octaves, self.persistence) for _ in range(3)], axis=-1
        )
        out = image.astype(np.float64)
        out[top : top + box_h, left : left + box_w] += self.amplitude * 255.0 * noise
        mask = np.zeros((height, width), np.uint8)
        mask[top : top + box_h, left : left + box_w] = 1
        return np.clip(np.rint(out), 0, 255).astype(np.uint8), mask


#: Names the original project's configs use for the synthesisers (``name:`` entries).
SYNTHESIZERS: dict[str, type[AnomalySynthesizer]] = {
    cls.__name__: cls
    for cls in (
        ImageBlendingSynthesizer,
        RandomeBoxSynthesizer,
        CutPasteAnomalySynthesizer,
        ColorShiftSynthesizer,
        SimplexNoiseSynthesizer,
    )
}
SYNTHESIZERS["RandomBoxSynthesizer"] = RandomeBoxSynthesizer


def build_synthesizer(spec: Mapping[str, Any] | AnomalySynthesizer | None) -> AnomalySynthesizer | None:
    """A synthesiser from a config entry: ``{class_path, init_args}``, ``{name, kwargs}`` or an instance.

    ``class_path`` / ``name`` is a class of this module (``ImageBlendingSynthesizer``)
    or an import path of any callable class mapping an :class:`LRPatch` to one.

    Raises:
        ValueError: an unknown class or arguments it does not take.
    """
    if spec is None or isinstance(spec, AnomalySynthesizer):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"synthesizer must be {{class_path, init_args}} or {{name, kwargs}}, got {spec!r}")
    unknown = set(spec) - {"class_path", "init_args", "name", "kwargs"}
    if unknown:
        raise ValueError(f"synthesizer has unknown keys {sorted(unknown)}: use class_path + init_args")
    path = str(spec.get("class_path") or spec.get("name") or "")
    kwargs = dict(spec.get("init_args") or spec.get("kwargs") or {})
    short = path.rpartition(".")[2]
    cls: Any = SYNTHESIZERS.get(path) or (SYNTHESIZERS.get(short) if path.startswith("hiad_pl.") else None)
    if cls is None:
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name) if module else None
        except (ImportError, AttributeError) as err:
            raise ValueError(f"synthesizer {path!r} could not be imported: {err}") from err
        if cls is None:
            raise ValueError(f"unknown synthesizer {path!r}; known: {', '.join(sorted(SYNTHESIZERS))}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"synthesizer {path}: bad arguments {sorted(kwargs)}: {err}") from err
