"""Tutorial import path for task generators (``from hiad_pl.task import ...``)."""

from hiad_pl.tasks import (
    A2OTaskGenerator,
    NeighborhoodTaskGenerator,
    O2OTaskGenerator,
    RetrieveTaskGenerator,
    SpatialClusteringTaskGenerator,
    ThresholdClusteringTaskGenerator,
)

__all__ = [
    "A2OTaskGenerator",
    "NeighborhoodTaskGenerator",
    "O2OTaskGenerator",
    "RetrieveTaskGenerator",
    "SpatialClusteringTaskGenerator",
    "ThresholdClusteringTaskGenerator",
]
