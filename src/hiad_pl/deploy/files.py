"""Prediction files and panels shared by ``predict --run_dir``, ``predict --export`` and ``test`` (numpy and Pillow only).

Per image: ``<stem>_map.png`` (16-bit), ``<stem>_map.npy`` (float32),
``<stem>_overlay.png`` (the heat map on the model's fixed colour scale with the
predicted-defect outline), ``<stem>_mask.png`` (predicted defect pixels, 0/255, full
image size) and ``<stem>_panel.png`` (image | overlay, with the score and the
decision written above); per run: ``scores.csv``. Every file is written atomically.
A model without thresholds writes no mask and no label (see :data:`hiad_pl.decisions.NO_THRESHOLDS`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hiad_pl.data.sample import IMAGE_SUFFIXES, resize_array
from hiad_pl.decisions import NG, NO_THRESHOLDS, Thresholds
from hiad_pl.errors import DatasetError, MissingFileError
from hiad_pl.run_folder import atomic_write

#: ``label`` is OK/NG (empty without thresholds); ``error`` is empty for scored images and says why the others were skipped.
SCORES_FIELDS = [
    "image", "score", "label", "image_threshold", "pixel_threshold", "defect_pixels",
    "map", "mask", "panel", "map_min", "map_max", "error",
]
#: Outline colours: predicted defects white, ground truth magenta (neither is a colour of the JET scale).
PREDICTED_COLOUR = (255, 255, 255)
TRUTH_COLOUR = (255, 0, 255)
DECISION_COLOURS = {"OK": (60, 200, 90), "NG": (255, 70, 60), None: (200, 200, 200)}
#: Longest side of each half of a ``predict`` panel (the overlay PNG keeps the full size).
PANEL_SIDE = 1024
#: Blend of the heat map over the image.
OVERLAY_ALPHA = 0.5


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    """An ``[H, W]`` (uint8 or uint16) or ``[H, W, 3]`` uint8 array encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def map_range(anomaly_map: np.ndarray, normalized: bool) -> tuple[float, float]:
    """The score range a map's PNG spans: [0, 1] for normalised scores, else the map's min..max."""
    return (0.0, 1.0) if normalized else (float(anomaly_map.min()), float(anomaly_map.max()))


def map_png16(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``[H, W]`` scores scaled from ``vmin..vmax`` onto the 16-bit range (clipped)."""
    scaled = np.clip((anomaly_map.astype(np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return (scaled * 65535).round().astype(np.uint16)


def colour_levels(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """``[H, W]`` scores -> colour levels 0..255 (uint8) on the range ``low..high``.

    Level ``k`` holds the scores in ``[low + k/256 (high - low), low + (k+1)/256 (high - low))``,
    so a threshold at a multiple of 1/256 of the range (the middle, see
    :data:`~hiad_pl.decisions.THRESHOLD_POSITION`) is a level boundary: every score below
    it has a colour below the threshold's.
    """
    scaled = (anomaly_map.astype(np.float32) - np.float32(low)) / np.float32(max(high - low, 1e-12))
    return np.clip(np.floor(scaled * 256), 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, colours: np.ndarray, low: float, high: float,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The heat map (``colours``: 256 RGB entries) on the fixed range ``low..high``, blended over the image."""
    heat = colours[colour_levels(anomaly_map, low, high)].astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)


def outline_width(side: int) -> int:
    """Outline thickness for an image of longest side ``side``: 2 px up to 800 px, then growing (5 px at 2048)."""
    return max(2, round(side / 400))


def _erode(region: np.ndarray, radius: int) -> np.ndarray:
    """``region`` eroded by a ``(2 radius + 1)`` square (outside the image counts as outside the region)."""
    padded = np.pad(region.astype(np.int32), radius + 1)
    integral = padded.cumsum(0).cumsum(1)
    size = 2 * radius + 1
    height, width = region.shape
    window = (integral[size:size + height, size:size + width] - integral[:height, size:size + width]
              - integral[size:size + height, :width] + integral[:height, :width])
    return window == size * size


