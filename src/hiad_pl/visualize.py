"""Visualisations: image | heat-map overlay | ground-truth contour."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from hiad_pl.data.sample import resize_array
from hiad_pl.run_folder import atomic_write


def heatmap(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``[H, W]`` scores -> ``[H, W, 3]`` uint8 RGB (JET colour map) on the range vmin..vmax."""
    scaled = np.clip((anomaly_map.astype(np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    bgr = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return bgr[..., ::-1]


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Heat map blended over the image."""
    heat = heatmap(anomaly_map, vmin, vmax).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)


def contour(image: np.ndarray, mask: np.ndarray | None, color: tuple[int, int, int] = (255, 0, 0), width: int = 2) -> np.ndarray:
    """The image with the outline of ``mask`` drawn on it."""
    out = image.copy()
    if mask is None or not mask.any():
        return out
    region = mask > 0
    edge = region & ~ndimage.binary_erosion(region, iterations=width)
    out[edge] = color
    return out


def render_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    vis_size: int,
    vmin: float,
    vmax: float,
) -> np.ndarray:
    """Three panels side by side at ``vis_size`` each: image, overlay, ground-truth contour."""
    height, width = image.shape[:2]
    scale = vis_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = resize_array(image, size)
    small_map = np.asarray(Image.fromarray(anomaly_map.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    small_mask = None if mask is None else resize_array((mask > 0).astype(np.uint8) * 255, size, nearest=True)
    panels = [small, overlay(small, small_map, vmin, vmax), contour(small, small_mask)]
    return np.concatenate(panels, axis=1)


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write an image as PNG atomically."""
    atomic_write(path, lambda stream: Image.fromarray(array).save(stream, format="PNG", compress_level=1))
