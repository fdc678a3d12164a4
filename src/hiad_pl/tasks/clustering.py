"""Task generators that group patch positions by how alike they look on the training images.

Both generators embed every index (its mean embedding over the training images,
see :mod:`hiad_pl.tasks.embedding`) and cluster the embeddings. They suit
aligned images, where a position shows the same content in every image; for
unaligned images use :class:`~hiad_pl.tasks.retrieval.RetrieveTaskGenerator`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.cluster import KMeans

from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionIndex
from hiad_pl.tasks.base import FeatureTaskGenerator, Task, named_tasks
from hiad_pl.tasks.embedding import index_embeddings

log = logging.getLogger("hiad_pl")

#: k-means restarts; the best of them (lowest inertia) is kept.
KMEANS_RESTARTS = 10


def position(index: MultiResolutionIndex) -> tuple[int, int]:
    """Row-major sort key of an index: ``(y, x)`` of its main patch."""
    return index.main_index.y, index.main_index.x


def groups_by_label(
    indexes: Sequence[MultiResolutionIndex], labels: Sequence[int] | np.ndarray
) -> list[list[MultiResolutionIndex]]:
    """Indexes grouped by label, each group row-major, groups ordered by their first position.

    The order makes task numbering independent of the arbitrary label values a
    clustering returns. Labels given to no index yield no group.
    """
    groups: dict[int, list[MultiResolutionIndex]] = {}
    for index, label in sorted(zip(indexes, labels), key=lambda pair: position(pair[0])):
        groups.setdefault(int(label), []).append(index)
    return sorted(groups.values(), key=lambda group: position(group[0]))


def kmeans_labels(points: np.ndarray, cluster_number: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means: the label of each point and the ``[k, D]`` centres."""
    model = KMeans(n_clusters=cluster_number, n_init=KMEANS_RESTARTS, random_state=seed)
    labels = model.fit_predict(np.asarray(points, dtype=np.float64))
    return labels, model.cluster_centers_


def check_cluster_number(cluster_number: int, owner: str) -> int:
    """``cluster_number`` as a positive int, or a clear error."""
    if isinstance(cluster_number, bool) or not isinstance(cluster_number, (int, np.integer)) or cluster_number < 1:
        raise ValueError(f"{owner}: cluster_number must be a positive int, got {cluster_number!r}")
    return int(cluster_number)


def warn_if_fewer(found: int, asked: int, owner: str) -> None:
    """Log when identical embeddings left fewer clusters than asked for."""
    if found < asked:
        log.warning("%s: only %d distinct clusters found for cluster_number=%d", owner, found, asked)


class SpatialClusteringTaskGenerator(FeatureTaskGenerator):
    """Patch positions that look alike share a detector: k-means over the positions' embeddings.

    Each index is embedded as its mean backbone feature over the training images
    and the embeddings are split into ``cluster_number`` groups with seeded
    k-means (``KMEANS_RESTARTS`` restarts). Tasks ``task_0, task_1, ...`` are
    numbered by the first row-major position of each group.

    Args:
        cluster_number: number of tasks.
        detector_class: the detector (class or import path) whose backbone embeds the patches.
        detector_config: the detector's config: its ``patch`` section (or the whole
            tutorial config); ``patch_size`` is ignored, the indexes give the size.
        batch_size: patches per forward pass.
        device: GPU ids; the first is used. Empty or ``None``: the CPU.
        feature_resolution: cells (int or ``(width, height)``) each layer is pooled to.
        fusion_weights: multi-resolution fusion weights (with indexes made with ``ds_factors``).
        seed: k-means seed.
    """

    def __init__(
        self,
        cluster_number: int,
        detector_class: type | str | None = None,
        detector_config: dict[str, Any] | None = None,
        batch_size: int = 8,
        device: Sequence[int | str] | None = None,
        feature_resolution: int | tuple[int, int] = 1,
        fusion_weights: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(detector_class, detector_config, batch_size, device, feature_resolution, fusion_weights)
        self.cluster_number = check_cluster_number(cluster_number, type(self).__name__)
        self.seed = int(seed)

    def create_tasks(self, train_samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]) -> list[Task]:
        """Cluster the indexes into ``cluster_number`` tasks."""
        owner = type(self).__name__
        if self.cluster_number > len(indexes):
            raise ValueError(
                f"{owner}: cluster_number={self.cluster_number} exceeds the {len(indexes)} patch indexes"
            )
        embeddings = index_embeddings(self, train_samples, indexes)
        labels, _ = kmeans_labels(embeddings, self.cluster_number, self.seed)
        groups = groups_by_label(indexes, labels)
        warn_if_fewer(len(groups), self.cluster_number, owner)
        return named_tasks(groups)


def threshold_labels(embeddings: np.ndarray, cluster_threshold: float) -> np.ndarray:
    """Complete-linkage clusters in which every pair has cosine similarity >= ``cluster_threshold``.

    Complete linkage merges two clusters at the largest distance between their
    members, so cutting its tree at cosine distance ``1 - cluster_threshold``
    bounds every pairwise distance within a cluster. The tree does not depend
    on the threshold and its merge heights never decrease, so a higher
    threshold cuts lower and only ever splits clusters: never fewer tasks.
    """
    points = np.asarray(embeddings, dtype=np.float64)
    if len(points) == 1:
        return np.zeros(1, dtype=int)
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    distances = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    tree = linkage(squareform(distances, checks=False), method="complete")
    return fcluster(tree, t=1.0 - cluster_threshold, criterion="distance")


class ThresholdClusteringTaskGenerator(FeatureTaskGenerator):
    """Patch positions share a detector when they all look alike: no preset number of tasks.

    Indexes are embedded as in :class:`SpatialClusteringTaskGenerator` and
    grouped by complete-linkage agglomerative clustering on cosine distance:
    within a task, every pair of indexes has cosine similarity of at least
    ``cluster_threshold``. Raising the threshold never lowers the task count;
    ``1.0`` gives one task per distinct position.

    Args:
        cluster_threshold: least cosine similarity between any two indexes of a task, in [-1, 1].
        detector_class, detector_config, batch_size, device, feature_resolution, fusion_weights:
            as for :class:`SpatialClusteringTaskGenerator`.
    """

    def __init__(
        self,
        cluster_threshold: float,
        detector_class: type | str | None = None,
        detector_config: dict[str, Any] | None = None,
        batch_size: int = 8,
        device: Sequence[int | str] | None = None,
        feature_resolution: int | tuple[int, int] = 1,
        fusion_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(detector_class, detector_config, batch_size, device, feature_resolution, fusion_weights)
        threshold = float(cluster_threshold)
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"{type(self).__name__}: cluster_threshold must be in [-1, 1], got {cluster_threshold!r}")
        self.cluster_threshold = threshold

    def create_tasks(self, train_samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]) -> list[Task]:
        """Group the indexes by the similarity threshold."""
        embeddings = index_embeddings(self, train_samples, indexes)
        return named_tasks(groups_by_label(indexes, threshold_labels(embeddings, self.cluster_threshold)))
