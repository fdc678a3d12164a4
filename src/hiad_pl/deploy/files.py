"""Prediction files shared by ``predict --run_dir`` and ``predict --export`` (numpy and Pillow only).

Per image: ``<stem>_map.png`` (16-bit), ``<stem>_map.npy`` (float32) and
``<stem>_overlay.png``; per run: ``scores.csv``. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from hiad_pl.data.sample import IMAGE_SUFFIXES
from hiad_pl.errors import DatasetError, MissingFileError
from hiad_pl.run_folder import atomic_write

#: ``error`` is empty for scored images and says why the others were skipped.
SCORES_FIELDS = ["image", "score", "map", "map_min", "map_max", "error"]


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


def write_prediction_files(
    folder: Path, stem: str, image_path: str, anomaly_map: np.ndarray, score: float, overlay: np.ndarray, normalized: bool
) -> dict:
    """Write one image's map (16-bit PNG and .npy) and ``overlay``; returns its ``scores.csv`` row.

    The 16-bit PNG spans [0, 1] for normalised scores; raw maps span their own
    min..max, which the row records so the PNG can be mapped back.
    """
    anomaly_map = anomaly_map.astype(np.float32)
    vmin, vmax = map_range(anomaly_map, normalized)
    atomic_write(folder / f"{stem}_map.png", png_bytes(map_png16(anomaly_map, vmin, vmax)))
    buffer = io.BytesIO()
    np.save(buffer, anomaly_map)
    atomic_write(folder / f"{stem}_map.npy", buffer.getvalue())
    atomic_write(folder / f"{stem}_overlay.png", png_bytes(overlay, compress_level=1))
    return {
        "image": image_path,
        "score": f"{score:.6f}",
        "map": f"{stem}_map.png",
        "map_min": f"{vmin:.6g}",
        "map_max": f"{vmax:.6g}",
    }


def write_scores_csv(rows: list[dict], path: Path, normalized: bool) -> None:
    """``scores.csv``: one row per image; a first comment line says whether scores are normalised."""
    buffer = io.StringIO()
    scale = "normalised to [0, 1] with validation statistics" if normalized else "raw (no validation set)"
    buffer.write(f"# scores: {scale}\n")
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
