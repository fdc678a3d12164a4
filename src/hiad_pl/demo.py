"""Procedural high-resolution demo data set in the MVTec AD layout.

:func:`make_demo_dataset` writes, for every category::

    root/<category>/train/good/000.png ...
    root/<category>/test/good/000.png ...
    root/<category>/test/<defect kind>/000.png ...
    root/<category>/ground_truth/<defect kind>/000_mask.png ...

Images are square RGB PNG files (2048 px by default); masks are single-channel
PNG files of the same size holding 0 (normal) and 255 (defect). Everything is
seeded: the same arguments write byte-identical files (with the same numpy and OpenCV).

Categories
----------
``texture`` (default)
    Plain-woven fabric. The weave is stationary: every position of the image
    looks alike, so one detector can serve all patches.
``object`` (default)
    A circuit board on a dark conveyor, centred and aligned (each image is
    shifted by at most 4 px at 2048, in proportion at other sizes). Its layout has a known symmetry on the 4 x 4 grid
    of ``image_size / 4`` patches (512 px at 2048), recorded in
    :data:`OBJECT_PATCH_GROUPS`::

        corner  edge    edge    corner        0  1  1  0
        edge    centre  centre  edge          1  2  2  1
        edge    centre  centre  edge          1  2  2  1
        corner  edge    edge    corner        0  1  1  0

    Corner patches hold a rounded corner of the board, much conveyor and a
    mounting screw; edge patches hold a bank of gold connector fingers and a
    row of small components; centre patches each hold a quarter of a black chip
    with its pins. The drawing is invariant under the mirrors and quarter turns
    of the square, so patches of one group differ only by orientation (and
    noise), while groups differ in content and colour.
``object_rotated``
    The same board, drawn smaller (about 46% of the image side), turned by a
    random angle and moved by up to 16% of the image side along each axis in
    every image: a grid position shows the chip in one image, connector fingers
    or bare conveyor in the next, so positions carry no meaning and patches
    must be routed by their content (retrieval).
``texture_large``
    The fabric with one large defect per image (a stain or a missing region)
    covering more than a quarter of the image, the case a low-resolution
    thumbnail branch is for.
``texture_fine``
    Brushed metal with strong pixel-scale grain and bright glints, a fine
    texture that tempts high-resolution detectors into false alarms; its
    defects are small.

Defects
-------
Each defective image holds one to three defects of one kind (one for
``texture_large``), never touching each other:

=========  =================================================  ============
kind       look                                               size (px)
=========  =================================================  ============
scratch    thin dark or bright line, 1-3 px wide              20-60 long
spot       dark or bright blob                                8-20
missing    material gone: a dark gap, or pale substrate       12-40
stain      colour change with a soft edge                     16-60
=========  =================================================  ============

Sizes are in pixels of the written image whatever ``image_size`` is (a
camera's smallest defect is fixed in pixels), except for ``texture_large``,
whose single defect covers 27-34 % of the image. Small defects keep their full
contrast at full resolution but shrink to a few pixels when the image is
downscaled to 256 px, where a low-resolution detector cannot see them. Masks
mark exactly the pixels inside each defect's outline; a stain's soft edge
fades out within a few pixels beyond it.

:func:`render_demo_sample` renders one image of the set in memory, together
with the same image without its defects, which makes the claims above
measurable.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

DEMO_CATEGORIES: tuple[str, ...] = ("texture", "object", "object_rotated", "texture_large", "texture_fine")
DEFAULT_CATEGORIES: tuple[str, ...] = ("texture", "object")
DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "missing", "stain")
OBJECT_GROUP_NAMES: tuple[str, ...] = ("corner", "edge", "centre")
OBJECT_PATCH_GROUPS: tuple[tuple[int, ...], ...] = (
    (0, 1, 1, 0),
    (1, 2, 2, 1),
    (1, 2, 2, 1),
    (0, 1, 1, 0),
)
"""Group id (index into :data:`OBJECT_GROUP_NAMES`) of each patch, row by row, on the
4 x 4 grid of ``image_size / 4`` patches of the ``object`` category."""
OBJECT_GRID = 4
MIN_IMAGE_SIZE = 256

log = logging.getLogger(__name__)

_FORMAT_VERSION = 2  # raised whenever a category's drawing changes: older sets are redrawn
_MARKER = ".demo.json"
_OBJECT_JITTER = 1 / 512  # of the image side (4 px at 2048): aligned, but not pixel-perfect
_ROTATED_SCALE = 0.55  # board size in object_rotated: small enough to move about the frame
_ROTATED_SHIFT = 0.16  # largest offset of its centre along each axis, in image sides
_ROTATED_PAD = 0.1  # drawing margin, in image sides, that keeps reflections free of the board
_SITE_STRIDE = 8  # resolution of the maps of admissible defect centres
_GAP = 16  # px between the outlines of two defects
_MAX_WORKERS = 4  # images in flight at once; each needs a few hundred MB at 2048 px


@dataclass(frozen=True)
class Defect:
    """One drawn defect: its kind, centre ``(x, y)``, size (largest extent of its mask, px) and mask box."""

    kind: str
    centre: tuple[float, float]
    size: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 with exclusive ends


@dataclass(frozen=True)
class DemoSample:
    """A rendered image, the same image without its defects, their 0/255 mask and the defects.

    For a normal image ``clean`` is ``image``, the mask is all zeros and ``defects`` is empty.
    """

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray
    defects: tuple[Defect, ...]


# --------------------------------------------------------------------------- noise


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-variance noise of ``shape`` (rows, cols), smooth over ``cells`` knots."""
    knots = rng.standard_normal((max(cells[0], 2), max(cells[1], 2)), dtype=np.float32)
    field = cv2.resize(knots, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _mottle(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """Slow multiplicative brightness variation ``1 ± amplitude`` over an image."""
    cells = size // 256 + 3
    return 1.0 + np.float32(amplitude) * _smooth_noise(rng, (size, size), (cells, cells))


# ----------------------------------------------------------------------- textures

_WEAVE_PERIOD = 12.0  # px per thread
_FABRIC_RGB = np.array([0.72, 0.64, 0.49], np.float32)
_WARP_SHADE = 0.84  # warp threads are dyed a little darker than weft threads
_METAL_RGB = np.array([0.95, 0.98, 1.04], np.float32)


def _threads(position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thread index and brightness across the thread (1 on its crest, 0 at its borders), from a position in threads.

    ``position`` is overwritten: the images are large, so temporaries are kept few.
    """
    index = np.floor(position)
    across = position
    across -= index
    across *= 2.0
    across -= 1.0
    np.square(across, out=across)
    np.subtract(1.0, across, out=across)
    return index.astype(np.int32), across


def _woven_fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain-woven fabric: warp and weft threads with wobble, per-thread shade and mottling."""
    coords = np.arange(size, dtype=np.float32) / np.float32(_WEAVE_PERIOD)
    knots = size // 96 + 4
    phase = rng.uniform(0.0, 2.0, 2).astype(np.float32)
    wobble_warp = (1.5 / _WEAVE_PERIOD) * _smooth_noise(rng, (size, 1), (knots, 1))  # threads are never straight
    wobble_weft = (1.5 / _WEAVE_PERIOD) * _smooth_noise(rng, (1, size), (1, knots))
    warp_index, across_warp = _threads(coords[None, :] + (phase[0] + wobble_warp))
    weft_index, across_weft = _threads(coords[:, None] + (phase[1] + wobble_weft))
    warp_on_top = ((warp_index + weft_index) & 1) == 0  # plain weave: warp floats over every other weft
    thread_shade = 1.0 + 0.07 * rng.standard_normal(size // 4 + 16, dtype=np.float32)
    warp_look = np.take(thread_shade * np.float32(_WARP_SHADE), warp_index, mode="wrap")
    warp_look *= across_warp
    warp_look *= 0.75 + 0.25 * across_weft  # a float bulges along its length
    weft_look = np.take(thread_shade[::-1], weft_index, mode="wrap")
    weft_look *= across_weft
    weft_look *= 0.75 + 0.25 * across_warp
    luminance = np.where(warp_on_top, warp_look, weft_look)
    luminance *= 0.55
    luminance += 0.45
    luminance += 0.03 * rng.standard_normal((size, size), dtype=np.float32)  # fibre fuzz
    luminance *= _mottle(rng, size, 0.025)
    return luminance[..., None] * _FABRIC_RGB


def _brushed_metal(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed metal: long and short horizontal streaks, strong pixel grain and sparse glints."""
    streaks = _smooth_noise(rng, (size, size), (size, size // 24))
    short_streaks = _smooth_noise(rng, (size, size), (size, size // 4))
    grain = rng.standard_normal((size, size), dtype=np.float32)
    luminance = 0.55 + 0.05 * streaks + 0.035 * short_streaks + 0.06 * grain
    count = size * size // 2000
    rows, cols = rng.integers(0, size - 1, (2, count))
    luminance[rows, cols] += 0.35
    luminance[rows + 1, cols] += 0.2
    luminance[rows, cols + 1] += 0.2
    luminance *= _mottle(rng, size, 0.03)
    return luminance[..., None] * _METAL_RGB


# -------------------------------------------------------------------------- board

_CONVEYOR_RGB = np.array([0.19, 0.20, 0.22], np.float32)
_BOARD_RGB = np.array([0.09, 0.36, 0.17], np.float32)
_TRACE_RGB = np.array([0.15, 0.50, 0.22], np.float32)
_GOLD_RGB = np.array([0.86, 0.68, 0.27], np.float32)
_SILVER_RGB = np.array([0.78, 0.79, 0.81], np.float32)
_SLOT_RGB = np.array([0.12, 0.12, 0.13], np.float32)
_CHIP_RGB = np.array([0.07, 0.07, 0.08], np.float32)
_MARK_RGB = np.array([0.28, 0.28, 0.29], np.float32)
_PART_RGB = np.array([0.74, 0.60, 0.42], np.float32)
_BOARD_HALF, _BOARD_RADIUS = 0.42, 0.10  # in image sides
_CHIP_HALF = 0.16
_SCREW_AT, _SCREW_RADIUS = 0.335, 0.045


def _rounded_square(ax: np.ndarray, ay: np.ndarray, half: float, radius: float) -> np.ndarray:
    """Signed distance (negative inside) to a centred square with rounded corners, from ``|x|, |y|``."""
    qx, qy = ax - (half - radius), ay - (half - radius)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - radius


def _stripes(along: np.ndarray, period: float, width: float) -> np.ndarray:
    """Signed distance to bars of ``width`` repeating every ``period``, one centred on 0."""
    return np.abs(np.mod(along + period / 2, period) - period / 2) - width / 2


def _bank(
    ax: np.ndarray, ay: np.ndarray, length: float, across: tuple[float, float], bars: tuple[float, float]
) -> np.ndarray:
    """Four banks of bars, one along each side of the square (pins, connector fingers, parts)."""

    def one_side(along: np.ndarray, normal: np.ndarray) -> np.ndarray:
        box = np.maximum(along - length, np.abs(normal - across[0]) - across[1])
        return np.maximum(box, _stripes(along, *bars))

    return np.minimum(one_side(ax, ay), one_side(ay, ax))


def _paint(canvas: np.ndarray, distance: np.ndarray, colour: np.ndarray, pixel: float) -> None:
    """Fill the region ``distance < 0`` of ``canvas`` with ``colour``, anti-aliased over one pixel."""
    alpha = np.clip(0.5 - distance / pixel, 0.0, 1.0)[..., None]
    canvas += alpha * (colour - canvas)


_BOARD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _draw_board(size: int, scale: float, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The board drawing, ``[size + 2 pad]^2 x 3`` float32, and its defect-site map, both read-only.

    Every shape is a function of ``|x|`` and ``|y|`` (and symmetric in swapping
    them) about the exact image centre, which makes the drawing invariant under
    the symmetries of the square. The site map (stride ``_SITE_STRIDE``, no
    padding) marks the board away from its border and off the chip.
    """
    rng = np.random.default_rng(20240917)  # the board's grain is part of the product
    extent = size + 2 * pad
    pixel = 1.0 / (size * scale)  # one pixel in board units
    axis = np.abs((np.arange(extent, dtype=np.float32) - (extent - 1) / 2) * pixel)
    ax, ay = axis[None, :], axis[:, None]
    canvas = np.broadcast_to(_CONVEYOR_RGB, (extent, extent, 3)).copy()
    canvas *= (1.0 + 0.08 * rng.standard_normal((extent, extent), dtype=np.float32))[..., None]
    board = _rounded_square(ax, ay, _BOARD_HALF, _BOARD_RADIUS)
    solder = _BOARD_RGB * (1.0 + 0.06 * _smooth_noise(rng, (extent, extent), (extent // 16, extent // 16)))[..., None]
    _paint(canvas, board, solder, pixel)
    _paint(canvas, np.abs(_rounded_square(ax, ay, 0.30, 0.06)) - 0.004, _TRACE_RGB, pixel)
    _paint(canvas, _bank(ax, ay, 0.199, (0.365, 0.03), (0.024, 0.014)), _GOLD_RGB, pixel)
    _paint(canvas, _bank(ax, ay, 0.12, (0.265, 0.01), (0.1, 0.036)), _PART_RGB, pixel)
    dx, dy = ax - _SCREW_AT, ay - _SCREW_AT
    radial = np.hypot(dx, dy)
    head = _SILVER_RGB * (1.0 - 0.35 * np.minimum(radial / _SCREW_RADIUS, 1.0) ** 2)[..., None]
    _paint(canvas, radial - _SCREW_RADIUS, head, pixel)
    slot = np.minimum(
        np.maximum(np.abs(dx) - 0.006, np.abs(dy) - 0.03), np.maximum(np.abs(dy) - 0.006, np.abs(dx) - 0.03)
    )
    _paint(canvas, slot, _SLOT_RGB, pixel)
    _paint(canvas, _bank(ax, ay, 0.125, (_CHIP_HALF + 0.015, 0.015), (0.02, 0.009)), _SILVER_RGB, pixel)
    chip = _rounded_square(ax, ay, _CHIP_HALF, 0.01)
    _paint(canvas, chip, _CHIP_RGB, pixel)
    _paint(canvas, np.hypot(ax - 0.115, ay - 0.115) - 0.012, _MARK_RGB, pixel)
    margin = min(36 * pixel, 0.06 / scale)  # keeps the largest small defect on the board (when the board is large enough)
    sites = (board < -margin) & (chip > 0.01)
    inner = slice(pad, pad + size, _SITE_STRIDE)
    canvas.setflags(write=False)
    sites = np.ascontiguousarray(sites[inner, inner])
    sites.setflags(write=False)
    return canvas, sites


def _board(size: int, scale: float, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The cached board drawing and site map; drawn once even when images are rendered in parallel."""
    with _BOARD_LOCK:
        return _draw_board(size, scale, pad)


# ------------------------------------------------------------------------- scenes


@dataclass
class _Scene:
    """A defect-free image before exposure, and where defects may be centred."""

    base: np.ndarray  # float32 [S, S, 3], owned by the scene (safe to draw on)
    sites: np.ndarray | None = None  # (x, y) candidate defect centres in px; None: anywhere


def _site_points(sites: np.ndarray) -> np.ndarray:
    """Centres ``(x, y)`` in px of the marked cells of a site map."""
    rows, cols = np.nonzero(sites)
    return np.stack([cols, rows], axis=1).astype(np.float64) * _SITE_STRIDE


def _texture_scene(draw: Callable[[np.random.Generator, int], np.ndarray]) -> Callable[..., _Scene]:
    """A scene maker for a stationary texture, where a defect may be anywhere."""

    def scene(rng: np.random.Generator, size: int) -> _Scene:
        return _Scene(draw(rng, size))

    return scene


def _aligned_board(rng: np.random.Generator, size: int) -> _Scene:
    """The board, shifted by a few pixels, with per-image mottling."""
    jitter = max(round(size * _OBJECT_JITTER), 1)
    pad = jitter + 2
    canvas, sites = _board(size, 1.0, pad)
    dx, dy = rng.integers(-jitter, jitter + 1, 2)
    window = canvas[pad + dy : pad + dy + size, pad + dx : pad + dx + size]
    base = window * _mottle(rng, size, 0.03)[..., None]
    return _Scene(base, _site_points(sites) - np.array([dx, dy], np.float64))


def _rotated_board(rng: np.random.Generator, size: int) -> _Scene:
    """The smaller board, turned by a random angle and placed anywhere within reach of the centre.

    The drawing is padded by a tenth of the image on each side, so the pixels
    that the turn brings in from beyond the padding (filled by reflection) are
    conveyor, never a mirrored piece of the board.
    """
    pad = math.ceil(size * _ROTATED_PAD)
    canvas, sites = _board(size, _ROTATED_SCALE, pad)
    centre = (size + 2 * pad - 1) / 2
    shift = rng.uniform(-1.0, 1.0, 2) * size * _ROTATED_SHIFT
    matrix = np.asarray(cv2.getRotationMatrix2D((centre, centre), float(rng.uniform(0.0, 360.0)), 1.0), dtype=np.float64)
    matrix[:, 2] += shift - pad
    turned = cv2.warpAffine(canvas, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    base = turned * _mottle(rng, size, 0.03)[..., None]
    points = _site_points(sites) + pad
    return _Scene(base, points @ matrix[:, :2].T + matrix[:, 2])


# ------------------------------------------------------------------------ defects


@dataclass(frozen=True)
class _Shape:
    """A defect outline: signed distance (px, positive inside) and the reach of its soft edge."""

    distance: Callable[[np.ndarray, np.ndarray], np.ndarray]
    reach: float  # no pixel farther than this from the centre is touched
    softness: float  # width of the edge ramp, px


def _scratch(rng: np.random.Generator, extent: float) -> _Shape:
    """A straight line 1-3 px wide whose round-capped length is ``extent``."""
    width = float(rng.integers(1, 4))
    angle = rng.uniform(0.0, np.pi)
    ux, uy = np.cos(angle), np.sin(angle)
    half = (extent - width) / 2

    def distance(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        along = np.clip(dx * ux + dy * uy, -half, half)
        return width / 2 - np.hypot(dx - along * ux, dy - along * uy)

    return _Shape(distance, extent / 2 + 1, 1.0)


def _blob(
    rng: np.random.Generator, irregularity: float, soft: float, *, extent: float = 0.0, area: float = 0.0
) -> _Shape:
    """A star-shaped blob with a wavy outline, of diameter ``extent`` or of ``area`` px².

    Its edge ramps over ``soft`` times its radius (between 1 and 24 px).
    """
    orders = np.arange(2, 6)
    amplitudes = irregularity * rng.uniform(0.2, 1.0, orders.size) / orders
    phases = rng.uniform(0.0, 2 * np.pi, orders.size)

    def outline(theta: np.ndarray) -> np.ndarray:
        waves = np.cos(orders * theta[..., None] + phases) @ amplitudes
        return 1.0 + waves.astype(theta.dtype)

    samples = outline(np.linspace(0.0, 2 * np.pi, 720, endpoint=False))
    radius = np.sqrt(area / (np.pi * np.mean(samples**2))) if area else extent / 2 / samples.max()
    largest = float(radius * samples.max())
    softness = float(np.clip(soft * largest, 1.0, 24.0))  # large stains keep a narrow rim

    def distance(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        return radius * outline(np.arctan2(dy, dx)) - np.hypot(dx, dy)

    return _Shape(distance, largest + softness / 2 + 1, softness)


_SHAPES: dict[str, Callable[[np.random.Generator, float], _Shape]] = {
    "scratch": _scratch,
    "spot": lambda rng, extent: _blob(rng, 0.25, 0.0, extent=extent),
    "missing": lambda rng, extent: _blob(rng, 0.6, 0.0, extent=extent),
    "stain": lambda rng, extent: _blob(rng, 0.35, 0.4, extent=extent),
}
_LARGE_SHAPES: dict[str, Callable[[np.random.Generator, float], _Shape]] = {
    "missing": lambda rng, area: _blob(rng, 0.2, 0.0, area=area),
    "stain": lambda rng, area: _blob(rng, 0.2, 0.4, area=area),
}
_HOLE_RGB = np.array([0.035, 0.03, 0.03], np.float32)
_SUBSTRATE_RGB = np.array([0.80, 0.76, 0.60], np.float32)
_DARK_RGB = np.array([0.06, 0.055, 0.05], np.float32)
_BRIGHT_RGB = np.array([0.93, 0.92, 0.88], np.float32)
_RUST_TINT = np.array([0.55, 0.36, 0.18], np.float32)
_RESIDUE_RGB = np.array([0.82, 0.80, 0.68], np.float32)


def _target(kind: str, window: np.ndarray, rng: np.random.Generator, large: bool) -> np.ndarray:
    """What the defect turns the pixels of ``window`` into, contrasting with their brightness."""
    level = float(window.mean())
    if kind == "missing":  # what lies beneath: a dark gap under bright stock, pale substrate under dark stock
        return _HOLE_RGB if level > 0.3 else _SUBSTRATE_RGB
    if kind == "stain":
        strength = 0.55 if large else 1.0  # a large stain keeps the weave visible through it
        if level > 0.35:
            return window * (1.0 - strength * (1.0 - _RUST_TINT))
        return window + strength * 0.8 * (_RESIDUE_RGB - window)
    dark = level > 0.6 or (level > 0.3 and rng.random() < 0.5)
    return _DARK_RGB if dark else _BRIGHT_RGB


def _window(centre: np.ndarray, reach: float, size: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Rows and columns around ``centre`` within ``reach``, and pixel offsets from the centre."""
    x0, y0 = (max(int(np.floor(c - reach)), 0) for c in centre)
    x1, y1 = (min(int(np.ceil(c + reach)) + 1, size) for c in centre)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(centre[0])
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(centre[1])
    return slice(y0, y1), slice(x0, x1), dx, dy


def _draw(
    base: np.ndarray,
    mask: np.ndarray,
    kind: str,
    shape: _Shape,
    centre: np.ndarray,
    rng: np.random.Generator,
    large: bool,
) -> Defect:
    """Draw one defect into ``base`` and ``mask`` in place and describe it."""
    rows, cols, dx, dy = _window(centre, shape.reach, base.shape[0])
    inside = shape.distance(dx, dy)
    ramp = np.clip((inside + shape.softness / 2) / shape.softness, 0.0, 1.0)
    alpha = (ramp * ramp * (3.0 - 2.0 * ramp))[..., None]  # smoothstep
    window = base[rows, cols]
    window += alpha * (_target(kind, window, rng, large) - window)
    outline = inside >= 0
    mask[rows, cols] |= outline
    ys, xs = np.nonzero(outline)
    x0, y0 = cols.start + int(xs.min()), rows.start + int(ys.min())
    box = (x0, y0, cols.start + int(xs.max()) + 1, rows.start + int(ys.max()) + 1)
    size = max(box[2] - box[0], box[3] - box[1])
    return Defect(kind, (float(centre[0]), float(centre[1])), size, box)


def _place(
    rng: np.random.Generator, shapes: Sequence[_Shape], sites: np.ndarray | None, size: int
) -> list[tuple[_Shape, np.ndarray]]:
    """Pair defect shapes with centres inside the image and apart from each other.

    The first shape always finds a place; a later one is dropped when no free
    place turns up, so an image never holds touching defects.
    """
    placed: list[tuple[_Shape, np.ndarray]] = []
    for shape in shapes:
        low, high = shape.reach + 2, size - shape.reach - 2
        for _ in range(200):
            if sites is None:
                candidate = rng.uniform(low, high, 2)
            else:
                candidate = sites[rng.integers(len(sites))] + rng.uniform(0, _SITE_STRIDE, 2)
            inside = bool(np.all((candidate >= low) & (candidate <= high)))
            apart = all(np.hypot(*(candidate - c)) > shape.reach + s.reach + _GAP for s, c in placed)
            if inside and apart:
                placed.append((shape, candidate))
                break
        else:
            if not placed:
                raise ValueError(f"no room for a defect of reach {shape.reach:.0f} px in a {size} px image")
    return placed


# --------------------------------------------------------------------- categories


@dataclass(frozen=True)
class _Category:
    """How one demo category is drawn and which defects it shows."""

    description: str
    scene: Callable[[np.random.Generator, int], _Scene]
    kinds: tuple[str, ...] = DEFECT_KINDS
    max_defects: int = 3
    large: bool = False  # defects cover a share of the image instead of a few pixels


_SMALL_EXTENTS: dict[str, tuple[float, float]] = {
    "scratch": (20.0, 59.0),
    "spot": (8.0, 19.0),
    "missing": (12.0, 39.0),
    "stain": (16.0, 59.0),
}  # px; upper ends one below the documented maxima: the mask may take one more pixel
_LARGE_AREAS = (0.27, 0.34)  # fractions of the image area

_CATEGORIES: dict[str, _Category] = {
    "texture": _Category("plain-woven fabric, stationary, small defects", _texture_scene(_woven_fabric)),
    "object": _Category("circuit board, centred and aligned, small defects", _aligned_board),
    "object_rotated": _Category("circuit board turned by a random angle and moved about, small defects", _rotated_board),
    "texture_large": _Category(
        "plain-woven fabric with one large defect covering over a quarter of the image",
        _texture_scene(_woven_fabric),
        kinds=("stain", "missing"),
        max_defects=1,
        large=True,
    ),
    "texture_fine": _Category(
        "brushed metal with strong fine grain and glints, small defects", _texture_scene(_brushed_metal)
    ),
}
_SPLIT_CODES = {"train": 0, "test": 1}
_COUNT_NAMES = ("num_train", "num_test_good", "num_test_defect")


def _shapes(rng: np.random.Generator, kind: str, category: _Category, size: int) -> list[_Shape]:
    """The outlines of an image's defects; small extents are log-uniform so that small defects dominate."""
    count = int(rng.integers(1, category.max_defects + 1))
    if category.large:
        areas = rng.uniform(*_LARGE_AREAS, count) * size * size
        return [_LARGE_SHAPES[kind](rng, area) for area in areas]
    low, high = _SMALL_EXTENTS[kind]
    return [_SHAPES[kind](rng, extent) for extent in np.exp(rng.uniform(np.log(low), np.log(high), count))]


# ------------------------------------------------------------------------ exposure


def _expose(base: np.ndarray, light: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Light and sensor: per-pixel gain, colour balance, additive noise, 8-bit quantisation."""
    gain, balance, noise = light
    image = base * gain[..., None]
    image *= balance
    image += noise[..., None]
    np.clip(image, 0.0, 255.0, out=image)
    return image.astype(np.uint8)


def _exposure(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random exposure: brightness, a gentle illumination slope, colour balance and sensor noise."""
    brightness = np.float32(255.0 * rng.normal(1.0, 0.03))
    slope = rng.normal(0.0, 0.03, 2).astype(np.float32)
    ramp = (np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2)) / np.float32(size)
    gain = brightness * ((1.0 + slope[0] * ramp[None, :]) + slope[1] * ramp[:, None])
    balance = rng.normal(1.0, 0.01, 3).astype(np.float32)
    noise = 2.5 * rng.standard_normal((size, size), dtype=np.float32)
    noise += 0.5  # rounds to nearest on conversion
    return gain, balance, noise


# ------------------------------------------------------------------------ samples


def _check_category(category: str) -> _Category:
    """The recipe of a category, or an error naming the valid ones."""
    if category not in _CATEGORIES:
        raise ValueError(f"unknown demo category {category!r}; choose from {', '.join(DEMO_CATEGORIES)}")
    return _CATEGORIES[category]


def _check_natural(name: str, value: int) -> int:
    """``value`` as an int, or an error when it is not a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_image_size(image_size: int) -> int:
    """``image_size`` as an int, or an error when the demo cannot be drawn at that size."""
    if _check_natural("image_size", image_size) < MIN_IMAGE_SIZE or image_size % OBJECT_GRID:
        raise ValueError(
            f"image_size must be a multiple of {OBJECT_GRID} and at least {MIN_IMAGE_SIZE}, got {image_size}"
        )
    return int(image_size)


def _entropy(name: str, seed: int, split: str, kind: str, index: int) -> list[int]:
    """The seed material of one image, after checking that the set holds such an image."""
    category = _check_category(name)
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    kinds = ("good",) + (category.kinds if split == "test" else ())
    if kind not in kinds:
        raise ValueError(f"kind {kind!r} is not in the {split} split of {name!r}; choose from {', '.join(kinds)}")
    code = [DEMO_CATEGORIES.index(name), _SPLIT_CODES[split], kinds.index(kind)]
    return [_check_natural("seed", seed), *code, _check_natural("index", index)]


def _render(name: str, image_size: int, seed: int, split: str, kind: str, index: int, keep_clean: bool) -> DemoSample:
    """Render one image of the set; the defect-free copy is only exposed when ``keep_clean``."""
    entropy = _entropy(name, seed, split, kind, index)
    size = _check_image_size(image_size)
    category = _CATEGORIES[name]
    scene_rng, defect_rng, light_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(entropy).spawn(3))
    scene = category.scene(scene_rng, size)
    light = _exposure(light_rng, size)  # shared by both copies, so they differ by the defects alone
    mask = np.zeros((size, size), dtype=bool)
    if kind == "good":
        image = _expose(scene.base, light)
        return DemoSample(image, image, mask.view(np.uint8), ())
    clean = _expose(scene.base, light) if keep_clean else None
    placed = _place(defect_rng, _shapes(defect_rng, kind, category, size), scene.sites, size)
    defects = tuple(_draw(scene.base, mask, kind, s, c, defect_rng, category.large) for s, c in placed)
    image = _expose(scene.base, light)
    return DemoSample(image, image if clean is None else clean, mask.view(np.uint8) * np.uint8(255), defects)


def render_demo_sample(
    category: str, image_size: int = 2048, seed: int = 0, split: str = "train", kind: str = "good", index: int = 0
) -> DemoSample:
    """Render in memory the image that :func:`make_demo_dataset` writes to ``<category>/<split>/<kind>/<index>.png``.

    The result also holds the same image without its defects (``clean``), its
    0/255 mask and the list of drawn defects.
    """
    return _render(category, image_size, seed, split, kind, index, keep_clean=True)


# ----------------------------------------------------------------------- writing


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG quickly (low compression; PIL adds no time stamp, so bytes are reproducible)."""
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _plan(category: _Category, num_train: int, num_test_good: int, num_test_defect: int) -> list[tuple[str, str, int]]:
    """Every image of a category as ``(split, kind, index)``; defect kinds are taken in turn."""
    plan = [("train", "good", i) for i in range(num_train)] + [("test", "good", i) for i in range(num_test_good)]
    turns = [category.kinds[i % len(category.kinds)] for i in range(num_test_defect)]
    return plan + [("test", kind, turns[:i].count(kind)) for i, kind in enumerate(turns)]


def _files(directory: Path, plan: list[tuple[str, str, int]]) -> list[Path]:
    """The image and mask files a plan writes."""
    images = [directory / split / kind / f"{index:03d}.png" for split, kind, index in plan]
    masks = [directory / "ground_truth" / kind / f"{index:03d}_mask.png" for _, kind, index in plan if kind != "good"]
    return images + masks


def _read_marker(directory: Path) -> dict | None:
    """The generation record of a category folder, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _prepare(directory: Path, params: dict, files: list[Path], overwrite: bool) -> bool:
    """Make ``directory`` ready for writing; return False when it already holds this exact set."""
    if not directory.exists():
        return True
    if overwrite:
        shutil.rmtree(directory)
        return True
    marker = _read_marker(directory)
    if marker is None:
        if any(directory.iterdir()):
            raise FileExistsError(
                f"{directory}: folder exists and was not written by make_demo_dataset; "
                "pass overwrite=True to replace it"
            )
        return True
    recorded = {k: v for k, v in marker.items() if k != "complete"}
    if recorded | {"format": params["format"]} == params and recorded.get("format") != params["format"]:
        log.info("%s: drawn by an older version of the demo generator; drawing it again", directory)
        shutil.rmtree(directory)
        return True
    if recorded != params:
        raise FileExistsError(
            f"{directory}: holds a demo set made with {recorded}, not {params}; pass overwrite=True to replace it"
        )
    if marker.get("complete") and all(f.is_file() for f in files):
        return False
    shutil.rmtree(directory)  # an interrupted run of the same set: start it again
    return True


def _workers() -> int:
    """How many images to render and encode at once: the usable cores, at most ``_MAX_WORKERS``."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(usable, _MAX_WORKERS))


def _write_image(directory: Path, name: str, image_size: int, seed: int, split: str, kind: str, index: int) -> None:
    """Render one image of a category and write it (and its mask) into ``directory``."""
    sample = _render(name, image_size, seed, split, kind, index, keep_clean=False)
    _save_png(sample.image, directory / split / kind / f"{index:03d}.png")
    if kind != "good":
        _save_png(sample.mask, directory / "ground_truth" / kind / f"{index:03d}_mask.png")


def _make_folders(directory: Path, plan: list[tuple[str, str, int]]) -> None:
    """Create the image and mask folders a plan writes into."""
    for split, kind, _ in plan:
        (directory / split / kind).mkdir(parents=True, exist_ok=True)
        if kind != "good":
            (directory / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)


def _write_category(
    root: Path, name: str, image_size: int, seed: int, counts: tuple[int, ...], overwrite: bool
) -> dict[str, Any]:
    """Write one category (or find it complete) and summarise it."""
    category = _CATEGORIES[name]
    directory = root / name
    plan = _plan(category, *counts)
    params = {"format": _FORMAT_VERSION, "category": name, "image_size": image_size, "seed": seed}
    params |= dict(zip(_COUNT_NAMES, counts))
    write = _prepare(directory, params, _files(directory, plan), overwrite)
    if write:
        _make_folders(directory, plan)
        (directory / _MARKER).write_text(json.dumps(params | {"complete": False}, indent=1))
        with ThreadPoolExecutor(max_workers=_workers()) as pool:  # numpy and zlib release the GIL
            list(pool.map(lambda item: _write_image(directory, name, image_size, seed, *item), plan))
        (directory / _MARKER).write_text(json.dumps(params | {"complete": True}, indent=1))
    kinds = [kind for _, kind, _ in plan if kind != "good"]
    return {
        "path": str(directory),
        "description": category.description,
        "train": counts[0],
        "test_good": counts[1],
        "test_defect": {kind: kinds.count(kind) for kind in category.kinds if kind in kinds},
        "skipped": not write,
    }


def _readme(root: Path) -> str:
    """The text of ``README.txt``, describing every demo category found under ``root``."""
    found = {name: _read_marker(root / name) for name in DEMO_CATEGORIES}
    lines = [
        "hiad-pl procedural demo data set (MVTec AD layout)",
        "",
        "<category>/train/good/*.png                    normal training images",
        "<category>/test/good/*.png                     normal test images",
        "<category>/test/<kind>/*.png                   defective test images",
        "<category>/ground_truth/<kind>/*_mask.png      their masks (single channel, 0 normal / 255 defect)",
        "",
        "categories (square RGB PNG images; the same seed writes byte-identical files):",
        *(
            f"  {name}: {_CATEGORIES[name].description} ({marker['image_size']} px, seed {marker['seed']})"
            for name, marker in found.items()
            if marker is not None
        ),
        "",
        "defect kinds, 1-3 per image: scratch (1-3 px wide, 20-60 px long), spot (8-20 px),",
        "missing (12-40 px), stain (16-60 px, soft edge). texture_large: one stain or missing",
        "region covering 27-34 % of the image. Small defects are plain at full resolution and",
        "all but vanish when the image is downscaled to 256 px. The object's 4 x 4 patches form",
        "three mirror-symmetric groups: corners, edges, centre.",
    ]
    return "\n".join(lines) + "\n"


def make_demo_dataset(
    root: str | Path,
    categories: str | Sequence[str] | None = None,
    image_size: int = 2048,
    num_train: int = 10,
    num_test_good: int = 5,
    num_test_defect: int = 10,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the procedural demo data set under ``root`` and return a summary of it.

    ``categories`` defaults to :data:`DEFAULT_CATEGORIES`; any of
    :data:`DEMO_CATEGORIES` may be named. Defect kinds are taken in turn over the
    ``num_test_defect`` defective test images of a category. A category folder
    that already holds the same complete set is left alone (``skipped`` in the
    summary); one holding anything else raises :class:`FileExistsError` unless
    ``overwrite`` is set, which replaces it.
    """
    if categories is not None and not categories:
        raise ValueError("categories is empty; name at least one of " + ", ".join(DEMO_CATEGORIES))
    names = list(dict.fromkeys([categories] if isinstance(categories, str) else (categories or DEFAULT_CATEGORIES)))
    for name in names:
        _check_category(name)
    size = _check_image_size(image_size)
    counts = tuple(_check_natural(n, v) for n, v in zip(_COUNT_NAMES, (num_train, num_test_good, num_test_defect)))
    seed = _check_natural("seed", seed)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root}: exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = {name: _write_category(root, name, size, seed, counts, overwrite) for name in names}
    (root / "README.txt").write_text(_readme(root))
    seconds = round(time.perf_counter() - start, 3)
    return {"root": str(root), "image_size": size, "seed": seed, "categories": summary, "seconds": seconds}
