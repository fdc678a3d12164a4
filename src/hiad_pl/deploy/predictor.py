"""Score images with an exported model: onnxruntime (or OpenVINO), numpy and Pillow only (no torch, no Lightning).

``python -m hiad_pl.deploy.predictor --export E --input DIR --output O`` (or
``hiad-pl predict --export E ...``) writes the files ``hiad-pl predict
--run_dir`` writes: per image ``<stem>_map.png`` / ``_map.npy`` / ``_overlay.png`` /
``_mask.png`` / ``_panel.png``, and ``scores.csv`` with the OK/NG label at the
run's thresholds (carried in the manifest). Every step outside the graphs mirrors the run's inference:
Pillow decoding and bilinear resizing, ImageNet normalisation, routing by
position or by the nearest retrieval centre, stitching (mean over overlaps),
the thumbnail merged by maximum, a separable Gaussian blur with reflect
padding, and the image score by the rule the manifest names (the detector's:
the largest window mean, the mean of the top-k pixels, or the largest pixel).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hiad_pl.data.sample import low_resolution_views, read_image, resize_array
from hiad_pl.data.tiling import (
    HRImageIndex,
    MultiResolutionIndex,
    crop_with_margin,
    inner_maps,
)
from hiad_pl.decisions import NO_THRESHOLDS, Decision, Thresholds
from hiad_pl.deploy.files import (
    input_images,
    unique_stems,
    write_prediction_files,
    write_scores_csv,
)
from hiad_pl.errors import InputError, MissingFileError, UserError

MANIFEST = "manifest.json"
#: Manifest versions this predictor reads: 1 scored every export by the 16-px window mean; 2 names the rule;
#: 3 names the graphs' runtime (``onnx`` or ``openvino``; before 3 always ``onnx``).
SUPPORTED_VERSIONS = (1, 2, 3)
#: Graph runtimes: onnxruntime for ``.onnx`` graphs, OpenVINO for ``.xml`` IR.
RUNTIMES = ("onnx", "openvino")
#: Image-score rules (those of :data:`hiad_pl.postprocess.IMAGE_SCORE_RULES`; this module imports no torch).
IMAGE_SCORE_RULES = ("window_max", "topk_mean", "max")


def gaussian_blur(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an ``[H, W]`` map with reflect padding (as :func:`hiad_pl.postprocess.gaussian_blur`)."""
    if sigma <= 0:
        return anomaly_map
    radius = int(4 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-(x**2) / np.float32(2 * sigma**2)).astype(np.float32)
    kernel /= kernel.sum()
    out = anomaly_map.astype(np.float32)
    for axis in (1, 0):
        length = out.shape[axis]
        pad = min(radius, length - 1)
        widths = [(0, 0), (0, 0)]
        widths[axis] = (pad, pad)
        padded = np.pad(out, widths, mode="reflect" if pad else "edge")
        taps = kernel[radius - pad : radius + pad + 1]
        result = np.zeros_like(out)
        for t, weight in enumerate(taps):
            result += weight * (padded[:, t : t + length] if axis == 1 else padded[t : t + length])
        out = result
    return out


def image_score(anomaly_map: np.ndarray, window: int) -> float:
    """The largest mean over ``window x window`` windows of the map (as :func:`hiad_pl.postprocess.image_score`)."""
    k_h, k_w = min(window, anomaly_map.shape[0]), min(window, anomaly_map.shape[1])
    integral = np.pad(anomaly_map.astype(np.float32).astype(np.float64).cumsum(1).cumsum(0), ((1, 0), (1, 0)))
    sums = integral[k_h:, k_w:] - integral[:-k_h, k_w:] - integral[k_h:, :-k_w] + integral[:-k_h, :-k_w]
    return float(np.float32((sums / (k_h * k_w)).max()))


def topk_mean_score(anomaly_map: np.ndarray, k: int) -> float:
    """The mean of the ``k`` largest values of the map (as :func:`hiad_pl.postprocess.topk_mean_score`)."""
    flat = anomaly_map.astype(np.float32).ravel()
    k = min(k, flat.size)
    return float(np.float32(np.partition(flat, flat.size - k)[flat.size - k :].astype(np.float64).mean()))


