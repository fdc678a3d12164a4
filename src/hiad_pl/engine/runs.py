"""A fitted run folder, one category at a time: what ``predict``, ``serve`` and ``export`` load."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hiad_pl.calibration import model_thresholds
from hiad_pl.data.tiling import as_pair
from hiad_pl.decisions import Thresholds
from hiad_pl.engine.launchers import resolve_devices
from hiad_pl.engine.orchestrator import TaskOrchestrator
from hiad_pl.errors import ConfigError, MissingFileError


def saved_image_size(run_dir: Path) -> tuple[int, int]:
    """The detection resolution recorded in a run folder's config.yaml."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise MissingFileError(f"{path}: not a run folder (no config.yaml); run `hiad-pl fit` first")
    data = (yaml.safe_load(path.read_text()) or {}).get("data", {})
    return as_pair(data.get("image_size", 2048), "image_size")


@dataclass
class LoadedRun:
    """One category model of a fitted run, loaded and ready to score."""

    orchestrator: TaskOrchestrator
    category: str
    image_size: tuple[int, int]
    device: str
    #: the model's thresholds; ``None`` for a run fitted before thresholds were stored (no decisions)
    thresholds: Thresholds | None


def run_categories(run_dir: Path) -> list[str]:
    """The fitted categories of a run folder (folders holding a tasks.json)."""
    categories = sorted(p.parent.name for p in Path(run_dir).glob("*/tasks.json"))
    if not categories:
        raise MissingFileError(f"{run_dir}: no fitted category (no */tasks.json)")
    return categories


def choose_category(run_dir: Path, category: str | None) -> str:
    """``category``, or the run's only category; an error lists the choices otherwise."""
    categories = run_categories(run_dir)
    if category is None:
        if len(categories) > 1:
            raise ConfigError(f"{run_dir} holds several categories {categories}: choose one with --category")
        return categories[0]
    if category not in categories:
        raise ConfigError(f"category {category!r} is not in {run_dir}; available: {categories}")
    return category


def load_run(run_dir: Path, category: str | None = None, devices: Sequence[int | str] = ()) -> LoadedRun:
    """Load a fitted category model once (tasks, every task's checkpoint) onto the first of ``devices``."""
    category = choose_category(Path(run_dir), category)
    image_size = saved_image_size(Path(run_dir))
    orchestrator = TaskOrchestrator("hiad_pl.detectors.base.HRDetector", {}, [], Path(run_dir) / category)
    device = resolve_devices(list(devices))[0]
    orchestrator.load(device)
    return LoadedRun(orchestrator, category, image_size, device, model_thresholds(orchestrator))
