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
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors.base import DEFAULT_LAYERS, OnePassDetector
from hiad_pl.detectors.feature_store import STORE_DTYPES, FeatureStore
from hiad_pl.detectors.features import FeatureExtractor
from hiad_pl.detectors.map_model import MoveKeysUnder, PatchMapModel
from hiad_pl.detectors.nn_search import SCAN_DTYPES, SEARCH_KINDS, NearestNeighbourIndex, choose_search_kind
from hiad_pl.postprocess import ImageScore

#: Rows projected at once when the coreset's random projection is applied.
PROJECTION_CHUNK_ROWS = 65536
#: Coreset chunks read from the training features at once (the rows are shuffled within them).
CORESET_CHUNKS_PER_BLOCK = 16

log = logging.getLogger(__name__)

#: How the features around a location are combined: their mean, or kept side by side.
AGGREGATIONS = ("mean", "neighbourhood")
#: How the layers' parts of a feature weigh in the distance: by width, or one share each.
LAYER_WEIGHTINGS = ("channels", "equal")


def pool_channels(features: Tensor, dimension: int | None, as_matrix: bool = False) -> Tensor:
    """Adaptive average pooling of the last (channel) axis of ``features`` down to ``dimension`` values.

    Pooling only ever reduces: features no wider than ``dimension`` are returned
    as they are (averaging cannot add information, it would only repeat channels).
    With ``as_matrix`` the same pooling is one product with a constant matrix (the
    pooled identity): ONNX has no adaptive pooling to sizes that do not divide the
    input (112 channels to 48).
    """
    channels = int(features.shape[-1])
    if dimension is None or dimension >= channels:
        return features
    if as_matrix:
        matrix = F.adaptive_avg_pool1d(torch.eye(channels, device=features.device)[:, None, :], dimension)[:, 0, :]
        return features @ matrix.to(features.dtype)
    pooled = F.adaptive_avg_pool1d(features.reshape(-1, 1, channels), dimension)
    return pooled.reshape(*features.shape[:-1], dimension)


def pooled_width(channels: int, dimension: int | None) -> int:
    """Width of :func:`pool_channels` output for ``channels`` input channels."""
    return channels if dimension is None else min(channels, dimension)


def projection_matrix(dimension_in: int, dimension: int, generator: torch.Generator) -> Tensor | None:
    """Gaussian random matrix ``[D, dimension]`` (Johnson-Lindenstrauss), or ``None`` when ``D <= dimension``."""
    if dimension_in <= dimension:
        return None
    return torch.randn(dimension_in, dimension, generator=generator) / math.sqrt(dimension)


def project(features: Tensor, matrix: Tensor | None, device: torch.device) -> Tensor:
    """``features @ matrix`` in float32 on ``device``, by chunks of rows (only the result is new memory)."""
    if matrix is None:
        return features.to(device, torch.float32)
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


def _read(features: Tensor | FeatureStore, start: int, stop: int) -> Tensor:
    """float32 rows ``start:stop`` of a tensor or a feature store."""
    if isinstance(features, FeatureStore):
        return features.read(start, stop)
    return features[start:stop].float()


