"""From a fitted model folder to the inference pipeline: checkpoints, shared backbones, normalisation statistics."""

from __future__ import annotations

from typing import Any

import torch

from hiad_pl.config import class_path, import_class
from hiad_pl.detectors.base import HRDetector
from hiad_pl.engine.callbacks import pooled_statistics
from hiad_pl.engine.run_folder import ModelFolder
from hiad_pl.engine.task_trainer import RUN_INFO_KEY
from hiad_pl.errors import CheckpointError, MissingFileError
from hiad_pl.inference import InferencePipeline, share_frozen_backbones
from hiad_pl.run_folder import load_checkpoint
from hiad_pl.tasks.base import Task, load_tasks


class FittedModels:
    """The fitted detector and validation statistics of every task of one model folder.

    Args:
        folder: the model folder.
        fallback_class: the detector class of checkpoints that do not name theirs
            (written by releases before the run info held it).
    """

    def __init__(self, folder: ModelFolder, fallback_class: type[HRDetector]) -> None:
        self.folder = folder
        self.fallback_class = fallback_class
        self.tasks: list[Task] = []
        self.detectors: dict[str, HRDetector] = {}
        #: validation statistics ``{low, high, ...}`` by task name (``None``: the task has none)
        self.statistics: dict[str, dict[str, Any] | None] = {}
        self.context_margin = 0

    def load(self, device: str = "cpu") -> None:
        """Load the tasks and every task's detector onto ``device``; frozen backbones are shared.

        :attr:`context_margin` becomes the one the patch tasks were fitted with
        (0 for checkpoints written before the option existed).

        Raises:
            MissingFileError: when a task has no checkpoint.
            ValueError: when the patch tasks were fitted with different context margins.
        """
        tasks = load_tasks(self.folder.tasks_path)
        missing = [t.name for t in tasks if not self.folder.checkpoint_path(t).is_file()]
        if missing:
            raise MissingFileError(f"{self.folder.root}: tasks {missing} have no checkpoint; run fit first")
        backbones: dict[tuple, torch.nn.Module] = {}
        margins: set[int] = set()
        detectors: dict[str, HRDetector] = {}
        statistics: dict[str, dict[str, Any] | None] = {}
        for task in tasks:
            path = self.folder.checkpoint_path(task)
            info = load_checkpoint(path, task.name).get(RUN_INFO_KEY, {})
            cls = import_class(info["detector_class"]) if "detector_class" in info else self.fallback_class
            if not issubclass(cls, HRDetector):
                raise CheckpointError(f"{path}: its detector class {class_path(cls)} is not an HRDetector")
            detector = cls.load_from_checkpoint(path, map_location=device, weights_only=True)
            detector.eval().to(device)
            # One frozen backbone per run, however many tasks (dedupe as they load: two copies at most).
            share_frozen_backbones([detector], backbones)
            detectors[task.name] = detector
            statistics[task.name] = info.get("normalization")
            if not task.is_thumbnail:
                margins.add(int(info.get("context_margin", 0)))
        if len(margins) > 1:
            raise ValueError(f"{self.folder.root}: the patch tasks were fitted with different context margins {sorted(margins)}")
        self.tasks, self.detectors, self.statistics = tasks, detectors, statistics
        self.context_margin = margins.pop() if margins else 0
        self._share_normalization()

    def _share_normalization(self) -> None:
        """Give the patch tasks pooled statistics when they were fitted with ``normalization: shared``."""
        patch = [t.name for t in self.tasks if not t.is_thumbnail]
        stats = [self.statistics.get(name) for name in patch]
        if not any(s is not None and s.get("scope") == "shared" for s in stats):
            return
        if any(s is None for s in stats):
            return  # some task lacks statistics: scores stay raw (see ``normalized``)
        pooled = pooled_statistics([s for s in stats if s is not None])
        for name in patch:
            self.statistics[name] = {**(self.statistics[name] or {}), **pooled}

    @property
    def loaded(self) -> bool:
        """Whether :meth:`load` has run."""
        return bool(self.detectors)

    @property
    def normalized(self) -> bool:
        """Whether every task has validation statistics, so scores lie in [0, 1]."""
        return bool(self.statistics) and all(v is not None for v in self.statistics.values())

    def detector(self, task_name: str) -> HRDetector:
        """The loaded detector of the task named ``task_name``."""
        if task_name not in self.detectors:
            raise KeyError(f"{self.folder.root}: no loaded detector for task {task_name!r}; call load() first")
        return self.detectors[task_name]

    def normalization(self, task_name: str) -> dict[str, Any] | None:
        """Validation statistics scores of ``task_name`` are normalised with (``None``: raw scores)."""
        return self.statistics.get(task_name) if self.normalized else None

    def pipeline(
        self, batch_size: int, device: str = "cpu", prefetch: int | None = None, images_per_step: int | None = None
    ) -> InferencePipeline:
        """The inference pipeline over the loaded detectors (see :class:`InferencePipeline` for the options)."""
        stats = {name: self.normalization(name) for name in self.statistics}
        return InferencePipeline(
            self.tasks,
            self.detectors,
            stats,
            batch_size,
            device,
            prefetch=prefetch,
            images_per_step=images_per_step,
            context_margin=self.context_margin,
        )

