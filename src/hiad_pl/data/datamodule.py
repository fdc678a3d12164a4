"""Datasets and loaders: per-task patches, thumbnails, validation patches, whole test images."""

from __future__ import annotations

import math
import random
from typing import Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.sample import HRSample, LRPatch
from hiad_pl.data.tiling import MultiResolutionIndex, Size, as_pair

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

Synthesizer = Callable[..., LRPatch]
MIN_VALIDATION_THUMBNAILS = 16
#: Fewer validation patches than this give a task unreliable normalisation statistics (a warning says so).
MIN_RELIABLE_VALIDATION_PATCHES = 32


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` ImageNet-normalised float."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (tensor - IMAGENET_MEAN) / IMAGENET_STD


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`image_to_tensor` for one ``[3, H, W]`` image."""
    image = (tensor.detach().cpu().float() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def patch_to_batch(patch: LRPatch, image_id: int = 0, default_label: int = -1) -> PatchBatch:
    """One :class:`LRPatch` as a batch of size 1."""
    h, w = patch.image.shape[:2]
    mask = torch.zeros(1, h, w) if patch.mask is None else torch.from_numpy((patch.mask > 0).astype(np.float32))[None]
    label = default_label if patch.label is None else int(patch.label)
    main = patch.main_index
    index = torch.tensor([[0, 0, w, h] if main is None else [main.x, main.y, main.width, main.height]])
    low_images = low_windows = None
    if patch.low_resolution_images:
        low_images = torch.stack([image_to_tensor(i) for i in patch.low_resolution_images])[None]
        low_windows = torch.tensor([[[i.x, i.y, i.width, i.height] for i in patch.low_resolution_indexes]])
    return PatchBatch(
        image=image_to_tensor(patch.image)[None],
        mask=mask,
        label=torch.tensor([label]),
        index=index,
        low_resolution_images=low_images,
        low_resolution_windows=low_windows,
        clsname=[patch.clsname or "unknown"],
        image_id=torch.tensor([image_id]),
    )


class _OpenSampleCache:
    """Keeps the most recently used sample decoded (one per worker process)."""

    def __init__(self) -> None:
        self.current: HRSample | None = None

    def get(self, sample: HRSample) -> HRSample:
        if self.current is not sample:
            if self.current is not None:
                self.current.close()
            self.current = sample.open()
        return sample


class PatchDataset(Dataset):
    """The patches at ``indexes`` of every sample; item ``k`` is (image ``k // n``, index ``k % n``).

    Items are image-major so a loader reading them in order decodes each
    high-resolution image once per batch instead of once per patch. With a
    ``synthesizer``, each item gets a synthetic anomaly drawn from a generator
    seeded by ``(seed, item)``: the same item is always the same validation patch.
    """

    def __init__(
        self,
        samples: Sequence[HRSample],
        indexes: Sequence[MultiResolutionIndex],
        synthesizer: Synthesizer | None = None,
        seed: int = 0,
        items: Sequence[int] | None = None,
    ) -> None:
        if not samples:
            raise ValueError("PatchDataset needs at least one sample")
        if not indexes:
            raise ValueError("PatchDataset needs at least one patch index")
        self.samples = list(samples)
        self.indexes = list(indexes)
        self.synthesizer = synthesizer
        self.seed = seed
        self.items = list(range(len(self.samples) * len(self.indexes))) if items is None else list(items)
        self._cache = _OpenSampleCache()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> PatchBatch:
        item = self.items[position]
        image_id, index_id = divmod(item, len(self.indexes))
        sample = self._cache.get(self.samples[image_id])
        patch = sample[self.indexes[index_id]]
        if self.synthesizer is not None:
            patch = self.synthesizer(patch, rng=np.random.default_rng([self.seed, item]))
        return patch_to_batch(patch, image_id, default_label=sample.label if sample.label is not None else 0)


class ThumbnailDataset(Dataset):
    """Whole images resized to ``thumbnail_size`` (with optional synthetic anomalies).

    ``repeats`` > 1 visits every image several times, each time with its own
    synthetic anomaly: a validation set of a few held-out images still gets
    enough normal and anomalous thumbnails.
    """

    def __init__(
        self,
        samples: Sequence[HRSample],
        thumbnail_size: Size,
        synthesizer: Synthesizer | None = None,
        seed: int = 0,
        repeats: int = 1,
    ) -> None:
        if not samples:
            raise ValueError("ThumbnailDataset needs at least one sample")
        self.samples = list(samples)
        self.thumbnail_size = as_pair(thumbnail_size, "thumbnail_size")
        self.synthesizer = synthesizer
        self.seed = seed
        self.repeats = max(1, int(repeats))

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def __getitem__(self, item: int) -> PatchBatch:
        sample = self.samples[item % len(self.samples)]
        with sample:
            patch = sample.down_sampling_to_LR(self.thumbnail_size)
        if self.synthesizer is not None:
            patch = self.synthesizer(patch, rng=np.random.default_rng([self.seed, item]))
        return patch_to_batch(patch, item, default_label=0)


class ImageGroupedSampler(Sampler[int]):
    """Image-major order; with ``shuffle``, images and the patches within each image are shuffled.

    Keeps consecutive items on the same image (one decode per batch) while still
    changing the order every epoch for gradient-trained detectors.
    """

    def __init__(self, dataset: PatchDataset, shuffle: bool, seed: int = 0) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset.indexes)
        groups: dict[int, list[int]] = {}
        for position, item in enumerate(self.dataset.items):
            groups.setdefault(item // n, []).append(position)
        order = list(groups)
        if self.shuffle:
            rng = random.Random(self.seed + self.epoch)
            self.epoch += 1
            rng.shuffle(order)
            for image_id in order:
                rng.shuffle(groups[image_id])
        for image_id in order:
            yield from groups[image_id]


def patch_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A loader of :class:`PatchBatch` for a patch or thumbnail dataset."""
    sampler = ImageGroupedSampler(dataset, shuffle, seed) if isinstance(dataset, PatchDataset) else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle if sampler is None else False,
        num_workers=num_workers,
        collate_fn=PatchBatch.collate,
        persistent_workers=False,
        pin_memory=False,
    )


def split_validation(
    samples: Sequence[HRSample], ratio: float, seed: int = 0
) -> tuple[list[HRSample], list[HRSample]]:
    """Hold out ``ratio`` of the training samples (at least one, never all) for validation."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"val_sample_ratio must be in (0, 1), got {ratio}")
    if len(samples) < 2:
        raise ValueError("a validation set needs at least 2 training images")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    count = min(len(samples) - 1, max(1, round(ratio * len(samples))))
    held = set(order[:count])
    train = [s for k, s in enumerate(samples) if k not in held]
    val = [s for k, s in enumerate(samples) if k in held]
    return train, val


def capped_items(
    num_images: int, num_indexes: int, max_items: int | None, seed: int = 0, items: Sequence[int] | None = None
) -> list[int] | None:
    """A seeded subset of at most ``max_items`` (image, index) items, or ``None`` for all.

    ``items`` restricts the choice to those items (all of them are kept when
    they are no more than ``max_items``).
    """
    pool = range(num_images * num_indexes) if items is None else sorted(items)
    if max_items is None or max_items >= len(pool):
        return None if items is None else list(pool)
    return sorted(random.Random(seed).sample(pool, max_items))


class HighResDataModule(L.LightningDataModule):
    """Loaders of one task: its training patches, and validation patches with synthetic anomalies.

    The orchestrator builds one per task; a task with ``thumbnail_size`` gets
    whole downscaled images instead of patches. ``train_items`` and
    ``val_items`` restrict training and validation to chosen (image, index)
    items (retrieval tasks train and validate on the patches routed to them).
    """

    def __init__(
        self,
        train_samples: Sequence[HRSample],
        indexes: Sequence[MultiResolutionIndex] = (),
        thumbnail_size: Size | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle: bool = False,
        val_samples: Sequence[HRSample] = (),
        val_synthesizer: Synthesizer | None = None,
        max_val_patches: int | None = None,
        seed: int = 0,
        train_items: Sequence[int] | None = None,
        val_items: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.train_samples = list(train_samples)
        self.indexes = list(indexes)
        self.thumbnail_size = thumbnail_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.val_samples = list(val_samples)
        self.val_synthesizer = val_synthesizer
        self.max_val_patches = max_val_patches
        self.seed = seed
        self.train_items = None if train_items is None else list(train_items)
        if self.train_items is not None and not self.train_items:
            raise ValueError("this task was assigned no training patches")
        self.val_items = None if val_items is None else list(val_items)

    def _dataset(
        self,
        samples: Sequence[HRSample],
        synthesizer: Synthesizer | None,
        cap: int | None,
        items: Sequence[int] | None = None,
    ) -> Dataset:
        if self.thumbnail_size is not None:
            repeats = 1 if synthesizer is None else math.ceil(MIN_VALIDATION_THUMBNAILS / len(samples))
            return ThumbnailDataset(samples, self.thumbnail_size, synthesizer, self.seed, repeats)
        chosen = capped_items(len(samples), len(self.indexes), cap, self.seed, items)
        return PatchDataset(samples, self.indexes, synthesizer, self.seed, chosen)

    def train_dataloader(self) -> DataLoader:
        """Training patches (normal images only)."""
        if self.train_items is not None:
            dataset: Dataset = PatchDataset(self.train_samples, self.indexes, None, self.seed, self.train_items)
        else:
            dataset = self._dataset(self.train_samples, None, None)
        return patch_loader(dataset, self.batch_size, self.num_workers, self.shuffle, self.seed)

    def val_dataloader(self) -> DataLoader | list:
        """Validation patches with synthetic anomalies, or nothing without a validation set."""
        if not self.val_samples or self.val_items == []:
            return []
        dataset = self._dataset(self.val_samples, self.val_synthesizer, self.max_val_patches, self.val_items)
        return patch_loader(dataset, self.batch_size, self.num_workers, False, self.seed)

    @property
    def num_val_patches(self) -> int:
        """How many validation patches (or thumbnails) the task is validated on."""
        if not self.has_validation:
            return 0
        return len(self._dataset(self.val_samples, self.val_synthesizer, self.max_val_patches, self.val_items))

    @property
    def has_validation(self) -> bool:
        """Whether a validation set is configured."""
        return bool(self.val_samples) and self.val_items != []
