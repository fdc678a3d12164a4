"""Tasks: which patch positions each detector learns, their layout and tasks.json."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionIndex, Size, as_pair, grid_shape
from hiad_pl.errors import InputError, MissingFileError
from hiad_pl.run_folder import atomic_write

THUMBNAIL_TASK = "thumbnail"


@dataclass
class Task:
    """One detector's share of the work.

    A patch task lists the patch indexes its detector is fitted on and scores.
    Retrieval tasks also carry ``centers``: test patches are routed to the task of
    the nearest centre instead of by position; ``train_top_k`` says how many of
    the nearest tasks each training patch trains (see
    :func:`~hiad_pl.tasks.retrieval.retrieval_train_items`). The thumbnail task has no indexes
    and a ``thumbnail_size``.
    """

    name: str
    indexes: list[MultiResolutionIndex] = field(default_factory=list)
    centers: list[list[float]] | None = None
    train_top_k: int | None = None
    thumbnail_size: tuple[int, int] | None = None

    @property
    def is_thumbnail(self) -> bool:
        """Whether this is the low-resolution whole-image task."""
        return self.thumbnail_size is not None

    def todict(self) -> dict[str, Any]:
        """JSON-ready form (indexes as the tutorial's strings)."""
        d: dict[str, Any] = {"name": self.name, "indexes": [str(i) for i in self.indexes]}
        if self.centers is not None:
            d["centers"] = self.centers
        if self.train_top_k is not None:
            d["train_top_k"] = self.train_top_k
        if self.thumbnail_size is not None:
            d["thumbnail_size"] = list(self.thumbnail_size)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Task:
        """Inverse of :meth:`todict`."""
        size = d.get("thumbnail_size")
        return Task(
            name=d["name"],
            indexes=[MultiResolutionIndex.from_str(s) for s in d.get("indexes", [])],
            centers=d.get("centers"),
            train_top_k=d.get("train_top_k"),
            thumbnail_size=None if size is None else as_pair(size, "thumbnail_size"),
        )


def thumbnail_task(thumbnail_size: Size) -> Task:
    """The whole-image low-resolution task."""
    return Task(name=THUMBNAIL_TASK, thumbnail_size=as_pair(thumbnail_size, "thumbnail_size"))


def save_tasks(tasks: Sequence[Task], path: str | Path) -> Path:
    """Write tasks to ``tasks.json`` atomically."""
    atomic_write(path, json.dumps([t.todict() for t in tasks], indent=2))
    return Path(path)


def load_tasks(path: str | Path) -> list[Task]:
    """Read tasks written by :func:`save_tasks`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [Task.from_dict(d) for d in data]
    except FileNotFoundError as error:
        raise MissingFileError(f"{path}: tasks file not found") from error
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InputError(f"{path}: malformed tasks file ({error})") from error


def task_layout(tasks: Sequence[Task]) -> str:
    """The task grid as the tutorial prints it."""
    patch_tasks = [t for t in tasks if not t.is_thumbnail]
    owner = {i.main_index: t.name for t in patch_tasks for i in t.indexes}
    rows, columns = grid_shape(owner)
    names = [t.name for t in patch_tasks]
    width = max(len(n) for n in names) + 2
    width += width % 2
    ys = sorted({m.y for m in owner})
    xs = sorted({m.x for m in owner})
    by_position = {(m.y, m.x): name for m, name in owner.items()}

    def cell(name: str) -> str:
        pad = width - len(name)
        return " " * math.ceil(pad / 2) + name + " " * (pad // 2)

    lines = [f"Row: {rows}, Column: {columns}, Patch Number: {len(owner)}, Task Number: {len(patch_tasks)}"]
    for y in ys:
        lines.append("|" + "|".join(cell(by_position.get((y, x), "-")) for x in xs) + "| ")
    thumb = next((t for t in tasks if t.is_thumbnail), None)
    if thumb is not None and thumb.thumbnail_size is not None:
        lines.append(f"+ {thumb.name}: whole image at {thumb.thumbnail_size[0]}x{thumb.thumbnail_size[1]}")
    return "\n".join(lines)


def PrintTasks(tasks: Sequence[Task]) -> None:
    """Print the task layout grid (tutorial name)."""
    print(task_layout(tasks))


def named_tasks(groups: Sequence[Sequence[MultiResolutionIndex]]) -> list[Task]:
    """Tasks ``task_0 ... task_{n-1}`` from groups of indexes, in order."""
    return [Task(name=f"task_{k}", indexes=list(group)) for k, group in enumerate(groups)]


class TaskGenerator(ABC):
    """Maps patch indexes to tasks; ``create_tasks(train_samples, indexes)``."""

    @abstractmethod
    def create_tasks(self, train_samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]) -> list[Task]:
        """Group ``indexes`` into tasks."""


class FeatureTaskGenerator(TaskGenerator):
    """Base for generators that look at the training images through a detector's backbone.

    Subclasses receive the detector class and its config, embed every index of
    the training images and group indexes by appearance.
    """

    def __init__(
        self,
        detector_class: type | str | None,
        detector_config: dict[str, Any] | None = None,
        batch_size: int = 8,
        device: Sequence[int | str] | None = None,
        feature_resolution: int | tuple[int, int] = 1,
        fusion_weights: Sequence[float] | None = None,
    ) -> None:
        self.detector_class = detector_class
        self.detector_config = dict(detector_config or {})
        self.batch_size = int(batch_size)
        self.device = list(device or [])
        self.feature_resolution = as_pair(feature_resolution, "feature_resolution")
        self.fusion_weights = None if fusion_weights is None else list(fusion_weights)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
