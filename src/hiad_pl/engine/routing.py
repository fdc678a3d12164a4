"""Routing of training and validation patches to retrieval tasks, computed once per model folder."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionIndex
from hiad_pl.detectors.base import HRDetector
from hiad_pl.run_folder import atomic_write
from hiad_pl.tasks.base import Task
from hiad_pl.tasks.retrieval import retrieval_train_items

log = logging.getLogger("hiad_pl")

Routed = tuple[list[MultiResolutionIndex], dict[str, list[int]]]


class RetrievalRouting:
    """Which patches of which images each retrieval task fits and validates on.

    Patches are routed with the rule inference uses, by a fresh detector: its
    frozen backbone embeds exactly as the fitted one will. Training patches go
    to their ``train_top_k`` nearest tasks; validation patches only to the
    nearest, where inference would send them, so each task is validated and
    normalised on the patches it will score. A task that no validation patch is
    routed to is validated at its own positions. The routing is kept in memory
    and in ``folder``, so that every task, worker process and rerun reads it
    instead of embedding every training patch again.

    Args:
        folder: where the routing files go (``<model folder>/retrieval``).
        key: everything besides the images that decides the routing (tasks,
            detector class and settings, fusion weights, context margin); part of the file name.
        batch_size: patches embedded per step.
        context_margin: pixels of image context read around each patch.
    """

    def __init__(self, folder: Path, key: Sequence[Any], batch_size: int, context_margin: int) -> None:
        self.folder = folder
        self.key = list(key)
        self.batch_size = batch_size
        self.context_margin = context_margin
        # Per split (training, validation): the image paths routed last and their routing.
        self._cache: dict[bool, tuple[tuple[str, ...], Routed]] = {}

    def path(self, paths: tuple[str, ...], validation: bool) -> Path:
        """Where the routing of these images is kept: it depends on the images and :attr:`key`."""
        key = json.dumps([paths, *self.key], sort_keys=True, default=repr)
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        return self.folder / f"{'validation' if validation else 'training'}-{digest}.json"

    def items(
        self, detector: HRDetector | None, task: Task, tasks: Sequence[Task], samples: Sequence[HRSample], validation: bool = False
    ) -> tuple[list[MultiResolutionIndex], list[int]]:
        """The grid and the items of ``samples`` routed to ``task``, one of the patch ``tasks``.

        ``detector`` embeds the patches when no routing of these images is kept yet.
        """
        paths = tuple(s.get_image_path() for s in samples)
        if validation not in self._cache or self._cache[validation][0] != paths:
            saved = self.path(paths, validation)
            if saved.is_file():
                data = json.loads(saved.read_text(encoding="utf-8"))
                routed: Routed = ([MultiResolutionIndex.from_str(i) for i in data["grid"]], data["items"])
            else:
                if detector is None:
                    raise ValueError(f"{saved}: no saved routing, and no detector to route the patches with")
                top_k = 1 if validation else None
                routed = retrieval_train_items(detector, list(samples), list(tasks), self.batch_size, top_k, self.context_margin)
                atomic_write(saved, json.dumps({"grid": [str(i) for i in routed[0]], "items": routed[1]}))
            self._cache[validation] = (paths, routed)
        grid, items = self._cache[validation][1]
        chosen = items[task.name]
        if validation and not chosen:
            own = {str(i) for i in task.indexes}
            chosen = [n * len(grid) + k for n in range(len(samples)) for k, i in enumerate(grid) if str(i) in own]
            log.info("%s: no validation patch is routed to this task; validating it at its own positions", task.name)
        return grid, chosen
