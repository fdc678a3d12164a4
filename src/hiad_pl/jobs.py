"""The CLI's jobs on a run folder: fit, test, predict, print tasks.

A run folder holds one model folder per category::

    <run_dir>/config.yaml                       the resolved config
    <run_dir>/<category>/tasks.json             tasks of that category's detectors
    <run_dir>/<category>/checkpoints/<task>.ckpt
    <run_dir>/<category>/tensorboard/<task>/
    <run_dir>/metrics.json  metrics.md          per-class metrics of `hiad-pl test`
    <run_dir>/visualizations/<category>/        image | overlay | ground truth
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hiad_pl.data.discovery import CategorySplit, discover
from hiad_pl.data.sample import IMAGE_SUFFIXES, HRSample
from hiad_pl.data.tiling import MultiResolutionHRImageSpliter, as_pair
from hiad_pl.engine import (
    evaluate_predictions,
    run_inference,
    score_range,
    unique_stems,
    write_prediction,
    write_scores_csv,
    write_visualizations,
)
from hiad_pl.orchestrator import TaskOrchestrator, ValidationConfig, detector_class_of, import_class, resolve_devices
from hiad_pl.tasks.base import FeatureTaskGenerator, Task, TaskGenerator

log = logging.getLogger("hiad_pl")


@dataclass
class DataConfig:
    """Where the images are and how they are cut.

    Args:
        root: data set: a folder of MVTec-style categories, one category, a flat folder (train*/test* images) or a .jsonl list.
        categories: categories to use (default: all found).
        image_size: detection resolution, int or [width, height]; images are resized to it.
        patch_size: patch size, int or [width, height].
        stride: tiling stride (default: patch_size, no overlap).
        ds_factors: down-sampling factors (powers of two) for multi-resolution feature fusion, e.g. [0, 1].
        batch_size: patches per step.
        num_workers: data loader worker processes per task.
    """

    root: str = "demo_data"
    categories: list[str] | None = None
    image_size: int | list[int] = 2048
    patch_size: int | list[int] = 512
    stride: int | list[int] | None = None
    ds_factors: list[int] | None = None
    batch_size: int = 8
    num_workers: int = 0


@dataclass
class EvaluationConfig:
    """How `hiad-pl test` evaluates.

    Args:
        evaluators: evaluator import paths (or {function: path, kwargs: {...}}); default: image, pixel and PRO metrics.
        vis_size: side of each visualisation panel in pixels (0: no visualisations).
    """

    evaluators: list[Any] | None = None
    vis_size: int = 1024


@dataclass
class RunConfig:
    """Everything `fit` and `test` need (the parsed YAML, detector and tasks as class_path/init_args)."""

    run_dir: Path
    data: DataConfig
    detector: dict[str, Any]
    tasks: dict[str, Any]
    thumbnail: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    devices: list[int | str] = field(default_factory=list)
    seed: int = 0
    fusion_weights: list[float] | None = None
    early_stop_epochs: int = -1
    resume: bool = True


def instantiate(spec: dict[str, Any] | str, section: str = "config", **defaults: Any) -> Any:
    """Build an object from ``{class_path, init_args}`` (or a bare import path).

    Arguments the class does not take are reported with the config ``section``
    they came from, before anything is built.
    """
    if isinstance(spec, str):
        spec = {"class_path": spec}
    cls = import_class(spec["class_path"])
    kwargs = {**defaults, **dict(spec.get("init_args") or {})}
    check_arguments(cls, kwargs, section)
    return cls(**kwargs)


def check_arguments(cls: type, kwargs: dict[str, Any], section: str) -> None:
    """Raise a ValueError naming ``section`` when ``cls`` cannot be called with ``kwargs``."""
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        accepted = ", ".join(p for p in signature.parameters if p not in ("args", "kwargs"))
        raise ValueError(f"{section}: bad init_args for {cls.__name__} ({error}); it accepts: {accepted}") from None


def splits_of(config: RunConfig) -> list[CategorySplit]:
    """The data set's categories."""
    return discover(config.data.root, config.data.categories, config.data.image_size)