def draw_outline(image: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int], width: int) -> np.ndarray:
    """``image`` with the ``width``-pixel inner outline of ``mask`` (non-zero pixels) drawn in ``colour``."""
    if mask is None or not mask.any():
        return image
    region = mask > 0
    edge = region & ~_erode(region, width)
    out = image.copy()
    out[edge] = colour
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def caption(width: int, lines: list[tuple[str, tuple[int, int, int]]], side: int) -> np.ndarray:
    """A dark ``[h, width, 3]`` bar with ``lines`` of text (text, colour), sized for an image of side ``side``."""
    size = max(12, round(side / 40))
    font = _font(size)
    height = round(size * 1.35) * len(lines) + size // 2
    bar = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(bar)
    for k, (text, colour) in enumerate(lines):
        draw.text((size // 2, size // 4 + k * round(size * 1.35)), text, fill=colour, font=font)
    return np.asarray(bar)


def decision_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    colours: np.ndarray,
    display: tuple[float, float],
    score: float,
    thresholds: Thresholds | None,
    truth: np.ndarray | None = None,
    side: int | None = None,
    title: str | None = None,
) -> np.ndarray:
    """``image | overlay`` side by side, each ``side`` px at most, with the score and the decision above.

    The overlay shows the heat map on the fixed ``display`` range, the outline of the
    predicted defect pixels (white; with thresholds) and of the ``truth`` mask
    (magenta; in ``test``). Outlines and text grow with the panel's size.
    """
    height, width = image.shape[:2]
    if side is not None and max(height, width) > side:
        scale = side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = resize_array(image, size)
        anomaly_map = np.asarray(Image.fromarray(anomaly_map.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
        truth = None if truth is None else resize_array((truth > 0).astype(np.uint8) * 255, size, nearest=True)
    height, width = image.shape[:2]
    thickness = outline_width(max(height, width))
    heat = overlay(image, anomaly_map, colours, *display)
    if thresholds is not None:
        heat = draw_outline(heat, thresholds.mask(anomaly_map), PREDICTED_COLOUR, thickness)
    heat = draw_outline(heat, truth, TRUTH_COLOUR, thickness)
    gap = np.full((height, max(2, thickness * 2), 3), 24, np.uint8)
    body = np.concatenate([image, gap, heat], axis=1)
    if thresholds is None:
        head = [(f"score {score:.4g}: no decision ({NO_THRESHOLDS.split(':')[0]})", DECISION_COLOURS[None])]
    else:
        decision = thresholds.decide(score)
        relation = ">" if decision.label == NG else "<="
        head = [(f"{decision.label}   score {score:.4g} {relation} image threshold {thresholds.image:.4g}",
                 DECISION_COLOURS[decision.label])]
    legend = f"colours {display[0]:.3g}..{display[1]:.3g}"
    if thresholds is not None:
        legend += f", white: pixels > {thresholds.pixel:.4g}"
    if truth is not None:
        legend += ", magenta: ground truth"
    lines = head + [((title + "   " if title else "") + legend, DECISION_COLOURS[None])]
    return np.concatenate([caption(body.shape[1], lines, max(height, width)), body], axis=0)


def write_prediction_files(
    folder: Path,
    stem: str,
    image_path: str,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    normalized: bool,
    colours: np.ndarray,
    thresholds: Thresholds | None,
) -> dict:
    """Write one image's map (16-bit PNG and .npy), overlay, predicted mask and panel; returns its ``scores.csv`` row.

    The 16-bit PNG spans [0, 1] for normalised scores; raw maps span their own
    min..max, which the row records so the PNG can be mapped back. The overlay's
    colours span the model's fixed display range (its thresholds'), or, without
    thresholds, the map's own range.
    """
    anomaly_map = anomaly_map.astype(np.float32)
    vmin, vmax = map_range(anomaly_map, normalized)
    atomic_write(folder / f"{stem}_map.png", png_bytes(map_png16(anomaly_map, vmin, vmax)))
    buffer = io.BytesIO()
    np.save(buffer, anomaly_map)
    atomic_write(folder / f"{stem}_map.npy", buffer.getvalue())
    display = (vmin, vmax) if thresholds is None else thresholds.display
    heat = overlay(image, anomaly_map, colours, *display)
    row = {
        "image": image_path,
        "score": f"{score:.6f}",
        "map": f"{stem}_map.png",
        "panel": f"{stem}_panel.png",
        "map_min": f"{vmin:.6g}",
        "map_max": f"{vmax:.6g}",
    }
    if thresholds is not None:
        mask = thresholds.mask(anomaly_map)
        heat = draw_outline(heat, mask, PREDICTED_COLOUR, outline_width(max(mask.shape)))
        atomic_write(folder / f"{stem}_mask.png", png_bytes(mask))
        row.update({
            "label": thresholds.decide(score).label,
            "image_threshold": f"{thresholds.image:.6g}",
            "pixel_threshold": f"{thresholds.pixel:.6g}",
            "defect_pixels": str(int(np.count_nonzero(mask))),
            "mask": f"{stem}_mask.png",
        })
    atomic_write(folder / f"{stem}_overlay.png", png_bytes(heat, compress_level=1))
    panel = decision_panel(image, anomaly_map, colours, display, score, thresholds, side=PANEL_SIDE)
    atomic_write(folder / f"{stem}_panel.png", png_bytes(panel, compress_level=1))
    return row


def write_scores_csv(rows: list[dict], path: Path, normalized: bool, thresholds: Thresholds | None = None) -> None:
    """``scores.csv``: one row per image; comment lines say whether scores are normalised and which thresholds decided."""
    buffer = io.StringIO()
    scale = "normalised to [0, 1] with validation statistics" if normalized else "raw (no validation set)"
    buffer.write(f"# scores: {scale}\n")
    buffer.write(f"# thresholds: {NO_THRESHOLDS if thresholds is None else thresholds.describe()}\n")
    writer = csv.DictWriter(buffer, fieldnames=SCORES_FIELDS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(path), buffer.getvalue())


def unique_stems(paths: Sequence[str | Path]) -> list[str]:
    """Output names for input images: the file stem, prefixed by folders where stems collide."""
    files = [Path(p) for p in paths]
    stems = [p.stem for p in files]
    depth = 1
    while len(set(stems)) < len(stems) and depth < max(len(p.parts) for p in files):
        stems = ["_".join(p.parts[-depth - 1 : -1] + (p.stem,)) for p in files]
        depth += 1
    if len(set(stems)) < len(stems):
        stems = [f"{k:05d}_{stem}" for k, stem in enumerate(stems)]
    return stems


def input_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively) in named folders."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem)
            if not found:
                raise DatasetError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise MissingFileError(f"{item}: no such file or folder")
    return files
