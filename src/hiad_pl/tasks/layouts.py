"""Task generators that group patches by position alone."""

from __future__ import annotations

import math
from collections.abc import Sequence

from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionIndex
from hiad_pl.tasks.base import Task, TaskGenerator, named_tasks


def _check_indexes(indexes: Sequence[MultiResolutionIndex]) -> list[MultiResolutionIndex]:
    if not indexes:
        raise ValueError("no patch indexes to assign: check image_size and patch_size")
    return list(indexes)


class A2OTaskGenerator(TaskGenerator):
    """All patches to one detector."""

    def create_tasks(self, train_samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]) -> list[Task]:
        """One task holding every index."""
        return named_tasks([_check_indexes(indexes)])


class O2OTaskGenerator(TaskGenerator):
    """One detector per patch position."""

    def create_tasks(self, train_samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]) -> list[Task]:
        """One task per index, row-major."""
        return named_tasks([[i] for i in _check_indexes(indexes)])


class NeighborhoodTaskGenerator(TaskGenerator):
    """Neighbouring patches share a detector: the grid is cut into blocks.

    ``num_groups_width`` blocks across and ``num_groups_height`` (default: the
    same) down; a column or row goes to block ``floor(k * groups / count)``.
    """

    def __init__(self, num_groups_width: int, num_groups_height: int | None = None) -> None:
        self.num_groups_width = int(num_groups_width)
        self.num_groups_height = self.num_groups_width if num_groups_height is None else int(num_groups_height)
        if self.num_groups_width <= 0 or self.num_groups_height <= 0:
            raise ValueError(
                f"num_groups_width and num_groups_height must be positive, got "
                f"{num_groups_width} and {num_groups_height}"
            )

    def create_tasks(self, train_samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]) -> list[Task]:
        """Block tasks, numbered row-major over blocks."""
        indexes = _check_indexes(indexes)
        xs = sorted({i.main_index.x for i in indexes})
        ys = sorted({i.main_index.y for i in indexes})
        if self.num_groups_width > len(xs) or self.num_groups_height > len(ys):
            raise ValueError(
                f"NeighborhoodTaskGenerator({self.num_groups_width}, {self.num_groups_height}) asks for more "
                f"groups than the {len(ys)}x{len(xs)} patch grid has rows/columns"
            )
        column_group = {x: math.floor(k * self.num_groups_width / len(xs)) for k, x in enumerate(xs)}
        row_group = {y: math.floor(k * self.num_groups_height / len(ys)) for k, y in enumerate(ys)}
        groups: list[list[MultiResolutionIndex]] = [[] for _ in range(self.num_groups_width * self.num_groups_height)]
        for index in indexes:
            block = row_group[index.main_index.y] * self.num_groups_width + column_group[index.main_index.x]
            groups[block].append(index)
        return named_tasks(groups)