def make_indexes(config: RunConfig) -> list:
    """The patch indexes of the configured image and patch sizes."""
    data = config.data
    if config.fusion_weights is not None and len(config.fusion_weights) != len(data.ds_factors or [0]):
        raise ValueError(
            f"fusion_weights has {len(config.fusion_weights)} values but ds_factors has "
            f"{len(data.ds_factors or [0])}: give one weight per resolution"
        )
    return MultiResolutionHRImageSpliter(data.image_size, data.patch_size, data.stride, data.ds_factors)


def detector_parts(config: RunConfig) -> tuple[type, dict[str, Any], dict[str, Any] | None]:
    """Detector class, patch config and thumbnail config."""
    cls = detector_class_of(config.detector["class_path"])
    init = dict(config.detector.get("init_args") or {})
    patch = {**init, "patch_size": config.data.patch_size}
    thumbnail = None
    if config.thumbnail:
        if "thumbnail_size" not in config.thumbnail:
            raise ValueError("thumbnail needs thumbnail_size")
        thumbnail = {**init, **config.thumbnail}
    return cls, patch, thumbnail


def create_tasks(config: RunConfig, split: CategorySplit) -> list[Task]:
    """Run the configured task generator on a category's training images."""
    cls, patch, _ = detector_parts(config)
    defaults: dict[str, Any] = {}
    generator_cls = import_class(config.tasks["class_path"])
    if issubclass(generator_cls, FeatureTaskGenerator):
        defaults = {
            "detector_class": cls,
            "detector_config": patch,
            "device": config.devices,
            "batch_size": config.data.batch_size,
            "fusion_weights": config.fusion_weights,
        }
    generator: TaskGenerator = instantiate(config.tasks, "tasks", **defaults)
    return generator.create_tasks(split.train, make_indexes(config))


def orchestrator_for(config: RunConfig, split: CategorySplit, tasks: Sequence[Task] = ()) -> TaskOrchestrator:
    """The orchestrator of one category's model folder."""
    cls, patch, thumbnail = detector_parts(config)
    return TaskOrchestrator(
        cls,
        patch,
        tasks,
        config.run_dir / split.name,
        thumbnail_config=thumbnail,
        batch_size=config.data.batch_size,
        seed=config.seed,
        fusion_weights=config.fusion_weights,
        trainer_kwargs=config.trainer,
        num_workers=config.data.num_workers,
        early_stop_epochs=config.early_stop_epochs,
    )


def validation_config(config: RunConfig) -> ValidationConfig | None:
    """The `validation:` section as the tutorial's val_config."""
    if not config.validation:
        return None
    from hiad_pl.metrics import resolve_evaluator

    section = dict(config.validation)
    if "anomaly_syn_fn" not in section:
        raise ValueError("validation needs anomaly_syn_fn: {class_path: hiad_pl.syn.RandomBoxSynthesizer, init_args: {p: 0.5}}")
    section["anomaly_syn_fn"] = instantiate(section["anomaly_syn_fn"], "validation.anomaly_syn_fn")
    section["evaluators"] = [resolve_evaluator(e) for e in section.get("evaluators") or []]
    return ValidationConfig.from_any(section)


def fit(config: RunConfig) -> Path:
    """Fit every category; returns the run folder. A rerun resumes."""
    splits = splits_of(config)
    val_config = validation_config(config)
    for split in splits:
        tasks = create_tasks(config, split)
        orchestrator = orchestrator_for(config, split, tasks)
        log.info("fitting %s: %d task(s), %d training images", split.name, len(orchestrator.tasks), len(split.train))
        orchestrator.fit(split.train, config.devices, val_config, resume=config.resume)
    return config.run_dir


