"""Time and memory of every evaluator on synthetic high-resolution anomaly maps.

    python benchmarks/bench_metrics.py                 # 100 maps of 2048x2048
    python benchmarks/bench_metrics.py --n 10          # a quick check
    python benchmarks/bench_metrics.py --out bench.json --calibrate

Maps are smooth noise plus fine noise (float32); about half the images carry a
few small defects (a few to a few hundred pixels each) that raise the map.
Memory is reported three ways: the peak of NumPy allocations (tracemalloc), the
peak resident memory above the level before the evaluator (sampled every 5 ms,
which also sees torch's allocations), and the process's maximum resident size
(``getrusage``), which includes the maps themselves.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from hiad_pl import metrics as hm
from hiad_pl.utils import metrics, metrics_gpu

MB = 2**20


Data = tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray | None]]


def make_maps(count: int, size: int, seed: int) -> Data:
    """Image scores, labels, synthetic maps and masks (None for normal images)."""
    rng = np.random.default_rng(seed)
    maps, masks, labels = [], [], []
    for index in range(count):
        coarse = rng.standard_normal((size // 64, size // 64), dtype=np.float32)
        score = 0.5 * cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        score += 0.25 * rng.standard_normal((size, size), dtype=np.float32)
        anomalous = index % 2 == 1
        mask = _defects(rng, size) if anomalous else None
        if mask is not None:
            score[mask > 0] += rng.uniform(1.0, 3.0)
        maps.append(score)
        masks.append(mask)
        labels.append(int(anomalous))
    scores = np.array([float(score.max()) for score in maps])
    return scores, np.array(labels), maps, masks


def _defects(rng: np.random.Generator, size: int) -> np.ndarray:
    """One to five ellipses of 1 to 10 pixels radius (a few to ~300 pixels each)."""
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 6)):
        centre = tuple(int(v) for v in rng.integers(16, size - 16, 2))
        axes = tuple(int(v) for v in rng.integers(1, 11, 2))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask


def _rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def rss_peak() -> Iterator[dict[str, int]]:
    """Sample the resident size every 5 ms; yields a dict filled with the peak rise."""
    result = {"rise": 0}
    start, peak, running = _rss_bytes(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        running[0] = False
        thread.join()
        result["rise"] = max(0, max(peak[0], _rss_bytes()) - start)


@dataclass
class Row:
    """One evaluator's measurements."""

    name: str
    seconds: float
    numpy_peak_mb: float
    rss_rise_mb: float
    max_rss_mb: float
    values: dict[str, float] = field(default_factory=dict)


def measure(name: str, evaluator: Callable[..., dict[str, float]], data: tuple[Any, ...]) -> Row:
    """Run one evaluator once and record time and memory."""
    tracemalloc.reset_peak()
    with rss_peak() as rss:
        start = time.perf_counter()
        values = evaluator(*data)
        seconds = time.perf_counter() - start
    _, numpy_peak = tracemalloc.get_traced_memory()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return Row(name, seconds, numpy_peak / MB, rss["rise"] / MB, max_rss / MB, values)


def evaluators(resize: int, with_gpu: bool) -> list[tuple[str, Callable[..., dict[str, float]]]]:
    """Every evaluator, labelled with its arguments."""
    sized: dict[str, Any] = {"resize": resize}
    chosen: list[tuple[Any, str, dict[str, Any]]] = [
        (metrics, "compute_imagewise_metrics", {}),
        (metrics, "compute_pixelwise_metrics", {}),
        (metrics, "compute_pro", {}),
        (metrics, "compute_pixelwise_metrics_resize", sized),
        (metrics, "compute_pro_resize", sized),
        (metrics, "compute_pixelwise_metrics_resize", {**sized, "mode": "exact"}),
        (metrics, "compute_pro_resize", {**sized, "mode": "exact"}),
    ]
    if with_gpu:
        chosen += [
            (metrics_gpu, "compute_imagewise_metrics_gpu", {}),
            (metrics_gpu, "compute_pixelwise_metrics_gpu", {}),
            (metrics_gpu, "compute_pro_gpu", {}),
            (metrics_gpu, "compute_pixelwise_metrics_gpu_resize", sized),
            (metrics_gpu, "compute_pro_gpu_resize", sized),
        ]
    return [
        (_label(name, kwargs), functools.partial(getattr(module, name), **kwargs))
        for module, name, kwargs in chosen
    ]


