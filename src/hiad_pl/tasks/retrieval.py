"""Retrieval tasks: patches are grouped by appearance, and routed by it at inference.

:class:`RetrieveTaskGenerator` clusters every training patch (every image, every
index) by its embedding and keeps the cluster centres in the tasks
(``Task.centers``, saved in ``tasks.json``). At inference
:func:`route_by_retrieval` embeds each patch of the test image and hands it to
the task of the nearest centre (cosine similarity), wherever the patch lies
(the inference pipeline does the same with :func:`route_features` on the
features it computes once for routing and scoring). So
images need not be aligned (a part turned in every image still meets the
detector that learned its look), and inference needs no training images.

Training and inference assign patches with the same rule
(:func:`nearest_center`), and training patches are assigned after the centres
are normalised, so a training patch goes where an identical test patch would.

Which patches each task trains on
---------------------------------
A task's ``indexes`` are the positions where its cluster is the most frequent
one over the training images (a cluster that is most frequent nowhere keeps the
single position where it is most frequent). They partition the grid, so
positional training (every image at those indexes) works, and their union is
the grid that inference embeds. Training on the patches each task is routed is
:func:`retrieval_train_items`: it routes every training patch as inference
would and returns, per task, the items of a
:class:`~hiad_pl.data.datamodule.PatchDataset` over the grid. With
``train_top_k`` > 1 a patch also trains the tasks of its next-nearest centres,
so the detectors overlap on the patches between clusters.

The embedding at inference is computed by the first patch task's fitted
detector (``fused_embedding``): every task is built from one detector config,
whose backbone is frozen, so any task's detector embeds as the generator did.
Centres carry ``D = channels * cells`` values; the cells of a square
``feature_resolution`` are recovered from ``D`` and the detector's channels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.datamodule import patch_to_batch
from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionIndex
from hiad_pl.tasks.base import FeatureTaskGenerator, Task
from hiad_pl.tasks.clustering import check_cluster_number, kmeans_labels, position, warn_if_fewer
from hiad_pl.tasks.embedding import module_device, patch_batches, patch_embeddings, pool_features

if TYPE_CHECKING:
    from hiad_pl.detectors.base import HRDetector


def nearest_center(embeddings: Tensor, centers: Tensor) -> Tensor:
    """Position of the centre with the highest cosine similarity to each ``[N, D]`` embedding."""
    return (F.normalize(embeddings.float(), dim=1) @ F.normalize(centers.float(), dim=1).T).argmax(dim=1)


def retrieval_grid(tasks: Sequence[Task]) -> list[MultiResolutionIndex]:
    """Every index of the tasks once, row-major: the patches embedded for routing."""
    return sorted({i for t in tasks for i in t.indexes}, key=position)


def stacked_centers(tasks: Sequence[Task]) -> tuple[Tensor, Tensor]:
    """``[K, D]`` centres of all tasks and the position in ``tasks`` of each centre's task."""
    missing = [t.name for t in tasks if not t.centers]
    if missing:
        raise ValueError(f"retrieval routing needs centres in every patch task; {missing} have none (tasks.json)")
    centers = [torch.as_tensor(c, dtype=torch.float32) for t in tasks for c in t.centers or ()]
    dims = {c.numel() for c in centers}
    if len(dims) != 1 or any(c.ndim != 1 for c in centers):
        raise ValueError(f"retrieval centres must be vectors of one length, got lengths {sorted(dims)} (tasks.json)")
    owners = torch.tensor([k for k, t in enumerate(tasks) for _ in t.centers or ()])
    return torch.stack(centers), owners


