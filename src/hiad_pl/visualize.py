"""Visualisations: the JET colour table and the test panels (image | overlay with outlines, score and decision)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from hiad_pl.decisions import Thresholds
from hiad_pl.deploy.files import decision_panel
from hiad_pl.run_folder import atomic_write

#: OpenCV's JET colour map as 256 RGB entries (level 0: dark blue, 255: dark red); exports carry it as a file.
JET_COLOURS: np.ndarray = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_JET)[0, :, ::-1].copy()


def render_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    vis_size: int,
    display: tuple[float, float],
    score: float,
    thresholds: Thresholds | None,
    title: str | None = None,
) -> np.ndarray:
    """``image | overlay`` at ``vis_size`` px per side: fixed colour scale, predicted and ground-truth outlines, score and decision."""
    return decision_panel(image, anomaly_map, JET_COLOURS, display, score, thresholds, mask, vis_size, title)


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write an image as PNG atomically."""
    atomic_write(path, lambda stream: Image.fromarray(array).save(stream, format="PNG", compress_level=1))
