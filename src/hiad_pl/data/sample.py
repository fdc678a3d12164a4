"""High-resolution samples: robust image and mask reading, patches, thumbnails.

Images are opened lazily (``open()`` / ``close()``) so a folder of 4K images
never sits in memory at once. Every reading error names the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hiad_pl.data.tiling import (
    HRImageIndex,
    MultiResolutionIndex,
    Size,
    as_pair,
    crop,
    crop_with_margin,
    grow,
    low_resolution_window,
)
from hiad_pl.errors import ImageReadError

__all__ = ["IMAGE_SUFFIXES", "HRImage", "HRSample", "ImageReadError", "LRPatch", "make_samples", "read_image", "read_size", "resize_array"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
Image.MAX_IMAGE_PIXELS = None  # 8K industrial images are legitimate, not decompression bombs


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Map any integer or float pixel array to 8 bits, keeping absolute levels."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        bits = 16 if array.max(initial=0) > 255 or array.dtype.itemsize >= 2 else 8
        shift = bits - 8
        return (np.clip(array, 0, 2**bits - 1) >> shift).astype(np.uint8)
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    scale = 255.0 if 0.0 <= lo and hi <= 1.0 else 255.0 / max(hi - lo, 1e-12)
    offset = 0.0 if 0.0 <= lo and hi <= 1.0 else lo
    return np.clip((array - offset) * scale, 0, 255).astype(np.uint8)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    array = tifffile.imread(path)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) storage
    return array


def read_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header, without decoding pixels."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    shape = tif.pages[0].shape
                    axes = tif.pages[0].axes
                    return shape[axes.index("X")], shape[axes.index("Y")]
            except Exception as tiff_error:  # noqa: BLE001 - reported with the file name
                raise ImageReadError(f"{path}: unreadable image ({tiff_error})") from tiff_error
        raise ImageReadError(f"{path}: unreadable image ({error})") from error


def read_image(path: str | Path, *, mask: bool = False) -> np.ndarray:
    """Decode an image as ``[H, W, 3]`` uint8 RGB, or a mask as ``[H, W]`` uint8 in {0, 1}.

    PNG, JPEG, BMP and TIFF are read, including 16-bit and single-channel images
    (scaled to 8 bits) and RGBA (alpha dropped). Raises :class:`ImageReadError`
    naming the file when it is missing, not an image, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    try:
        with Image.open(path) as image:
            image.load()
            array = np.asarray(image)
            mode = image.mode
    except (UnidentifiedImageError, OSError, ValueError) as error:
        if path.suffix.lower() not in (".tif", ".tiff"):
            problem = "truncated image" if "truncated" in str(error) else "unreadable image"
            raise ImageReadError(f"{path}: {problem} ({error})") from error
        try:
            array, mode = _read_tiff(path), ""
        except Exception as tiff_error:  # noqa: BLE001 - reported with the file name
            raise ImageReadError(f"{path}: unreadable image ({tiff_error})") from tiff_error
    if mode == "P":
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGBA" if "transparency" in image.info else "RGB"))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        array = array[..., :-1] if array.shape[-1] == 4 else array[..., :1].repeat(3, -1)
    if mask:
        gray = array if array.ndim == 2 else array.max(axis=-1)
        return (gray > 0).astype(np.uint8)
    array = _to_uint8(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ImageReadError(f"{path}: unsupported pixel layout {array.shape}")
    return np.ascontiguousarray(array)


def resize_array(array: np.ndarray, size: Size, *, nearest: bool = False) -> np.ndarray:
    """Resize an ``[H, W(, 3)]`` uint8 array to ``size`` (width, height)."""
    width, height = as_pair(size)
    if array.shape[1] == width and array.shape[0] == height:
        return array
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.array(Image.fromarray(array).resize((width, height), resample=resample))


def low_resolution_views(
    image: np.ndarray, item: MultiResolutionIndex, context_margin: int = 0
) -> tuple[list[np.ndarray], list[HRImageIndex]]:
    """The low-resolution crops of ``item`` and where the patch lies in each, read with ``context_margin``.

    Each enclosing region is widened by the margin at its own scale, so it
    stays the same place as the widened patch, seen coarser; each is resized
    to the widened patch's size. Returns the crops and, per crop, the window of
    the widened patch inside it.
    """
    main, margin = item.main_index, context_margin
    size = (main.width + 2 * margin, main.height + 2 * margin)
    images, windows = [], []
    for low in item.low_resolution_indexes or ():
        mx, my = round(margin * low.width / main.width), round(margin * low.height / main.height)
        images.append(resize_array(crop_with_margin(image, low, mx, my), size))
        windows.append(low_resolution_window(grow(main, margin), grow(low, mx, my), size))
    return images, windows


class HRImage:
    """One image (or mask) file, decoded on :meth:`open` and released on :meth:`close`."""

    def __init__(self, image_path: str | Path, image_size: Size | None = None, is_mask: bool = False):
        self.image_path = str(image_path)
        self.image_size = None if image_size is None else as_pair(image_size, "image_size")
        self.is_mask = is_mask
        self.image: np.ndarray | None = None

    def original_size(self) -> tuple[int, int]:
        """``(width, height)`` of the file, read from its header."""
        return read_size(self.image_path)

    def open(self) -> np.ndarray:
        """Decode the file (resized to ``image_size``) and keep it until :meth:`close`."""
        if self.image is None:
            array = read_image(self.image_path, mask=self.is_mask)
            if self.image_size is not None:
                array = resize_array(array, self.image_size, nearest=self.is_mask)
            self.image = array
        return self.image

    def close(self) -> None:
        """Release the decoded pixels."""
        self.image = None

    def size(self) -> tuple[int, int]:
        """``(width, height)`` after resizing."""
        if self.image_size is not None:
            return self.image_size
        return self.original_size()

    def resize(self, image_size: Size) -> np.ndarray:
        """The decoded image resized to ``image_size`` (nearest for masks)."""
        return resize_array(self.open(), image_size, nearest=self.is_mask)

    def __getitem__(self, item: HRImageIndex) -> np.ndarray:
        return crop(self.open(), item).copy()


@dataclass
class LRPatch:
    """A low-resolution piece of a sample: a patch, or the whole image as a thumbnail."""

    image: np.ndarray
    mask: np.ndarray | None = None
    label: int | None = None
    clsname: str | None = None
    main_index: HRImageIndex | None = None
    low_resolution_images: list[np.ndarray] | None = None
    low_resolution_indexes: list[HRImageIndex] | None = None


class HRSample:
    """A high-resolution image with its optional mask, label and class name.

    ``HRSample(image="a.png", mask="a_mask.png", image_size=2048)`` checks that
    both files exist and that the mask has the image's size, then decodes
    nothing until :meth:`open`.
    """

    def __init__(
        self,
        image: str | Path | HRImage,
        mask: str | Path | HRImage | None = None,
        image_size: Size | None = None,
        label: int | None = None,
        clsname: str | None = None,
        label_name: str | None = None,
    ):
        size = None if image_size is None else as_pair(image_size, "image_size")
        self.image = image if isinstance(image, HRImage) else HRImage(image, size)
        self.mask = mask if mask is None or isinstance(mask, HRImage) else HRImage(mask, size, True)
        image_wh = self.image.original_size()
        if self.mask is not None:
            mask_wh = self.mask.original_size()
            if mask_wh != image_wh:
                raise ImageReadError(
                    f"{self.mask.image_path}: mask size {mask_wh[0]}x{mask_wh[1]} differs from "
                    f"image {self.image.image_path} size {image_wh[0]}x{image_wh[1]}"
                )
        #: ``(width, height)`` the image is read at: the given size, or the file's own.
        self.image_size: tuple[int, int] = image_wh if size is None else size
        self.label = label
        self.clsname = clsname
        self.label_name = label_name

    def __repr__(self) -> str:
        mask = None if self.mask is None else self.mask.image_path
        return f"HRSample(image={self.image.image_path!r}, mask={mask!r}, label={self.label}, clsname={self.clsname!r})"

    def get_image_path(self) -> str:
        """Path of the image file."""
        return self.image.image_path

    def open(self) -> HRSample:
        """Decode the image and mask."""
        self.image.open()
        if self.mask is not None:
            self.mask.open()
        return self

    def close(self) -> None:
        """Release decoded pixels."""
        self.image.close()
        if self.mask is not None:
            self.mask.close()

    def __enter__(self) -> HRSample:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def resolved_label(self) -> int:
        """The label, or 1 when the mask has defect pixels, 0 when it has none, -1 unknown."""
        if self.label is not None:
            return int(self.label)
        if self.mask is None:
            return -1
        return int(self.mask.open().any())

    def full_mask(self) -> np.ndarray:
        """The ``[H, W]`` mask at ``image_size`` (zeros for a sample without mask)."""
        if self.mask is not None:
            return self.mask.open()
        width, height = self.image_size
        return np.zeros((height, width), dtype=np.uint8)

    def __getitem__(self, item: HRImageIndex | MultiResolutionIndex) -> LRPatch:
        return self.patch(item)

    def patch(self, item: HRImageIndex | MultiResolutionIndex, context_margin: int = 0) -> LRPatch:
        """The patch at ``item`` (and its low-resolution views), read with ``context_margin`` pixels of context.

        With a margin the image, mask and low-resolution views cover the patch
        widened by the margin on every side (mirrored only where that runs off
        the image, :func:`~hiad_pl.data.tiling.crop_with_margin`);
        ``main_index`` stays the patch itself (see :func:`low_resolution_views`).
        """
        main = item.main_index if isinstance(item, MultiResolutionIndex) else item
        margin = context_margin
        image = self.image.open()
        patch = LRPatch(
            image=crop_with_margin(image, main, margin),
            mask=None if self.mask is None else crop_with_margin(self.mask.open(), main, margin),
            label=self.label,
            clsname=self.clsname,
            main_index=main,
        )
        if isinstance(item, MultiResolutionIndex) and item.low_resolution_indexes:
            patch.low_resolution_images, patch.low_resolution_indexes = low_resolution_views(image, item, margin)
        return patch

    def down_sampling_to_LR(self, image_size: Size) -> LRPatch:
        """The whole image (and mask) resized to ``image_size``: the thumbnail."""
        return LRPatch(
            image=self.image.resize(image_size),
            mask=None if self.mask is None else self.mask.resize(image_size),
            label=self.label,
            clsname=self.clsname,
        )


def make_samples(
    paths: Sequence[str | Path], image_size: Size | None = None, **kwargs
) -> list[HRSample]:
    """One :class:`HRSample` per image path."""
    return [HRSample(image=p, image_size=image_size, **kwargs) for p in paths]