def _label(name: str, kwargs: dict[str, Any]) -> str:
    """``name(key=value, ...)``."""
    return f"{name}({', '.join(f'{key}={value!r}' for key, value in kwargs.items())})"


def calibrate(sizes: list[int]) -> list[dict[str, float]]:
    """Exact against binned pixel metrics on one map of each total size."""
    rows = []
    for side in sizes:
        _, _, maps, masks = make_maps(2, side, seed=1)
        maps, masks = maps[1:], masks[1:]  # one anomalous map
        row: dict[str, float] = {"pixels": side * side}
        for mode in ("exact", "binned"):
            measured = measure(mode, functools.partial(hm.pixel_metrics, mode=mode), (maps, masks))
            row[f"{mode}_s"] = measured.seconds
            row[f"{mode}_rss_mb"] = measured.rss_rise_mb
            row[f"{mode}_auroc"] = measured.values["pixel_auroc"]
        rows.append(row)
    return rows


def calibration_table(rows: list[dict[str, float]]) -> str:
    """Markdown table of exact against binned pixel metrics by pixel count."""
    lines = [
        "| pixels | exact (s) | exact RSS rise (MB) | binned (s) | binned RSS rise (MB) "
        "| AUROC exact - binned |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        cells = [
            f"{row['pixels']:.0f}",
            f"{row['exact_s']:.2f}",
            f"{row['exact_rss_mb']:.0f}",
            f"{row['binned_s']:.2f}",
            f"{row['binned_rss_mb']:.0f}",
            f"{row['exact_auroc'] - row['binned_auroc']:.1e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    """Markdown table of the measurements and the values."""
    keys = ["image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1", "pro"]
    header = ["evaluator", "time (s)", "NumPy peak (MB)", "RSS rise (MB)", "max RSS (MB)", *keys]
    lines = ["| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    for row in rows:
        measured = [f"{row.seconds:.2f}"] + [
            f"{mb:.0f}" for mb in (row.numpy_peak_mb, row.rss_rise_mb, row.max_rss_mb)
        ]
        values = [f"{row.values[k]:.6f}" if k in row.values else "" for k in keys]
        lines.append("| " + " | ".join([row.name, *measured, *values]) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, build the maps, measure every evaluator, print (and save) the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100, help="number of maps")
    parser.add_argument("--size", type=int, default=2048, help="side of each square map")
    parser.add_argument("--resize", type=int, default=512, help="side for the *_resize evaluators")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--calibrate", action="store_true", help="also time exact vs binned by pixel count")
    parser.add_argument("--out", help="write the measurements to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    data = make_maps(args.n, args.size, args.seed)
    maps, masks = data[2], data[3]
    defect_sizes = [int(mask.sum()) for mask in masks if mask is not None]
    print(
        f"{args.n} maps of {args.size}x{args.size} float32 ({sum(m.nbytes for m in maps) / MB:.0f} MB), "
        f"{len(defect_sizes)} anomalous, defect pixels per image {min(defect_sizes, default=0)}-"
        f"{max(defect_sizes, default=0)}; built in {time.perf_counter() - start:.1f} s; "
        f"torch threads: {torch.get_num_threads()}; CUDA: {torch.cuda.is_available()}\n"
    )
    tracemalloc.start()
    rows = [measure(name, fn, data) for name, fn in evaluators(args.resize, torch.cuda.is_available())]
    tracemalloc.stop()
    default = sum(row.seconds for row in rows[:3])
    print(table(rows))
    print(f"\ndefault evaluation (image + pixel + pro, full resolution): {default:.1f} s")
    report: dict[str, Any] = {"args": vars(args), "default_seconds": default}
    report["rows"] = [asdict(row) for row in rows]
    if args.calibrate:
        report["calibration"] = calibrate([1024, 1448, 2048, 2896])
        print("\n" + calibration_table(report["calibration"]))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as stream:
            json.dump(report, stream, indent=2)


if __name__ == "__main__":
    main()
