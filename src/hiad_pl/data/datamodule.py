"""Datasets and loaders: per-task patches, thumbnails, validation patches, whole test images."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.sample import HRSample, LRPatch
from hiad_pl.data.tiling import HRImageIndex, MultiResolutionIndex, Size, as_pair, crop_with_margin

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
#: ``(x / 255 - mean) / std`` as one multiply-add per pixel: ``x * _PIXEL_SCALE + _PIXEL_SHIFT``.
_PIXEL_SCALE, _PIXEL_SHIFT = 1 / (255 * IMAGENET_STD), -IMAGENET_MEAN / IMAGENET_STD

Synthesizer = Callable[..., LRPatch]
MIN_VALIDATION_THUMBNAILS = 16
#: Fewer validation patches than this give a task unreliable normalisation statistics (a warning says so).
MIN_RELIABLE_VALIDATION_PATCHES = 32


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` ImageNet-normalised float."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return torch.addcmul(_PIXEL_SHIFT, tensor, _PIXEL_SCALE, out=tensor)  # one pass, in place


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
    if patch.low_resolution_images and patch.low_resolution_indexes is not None:
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


def image_patches_to_batch(
    image: np.ndarray,
    indexes: Sequence[HRImageIndex],
    image_id: int = 0,
    label: int | None = None,
    clsname: str | None = None,
    context_margin: int = 0,
) -> PatchBatch:
    """The equal-size patches of one decoded ``[H, W, 3]`` uint8 image at ``indexes``, as one batch.

    For scoring: each patch is converted straight into its place in a
    channels-last ``[N, 3, h, w]`` float tensor (the layout the shared frozen
    backbone runs in), then the whole batch is ImageNet-normalised in one
    multiply-add, the same values :func:`patch_to_batch` gives patch by patch
    without its per-patch copies and concatenation. The masks are a zero-stride
    view of one zero (nothing is allocated for them): a scoring batch has no
    ground truth. With ``context_margin`` each patch is read widened by the
    margin on every side (:func:`~hiad_pl.data.tiling.crop_with_margin`); the
    batch's ``index`` stays the patches themselves.
    """
    if not indexes:
        raise ValueError("no patch indexes")
    h, w = indexes[0].height, indexes[0].width
    if any((i.height, i.width) != (h, w) for i in indexes):
        raise ValueError(f"patches of one batch must share one size; got {sorted({(i.width, i.height) for i in indexes})}")
    with warnings.catch_warnings():  # decoded images are read-only arrays; they are only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pixels = torch.from_numpy(image)
    margin = context_margin
    planes = torch.empty(len(indexes), h + 2 * margin, w + 2 * margin, 3)
    height, width = image.shape[:2]
    for k, index in enumerate(indexes):
        x0, y0 = index.x - margin, index.y - margin
        if x0 >= 0 and y0 >= 0 and x0 + w + 2 * margin <= width and y0 + h + 2 * margin <= height:
            planes[k].copy_(pixels[y0 : y0 + h + 2 * margin, x0 : x0 + w + 2 * margin])  # no copy in between
        else:  # on the image border: the context is mirrored
            planes[k].copy_(torch.from_numpy(crop_with_margin(image, index, margin)))
    images = planes.permute(0, 3, 1, 2)  # [N, 3, h, w], channels-last strides
    torch.addcmul(_PIXEL_SHIFT, images, _PIXEL_SCALE, out=images)
    count = len(indexes)
    return PatchBatch(
        image=images,
        mask=torch.zeros(()).expand(count, h + 2 * margin, w + 2 * margin),
        label=torch.full((count,), -1 if label is None else int(label)),
        index=torch.tensor([[i.x, i.y, i.width, i.height] for i in indexes]),
        clsname=[clsname or "unknown"] * count,
        image_id=torch.full((count,), image_id),
    )


def synthesised_batch(
    patch: LRPatch,
    synthesizer: Synthesizer | None,
    rng: np.random.Generator,
    image_id: int,
    default_label: int,
    keep_clean: bool,
) -> PatchBatch:
    """The batch of one patch after ``synthesizer`` (if any); with ``keep_clean`` the clean patch rides along.

    With ``keep_clean`` the batch is a training triple: ``image`` / ``mask`` are
    the corrupted patch and its changed pixels, ``clean_image`` (and
    ``clean_low_resolution_images``) the patch before synthesis.
    """
    if synthesizer is None:
        return patch_to_batch(patch, image_id, default_label)
    batch = patch_to_batch(synthesizer(patch, rng=rng), image_id, default_label)
    if keep_clean:
        clean = patch_to_batch(patch, image_id, default_label)
        batch.clean_image = clean.image
        batch.clean_low_resolution_images = clean.low_resolution_images
    return batch


def item_and_epoch(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """A dataset key as ``(position, epoch)``: samplers of synthetic training data pass the epoch along."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


