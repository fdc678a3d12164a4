"""Patch embeddings for task generation: how each patch position looks to a detector's backbone.

A patch's embedding is its backbone feature maps (multi-resolution fused when
the detector has ``fusion_weights`` and the indexes carry low-resolution
regions), each layer average-pooled to ``feature_resolution`` cells,
L2-normalised on its own so that every layer weighs the same whatever its
channel count, and concatenated. The result has unit length, so the dot product
of two embeddings is their cosine similarity.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hiad_pl.config import patch_options
from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.datamodule import patch_to_batch
from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionIndex
from hiad_pl.errors import ConfigError, DatasetError, InputError, UserError
from hiad_pl.tasks.base import FeatureTaskGenerator

if TYPE_CHECKING:
    from hiad_pl.detectors.base import HRDetector


def load_detector_class(detector_class: type | str | None, owner: str = "task generator") -> type:
    """The detector class itself; a string is a short name (``patchcore``), class name or import path."""
    if detector_class is None:
        raise ConfigError(
            f"{owner} needs a detector_class (e.g. HRPatchCore) and detector_config to embed patches; "
            "pass them, or let the CLI fill them in from the 'detector' section"
        )
    if isinstance(detector_class, type):
        return detector_class
    from hiad_pl.detectors import get_detector  # the registry loads every detector: only when named

    try:
        return get_detector(str(detector_class))
    except ValueError as error:
        raise ConfigError(f"{owner}: {error}") from error


def resolve_device(device: Sequence[int | str] | int | str | None) -> torch.device:
    """The first of the given devices: GPU ids are CUDA devices; empty or ``None`` is the CPU."""
    if device is None or isinstance(device, (int, str)):
        devices = [] if device is None else [device]
    else:
        devices = list(device)
    if not devices or str(devices[0]) == "cpu":
        return torch.device("cpu")
    first = devices[0]
    if isinstance(first, int) or str(first).isdigit():
        if not torch.cuda.is_available():
            raise ConfigError(f"GPU id {first} requested but CUDA is not available; use device=[] for CPU")
        return torch.device(f"cuda:{int(first)}")
    try:
        return torch.device(str(first))
    except RuntimeError as error:
        raise ConfigError(f"unknown device {first!r}: use GPU ids (0, 1, ...) or 'cpu'") from error


def build_embedding_detector(generator: FeatureTaskGenerator, indexes: Sequence[MultiResolutionIndex]) -> HRDetector:
    """A detector built from a generator's ``detector_class``/``detector_config``, sized to the patches."""
    owner = type(generator).__name__
    cls = load_detector_class(generator.detector_class, owner)
    try:
        kwargs = patch_options(cls, generator.detector_config)
    except ValueError as error:
        raise ConfigError(f"{owner}: bad detector_config: {error}") from error
    if generator.fusion_weights is not None:
        kwargs["fusion_weights"] = list(generator.fusion_weights)
    main = indexes[0].main_index
    try:
        detector = cls(input_size=(main.width, main.height), **kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{owner}: bad detector_config for {cls.__name__}: {error}") from error
    return detector.eval()


def pool_features(features: Sequence[Tensor], feature_resolution: tuple[int, int]) -> Tensor:
    """``[B, D]`` unit-length embeddings from per-layer ``[B, C_l, h_l, w_l]`` maps.

    Each layer is pooled to ``feature_resolution`` (width, height) cells, so all
    layers share one grid, and normalised separately before concatenation.
    """
    width, height = feature_resolution
    parts = [F.normalize(F.adaptive_avg_pool2d(f.float(), (height, width)).flatten(1), dim=1) for f in features]
    return torch.cat(parts, dim=1) / math.sqrt(len(parts))


def check_indexes_fit(samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]) -> None:
    """Raise when a sample is smaller than the area the indexes cover."""
    right = max(i.main_index.x + i.main_index.width for i in indexes)
    bottom = max(i.main_index.y + i.main_index.height for i in indexes)
    for sample in samples:
        width, height = sample.image_size
        if width < right or height < bottom:
            raise InputError(
                f"{sample.get_image_path()}: image size {width}x{height} is smaller than the "
                f"{right}x{bottom} area the patch indexes cover"
            )


