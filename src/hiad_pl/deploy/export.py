"""``hiad-pl export``: one ONNX (or OpenVINO IR) graph per task and a manifest, for scoring without torch.

Each task's graph maps ImageNet-normalised patch pixels ``[B, 3, h, w]`` (plus
the low-resolution crops ``[B, L, 3, h, w]`` and windows ``[B, L, 4]`` when the
run fuses resolutions) to the task's normalised anomaly map ``[B, h, w]``:
backbone, the detector's method and the validation statistics' normalisation.
The method is the detector's plain model
(:class:`~hiad_pl.detectors.map_model.PatchMapModel`) in the traceable form it
gives (PatchCore's k-NN becomes a matrix product and a top-k against the bank);
a detector without one is traced through its ``anomaly_map``. The thumbnail
graph also resizes its map to the full image. Retrieval runs get a router graph
(patch pixels to pooled embeddings) and their centres in the manifest.

Everything else a prediction needs is in ``manifest.json``: the tasks and their
indexes, the spliter settings, retrieval centres, normalisation statistics,
image and pixel thresholds with their display range, blur and the image-score rule
(the detectors' own), input statistics. Predictions from the export equal the run's
(see :mod:`hiad_pl.deploy.predictor`). ``--format openvino`` converts each traced
ONNX graph to OpenVINO IR with float32 weights and names the runtime in the manifest.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiad_pl import __version__
from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors.backbones import IMAGENET_MEAN, IMAGENET_STD
from hiad_pl.detectors.base import HRDetector
from hiad_pl.detectors.features import ViTTokenExtractor
from hiad_pl.detectors.map_model import PatchMapModel
from hiad_pl.errors import ConfigError
from hiad_pl.postprocess import BLUR_SIGMA, normalize_scores
from hiad_pl.run_folder import atomic_write
from hiad_pl.tasks.base import Task

log = logging.getLogger("hiad_pl")

#: ``onnx``: ONNX graphs for onnxruntime; ``openvino``: the same graphs converted to OpenVINO IR (``.xml`` + ``.bin``).
EXPORT_FORMATS = ("onnx", "openvino")
MANIFEST = "manifest.json"
#: 2: ``postprocess.image_score`` names the run's image-score rule (1: always the 16-px window mean).
#: 3: ``runtime`` names the graphs' runtime (written by OpenVINO exports only, so that a predictor
#: that reads 2 and knows onnxruntime alone refuses them by version; ONNX exports stay at 2).
MANIFEST_VERSION = 2
MANIFEST_VERSION_RUNTIME = 3
OPSET = 17
#: The overlay colours (``visualize.JET_COLOURS``, 256 RGB entries), so the predictor needs no OpenCV.
COLORMAP_FILE = "colormap.npy"


def image_batch(image: Tensor, low_images: Tensor | None = None, low_windows: Tensor | None = None) -> PatchBatch:
    """A batch of patch pixels as the pipeline scores them: no ground truth (zero masks, label -1, unknown positions).

    The graphs read only the pixels: the tracer drops the unused fields.
    """
    count, height, width = image.shape[0], image.shape[-2], image.shape[-1]
    return PatchBatch(
        image=image, mask=image.new_zeros((count, height, width)), label=torch.full((count,), -1, dtype=torch.long),
        index=torch.zeros((count, 4), dtype=torch.long), low_resolution_images=low_images, low_resolution_windows=low_windows,
    )


def method_model(detector: HRDetector) -> PatchMapModel | None:
    """The plain model a detector delegates its anomaly map to (``detector.model``), or ``None`` when it has none."""
    model = getattr(detector, "model", None)
    return model if isinstance(model, PatchMapModel) else None


class TaskGraph(nn.Module):
    """Normalised patch pixels to a task's normalised anomaly map (the graph of one task).

    Args:
        detector: the task's fitted detector.
        normalization: validation statistics ``{low, high}`` or ``None`` (raw scores).
        output_size: ``(width, height)`` to resize the map to (the thumbnail), or ``None``.
    """

    def __init__(
        self, detector: HRDetector, normalization: dict | None, output_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.detector = detector
        width, height = detector.input_size
        for module in detector.modules():
            if isinstance(module, ViTTokenExtractor):
                module.fix_input_size(height, width)
        self.normalization = None if normalization is None else (float(normalization["low"]), float(normalization["high"]))
        self.output_size = output_size

    def forward(self, image: Tensor, low_images: Tensor | None = None, low_windows: Tensor | None = None) -> Tensor:
        """``[B, h, w]`` (or ``[B, H, W]`` with ``output_size``) float32 maps."""
        batch = image_batch(image, low_images, low_windows)
        model = method_model(self.detector)
        if model is None:  # the method still lives in the LightningModule
            maps = self.detector.anomaly_map(batch).float()
        else:  # the backbone (and fusion), then the method's plain model in its traceable form
            with model.traceable():
                maps = model(self.detector.fused_embedding(batch), image.shape[-2:]).float()
        if self.normalization is not None:
            maps = normalize_scores(maps, *self.normalization).float()
        if self.output_size is not None and tuple(maps.shape[-2:]) != (self.output_size[1], self.output_size[0]):
            size = (self.output_size[1], self.output_size[0])
            maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return maps


class RouterGraph(nn.Module):
    """Normalised patch pixels to the pooled embeddings retrieval routes by ``[B, D]``."""

    def __init__(self, detector: HRDetector, cells: tuple[int, int]) -> None:
        super().__init__()
        self.detector = detector
        self.cells = cells

    def forward(self, image: Tensor, low_images: Tensor | None = None, low_windows: Tensor | None = None) -> Tensor:
        """Embeddings as :func:`~hiad_pl.tasks.embedding.pool_features` computes them."""
        from hiad_pl.tasks.embedding import pool_features

        batch = image_batch(image, low_images, low_windows)
        return pool_features(self.detector.fused_embedding(batch), self.cells)


def example_inputs(task: Task, detector: HRDetector) -> tuple[Tensor, ...]:
    """Example graph inputs of a task (two patches): image, and the low-resolution views when it fuses them."""
    width, height = detector.input_size
    image = torch.zeros(2, 3, height, width)
    lows = task.indexes[0].low_resolution_indexes if task.indexes else None
    if not lows or detector.fusion_weights is None:
        return (image,)
    views = len(lows)
    windows = torch.tensor([[0, 0, width, height]] * views).expand(2, views, 4).contiguous()
    return image, torch.zeros(2, views, 3, height, width), windows


def export_graph(module: nn.Module, inputs: tuple[Tensor, ...], path: Path, output: str) -> None:
    """Trace ``module`` to an ONNX file (batch axis dynamic), written atomically."""
    names = ["image", "low_images", "low_windows"][: len(inputs)]
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shapes that are constant per task by design
        torch.onnx.export(
            module, inputs, str(tmp), input_names=names, output_names=[output],
            dynamic_axes={name: {0: "batch"} for name in [*names, output]}, opset_version=OPSET, dynamo=False,
        )
    tmp.replace(path)


def require_openvino() -> Any:
    """The ``openvino`` module; a ConfigError saying how to install it when it is missing."""
    try:
        import openvino
    except ImportError as error:
        raise ConfigError("export --format openvino needs the openvino package: pip install 'hiad-pl[openvino]'") from error
    return openvino


def to_openvino(onnx_path: Path, xml_path: Path) -> None:
    """Convert an ONNX graph to OpenVINO IR at ``xml_path`` (its weights beside it as ``.bin``), written atomically.

    Weights stay float32 (``save_model`` would halve them to float16 by default), so the IR scores as the ONNX graph.
    The graph is read by the runtime's ONNX front end (``Core.read_model``), not the ``convert_model`` tool,
    which sends usage telemetry over the network by default (and hangs on a machine without DNS).
    """
    ov = require_openvino()
    tmp = xml_path.with_name(f".{xml_path.stem}.tmp.xml")
    ov.save_model(ov.Core().read_model(str(onnx_path)), str(tmp), compress_to_fp16=False)
    # the IR names no weights file: a model is read with the .bin of its own stem, so both are renamed
    tmp.with_suffix(".bin").replace(xml_path.with_suffix(".bin"))
    tmp.replace(xml_path)


def write_graph(module: nn.Module, inputs: tuple[Tensor, ...], folder: Path, name: str, output: str, export_format: str) -> str:
    """Write graph ``name`` of ``module`` to ``folder`` in ``export_format``; the file name the manifest gives it."""
    onnx_path = folder / f"{name}.onnx"
    export_graph(module, inputs, onnx_path, output)
    if export_format == "onnx":
        return onnx_path.name
    xml_path = folder / f"{name}.xml"
    try:
        to_openvino(onnx_path, xml_path)
    finally:
        onnx_path.unlink(missing_ok=True)  # the IR replaces the intermediate graph
    return xml_path.name


def task_entry(task: Task, detector: HRDetector, normalization: dict | None, graph: str, fused: bool) -> dict[str, Any]:
    """A task's manifest entry."""
    return {
        "name": task.name,
        "graph": graph,
        "detector": f"{type(detector).__module__}.{type(detector).__qualname__}",
        "input_size": list(detector.input_size),
        "indexes": [i.todict() for i in task.indexes],
        "thumbnail_size": None if task.thumbnail_size is None else list(task.thumbnail_size),
        "normalization": None if normalization is None else {"low": normalization["low"], "high": normalization["high"]},
        "fused": fused,
    }


