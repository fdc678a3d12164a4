"""The one typed batch that flows from the data module into every detector."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class PatchBatch:
    """A batch of patches (or thumbnails) of high-resolution images.

    Attributes:
        image: ``[B, 3, h, w]`` float images, ImageNet-normalised.
        mask: ``[B, h, w]`` float ground truth in {0, 1} (zeros when unknown).
        label: ``[B]`` long image labels (0 normal, 1 anomalous, -1 unknown).
        index: ``[B, 4]`` long ``(x, y, width, height)`` of each patch in the full image.
        low_resolution_images: ``[B, L, 3, h, w]`` crops of the enclosing regions,
            resized to the patch size, or ``None`` without ``ds_factors``.
        low_resolution_windows: ``[B, L, 4]`` long ``(x, y, width, height)`` of the patch
            inside each resized crop, or ``None``.
        clsname: class name of each patch's image.
        image_id: position of each patch's image in its sample list.
        clean_image: with training-time anomaly synthesis, ``[B, 3, h, w]`` the
            patches before synthesis (``image`` is then the corrupted patch and
            ``mask`` its changed pixels); ``None`` otherwise.
        clean_low_resolution_images: the low-resolution crops before synthesis, or ``None``.
    """

    image: torch.Tensor
    mask: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    low_resolution_images: torch.Tensor | None = None
    low_resolution_windows: torch.Tensor | None = None
    clsname: list[str] = field(default_factory=list)
    image_id: torch.Tensor | None = None
    clean_image: torch.Tensor | None = None
    clean_low_resolution_images: torch.Tensor | None = None

    @property
    def is_synthetic(self) -> bool:
        """Whether the batch carries clean patches beside corrupted ones (training-time synthesis)."""
        return self.clean_image is not None

    def clean(self) -> PatchBatch:
        """The clean patches of a synthetic batch as a batch of their own (zero masks, label 0).

        Raises:
            ValueError: when the batch has no clean patches (no training-time synthesis).
        """
        if self.clean_image is None:
            raise ValueError(
                "this batch has no clean patches: the detector needs training-time anomaly synthesis "
                "(its training_synthesizer() returned None)"
            )
        return replace(
            self,
            image=self.clean_image,
            mask=torch.zeros_like(self.mask),
            label=torch.zeros_like(self.label),
            low_resolution_images=self.clean_low_resolution_images,
            clean_image=None,
            clean_low_resolution_images=None,
        )

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device | str) -> PatchBatch:
        """Move every tensor to ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    @staticmethod
    def collate(items: list[PatchBatch]) -> PatchBatch:
        """Concatenate per-item batches (each of size 1 or more) into one.

        A single batch is returned as it is. A field that is one constant
        broadcast in every item (zero strides, as the masks of a scoring batch)
        stays a broadcast view instead of being written out.
        """
        if len(items) == 1:
            return items[0]
        merged: dict[str, Any] = {}
        for f in fields(PatchBatch):
            values = [getattr(item, f.name) for item in items]
            if f.name == "clsname":
                merged[f.name] = [name for v in values for name in v]
            elif values[0] is None:
                merged[f.name] = None
            elif _same_constant(values):
                merged[f.name] = values[0][:1].expand(sum(len(v) for v in values), *values[0].shape[1:])
            else:
                merged[f.name] = torch.cat(values)
        return PatchBatch(**merged)


def _same_constant(values: list[torch.Tensor]) -> bool:
    """Whether every tensor is the same single value broadcast (all strides zero) over one shape."""
    first = values[0]
    return all(
        v.ndim > 0 and not any(v.stride()) and v.shape[1:] == first.shape[1:] and v.dtype == first.dtype
        and v.device == first.device and bool(v.reshape(-1)[:1].eq(first.reshape(-1)[:1]).all())
        for v in values
    )