def patch_batches(
    samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex], batch_size: int, context_margin: int = 0
) -> Iterator[PatchBatch]:
    """Batches of the patches at ``indexes`` of every sample, image-major, read with ``context_margin``.

    A batch may span two images; each image is decoded once and released as
    soon as its last patch is cut.
    """
    pending: list[PatchBatch] = []
    for image_id, sample in enumerate(samples):
        with sample:
            for index in indexes:
                pending.append(patch_to_batch(sample.patch(index, context_margin), image_id))
                if len(pending) == batch_size:
                    yield PatchBatch.collate(pending)
                    pending = []
    if pending:
        yield PatchBatch.collate(pending)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights live (the CPU for a module without any)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def embed_batch(detector: HRDetector, batch: PatchBatch, feature_resolution: tuple[int, int]) -> Tensor:
    """``[B, D]`` embeddings of one batch, computed on the detector's device."""
    return pool_features(detector.fused_embedding(batch.to(module_device(detector))), feature_resolution)


def iter_patch_embeddings(
    detector: HRDetector,
    samples: Sequence[HRSample],
    indexes: Sequence[MultiResolutionIndex],
    batch_size: int,
    feature_resolution: tuple[int, int],
) -> Iterator[Tensor]:
    """Embeddings ``[B, D]`` (on the CPU) of every (image, index) patch, image-major, batch by batch."""
    total = len(samples) * len(indexes)
    with torch.inference_mode(), tqdm(total=total, desc="embedding patches", unit="patch", disable=None) as bar:
        for batch in patch_batches(samples, indexes, batch_size):
            yield embed_batch(detector, batch, feature_resolution).cpu()
            bar.update(len(batch))


def _prepared(
    generator: FeatureTaskGenerator, samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]
) -> HRDetector:
    """Validate the inputs and build the detector on the generator's first device."""
    owner = type(generator).__name__
    if not samples:
        raise DatasetError(f"{owner}: no training samples to embed")
    if not indexes:
        raise ConfigError(f"{owner}: no patch indexes to assign: check image_size and patch_size")
    check_indexes_fit(samples, indexes)
    return build_embedding_detector(generator, indexes).to(resolve_device(generator.device))


def patch_embeddings(
    generator: FeatureTaskGenerator, samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]
) -> np.ndarray:
    """``[n_images, n_indexes, D]`` unit-length embedding of every training patch."""
    detector = _prepared(generator, samples, indexes)
    chunks = list(iter_patch_embeddings(detector, samples, indexes, generator.batch_size, generator.feature_resolution))
    return torch.cat(chunks).reshape(len(samples), len(indexes), -1).numpy()


def index_embeddings(
    generator: FeatureTaskGenerator, samples: Sequence[HRSample], indexes: Sequence[MultiResolutionIndex]
) -> np.ndarray:
    """``[n_indexes, D]`` unit-length mean embedding of each index over the training images.

    Sums are accumulated batch by batch, so memory does not grow with the
    number of images.
    """
    detector = _prepared(generator, samples, indexes)
    sums: Tensor | None = None
    start = 0
    for chunk in iter_patch_embeddings(detector, samples, indexes, generator.batch_size, generator.feature_resolution):
        if sums is None:
            sums = torch.zeros(len(indexes), chunk.shape[1], dtype=torch.float64)
        positions = torch.arange(start, start + len(chunk)) % len(indexes)
        sums.index_add_(0, positions, chunk.double())
        start += len(chunk)
    assert sums is not None  # _prepared refuses empty samples and indexes
    return F.normalize(sums, dim=1).float().numpy()
