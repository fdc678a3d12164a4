"""client_detection: score images against a running hiad-pl service, as the original's client does."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hiad_pl.data.sample import HRSample

ImageLike = str | Path | np.ndarray | HRSample


def _resize(image: np.ndarray, image_size: int | Sequence[int] | None) -> np.ndarray:
    """Bilinear resize to ``image_size`` (width, height or one side), as the original client does."""
    if image_size is None:
        return image
    size = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    return np.array(Image.fromarray(image).resize(size, resample=Image.Resampling.BILINEAR))


def load_image(sample: ImageLike, image_size: int | Sequence[int] | None) -> np.ndarray:
    """An image path, ``[H, W, 3]`` array or HRSample as a uint8 RGB array at ``image_size``."""
    if isinstance(sample, (str, Path)):
        with Image.open(sample) as image:
            return _resize(np.array(image.convert("RGB")), image_size)
    if isinstance(sample, np.ndarray):
        array = sample if sample.dtype == np.uint8 else np.clip(sample, 0, 255).astype(np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"numpy images must be [H, W, 3] (or [H, W]), got shape {sample.shape}")
        return _resize(array, image_size)
    if isinstance(sample, HRSample):
        with sample:
            return _resize(sample.image.open().copy(), image_size)
    raise TypeError(f"client_detection takes image paths, numpy arrays or HRSample, got {type(sample).__name__}")


def _detect_one(url: str, image: np.ndarray, name: str, timeout_s: float) -> tuple[float, np.ndarray]:
    """POST one image (lossless PNG); its score and exact float32 map."""
    import httpx

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    response = httpx.post(
        f"{url}/predict",
        params={"map": "true", "map_format": "npy"},
        files={"image": (name, buffer.getvalue(), "image/png")},
        timeout=timeout_s,
    )
    body = response.json()
    if response.status_code != 200:
        raise RuntimeError(f"{name}: the service answered {response.status_code}: {body.get('error', body)}")
    anomaly_map = np.load(io.BytesIO(base64.b64decode(body["anomaly_map_npy"])))
    return float(body["image_score"]), anomaly_map


def client_detection(
    samples: Sequence[ImageLike],
    image_size: int | Sequence[int] | None = None,
    ip: str = "127.0.0.1",
    port: int | str = 1473,
    batch_size: int = -1,
    return_fps: bool = False,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Score images on a running service: ``{"image_scores": [N], "anomaly_maps": [N, H, W]}``.

    ``samples`` are image paths, ``[H, W, 3]`` uint8 arrays or HRSamples, resized
    to ``image_size`` on this side when it is given. ``batch_size`` images are
    in flight at once (``-1``: all), so the service batches them on its device.
    With ``return_fps`` the result also has ``fps`` (images per second of waiting).
    """
    images = [load_image(sample, image_size) for sample in samples]
    if not images:
        raise ValueError("client_detection needs at least one image")
    url = f"http://{ip}:{port}"
    workers = len(images) if batch_size == -1 else max(1, int(batch_size))
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda k: _detect_one(url, images[k], f"{k}.png", timeout_s), range(len(images))))
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {
        "image_scores": np.array([score for score, _ in results]),
        "anomaly_maps": np.stack([anomaly_map for _, anomaly_map in results]),
    }
    if return_fps:
        result["fps"] = round(len(images) / max(elapsed, 1e-9), 2)
    return result