def score_image(anomaly_map: np.ndarray, settings: Mapping[str, Any]) -> float:
    """The image score of the manifest's ``image_score`` settings (as :class:`hiad_pl.postprocess.ImageScore`)."""
    rule = settings["rule"]
    if rule == "window_max":
        return image_score(anomaly_map, int(settings["window"]))
    if rule == "topk_mean":
        return topk_mean_score(anomaly_map, int(settings["k"]))
    if rule == "max":
        return float(np.float32(anomaly_map.max()))
    raise ValueError(f"unknown image-score rule {rule!r}")


def image_score_settings(postprocess: Mapping[str, Any], version: int) -> dict[str, Any]:
    """The image-score settings of a manifest's ``postprocess`` section (version 1: the window mean of ``score_window``).

    Raises:
        ValueError: for an unknown rule or a missing or non-positive ``window`` / ``k``.
    """
    if version == 1:
        settings = {"rule": "window_max", "window": postprocess.get("score_window")}
    else:
        settings = dict(postprocess.get("image_score") or {})
    rule = settings.get("rule")
    if rule not in IMAGE_SCORE_RULES:
        raise ValueError(f"unknown image-score rule {rule!r} (rules: {', '.join(IMAGE_SCORE_RULES)})")
    needed = {"window_max": "window", "topk_mean": "k"}.get(rule)
    if needed is not None:
        value = settings.get(needed)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"image-score rule {rule} needs an integer {needed} >= 1, got {value!r}")
    return settings