def item_rng(seed: int, item: int, epoch: int | None) -> np.random.Generator:
    """The generator of one item's synthesis: fixed per item, and per epoch when one is given."""
    return np.random.default_rng([seed, item] if epoch is None else [seed, item, epoch])


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
    Training synthesis (``keep_clean``) keys items by ``(position, epoch)`` (see
    :class:`ImageGroupedSampler`), so each epoch draws new anomalies, reproducibly.
    With ``context_margin`` every patch is read widened by the margin
    (:meth:`~hiad_pl.data.sample.HRSample.patch`): the geometry inference scores.
    """

    def __init__(
        self,
        samples: Sequence[HRSample],
        indexes: Sequence[MultiResolutionIndex],
        synthesizer: Synthesizer | None = None,
        seed: int = 0,
        items: Sequence[int] | None = None,
        keep_clean: bool = False,
        context_margin: int = 0,
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
        self.keep_clean = keep_clean
        self.context_margin = context_margin
        self._cache = _OpenSampleCache()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> PatchBatch:
        position, epoch = item_and_epoch(key)
        item = self.items[position]
        image_id, index_id = divmod(item, len(self.indexes))
        sample = self._cache.get(self.samples[image_id])
        patch = sample.patch(self.indexes[index_id], self.context_margin)
        label = sample.label if sample.label is not None else 0
        rng = item_rng(self.seed, item, epoch)
        return synthesised_batch(patch, self.synthesizer, rng, image_id, label, self.keep_clean)


class ThumbnailDataset(Dataset):
    """Whole images resized to ``thumbnail_size`` (with optional synthetic anomalies).

    ``repeats`` > 1 visits every image several times, each time with its own
    synthetic anomaly: a validation set of a few held-out images still gets
    enough normal and anomalous thumbnails. ``keep_clean`` makes training
    triples, as in :class:`PatchDataset`.
    """

    def __init__(
        self,
        samples: Sequence[HRSample],
        thumbnail_size: Size,
        synthesizer: Synthesizer | None = None,
        seed: int = 0,
        repeats: int = 1,
        keep_clean: bool = False,
    ) -> None:
        if not samples:
            raise ValueError("ThumbnailDataset needs at least one sample")
        self.samples = list(samples)
        self.thumbnail_size = as_pair(thumbnail_size, "thumbnail_size")
        self.synthesizer = synthesizer
        self.seed = seed
        self.repeats = max(1, int(repeats))
        self.keep_clean = keep_clean

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def __getitem__(self, key: int | tuple[int, int]) -> PatchBatch:
        item, epoch = item_and_epoch(key)
        sample = self.samples[item % len(self.samples)]
        with sample:
            patch = sample.down_sampling_to_LR(self.thumbnail_size)
        rng = item_rng(self.seed, item, epoch)
        return synthesised_batch(patch, self.synthesizer, rng, item, 0, self.keep_clean)


class ImageGroupedSampler(Sampler):
    """Image-major order; with ``shuffle``, images and the patches within each image are shuffled.

    Keeps consecutive items on the same image (one decode per batch) while still
    changing the order every epoch for gradient-trained detectors. Lightning
    calls :meth:`set_epoch` before each epoch, so a resumed fit sees the same
    order as an uninterrupted one. With ``tag_epoch`` the sampler yields
    ``(position, epoch)`` keys: a dataset with training synthesis then draws new
    anomalies every epoch, also inside worker processes. Thumbnail datasets
    (one item per image) are shuffled item by item.
    """

    def __init__(
        self, dataset: PatchDataset | ThumbnailDataset, shuffle: bool, seed: int = 0, tag_epoch: bool = False
    ) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.tag_epoch = tag_epoch
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order (and synthesis) comes next."""
        self.epoch = int(epoch)

    def _groups(self) -> dict[int, list[int]]:
        if not isinstance(self.dataset, PatchDataset):
            return {position: [position] for position in range(len(self.dataset))}
        n = len(self.dataset.indexes)
        groups: dict[int, list[int]] = {}
        for position, item in enumerate(self.dataset.items):
            groups.setdefault(item // n, []).append(position)
        return groups

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        groups = self._groups()
        order = list(groups)
        epoch = self.epoch
        if self.shuffle:
            rng = random.Random(self.seed + epoch)
            self.epoch += 1
            rng.shuffle(order)
            for image_id in order:
                rng.shuffle(groups[image_id])
        for image_id in order:
            for position in groups[image_id]:
                yield (position, epoch) if self.tag_epoch else position


def patch_loader(
    dataset: PatchDataset | ThumbnailDataset, batch_size: int, num_workers: int = 0, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A loader of :class:`PatchBatch` for a patch or thumbnail dataset."""
    tag_epoch = bool(getattr(dataset, "keep_clean", False))
    grouped = isinstance(dataset, PatchDataset) or tag_epoch
    sampler = ImageGroupedSampler(dataset, shuffle, seed, tag_epoch) if grouped else None
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
    ``train_synthesizer`` corrupts every training patch (methods that learn from
    synthetic anomalies): training batches then carry ``(clean_image, image,
    mask)`` with fresh, seeded anomalies every epoch. ``context_margin``: pixels
    of real image context read around every patch (see :class:`PatchDataset`).
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
        train_synthesizer: Synthesizer | None = None,
        context_margin: int = 0,
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
        self.train_synthesizer = train_synthesizer
        self.context_margin = context_margin

    def _dataset(
        self,
        samples: Sequence[HRSample],
        synthesizer: Synthesizer | None,
        cap: int | None,
        items: Sequence[int] | None = None,
        keep_clean: bool = False,
    ) -> PatchDataset | ThumbnailDataset:
        if self.thumbnail_size is not None:
            validation = synthesizer is not None and not keep_clean
            repeats = math.ceil(MIN_VALIDATION_THUMBNAILS / len(samples)) if validation else 1
            return ThumbnailDataset(samples, self.thumbnail_size, synthesizer, self.seed, repeats, keep_clean)
        chosen = capped_items(len(samples), len(self.indexes), cap, self.seed, items)
        return PatchDataset(samples, self.indexes, synthesizer, self.seed, chosen, keep_clean, self.context_margin)

    def train_dataset(self) -> PatchDataset | ThumbnailDataset:
        """Training patches (normal images only), corrupted by ``train_synthesizer`` when one is set."""
        synthesizer, keep_clean = self.train_synthesizer, self.train_synthesizer is not None
        if self.train_items is not None:
            return PatchDataset(
                self.train_samples, self.indexes, synthesizer, self.seed, self.train_items, keep_clean, self.context_margin
            )
        return self._dataset(self.train_samples, synthesizer, None, keep_clean=keep_clean)

    def train_dataloader(self) -> DataLoader:
        """Loader of :meth:`train_dataset`."""
        return patch_loader(self.train_dataset(), self.batch_size, self.num_workers, self.shuffle, self.seed)

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