def cells_for(dim: int, channels: int) -> tuple[int, int]:
    """The square ``feature_resolution`` giving ``dim`` values from ``channels`` channels."""
    side = math.isqrt(dim // channels) if dim % channels == 0 else 0
    if side * side * channels != dim:
        raise ValueError(
            f"retrieval centres have {dim} values, which no square feature_resolution gives from the "
            f"detector's {channels} feature channels: tasks.json was made with another backbone or layers"
        )
    return side, side


def feature_similarities(features: Sequence[Tensor], tasks: Sequence[Task]) -> Tensor:
    """``[N, T]`` cosine similarity of each patch to each task (its nearest centre), from the patches' fused maps."""
    centers, owners = stacked_centers(tasks)
    centers = F.normalize(centers.to(features[0].device), dim=1)
    cells = cells_for(centers.shape[1], sum(f.shape[1] for f in features))
    similarity = (F.normalize(pool_features(features, cells).float(), dim=1) @ centers.T).cpu()
    per_task = torch.full((len(similarity), len(tasks)), -math.inf)
    return per_task.scatter_reduce(1, owners.expand_as(similarity), similarity, reduce="amax")


def route_features(features: Sequence[Tensor], tasks: Sequence[Task]) -> Tensor:
    """Position in ``tasks`` of the task each patch is routed to, from the patches' fused maps ``[N, C_l, h, w]``."""
    return feature_similarities(features, tasks).argmax(dim=1)


def task_similarities(detector: HRDetector, batches: Iterable[PatchBatch], tasks: Sequence[Task]) -> Tensor:
    """``[N, T]`` cosine similarity of each patch of ``batches`` to each task (its nearest centre), in order."""
    device = module_device(detector)
    stacked_centers(tasks)  # checks the centres before any patch is embedded
    rows = []
    with torch.inference_mode():
        for batch in batches:
            rows.append(feature_similarities(detector.fused_embedding(batch.to(device)), tasks))
    return torch.cat(rows) if rows else torch.zeros(0, len(tasks))


def assign_batches(detector: HRDetector, batches: Iterable[PatchBatch], tasks: Sequence[Task]) -> Tensor:
    """Position in ``tasks`` of the task each patch of ``batches`` is routed to, in order."""
    return task_similarities(detector, batches, tasks).argmax(dim=1)


def route_by_retrieval(
    detector: HRDetector, sample: HRSample, patch_tasks: Sequence[Task], batch_size: int = 8, context_margin: int = 0
) -> list[tuple[Task, list[MultiResolutionIndex]]]:
    """The indexes of ``sample`` each task scores: every patch goes to the task of its nearest centre.

    ``detector`` (any of the tasks' fitted detectors: they share one frozen
    backbone) embeds the patches, ``batch_size`` at a time. Tasks that receive
    no patch of this image come back with an empty list. The inference pipeline
    routes with :func:`route_features` on the features it has already computed.
    Patches are read with ``context_margin`` (the margin the tasks were fitted with).
    """
    if not patch_tasks:
        return []
    grid = retrieval_grid(patch_tasks)
    # The caller keeps the sample open: cut patches without closing it.
    batches = (
        PatchBatch.collate([patch_to_batch(sample.patch(i, context_margin)) for i in grid[start : start + batch_size]])
        for start in range(0, len(grid), batch_size)
    )
    owners = assign_batches(detector, batches, patch_tasks).tolist()
    return [(task, [i for i, o in zip(grid, owners) if o == k]) for k, task in enumerate(patch_tasks)]


def retrieval_train_items(
    detector: HRDetector,
    samples: Sequence[HRSample],
    patch_tasks: Sequence[Task],
    batch_size: int = 8,
    top_k: int | None = None,
    context_margin: int = 0,
) -> tuple[list[MultiResolutionIndex], dict[str, list[int]]]:
    """The training patches of each retrieval task: those for which it is among the ``top_k`` nearest.

    With ``top_k=1`` every training patch trains exactly the task inference
    would route it to; larger values also give each task the patches on the
    border of its cluster. ``None`` takes the tasks' ``train_top_k`` (1 when
    unset). Returns the grid and, per task name, the items
    ``image * len(grid) + index`` of ``PatchDataset(samples, grid, items=...)``.
    Patches are read with ``context_margin``, as the inference pipeline routes them.
    """
    top_k = train_top_k(patch_tasks) if top_k is None else check_top_k(top_k, len(patch_tasks))
    grid = retrieval_grid(patch_tasks)
    similarity = task_similarities(detector, patch_batches(samples, grid, batch_size, context_margin), patch_tasks)
    chosen = similarity.topk(min(top_k, len(patch_tasks)), dim=1).indices  # [N, k], nearest first
    return grid, {t.name: torch.nonzero((chosen == k).any(dim=1)).flatten().tolist() for k, t in enumerate(patch_tasks)}


def check_top_k(top_k: int, tasks: int | None = None, owner: str = "retrieval") -> int:
    """``top_k`` as a positive int (at most ``tasks`` when given), or a ValueError naming ``owner``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{owner}: train_top_k must be a positive int, got {top_k!r}")
    if tasks is not None and top_k > tasks:
        raise ValueError(f"{owner}: train_top_k={top_k} exceeds the {tasks} retrieval tasks")
    return top_k


def train_top_k(patch_tasks: Sequence[Task]) -> int:
    """The ``train_top_k`` the retrieval tasks were made with (1 when they do not say)."""
    values = {t.train_top_k or 1 for t in patch_tasks}
    if len(values) != 1:
        raise ValueError(f"retrieval tasks disagree on train_top_k: {sorted(values)} (tasks.json)")
    return check_top_k(values.pop(), len(patch_tasks))


def plurality_indexes(labels: np.ndarray, clusters: int) -> list[list[int]]:
    """Per cluster, the index positions where it is the most frequent label over the images.

    ``labels`` is ``[n_images, n_indexes]``. A cluster that is most frequent
    nowhere keeps the one position where it is most frequent.
    """
    counts = np.stack([(labels == k).sum(axis=0) for k in range(clusters)])  # [k, n_indexes]
    owner = counts.argmax(axis=0)
    groups = [np.flatnonzero(owner == k).tolist() for k in range(clusters)]
    return [group or [int(counts[k].argmax())] for k, group in enumerate(groups)]


class RetrieveTaskGenerator(FeatureTaskGenerator):
    """Clusters all training patches by appearance; test patches are routed to the nearest centre.

    Every (image, index) patch is embedded and clustered with seeded k-means
    into ``cluster_number`` clusters; each cluster becomes a task holding its
    unit-length centre (``Task.centers``). Training patches are then assigned
    to the nearest centre by cosine similarity, the rule used at inference, and
    a task's ``indexes`` are the positions where its cluster is the most
    frequent (see the module docs). Tasks are numbered by their first
    row-major position. Removes the need for aligned images.

    Args:
        cluster_number: number of tasks.
        detector_class, detector_config, batch_size, device, fusion_weights, seed:
            as for :class:`~hiad_pl.tasks.clustering.SpatialClusteringTaskGenerator`.
        feature_resolution: cells each layer is pooled to; square (an int or
            ``(n, n)``), because inference recovers it from the centres' length.
            The default 1 is the least sensitive to a part's orientation.
        train_top_k: how many of the nearest tasks each training patch trains.
            1 trains every detector on exactly the patches inference routes to
            it; 2 also gives it the patches on the border of its cluster, so a
            test patch that mixes two looks (half part, half conveyor) meets a
            detector that has seen such mixtures, at twice the training work.
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
        train_top_k: int = 1,
    ) -> None:
        super().__init__(detector_class, detector_config, batch_size, device, feature_resolution, fusion_weights)
        owner = type(self).__name__
        self.cluster_number = check_cluster_number(cluster_number, owner)
        self.train_top_k = check_top_k(train_top_k, self.cluster_number, owner)
        if self.feature_resolution[0] != self.feature_resolution[1]:
            raise ValueError(f"{owner}: feature_resolution must be square, got {feature_resolution!r}")
        self.seed = int(seed)

    def create_tasks(self, train_samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]) -> list[Task]:
        """Cluster every training patch into ``cluster_number`` retrieval tasks."""
        owner = type(self).__name__
        patches = len(train_samples) * len(indexes)
        if self.cluster_number > patches:
            raise ValueError(f"{owner}: cluster_number={self.cluster_number} exceeds the {patches} training patches")
        embeddings = patch_embeddings(self, train_samples, indexes)  # [images, indexes, D]
        flat = torch.from_numpy(embeddings.reshape(-1, embeddings.shape[-1]))
        _, kmeans_centers = kmeans_labels(flat.numpy(), self.cluster_number, self.seed)
        centers = F.normalize(torch.from_numpy(kmeans_centers).float(), dim=1)
        labels = nearest_center(flat, centers).numpy()
        # Centres that win no training patch under the cosine rule would be tasks with nothing to learn.
        used = np.unique(labels)
        warn_if_fewer(len(used), self.cluster_number, owner)
        labels = np.searchsorted(used, labels).reshape(len(train_samples), len(indexes))
        groups = [sorted((indexes[i] for i in group), key=position) for group in plurality_indexes(labels, len(used))]
        sizes = np.bincount(labels.ravel(), minlength=len(used))
        ranked = sorted(range(len(used)), key=lambda k: (position(groups[k][0]), -int(sizes[k]), k))
        return [
            Task(
                name=f"task_{n}",
                indexes=groups[k],
                centers=[centers[used[k]].tolist()],
                train_top_k=min(self.train_top_k, len(used)),
            )
            for n, k in enumerate(ranked)
        ]