def test(config: RunConfig) -> dict[str, dict]:
    """Evaluate a fitted run on every category's test images; writes metrics and visualisations."""
    from hiad_pl.metrics import default_evaluators, format_table, resolve_evaluator, save_report

    evaluators = (
        [resolve_evaluator(e) for e in config.evaluation.evaluators]
        if config.evaluation.evaluators
        else default_evaluators()
    )
    device = resolve_devices(config.devices)[0]
    samples: list[HRSample] = []
    scores, maps = [], []
    for split in splits_of(config):
        if not split.test:
            raise ValueError(f"{config.data.root}: category {split.name!r} has no test images")
        orchestrator = orchestrator_for(config, split)
        orchestrator.load(device)
        split_scores, split_maps = run_inference(orchestrator, split.test, device)
        if config.evaluation.vis_size > 0:
            vmin, vmax = score_range(split_maps, orchestrator.normalized)
            write_visualizations(split.test, split_maps, config.run_dir / "visualizations", config.evaluation.vis_size, vmin, vmax)
        samples.extend(split.test)
        scores.extend(split_scores.tolist())
        maps.extend(split_maps)
    import numpy as np

    results = evaluate_predictions(samples, np.asarray(scores), maps, evaluators)
    save_report(results, config.run_dir)
    print(format_table(results))
    return results


def saved_image_size(run_dir: Path) -> tuple[int, int]:
    """The detection resolution recorded in a run folder's config.yaml."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run folder (no config.yaml); run `hiad-pl fit` first")
    data = (yaml.safe_load(path.read_text()) or {}).get("data", {})
    return as_pair(data.get("image_size", 2048), "image_size")


def input_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively) in named folders."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem)
            if not found:
                raise ValueError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


def predict(
    run_dir: Path, inputs: Sequence[str | Path], output: Path, category: str | None = None, devices: Sequence[int | str] = ()
) -> Path:
    """Score new images with a fitted run: maps (16-bit PNG, .npy), overlays and scores.csv."""
    categories = sorted(p.parent.name for p in Path(run_dir).glob("*/tasks.json"))
    if not categories:
        raise FileNotFoundError(f"{run_dir}: no fitted category (no */tasks.json)")
    if category is None:
        if len(categories) > 1:
            raise ValueError(f"{run_dir} holds several categories {categories}: choose one with --category")
        category = categories[0]
    if category not in categories:
        raise ValueError(f"category {category!r} is not in {run_dir}; available: {categories}")
    image_size = saved_image_size(Path(run_dir))
    samples = [HRSample(p, image_size=image_size, clsname=category) for p in input_images(inputs)]
    orchestrator = TaskOrchestrator("hiad_pl.detectors.base.HRDetector", {}, [], Path(run_dir) / category)
    device = resolve_devices(list(devices))[0]
    orchestrator.load(device)
    stems = unique_stems([s.get_image_path() for s in samples])
    rows = [
        write_prediction(p, samples[p.sample_id], Path(output), orchestrator.normalized, stems[p.sample_id])
        for p in orchestrator.predict(samples, device)
    ]
    write_scores_csv(rows, Path(output) / "scores.csv", orchestrator.normalized)
    return Path(output)


def list_detectors(modules: Sequence[str] = ()) -> list[str]:
    """One line per registered detector, after importing ``modules`` (where user detectors live)."""
    import importlib

    from hiad_pl.detectors import describe_detectors

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"detectors --modules: cannot import {module!r}: {error}") from error
    return describe_detectors()


def print_tasks(config: RunConfig) -> None:
    """Print each category's task layout without training."""
    from hiad_pl.tasks.base import task_layout, thumbnail_task

    for split in splits_of(config):
        tasks = create_tasks(config, split)
        if config.thumbnail:
            tasks.append(thumbnail_task(config.thumbnail["thumbnail_size"]))
        print(f"[{split.name}]")
        print(task_layout(tasks))
