"""Task generators: which patches each detector learns."""

from hiad_pl.tasks.base import (
    FeatureTaskGenerator,
    PrintTasks,
    Task,
    TaskGenerator,
    load_tasks,
    save_tasks,
    task_layout,
    thumbnail_task,
)
from hiad_pl.tasks.layouts import A2OTaskGenerator, NeighborhoodTaskGenerator, O2OTaskGenerator

__all__ = [
    "A2OTaskGenerator",
    "FeatureTaskGenerator",
    "NeighborhoodTaskGenerator",
    "O2OTaskGenerator",
    "PrintTasks",
    "Task",
    "TaskGenerator",
    "load_tasks",
    "save_tasks",
    "task_layout",
    "thumbnail_task",
]
