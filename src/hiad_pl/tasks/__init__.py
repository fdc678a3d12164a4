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
from hiad_pl.tasks.clustering import SpatialClusteringTaskGenerator, ThresholdClusteringTaskGenerator
from hiad_pl.tasks.layouts import A2OTaskGenerator, NeighborhoodTaskGenerator, O2OTaskGenerator
from hiad_pl.tasks.retrieval import RetrieveTaskGenerator, route_by_retrieval

__all__ = [
    "A2OTaskGenerator",
    "FeatureTaskGenerator",
    "NeighborhoodTaskGenerator",
    "O2OTaskGenerator",
    "PrintTasks",
    "RetrieveTaskGenerator",
    "SpatialClusteringTaskGenerator",
    "Task",
    "TaskGenerator",
    "ThresholdClusteringTaskGenerator",
    "load_tasks",
    "route_by_retrieval",
    "save_tasks",
    "task_layout",
    "thumbnail_task",
]