def export_run(run_dir: str | Path, output: str | Path, category: str | None = None, export_format: str = "onnx") -> Path:
    """Export a fitted run's category model to ``output``: one graph per task and ``manifest.json``.

    The graphs are ``<task>.onnx`` (``export_format="onnx"``) or OpenVINO IR ``<task>.xml`` + ``.bin`` (``"openvino"``).
    """
    import yaml

    from hiad_pl.engine.runs import load_run
    from hiad_pl.inference import run_image_score
    from hiad_pl.tasks.retrieval import cells_for, retrieval_grid, stacked_centers
    from hiad_pl.visualize import JET_COLOURS

    if export_format not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {list(EXPORT_FORMATS)}, got {export_format!r}")
    if export_format == "openvino":
        require_openvino()  # before the run loads
    run = load_run(Path(run_dir), category, ["cpu"])
    orchestrator = run.orchestrator
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    normalized = orchestrator.normalized
    width, height = run.image_size
    entries = []
    for task in orchestrator.tasks:
        detector = orchestrator.detector(task.name)
        statistics = orchestrator.normalization(task.name)
        inputs = example_inputs(task, detector)
        module = TaskGraph(detector, statistics, (width, height) if task.is_thumbnail else None).eval()
        graph = write_graph(module, inputs, output, task.name, "anomaly_map", export_format)
        entries.append(task_entry(task, detector, statistics, graph, len(inputs) > 1))
        log.info("exported %s (%s)", task.name, type(detector).__name__)
    patch_tasks = [t for t in orchestrator.tasks if not t.is_thumbnail]
    image_score = run_image_score(orchestrator.tasks, {t.name: orchestrator.detector(t.name) for t in orchestrator.tasks})
    router = None
    if any(t.centers is not None for t in patch_tasks):
        centers, owners = stacked_centers(patch_tasks)
        detector = orchestrator.detector(patch_tasks[0].name)
        inputs = example_inputs(patch_tasks[0], detector)
        features = detector.fused_embedding(image_batch(*inputs))
        channels = sum(int(f.shape[1]) for f in features)
        router_graph = RouterGraph(detector, cells_for(centers.shape[1], channels)).eval()
        router = {
            "graph": write_graph(router_graph, inputs, output, "router", "embedding", export_format),
            "grid": [i.todict() for i in retrieval_grid(patch_tasks)],
            "centers": centers.tolist(),
            "owners": owners.tolist(),
        }
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    data = config.get("data", {})
    manifest = {
        "format": "hiad-pl export",
        "version": MANIFEST_VERSION if export_format == "onnx" else MANIFEST_VERSION_RUNTIME,
        **({} if export_format == "onnx" else {"runtime": export_format}),
        "hiad_pl_version": __version__,
        "category": run.category,
        "image_size": [width, height],
        "spliter": {k: data.get(k) for k in ("image_size", "patch_size", "stride", "ds_factors")},
        # patches are read widened by this many pixels of image context; maps are cropped back before stitching
        "context_margin": orchestrator.context_margin,
        "batch_size": orchestrator.batch_size,
        "input": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": 255.0,
                  "layout": "NCHW float32 RGB", "resize": "Pillow bilinear to image_size"},
        "normalized": normalized,
        # the image and pixel thresholds on the scores as the graphs output them (None: no decisions)
        "thresholds": None if run.thresholds is None else run.thresholds.todict(),
        "postprocess": {"merge": "mean over overlaps, then maximum with the thumbnail",
                        "blur_sigma": BLUR_SIGMA, "blur_padding": "reflect",
                        "image_score": image_score.todict()},
        "routing": "retrieval" if router else "position",
        "router": router,
        "tasks": entries,
        "colormap": COLORMAP_FILE,
    }
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(JET_COLOURS))
    atomic_write(output / COLORMAP_FILE, buffer.getvalue())
    atomic_write(output / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
    return output


def export_parser() -> Any:
    """The arguments of ``hiad-pl export``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description="Export a fitted run to ONNX (or OpenVINO) graphs and a manifest (scored without torch)")
    parser.add_argument("--run_dir", type=str, required=True, help="A folder written by `hiad-pl fit`")
    parser.add_argument("--category", type=str | None, default=None, help="Category model to export (when the run has several)")
    parser.add_argument("--format", type=str, default="onnx", help=f"Export format: {', '.join(EXPORT_FORMATS)}")
    parser.add_argument("--output", type=str, required=True, help="Folder for the graphs and manifest.json")
    return parser


def export_command(args: Any) -> Path:
    """Run ``hiad-pl export`` with parsed arguments."""
    return export_run(args.run_dir, args.output, args.category, args.format)