def coreset_subsample(
    features: Tensor | FeatureStore,
    percentage: float,
    projection_dim: int = 128,
    max_candidates: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The memory bank: ``percentage`` of ``features`` ``[N, D]`` chosen by greedy k-center.

    ``features`` is a tensor or a :class:`FeatureStore`, read one block of
    ``CORESET_CHUNKS_PER_BLOCK * chunk_size`` rows at a time. Distances are
    measured after a random projection to ``projection_dim`` dimensions; the
    returned rows are the original features (float32). Greedy selection costs
    ``O(percentage * N * C)`` for chunks of ``C`` rows: with ``chunk_size`` set
    and ``N`` larger, each block's rows are shuffled into equal chunks of at most
    ``chunk_size`` and each chunk keeps ``percentage`` of itself (the union of
    per-chunk k-centers covers the whole set: every training feature is
    considered). Without ``chunk_size`` one greedy runs over all rows.
    ``max_candidates`` instead draws a uniform random subset first, which drops
    training features: a warning gives the numbers. ``percentage >= 1`` keeps
    every candidate.
    """
    generator = torch.Generator().manual_seed(seed)
    total = len(features)
    keep: Tensor | None = None
    if max_candidates is not None and total > max_candidates:
        message = (
            f"PatchCore: {total} training features exceed coreset_max_candidates={max_candidates}; "
            f"the coreset is chosen from a random {max_candidates} of them and {total - max_candidates} "
            f"({100 * (total - max_candidates) / total:.1f}%) are dropped. Unset coreset_max_candidates "
            "to consider every feature (coreset_chunk_size bounds the time)."
        )
        log.warning(message)
        warnings.warn(message, stacklevel=2)
        keep = torch.zeros(total, dtype=torch.bool)
        keep[torch.randperm(total, generator=generator)[:max_candidates]] = True
    dimension_in = (features.dim or 0) if isinstance(features, FeatureStore) else features.shape[1]
    device = torch.device(device) if device is not None else torch.device("cpu")
    matrix = projection_matrix(int(dimension_in), projection_dim, generator)
    block = total if chunk_size is None else chunk_size * CORESET_CHUNKS_PER_BLOCK
    bank = []
    for start in range(0, total, block):
        rows = _read(features, start, start + block)
        if keep is not None:
            rows = rows[keep[start : start + block]]
        if percentage >= 1 or len(rows) == 0:
            bank.append(rows)
            continue
        if chunk_size is None or len(rows) <= chunk_size:
            chunks = [torch.arange(len(rows))]
        else:
            chunks = list(torch.randperm(len(rows), generator=generator).tensor_split(math.ceil(len(rows) / chunk_size)))
        for chunk in chunks:
            count = max(1, math.ceil(percentage * len(chunk)))
            projected = project(rows[chunk], matrix, device)
            bank.append(rows[chunk[greedy_coreset_indices(projected, count, generator).cpu()]])
    if chunk_size is not None and total > chunk_size and percentage < 1:
        log.info(f"PatchCore: coreset over all {total} features in chunks of at most {chunk_size}.")
    return torch.cat(bank)


class PatchCoreModel(PatchMapModel):
    """PatchCore's scoring: locally aware features of the backbone maps and their distance to the memory bank.

    Args:
        layer_channels: channels of each backbone layer the maps come from (shallow to deep).
        merge_size: side of the neighbourhood aggregated around each location (odd).
        aggregation: ``mean`` or ``neighbourhood`` (see :class:`HRPatchCore`).
        layer_weighting: ``channels`` or ``equal`` (see :class:`HRPatchCore`).
        pretrain_embed_dimension: channels each layer is pooled down to (``None``: all).
        target_embed_dimension: channels the joined feature is pooled down to (``None``: all).
        num_neighbors: a location scores its mean distance to this many nearest bank features.
        search: nearest-neighbour search: ``exact``, ``ivf``, ``hnsw`` or ``auto``.
        exact_search_max_bank: largest bank ``auto`` searches exactly.
        search_nprobe: IVF cells each query scans.
        search_precision: precision of the IVF scan: ``float32``, ``bfloat16`` or ``auto``.
        seed: seed of the IVF cells.

    The bank (``memory_bank``, ``[M, D]``) is a buffer, empty until
    :meth:`set_memory_bank` or a loaded state dict fills it. The search index is
    built from it on first use and rebuilt whenever the bank changes.
    """

    resizable_buffers = ("memory_bank",)

    def __init__(
        self,
        layer_channels: Sequence[int],
        merge_size: int = 3,
        aggregation: str = "mean",
        layer_weighting: str = "channels",
        pretrain_embed_dimension: int | None = None,
        target_embed_dimension: int | None = None,
        num_neighbors: int = 1,
        search: str = "auto",
        exact_search_max_bank: int = 10_000,
        search_nprobe: int = 8,
        search_precision: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_positive(
            pretrain_embed_dimension=pretrain_embed_dimension,
            target_embed_dimension=target_embed_dimension,
            num_neighbors=num_neighbors,
            exact_search_max_bank=exact_search_max_bank,
            search_nprobe=search_nprobe,
        )
        if search not in SEARCH_KINDS:
            raise ValueError(f"search must be one of {SEARCH_KINDS}, got {search!r}")
        if search_precision not in SCAN_DTYPES:
            raise ValueError(f"search_precision must be one of {SCAN_DTYPES}, got {search_precision!r}")
        if merge_size < 1 or merge_size % 2 == 0:
            raise ValueError(f"merge_size must be a positive odd number, got {merge_size}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if layer_weighting not in LAYER_WEIGHTINGS:
            raise ValueError(f"layer_weighting must be one of {LAYER_WEIGHTINGS}, got {layer_weighting!r}")
        self.layer_channels = [int(c) for c in layer_channels]
        self.merge_size = merge_size
        self.aggregation = aggregation
        self.layer_weighting = layer_weighting
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension
        self.num_neighbors = num_neighbors
        self.search = search
        self.exact_search_max_bank = exact_search_max_bank
        self.search_nprobe = search_nprobe
        self.search_precision = search_precision
        self.seed = seed
        self.memory_bank: Tensor
        self.register_buffer("memory_bank", torch.empty(0, self.embed_dimension))
        self._search: tuple[tuple, NearestNeighbourIndex] | None = None
        self._graph_ops = False

    @property
    def embed_dimension(self) -> int:
        """Width of one patch feature (and of the memory bank's rows)."""
        return pooled_width(sum(self._layer_widths()), self.target_embed_dimension)

    def _layer_widths(self) -> list[int]:
        """Width of each layer's part of a feature, after its pooling."""
        spread = self.merge_size**2 if self.aggregation == "neighbourhood" else 1
        return [pooled_width(c * spread, self.pretrain_embed_dimension) for c in self.layer_channels]

    def locally_aware_features(self, maps: Sequence[Tensor]) -> Tensor:
        """``[B, h, w, D]`` features from per-layer (fused) maps: neighbourhoods aggregated, layers joined and pooled."""
        grid = maps[0].shape[-2:]
        size = self.merge_size
        if self.aggregation == "mean":
            # count_include_pad=False keeps border locations (patch seams) on the same scale.
            maps = [F.avg_pool2d(m, size, stride=1, padding=size // 2, count_include_pad=False) for m in maps]
        elif size > 1:
            maps = [F.unfold(m, size, padding=size // 2).reshape(m.shape[0], -1, *m.shape[-2:]) for m in maps]
        maps = [
            m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in maps
        ]
        matrix = self._graph_ops
        layers = [pool_channels(m.permute(0, 2, 3, 1).float(), self.pretrain_embed_dimension, matrix) for m in maps]
        if self.layer_weighting == "equal" and len(layers) > 1:
            widest = max(layer.shape[-1] for layer in layers)
            layers = [layer * math.sqrt(widest / layer.shape[-1]) for layer in layers]
        return pool_channels(torch.cat(layers, dim=-1), self.target_embed_dimension, matrix)

    def set_memory_bank(self, bank: Tensor) -> None:
        """Replace the memory bank (kept on the bank buffer's device and dtype); the search index follows."""
        self.memory_bank = bank.to(self.memory_bank.device, self.memory_bank.dtype)
        self._search = None

    def nearest_neighbours(self) -> NearestNeighbourIndex:
        """The search index of the current bank, rebuilt when the bank changes.

        Raises:
            RuntimeError: when the bank is empty (nothing fitted or loaded).
        """
        bank = self._fitted_bank()
        key = (bank.data_ptr(), tuple(bank.shape), str(bank.device))
        if self._search is None or self._search[0] != key:
            kind = choose_search_kind(bank.shape[0], self.search, self.exact_search_max_bank)
            index = NearestNeighbourIndex(
                bank, kind=kind, nprobe=self.search_nprobe, seed=self.seed, scan_dtype=self.search_precision
            )
            self._search = (key, index)
        return self._search[1]

    def _fitted_bank(self) -> Tensor:
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError(
                "PatchCore has an empty memory bank: fit it (trainer.fit) or load a checkpoint before scoring"
            )
        return self.memory_bank

    @contextmanager
    def traceable(self) -> Iterator[None]:
        """Within the block, score with traceable operations of the same values.

        The k-NN becomes ``|x|^2 - 2 x.b + |b|^2`` against the whole bank, a
        top-k and a square root (exact search, whatever :attr:`search` says), and
        channel pooling a matrix product (:func:`pool_channels`).
        """
        previous, self._graph_ops = self._graph_ops, True
        try:
            yield
        finally:
            self._graph_ops = previous

    def _exact_distances(self, queries: Tensor, k: int) -> Tensor:
        """Distances ``[N, k]`` of ``queries`` to their ``k`` nearest bank rows, in traceable operations."""
        bank = self._fitted_bank().float()
        squared = queries.square().sum(1, keepdim=True) - 2 * queries @ bank.T + bank.square().sum(1)[None]
        k = max(1, min(k, bank.shape[0]))
        return squared.topk(k, dim=1, largest=False).values.clamp_min(0).sqrt()

    def forward(self, features: Sequence[Tensor], output_size: Sequence[int]) -> Tensor:
        """Mean distance of each location to its nearest bank features, upsampled to ``output_size``."""
        embedding = self.locally_aware_features(features)
        size, height, width, dim = embedding.shape
        queries = embedding.reshape(-1, dim)
        if self._graph_ops:
            distances = self._exact_distances(queries, self.num_neighbors)
        else:
            distances = self.nearest_neighbours().search(queries, self.num_neighbors)
        scores = distances.mean(dim=1).reshape(size, 1, height, width)
        return F.interpolate(scores, size=output_size, mode="bilinear", align_corners=False)[:, 0]

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        # A bank copied in place keeps its address, so the search index must be dropped here.
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._search = None


class HRPatchCore(OnePassDetector):
    """PatchCore on high-resolution patches, fitted in one pass.

    Args:
        backbone_name: timm backbone (or tutorial alias, e.g. ``wideresnet50``).
        layers_to_extract_from: backbone layers whose features are combined; deeper
            layers are upsampled to the first layer's grid, which is the score grid.
        weights: backbone weights: ``hub``, ``offline``, ``none`` or a file path.
        input_size: ``(width, height)`` or one int: patch size the detector sees.
        fusion_weights: multi-resolution fusion weights (see :class:`HRDetector`).
        merge_size: side of the neighbourhood aggregated around each feature
            location (odd; 1 disables local aggregation).
        aggregation: ``mean`` (each channel averaged over the neighbourhood: ``C``
            values per layer) or ``neighbourhood`` (the ``merge_size**2`` positions kept
            side by side, zero-padded at the patch border: ``C * merge_size**2``
            values, what the reference implementation's unfold-and-pool keeps for
            narrow layers such as EfficientNet-Lite0's).
        layer_weighting: ``equal`` (each layer's part is scaled by
            ``1 / sqrt(width)``, so every layer weighs the same in the squared
            distance whatever its width: the weighting the reference gets by
            pooling every layer to ``pretrain_embed_dimension`` values, without
            repeating channels) or ``channels`` (every value weighs the same, so a
            wider layer weighs more).
        percentage: fraction of the training features kept in the bank (1: no coreset,
            every feature is searched, best with an approximate ``search``).
        pretrain_embed_dimension: channels each layer is average-pooled down to before
            concatenation (a layer with fewer channels keeps them); ``None`` keeps every channel.
        target_embed_dimension: channels the concatenated feature is pooled down to
            (never up); ``None`` keeps the concatenation's width.
        num_neighbors: the score is the mean distance to this many nearest bank features.
        coreset_projection_dim: dimension of the random projection on which the
            greedy coreset measures distances.
        coreset_max_candidates: most training features the greedy coreset
            considers; beyond it a random subset is drawn first and the rest are
            dropped (a warning gives the numbers). ``None`` (the default) considers all.
        coreset_chunk_size: greedy selection runs on shuffled chunks of at most
            this many features (each keeps ``percentage`` of itself), so its time
            is linear in the number of features; ``None`` runs one greedy over all
            of them (the paper's setting; quadratic time).
        feature_dtype: how training features are streamed to disk during the
            pass: ``float32`` (the default: the bank holds the exact features) or
            ``float16`` (half the disk; bank rows rounded to half precision).
        search: nearest-neighbour search: ``exact``, ``ivf``, ``hnsw`` or ``auto``
            (exact up to ``exact_search_max_bank`` bank features, IVF above).
        exact_search_max_bank: largest bank ``auto`` searches exactly.
        search_nprobe: IVF cells each query scans (more: slower, closer to exact).
        search_precision: precision of the IVF scan that scores: ``float32``,
            ``bfloat16`` (1.5x as fast on a CPU with native bfloat16 products,
            distances within 0.14% of float32's on average) or ``auto`` (bfloat16
            on such a CPU, float32 elsewhere).
        seed: seed of the projection, the coreset's start and chunks, and the IVF cells.
        image_score: overrides of the image-score rule (default: the largest 32 x 32 window mean; HiAD
            uses 16 x 16, which ranks images worse on the real benchmark, docs/results.md; see
            :class:`HRDetector`).

    The method lives in :attr:`model` (a :class:`PatchCoreModel`), whose bank
    (``model.memory_bank``, ``[M, D]``) is a buffer saved in checkpoints.
    During the pass the training features are streamed to a temporary file
    (``N x D x 4`` bytes for ``N`` locations, half in float16); resident memory is one
    block of features (16 coreset chunks) plus the bank.
    """

    scores_shared_embedding = True
    #: The largest 32 x 32 window mean: over the three real sets, paired, image AUROC +0.032
    #: [+0.016, +0.050] above HiAD's 16 x 16 window; 64 x 64 is not better than 32 (+0.013
    #: [-0.006, +0.030]) and would average a few-pixel defect away on finer maps.
    default_image_score: ClassVar[ImageScore] = ImageScore(window=32)

    def __init__(
        self,
        backbone_name: str = "efficientnet_lite0",
        layers_to_extract_from: Sequence[str] = DEFAULT_LAYERS,
        weights: str = "hub",
        input_size: int | tuple[int, int] = 512,
        fusion_weights: Sequence[float] | None = None,
        merge_size: int = 3,
        aggregation: str = "mean",
        layer_weighting: str = "channels",
        percentage: float = 0.1,
        pretrain_embed_dimension: int | None = None,
        target_embed_dimension: int | None = None,
        num_neighbors: int = 1,
        coreset_projection_dim: int = 128,
        coreset_max_candidates: int | None = None,
        coreset_chunk_size: int | None = 8192,
        feature_dtype: str = "float32",
        search: str = "auto",
        exact_search_max_bank: int = 10_000,
        search_nprobe: int = 8,
        search_precision: str = "auto",
        seed: int = 0,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__(
            backbone_name, layers_to_extract_from, weights, input_size, fusion_weights, image_score=image_score
        )
        _check_positive(
            coreset_projection_dim=coreset_projection_dim,
            coreset_max_candidates=coreset_max_candidates,
            coreset_chunk_size=coreset_chunk_size,
        )
        if feature_dtype not in STORE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {sorted(STORE_DTYPES)}, got {feature_dtype!r}")
        if not 0 < percentage <= 1:
            raise ValueError(f"percentage must be in (0, 1], got {percentage}")
        #: The method: locally aware features, the memory bank and its search (what export traces).
        self.model = PatchCoreModel(
            cast(FeatureExtractor, self.backbone).channels,
            merge_size=merge_size,
            aggregation=aggregation,
            layer_weighting=layer_weighting,
            pretrain_embed_dimension=pretrain_embed_dimension,
            target_embed_dimension=target_embed_dimension,
            num_neighbors=num_neighbors,
            search=search,
            exact_search_max_bank=exact_search_max_bank,
            search_nprobe=search_nprobe,
            search_precision=search_precision,
            seed=seed,
        )
        self.percentage = percentage
        self.coreset_projection_dim = coreset_projection_dim
        self.coreset_max_candidates = coreset_max_candidates
        self.coreset_chunk_size = coreset_chunk_size
        self.feature_dtype = feature_dtype
        self.seed = seed
        self._train_features: FeatureStore | None = None
        # checkpoints written before the bank moved into the model kept it at the top level
        self.register_load_state_dict_pre_hook(MoveKeysUnder(("memory_bank",)))

    def patch_features(self, batch: PatchBatch) -> Tensor:
        """Locally aware patch features ``[B, h, w, D]`` on the first layer's grid."""
        return self.model.locally_aware_features(self.fused_embedding(batch))

    # ------------------------------------------------------------------ fitting

    def on_train_epoch_start(self) -> None:
        """Start a fresh pass."""
        self._drop_train_features()

    def _drop_train_features(self) -> None:
        if self._train_features is not None:
            self._train_features.close()
        self._train_features = None

    def accumulate(self, batch: PatchBatch) -> None:
        """Stream the batch's patch features to the pass's feature file."""
        if self._train_features is None:
            self._train_features = FeatureStore(self.feature_dtype)
        features = self.patch_features(batch)
        self._train_features.append(features.reshape(-1, features.shape[-1]))

    def has_pending_fit(self) -> bool:
        """Whether features were collected since the bank was last built."""
        return self._train_features is not None and len(self._train_features) > 0

    def finalize(self) -> None:
        """Build the memory bank from the streamed features by greedy coreset selection."""
        store = self._train_features
        if store is None:
            raise RuntimeError("HRPatchCore.finalize: no training features were accumulated")
        try:
            bank = coreset_subsample(
                store,
                self.percentage,
                projection_dim=self.coreset_projection_dim,
                max_candidates=self.coreset_max_candidates,
                seed=self.seed,
                device=self.model.memory_bank.device,
                chunk_size=self.coreset_chunk_size,
            )
        finally:
            self._drop_train_features()
        self.model.set_memory_bank(bank)
        log.info(f"PatchCore: memory bank of {bank.shape[0]} features from {len(store)}.")

    # ------------------------------------------------------------------ scoring

    def prepare_scoring(self) -> None:
        """Build the search index of the fitted bank (an empty bank is left for scoring to report)."""
        if self.model.memory_bank.shape[0]:
            self.model.nearest_neighbours()

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """Distance of each location to its nearest bank features, upsampled to the patch size."""
        return self.model(self.fused_embedding(batch), batch.image.shape[-2:])

    def score_embedding(self, embedding: list[Tensor], batch: PatchBatch) -> Tensor:
        """:meth:`anomaly_map` from the patches' fused backbone maps."""
        return self.model(embedding, batch.image.shape[-2:])


def _check_positive(**values: int | None) -> None:
    """Raise ``ValueError`` naming the first value that is set but not a positive int."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
