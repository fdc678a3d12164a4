"""Where a patch seam lives: mean normal-image score against the distance to the nearest interior patch border.

Fits one detector (one for all patches) on a set built by ``real_data.py`` with a
given context margin, scores the set's normal test images and reports, per band of
distance to the nearest interior patch border, the mean map value over the mean of
the whole map (1 = no dependence on the patch grid). A seam that comes from the
features' receptive field reaching the patch's zero-padded edge shows as a slope
over tens of pixels; one from stitching or upsampling as a step within a few pixels::

    python benchmarks/seam_profile.py --set ~/.cache/hiad-pl/real_data/built/ksdd --margins 0 16 32 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

BANDS = (0, 4, 8, 16, 32, 64, 128)


def border_distance(image_size: tuple[int, int], patch_size: int) -> np.ndarray:
    """``[H, W]`` distance in pixels to the nearest interior patch border (a large value where there is none)."""
    from hiad_pl.data.tiling import HRImageSpliter

    width, height = image_size
    indexes = HRImageSpliter(image_size, patch_size)
    xs = sorted(({i.x for i in indexes} | {i.x + i.width for i in indexes}) - {0, width})
    ys = sorted(({i.y for i in indexes} | {i.y + i.height for i in indexes}) - {0, height})
    far = float(max(width, height))
    col = np.min([np.abs(np.arange(width) + 0.5 - x) for x in xs], axis=0) if xs else np.full(width, far)
    row = np.min([np.abs(np.arange(height) + 0.5 - y) for y in ys], axis=0) if ys else np.full(height, far)
    return np.minimum(row[:, None], col[None, :])


def profile(maps: list[np.ndarray], distance: np.ndarray) -> dict[str, float]:
    """Mean map value per distance band over the map's mean, averaged over the maps."""
    out: dict[str, float] = {}
    edges = [*BANDS, np.inf]
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (distance >= low) & (distance < high)
        if inside.any():
            out[f"{low}-{high}"] = float(np.mean([m[inside].mean() / m.mean() for m in maps]))
    return out


def run(set_root: Path, margin: int, detector: str, overrides: dict[str, object]) -> dict[str, object]:
    """Fit with ``margin`` and profile the normal test images' maps."""
    import torch

    from hiad_pl.data.discovery import discover
    from hiad_pl.orchestrator import TaskOrchestrator, collect
    from hiad_pl.task import A2OTaskGenerator
    from hiad_pl.utils.split_and_gather import MultiResolutionHRImageSpliter
    from real_data import DETECTORS, SEED

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    record = json.loads((set_root / "set.json").read_text())
    image_size, patch_size = tuple(record["image_size"]), int(record["patch_size"])
    (split,) = discover(str(set_root.parent), categories=[set_root.name], image_size=image_size)
    class_path, config = DETECTORS[detector]
    config = {**config, **overrides, "input_size": patch_size}
    indexes = MultiResolutionHRImageSpliter(image_size=image_size, patch_size=patch_size)
    tasks = A2OTaskGenerator().create_tasks(split.train, indexes)
    normal = [s for s in split.test if not s.label]
    with tempfile.TemporaryDirectory(prefix="hiad_pl_seam_") as work:
        orchestrator = TaskOrchestrator(class_path, config, tasks, work, batch_size=8, context_margin=margin)
        start = time.perf_counter()
        orchestrator.fit(split.train, [])
        orchestrator.load("cpu")
        _, maps = collect(orchestrator.pipeline("cpu").predict(normal), len(normal))
        seconds = time.perf_counter() - start
    full = [np.asarray(m, np.float64) for m in maps]
    result = profile(full, border_distance(image_size, patch_size))
    return {"set": set_root.name, "margin": margin, "normal_images": len(normal), "seconds": seconds,
            "profile": result}


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", type=Path, required=True, help="a set folder built by real_data.py")
    parser.add_argument("--margins", type=int, nargs="+", default=[0, 16, 32])
    parser.add_argument("--detector", default="patchcore")
    parser.add_argument("--override", nargs="*", default=[], help="KEY=JSON: detector config overrides")
    parser.add_argument("--out", type=Path, default=None, help="append each result as a JSON line")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.override)}
    for margin in args.margins:
        result = run(args.set.expanduser(), margin, args.detector, overrides)
        line = json.dumps(result)
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