def stitch(maps: Sequence[np.ndarray], indexes: Sequence[HRImageIndex], size: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` map of patch maps placed at ``indexes``, overlaps averaged (as :func:`hiad_pl.data.tiling.stitch`)."""
    width, height = size
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.float64)
    for patch_map, index in zip(maps, indexes):
        rows, cols = index.slices
        total[rows, cols] += patch_map
        count[rows, cols] += 1
    if (count == 0).any():
        raise InputError("the exported indexes do not cover the whole image")
    return (total / count).astype(np.float32)


class OnnxGraph:
    """An ONNX graph in an onnxruntime session: ``graph(feed)`` is its first output."""

    def __init__(self, file: Path, providers: Sequence[str] | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(file), options, providers=list(providers or ort.get_available_providers()))
        self.input_names: list[str] = [i.name for i in self.session.get_inputs()]

    def __call__(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The graph's first output on ``feed`` (input name -> array)."""
        return np.asarray(self.session.run(None, dict(feed))[0])


class OpenVINOGraph:
    """An OpenVINO IR graph compiled for the CPU in float32: ``graph(feed)`` is its first output."""

    def __init__(self, file: Path) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise InputError(f"{file}: an OpenVINO graph; scoring it needs the openvino package (pip install openvino)") from None

        # float32 throughout: the CPU plugin would otherwise infer in bfloat16 where the processor has it
        self.compiled = ov.Core().compile_model(str(file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.input_names: list[str] = [i.get_any_name() for i in self.compiled.inputs]

    def __call__(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The graph's first output on ``feed`` (input name -> array)."""
        return np.asarray(self.compiled(dict(feed))[0])


Graph = OnnxGraph | OpenVINOGraph


@dataclass
class GraphTask:
    """One exported task: its compiled graph and what it scores."""

    name: str
    session: Graph
    indexes: list[MultiResolutionIndex]
    thumbnail_size: tuple[int, int] | None
    fused: bool


class ExportedModel:
    """An exported category model, loaded once; :meth:`predict` scores one decoded image."""

    def __init__(self, folder: str | Path, providers: Sequence[str] | None = None, batch_size: int | None = None) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise MissingFileError(f"{path}: not an export (no {MANIFEST}); write one with `hiad-pl export`")
        manifest = json.loads(path.read_text())
        version = manifest.get("version")
        if version not in SUPPORTED_VERSIONS:
            raise InputError(
                f"{path}: export version {version!r}, this predictor reads {', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        self.manifest = manifest
        #: the graphs' runtime: ``onnx`` (onnxruntime) or ``openvino``
        self.runtime = str(manifest.get("runtime", "onnx"))
        if self.runtime not in RUNTIMES:
            raise InputError(f"{path}: unknown graph runtime {self.runtime!r} (runtimes: {', '.join(RUNTIMES)})")

        def session(graph: str) -> Graph:
            file = self.folder / graph
            if not file.is_file():
                raise MissingFileError(f"{file}: graph named in {path} is missing")
            return OnnxGraph(file, providers) if self.runtime == "onnx" else OpenVINOGraph(file)

        self.tasks = [
            GraphTask(
                entry["name"],
                session(entry["graph"]),
                [MultiResolutionIndex.from_dict(i) for i in entry["indexes"]],
                None if entry["thumbnail_size"] is None else tuple(entry["thumbnail_size"]),
                bool(entry["fused"]),
            )
            for entry in manifest["tasks"]
        ]
        self.image_size: tuple[int, int] = tuple(manifest["image_size"])
        # pixels of image context around every patch (exports written before the option read none)
        self.context_margin = int(manifest.get("context_margin", 0))
        self.normalized = bool(manifest["normalized"])
        # PatchCore's graph holds a [batch * h * w, bank] distance matrix: a smaller batch bounds memory
        self.batch_size = int(batch_size or manifest["batch_size"])
        stats = manifest["input"]
        self.mean = np.asarray(stats["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(stats["std"], dtype=np.float32).reshape(3, 1, 1)
        self.scale = np.float32(stats["scale"])
        post = manifest["postprocess"]
        self.blur_sigma = float(post["blur_sigma"])
        try:
            #: The image-score rule and its settings (``rule``, ``window``, ``k``).
            self.image_score = image_score_settings(post, version)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        router = manifest.get("router")
        self.router = None
        if router:
            centers = np.asarray(router["centers"], dtype=np.float32)
            self.router = (
                session(router["graph"]),
                [MultiResolutionIndex.from_dict(i) for i in router["grid"]],
                centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12),
                np.asarray(router["owners"], dtype=np.int64),
            )
        self.colormap = np.load(self.folder / manifest["colormap"])
        saved = manifest.get("thresholds")
        #: the run's thresholds (``None``: exported from a run without them, no decisions)
        self.thresholds: Thresholds | None = None if saved is None else Thresholds.fromdict(saved, f"{path}: thresholds")

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """``[H, W, 3]`` uint8 -> ``[3, H, W]`` normalised float32 (as the data module's ``image_to_tensor``)."""
        tensor = np.ascontiguousarray(image).transpose(2, 0, 1).astype(np.float32) / self.scale
        return (tensor - self.mean) / self.std

    def patch_inputs(self, image: np.ndarray, indexes: Sequence[MultiResolutionIndex], fused: bool) -> list[np.ndarray]:
        """Graph inputs of the patches at ``indexes``: pixels, and the low-resolution views when fused."""
        margin = self.context_margin
        pixels = np.stack([self.pixels(crop_with_margin(image, i.main_index, margin)) for i in indexes])
        if not fused:
            return [pixels]
        lows, windows = [], []
        for index in indexes:
            crops, places = low_resolution_views(image, index, margin)
            lows.append(np.stack([self.pixels(c) for c in crops]))
            windows.append([list(w.todict().values()) for w in places])
        return [pixels, np.stack(lows), np.asarray(windows, dtype=np.int64)]

    def run(self, graph: Graph, inputs: list[np.ndarray]) -> np.ndarray:
        """A graph over its inputs in chunks of ``batch_size`` patches."""
        outputs = []
        for start in range(0, len(inputs[0]), self.batch_size):
            outputs.append(graph({name: value[start : start + self.batch_size] for name, value in zip(graph.input_names, inputs)}))
        return np.concatenate(outputs)

    def route(self, image: np.ndarray, patch_tasks: list[GraphTask]) -> list[list[MultiResolutionIndex]]:
        """The indexes each patch task scores: its own, or the patches nearest its retrieval centres."""
        if self.router is None:
            return [task.indexes for task in patch_tasks]
        session, grid, centers, owners = self.router
        embeddings = self.run(session, self.patch_inputs(image, grid, patch_tasks[0].fused))
        embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        similarity = embeddings @ centers.T
        per_task = np.full((len(grid), len(patch_tasks)), -np.inf, dtype=np.float32)
        for k in range(len(patch_tasks)):
            per_task[:, k] = similarity[:, owners == k].max(axis=1)
        chosen = per_task.argmax(axis=1)
        return [[i for i, owner in zip(grid, chosen) if owner == k] for k in range(len(patch_tasks))]

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Blurred anomaly map ``[H, W]`` and image score of an image already at :attr:`image_size`."""
        width, height = self.image_size
        patch_tasks = [t for t in self.tasks if t.thumbnail_size is None]
        maps: list[np.ndarray] = []
        mains: list[HRImageIndex] = []
        for task, indexes in zip(patch_tasks, self.route(image, patch_tasks)):
            if indexes:
                scored = self.run(task.session, self.patch_inputs(image, indexes, task.fused))
                maps.extend(inner_maps(scored, self.context_margin))
                mains.extend(i.main_index for i in indexes)
        full = stitch(maps, mains, (width, height)) if maps else None
        for task in self.tasks:
            if task.thumbnail_size is None:
                continue
            thumbnail = self.run(task.session, [self.pixels(resize_array(image, task.thumbnail_size))[None]])[0]
            full = thumbnail if full is None else np.maximum(full, thumbnail)
        full = gaussian_blur(np.zeros((height, width), np.float32) if full is None else full, self.blur_sigma)
        return full, score_image(full, self.image_score)

    def decide(self, score: float) -> Decision | None:
        """The decision on an image score (label OK/NG, score, threshold); ``None`` without thresholds."""
        return None if self.thresholds is None else self.thresholds.decide(score)

    def mask(self, anomaly_map: np.ndarray) -> np.ndarray | None:
        """The predicted defect mask (0/255 uint8, the map's size); ``None`` without thresholds."""
        return None if self.thresholds is None else self.thresholds.mask(anomaly_map)


def predict_export(
    export: str | Path, inputs: Sequence[str | Path], output: str | Path, batch_size: int | None = None
) -> Path:
    """Score images with an exported model; writes the files of ``hiad-pl predict --run_dir``."""
    files = input_images(inputs)
    model = ExportedModel(export, batch_size=batch_size)
    if model.thresholds is None:
        print(f"{export}: {NO_THRESHOLDS}", file=sys.stderr)
    output = Path(output)
    stems = unique_stems(files)
    rows = []
    for path, stem in zip(files, stems):
        image = resize_array(read_image(path), model.image_size)
        anomaly_map, score = model.predict(image)
        rows.append(write_prediction_files(
            output, stem, str(path), image, anomaly_map, score, model.normalized, model.colormap, model.thresholds
        ))
    write_scores_csv(rows, output / "scores.csv", model.normalized, model.thresholds)
    return output


def main(argv: list[str] | None = None) -> int:
    """``python -m hiad_pl.deploy.predictor --export E --input DIR --output O``."""
    parser = argparse.ArgumentParser(description="Score images with a model written by `hiad-pl export` (no torch needed)")
    parser.add_argument("--export", required=True, help="A folder written by `hiad-pl export`")
    parser.add_argument("--input", nargs="+", required=True, help="Image files or folders")
    parser.add_argument("--output", required=True, help="Folder for maps, overlays and scores.csv")
    parser.add_argument("--batch_size", type=int, default=None, help="Patches per graph call (default: the run's)")
    args = parser.parse_args(argv)
    try:
        out = predict_export(args.export, args.input, args.output, args.batch_size)
    except UserError as error:  # bad input only: anything else is a bug, with its traceback
        print(f"hiad_pl.deploy.predictor: error: {error}", file=sys.stderr)
        return 2
    print(f"predictions written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
