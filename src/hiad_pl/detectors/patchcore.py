"""PatchCore: nearest-neighbour distance to a coreset memory bank of normal patch features.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022).
Every location of a patch is described by locally aggregated backbone features
of two (or more) layers; the training features are thinned by greedy k-center
selection into a memory bank, and a test location scores its distance to the
nearest bank feature. The map is upsampled to the patch size; Gaussian blur and
the image score are applied later, on the stitched full-resolution map.
"""

from __future__ import annotations

import logging

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors.base import DEFAULT_LAYERS, OnePassDetector
from hiad_pl.detectors.nn_search import NearestNeighbourIndex

#: Rows projected at once when the coreset's random projection is applied.
PROJECTION_CHUNK_ROWS = 65536

log = logging.getLogger(__name__)


def pool_channels(features: Tensor, dimension: int | None) -> Tensor:
    """Adaptive average pooling of the last (channel) axis of ``features`` to ``dimension`` values."""
    channels = features.shape[-1]
    if dimension is None or dimension == channels:
        return features
    pooled = F.adaptive_avg_pool1d(features.reshape(-1, 1, channels), dimension)
    return pooled.reshape(*features.shape[:-1], dimension)


def random_projection(features: Tensor, dimension: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Features ``[N, D]`` mapped to ``dimension`` by a Gaussian random matrix (Johnson-Lindenstrauss).

    Features already no wider than ``dimension`` are returned as they are (on ``device``).
    Rows are projected in chunks so that only the ``[N, dimension]`` result is new memory.
    """
    if features.shape[1] <= dimension:
        return features.to(device, torch.float32)
    matrix = torch.randn(features.shape[1], dimension, generator=generator) / math.sqrt(dimension)
    matrix = matrix.to(device)
    return torch.cat([chunk.to(device, torch.float32) @ matrix for chunk in features.split(PROJECTION_CHUNK_ROWS)])


def greedy_coreset_indices(points: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Indices of ``count`` rows of ``points`` chosen by greedy k-center selection.

    Starts from a random row; each step adds the row farthest from everything
    selected so far and updates every row's distance to its nearest selected
    row. One step costs one ``[N, d] x [d]`` product; memory is ``O(N)`` beyond
    ``points``. The loop stays on ``points.device`` without host syncs.
    """
    total = points.shape[0]
    count = min(int(count), total)
    points = points.float()
    norms = points.square().sum(1)
    nearest = torch.full((total,), float("inf"), device=points.device)
    chosen = torch.empty(count, dtype=torch.long, device=points.device)
    current = torch.randint(total, (1,), generator=generator).to(points.device)
    for step in range(count):
        chosen[step] = current[0]
        centre = points.index_select(0, current)  # [1, d]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one matrix product per step.
        squared = (points @ centre.T).squeeze(1).mul_(-2).add_(norms).add_(norms.index_select(0, current))
        torch.minimum(nearest, squared, out=nearest)
        current = nearest.argmax().reshape(1)
    return chosen


def coreset_subsample(
    features: Tensor,
    percentage: float,
    projection_dim: int = 128,
    max_candidates: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """The memory bank: ``percentage`` of ``features`` ``[N, D]`` chosen by greedy k-center.

    Distances are measured after a random projection to ``projection_dim``
    dimensions; the returned rows are the original features. When ``N`` exceeds
    ``max_candidates``, a uniform random subset of ``max_candidates`` rows is
    drawn first (and logged) and the bank keeps ``percentage`` of that subset,
    which bounds both the time (``O(percentage * max_candidates^2)``) and the size
    of the bank. ``percentage >= 1`` keeps every candidate.
    """
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device) if device is not None else features.device
    total = features.shape[0]
    if max_candidates is not None and total > max_candidates:
        log.info(
            f"PatchCore: {total} training features exceed coreset_max_candidates={max_candidates}; "
            f"the coreset is chosen from a random subset of {max_candidates}."
        )
        features = features[torch.randperm(total, generator=generator)[:max_candidates].to(features.device)]
    if percentage >= 1:
        return features
    count = max(1, math.ceil(percentage * features.shape[0]))
    projected = random_projection(features, projection_dim, generator, device)
    chosen = greedy_coreset_indices(projected, count, generator)
    return features[chosen.to(features.device)]


class HRPatchCore(OnePassDetector):
    """PatchCore on high-resolution patches, fitted in one pass.

    Args:
        backbone_name: timm backbone (or tutorial alias, e.g. ``wideresnet50``).
        layers_to_extract_from: backbone layers whose features are combined; deeper
            layers are upsampled to the first layer's grid, which is the score grid.
        weights: backbone weights: ``hub``, ``offline``, ``none`` or a file path.
        input_size: ``(width, height)`` or one int: patch size the detector sees.
        fusion_weights: multi-resolution fusion weights (see :class:`HRDetector`).
        merge_size: side of the neighbourhood averaged around each feature
            location (odd; 1 disables local aggregation).
        percentage: fraction of the (candidate) training features kept in the bank.
        pretrain_embed_dimension: channels each layer is average-pooled to before
            concatenation; ``None`` keeps each layer's channel count.
        target_embed_dimension: channels the concatenated feature is pooled to;
            ``None`` keeps the concatenation's width.
        num_neighbors: the score is the mean distance to this many nearest bank features.
        coreset_projection_dim: dimension of the random projection on which the
            greedy coreset measures distances.
        coreset_max_candidates: most training features the greedy coreset
            considers; beyond it a random subset is drawn first (logged), which
            bounds time and bank size. ``None`` runs the greedy over all features
            (the paper's setting; on a CPU this takes minutes for 10^5 features).
        seed: seed of the projection, the coreset's start and the candidate subset.

    The bank (``memory_bank``, ``[M, D]``) is a buffer saved in checkpoints. The
    training features are held on the CPU until the pass ends: ``N x D x 4`` bytes
    for ``N`` feature locations.
    """

    resizable_buffers = ("memory_bank",)

    def __init__(
        self,
        backbone_name: str = "efficientnet_lite0",
        layers_to_extract_from: Sequence[str] = DEFAULT_LAYERS,
        weights: str = "hub",
        input_size: int | tuple[int, int] = 512,
        fusion_weights: Sequence[float] | None = None,
        merge_size: int = 3,
        percentage: float = 0.1,
        pretrain_embed_dimension: int | None = None,
        target_embed_dimension: int | None = None,
        num_neighbors: int = 1,
        coreset_projection_dim: int = 128,
        coreset_max_candidates: int | None = 50_000,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone_name, layers_to_extract_from, weights, input_size, fusion_weights)
        _check_positive(
            pretrain_embed_dimension=pretrain_embed_dimension,
            target_embed_dimension=target_embed_dimension,
            num_neighbors=num_neighbors,
            coreset_projection_dim=coreset_projection_dim,
            coreset_max_candidates=coreset_max_candidates,
        )
        if merge_size < 1 or merge_size % 2 == 0:
            raise ValueError(f"merge_size must be a positive odd number, got {merge_size}")
        if not 0 < percentage <= 1:
            raise ValueError(f"percentage must be in (0, 1], got {percentage}")
        self.merge_size = merge_size
        self.percentage = percentage
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension
        self.num_neighbors = num_neighbors
        self.coreset_projection_dim = coreset_projection_dim
        self.coreset_max_candidates = coreset_max_candidates
        self.seed = seed
        self.register_buffer("memory_bank", torch.empty(0, self.embed_dimension))
        self._train_features: list[Tensor] = []
        self._search: tuple[tuple, NearestNeighbourIndex] | None = None

    @property
    def embed_dimension(self) -> int:
        """Width of one patch feature (and of the memory bank's rows)."""
        if self.target_embed_dimension is not None:
            return self.target_embed_dimension
        per_layer = self.backbone.channels
        if self.pretrain_embed_dimension is not None:
            return self.pretrain_embed_dimension * len(per_layer)
        return sum(per_layer)

    def patch_features(self, batch: PatchBatch) -> Tensor:
        """Locally aware patch features ``[B, h, w, D]`` on the first layer's grid."""
        maps = self.fused_embedding(batch)
        pad = self.merge_size // 2
        # count_include_pad=False keeps border locations (patch seams) on the same scale.
        maps = [F.avg_pool2d(m, self.merge_size, stride=1, padding=pad, count_include_pad=False) for m in maps]
        grid = maps[0].shape[-2:]
        maps = [
            m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in maps
        ]
        layers = [pool_channels(m.permute(0, 2, 3, 1).float(), self.pretrain_embed_dimension) for m in maps]
        return pool_channels(torch.cat(layers, dim=-1), self.target_embed_dimension)

    # ------------------------------------------------------------------ fitting

    def on_train_epoch_start(self) -> None:
        """Start a fresh pass."""
        self._train_features = []

    def accumulate(self, batch: PatchBatch) -> None:
        """Keep the batch's patch features (on the CPU, to bound accelerator memory)."""
        features = self.patch_features(batch)
        self._train_features.append(features.reshape(-1, features.shape[-1]).cpu())

    def has_pending_fit(self) -> bool:
        """Whether features were collected since the bank was last built."""
        return bool(self._train_features)

    def finalize(self) -> None:
        """Build the memory bank from the collected features by greedy coreset selection."""
        features = torch.cat(self._train_features)
        self._train_features = []
        bank = coreset_subsample(
            features,
            self.percentage,
            projection_dim=self.coreset_projection_dim,
            max_candidates=self.coreset_max_candidates,
            seed=self.seed,
            device=self.memory_bank.device,
        )
        self.memory_bank = bank.to(self.memory_bank.device, self.memory_bank.dtype)
        self._search = None
        log.info(f"PatchCore: memory bank of {bank.shape[0]} features from {features.shape[0]}.")

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
        # A bank copied in place keeps its address, so the search index must be dropped here.
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._search = None

    # ------------------------------------------------------------------ scoring

    def _nearest_neighbours(self) -> NearestNeighbourIndex:
        """The search index of the current bank, rebuilt when the bank changes."""
        bank = self.memory_bank
        if bank.shape[0] == 0:
            raise RuntimeError(
                "HRPatchCore has an empty memory bank: fit it (trainer.fit) or load a checkpoint before scoring"
            )
        key = (bank.data_ptr(), tuple(bank.shape), str(bank.device))
        if self._search is None or self._search[0] != key:
            self._search = (key, NearestNeighbourIndex(bank))
        return self._search[1]

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """Distance of each location to its nearest bank features, upsampled to the patch size."""
        index = self._nearest_neighbours()
        features = self.patch_features(batch)
        size, height, width, dim = features.shape
        distances = index.search(features.reshape(-1, dim), self.num_neighbors)
        scores = distances.mean(dim=1).reshape(size, 1, height, width)
        scores = F.interpolate(scores, size=batch.image.shape[-2:], mode="bilinear", align_corners=False)
        return scores[:, 0]


def _check_positive(**values: int | None) -> None:
    """Raise ``ValueError`` naming the first value that is set but not a positive int."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
