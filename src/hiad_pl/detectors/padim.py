"""PaDiM: a multivariate Gaussian of normal features at every position of the patch.

Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization" (ICPR 2021). The features of the chosen backbone
layers are upsampled to the first layer's grid and concatenated; a random,
seeded subset of ``d_reduced`` channels is kept. Every grid position gets the
mean and the regularised covariance (``+ epsilon * I``) of the training
features seen there, and a test feature scores its Mahalanobis distance to its
position's Gaussian.

Memory. Fitting streams the features: per batch it adds to the running sum
``[P, d]`` and sum of outer products ``[P, d, d]`` (float64, so that the
one-pass covariance ``(S2 - n mu mu^T) / (n - 1)`` loses no precision), never
keeping the features themselves. The fitted state is the mean ``[P, d]`` and
the inverse covariance ``[P, d, d]`` in float32, for ``P`` grid positions.
With the defaults (EfficientNet-Lite0 ``blocks.2``/``blocks.4``, stride 8,
``d_reduced=100``) and 512 px patches, ``P = 64 * 64 = 4096``:

* inverse covariance ``4096 * 100 * 100 * 4 B = 164 MB`` per task (in the
  checkpoint and on the scoring device);
* while fitting, the float64 accumulator adds ``328 MB`` (freed once fitted).

The cost grows as ``P * d^2``: WideResNet-50 ``layer2``/``layer3`` with
``d_reduced=550`` (the paper's width) at 512 px holds ``4096 * 550^2 * 4 B =
4.96 GB`` per task.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors.base import DEFAULT_LAYERS, OnePassDetector
from hiad_pl.detectors.features import FeatureExtractor
from hiad_pl.detectors.map_model import MoveKeysUnder, PatchMapModel
from hiad_pl.postprocess import ImageScore

#: Matrix elements inverted at once when the covariances are inverted (bounds temporary memory).
INVERSION_CHUNK_ELEMENTS = 1 << 24


def select_channels(total: int, d_reduced: int | None, seed: int) -> Tensor:
    """Sorted indices of ``d_reduced`` of ``total`` channels, drawn at random with ``seed`` (all when ``None``).

    Raises:
        ValueError: when ``d_reduced`` is not a positive integer no larger than ``total``.
    """
    if d_reduced is None:
        return torch.arange(total)
    if not isinstance(d_reduced, int) or not 1 <= d_reduced <= total:
        raise ValueError(
            f"d_reduced must be an integer in [1, {total}] (the channels of the chosen layers), got {d_reduced!r}"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:d_reduced].sort().values


@contextmanager
def single_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block with one intra-op thread when ``device`` is the CPU.

    Batched small-matrix LAPACK calls nest the math library's threads inside
    torch's parallel loop over the batch; on a few busy cores this is orders of
    magnitude slower than one thread (4096 inverses of 100 x 100: 0.8 s on one
    thread, over 100 s on two).
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gaussian_statistics(
    count: int, feature_sum: Tensor, outer_sum: Tensor, epsilon: float
) -> tuple[Tensor, Tensor]:
    """Mean ``[P, d]`` and inverse regularised covariance ``[P, d, d]`` (float32) from running sums.

    ``outer_sum`` (float64, the sum of ``x x^T`` per position) is overwritten with
    the covariance to keep the peak memory at one ``[P, d, d]`` float64 array plus
    the float32 result; the covariance is unbiased (``n - 1``), as ``numpy.cov``.
    """
    mean = feature_sum / count
    covariance = outer_sum.baddbmm_(mean.unsqueeze(2), mean.unsqueeze(1), alpha=-count)
    covariance.div_(max(count - 1, 1))
    covariance.diagonal(dim1=-2, dim2=-1).add_(epsilon)
    dim = covariance.shape[-1]
    inverse = torch.empty(covariance.shape, dtype=torch.float32, device=covariance.device)
    step = max(1, INVERSION_CHUNK_ELEMENTS // (dim * dim))
    with single_cpu_thread(covariance.device):
        for start in range(0, covariance.shape[0], step):
            # Covariance + epsilon * I is symmetric positive definite: Cholesky is exact and stable.
            factor = torch.linalg.cholesky(covariance[start : start + step])
            inverse[start : start + step] = torch.cholesky_inverse(factor)
    return mean.float(), inverse


def mahalanobis(features: Tensor, mean: Tensor, inv_covariance: Tensor) -> Tensor:
    """Distances ``[P, B]`` of position-major ``features`` ``[P, B, d]`` to per-position Gaussians."""
    diff = features - mean.unsqueeze(1)
    squared = (torch.bmm(diff, inv_covariance) * diff).sum(-1)
    return squared.clamp_min(0).sqrt()


class PaDiMModel(PatchMapModel):
    """PaDiM's scoring: the Mahalanobis distance of each position's selected features to that position's Gaussian.

    Args:
        total_channels: channels of the backbone layers together (the concatenated map's width).
        d_reduced: channels kept by the random selection (``None`` keeps all).
        seed: seed of the random channel selection.

    The chosen channels (``channel_index``) and the fitted statistics (``mean``
    ``[P, d]``, ``inv_covariance`` ``[P, d, d]``, empty until
    :meth:`set_statistics` or a loaded state dict fills them) are buffers.
    """

    resizable_buffers = ("mean", "inv_covariance")

    def __init__(self, total_channels: int, d_reduced: int | None = 100, seed: int = 0) -> None:
        super().__init__()
        channels = select_channels(total_channels, d_reduced, seed)
        dim = channels.numel()
        self.channel_index: Tensor
        self.mean: Tensor
        self.inv_covariance: Tensor
        self.register_buffer("channel_index", channels)
        self.register_buffer("mean", torch.empty(0, dim))
        self.register_buffer("inv_covariance", torch.empty(0, dim, dim))

    @property
    def feature_dimension(self) -> int:
        """Width ``d`` of the features each Gaussian models."""
        return int(self.channel_index.numel())

    def selected_features(self, maps: Sequence[Tensor]) -> tuple[Tensor, tuple[int, int]]:
        """Selected features of per-layer (fused) maps, position-major ``[P, B, d]`` (float32), and the ``(h, w)`` grid."""
        grid = maps[0].shape[-2:]
        # Nearest upsampling repeats each deep feature over the cells it covers, as the paper's concatenation does.
        maps = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="nearest") for m in maps]
        features = torch.cat(maps, dim=1).index_select(1, self.channel_index).float()
        # Contiguous per-position matrices: batched products on strided views are many times slower.
        positions = features.flatten(2).permute(2, 0, 1).contiguous()
        return positions, (int(grid[0]), int(grid[1]))

    def set_statistics(self, mean: Tensor, inv_covariance: Tensor) -> None:
        """Replace the fitted statistics (kept on the buffers' devices)."""
        self.mean = mean.to(self.mean.device)
        self.inv_covariance = inv_covariance.to(self.inv_covariance.device)

    def forward(self, features: Sequence[Tensor], output_size: Sequence[int]) -> Tensor:
        """Mahalanobis distance of each position to its Gaussian, upsampled to ``output_size``.

        Raises:
            RuntimeError: when nothing was fitted or loaded.
            ValueError: when the maps have another number of positions than the statistics.
        """
        if self.mean.shape[0] == 0:
            raise RuntimeError("PaDiM has no statistics: fit it (trainer.fit) or load a checkpoint before scoring")
        positions, (height, width) = self.selected_features(features)
        if positions.shape[0] != self.mean.shape[0]:
            raise ValueError(
                f"PaDiM was fitted on {self.mean.shape[0]} feature positions but this batch has "
                f"{positions.shape[0]} ({height}x{width}): score patches of the size it was fitted on"
            )
        distances = mahalanobis(positions, self.mean, self.inv_covariance)  # [P, B]
        scores = distances.T.reshape(-1, 1, height, width)
        return F.interpolate(scores, size=output_size, mode="bilinear", align_corners=False)[:, 0]


class HRPaDiM(OnePassDetector):
    """PaDiM on high-resolution patches, fitted in one streaming pass.

    Args:
        backbone_name: timm backbone (or tutorial alias, e.g. ``wideresnet50``).
        layers_to_extract_from: backbone layers whose features are concatenated;
            deeper layers are upsampled (nearest) to the first layer's grid, which
            is the grid of Gaussians.
        weights: backbone weights: ``hub``, ``offline``, ``none`` or a file path.
        input_size: ``(width, height)`` or one int: patch size the detector sees.
        fusion_weights: multi-resolution fusion weights (see :class:`HRDetector`).
        d_reduced: channels kept by the random selection (``None`` keeps all);
            memory grows with its square (see the module docstring).
        epsilon: ridge added to every covariance's diagonal, so that it is invertible.
        seed: seed of the random channel selection.
        image_score: overrides of the image-score rule (default: the largest 16 x 16 window mean, as HiAD
            scores this method; see :class:`HRDetector`).

    The method lives in :attr:`model` (a :class:`PaDiMModel`): the statistics
    (``model.mean`` ``[P, d]``, ``model.inv_covariance`` ``[P, d, d]``) and the chosen
    channels (``model.channel_index``) are buffers saved in checkpoints.
    """

    #: HiAD's option names in its config files (configs/padim.yaml), and ours.
    hiad_option_names: ClassVar[dict[str, str]] = {"embed_dimension": "d_reduced"}
    scores_shared_embedding = True

    def __init__(
        self,
        backbone_name: str = "efficientnet_lite0",
        layers_to_extract_from: Sequence[str] = DEFAULT_LAYERS,
        weights: str = "hub",
        input_size: int | tuple[int, int] = 512,
        fusion_weights: Sequence[float] | None = None,
        d_reduced: int | None = 100,
        epsilon: float = 0.01,
        seed: int = 0,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__(
            backbone_name, layers_to_extract_from, weights, input_size, fusion_weights, image_score=image_score
        )
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive (it keeps the covariances invertible), got {epsilon!r}")
        self.epsilon = float(epsilon)
        #: The method: channel selection and the per-position Gaussians (what export traces).
        self.model = PaDiMModel(sum(cast(FeatureExtractor, self.backbone).channels), d_reduced, seed)
        self._reset_sums()
        # checkpoints written before the statistics moved into the model kept them at the top level
        self.register_load_state_dict_pre_hook(MoveKeysUnder(("channel_index", "mean", "inv_covariance")))

    def gaussian_features(self, batch: PatchBatch) -> tuple[Tensor, tuple[int, int]]:
        """Selected features, position-major ``[P, B, d]`` (float32), and the ``(h, w)`` grid of the ``P`` positions."""
        return self.model.selected_features(self.fused_embedding(batch))

    # ------------------------------------------------------------------ fitting

    def _reset_sums(self) -> None:
        """Forget the running sums of a pass."""
        self._count = 0
        self._feature_sum: Tensor | None = None
        self._outer_sum: Tensor | None = None

    def on_train_epoch_start(self) -> None:
        """Start a fresh pass."""
        self._reset_sums()

    def accumulate(self, batch: PatchBatch) -> None:
        """Add the batch's features to the running sum and sum of outer products (float64)."""
        features = self.gaussian_features(batch)[0].double()  # [P, B, d]
        positions, size, dim = features.shape
        feature_sum, outer_sum = self._feature_sum, self._outer_sum
        if feature_sum is None or outer_sum is None:
            feature_sum = self._feature_sum = features.new_zeros(positions, dim)
            outer_sum = self._outer_sum = features.new_zeros(positions, dim, dim)
        elif feature_sum.shape[0] != positions:
            raise ValueError(
                f"HRPaDiM: a batch has {positions} feature positions but earlier batches had "
                f"{feature_sum.shape[0]}: all training patches must have the same size"
            )
        feature_sum.add_(features.sum(1))
        outer_sum.baddbmm_(features.transpose(1, 2), features)
        self._count += size

    def has_pending_fit(self) -> bool:
        """Whether batches were accumulated since the statistics were last built."""
        return self._count > 0

    def finalize(self) -> None:
        """Turn the running sums into each position's mean and inverse covariance."""
        count, feature_sum, outer_sum = self._count, self._feature_sum, self._outer_sum
        self._reset_sums()
        if feature_sum is None or outer_sum is None:
            raise RuntimeError("HRPaDiM.finalize: no training batches were accumulated")
        mean, inverse = gaussian_statistics(count, feature_sum, outer_sum, self.epsilon)
        del feature_sum, outer_sum
        self.model.set_statistics(mean, inverse)
        rank_zero_info(
            f"PaDiM: {mean.shape[0]} Gaussians of dimension {mean.shape[1]} from {count} patches "
            f"({inverse.numel() * 4 / 1e6:.0f} MB of inverse covariances)."
        )

    # ------------------------------------------------------------------ scoring

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """Mahalanobis distance of each position to its Gaussian, upsampled to the patch size."""
        return self.model(self.fused_embedding(batch), batch.image.shape[-2:])

    def score_embedding(self, embedding: list[Tensor], batch: PatchBatch) -> Tensor:
        """:meth:`anomaly_map` from the patches' fused backbone maps."""
        return self.model(embedding, batch.image.shape[-2:])
