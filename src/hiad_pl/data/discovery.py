"""Finding samples on disk: MVTec-style folders, flat folders, JSON-lines lists.

All three layouts give the same thing: per category, training samples (normal)
and test samples (with labels and, for defects, masks where there are any).

A defective test image without a mask is accepted: its label is known, its
defect pixels are not (a set labelled per image, common on a production line).
Image metrics use it; pixel metrics leave it out (see :func:`hiad_pl.metrics.evaluate`).
Discovery reads the test split only when asked (``test=True``): fitting never
opens a test image or mask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hiad_pl.data.sample import IMAGE_SUFFIXES, HRSample
from hiad_pl.data.tiling import Size
from hiad_pl.errors import DatasetError, ImageReadError

GOOD = "good"


@dataclass
class CategorySplit:
    """The samples of one category."""

    name: str
    train: list[HRSample] = field(default_factory=list)
    test: list[HRSample] = field(default_factory=list)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _find_mask(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for name in (f"{stem}_mask{suffix}", f"{stem}{suffix}"):
            if (folder / name).is_file():
                return folder / name
    return None


def is_mvtec_category(path: Path) -> bool:
    """Whether ``path`` holds ``train/good`` like an MVTec AD category."""
    return (path / "train" / GOOD).is_dir()


def discover_mvtec(root: Path, category: str, image_size: Size | None, test: bool = True) -> CategorySplit:
    """Read ``root/category/{train/good, test/<kind>, ground_truth/<kind>}`` (the test folders only with ``test``).

    A defective image without ``ground_truth/<kind>/<stem>_mask.*`` gets no mask (image label only).
    """
    base = root / category
    if not is_mvtec_category(base):
        raise DatasetError(f"{base}: not an MVTec-style category (no train/good folder)")
    split = CategorySplit(category)
    train_images = _images(base / "train" / GOOD)
    if not train_images:
        raise DatasetError(f"{base / 'train' / GOOD}: no training images ({', '.join(IMAGE_SUFFIXES)})")
    split.train = [HRSample(p, image_size=image_size, label=0, clsname=category, label_name=GOOD) for p in train_images]
    test_root = base / "test"
    if test and test_root.is_dir():
        for kind_dir in sorted(d for d in test_root.iterdir() if d.is_dir()):
            kind = kind_dir.name
            for path in _images(kind_dir):
                mask = None if kind == GOOD else _find_mask(base / "ground_truth" / kind, path.stem)
                split.test.append(
                    HRSample(path, mask=mask, image_size=image_size, label=int(kind != GOOD), clsname=category, label_name=kind)
                )
    return split


def discover_flat(folder: Path, image_size: Size | None, clsname: str, test: bool = True) -> CategorySplit:
    """Tutorial quick-start layout: ``train*.jpg``, ``test*.jpg`` and ``test*_mask.*`` in one folder (``test*`` only with ``test``)."""
    split = CategorySplit(clsname)
    images = [p for p in _images(folder) if not p.stem.endswith("_mask")]
    for path in images:
        if path.name.startswith("train"):
            split.train.append(HRSample(path, image_size=image_size, label=0, clsname=clsname))
        elif test and path.name.startswith("test"):
            mask = _find_mask(folder, f"{path.stem}")
            mask = mask if mask is not None and mask != path else None
            split.test.append(HRSample(path, mask=mask, image_size=image_size, label=int(mask is not None), clsname=clsname))
    if not split.train:
        raise DatasetError(f"{folder}: no training images (expected files named train*.png/jpg/...)")
    return split


def discover_jsonl(path: Path, image_size: Size | None, test: bool = True) -> list[CategorySplit]:
    """A JSON-lines list: ``{"image", "mask", "label", "clsname", "split"}`` per line.

    Relative paths are relative to the list's folder. ``split`` is ``train`` or
    ``test``; without it, normal images without a mask go to ``train``. A line
    with ``"label": 1`` and no mask is a defective image known by its label only.
    Without ``test`` the test lines are checked as lines but their files are not opened.
    """
    splits: dict[str, CategorySplit] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image = path.parent / record["image"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DatasetError(f"{path}:{number}: malformed line, expected {{\"image\": ...}} ({error})") from error
        mask = record.get("mask")
        label = record.get("label", int(mask is not None))
        if label not in (0, 1):
            raise DatasetError(f"{path}:{number}: label must be 0 or 1, got {label!r}")
        clsname = str(record.get("clsname", "unknown"))
        which = record.get("split", "test" if label or mask else "train")
        if which not in ("train", "test"):
            raise DatasetError(f"{path}:{number}: split must be 'train' or 'test', got {which!r}")
        split = splits.setdefault(clsname, CategorySplit(clsname))
        if which == "test" and not test:
            continue
        try:
            sample = HRSample(
                image, mask=None if mask is None else path.parent / mask, image_size=image_size, label=label, clsname=clsname
            )
        except ImageReadError as error:
            raise DatasetError(f"{path}:{number}: {error}") from error
        getattr(split, which).append(sample)
    if not splits:
        raise DatasetError(f"{path}: the list has no samples")
    for split in splits.values():
        if not split.train:
            raise DatasetError(f"{path}: category {split.name!r} has no training images")
    return list(splits.values())


def discover(
    root: str | Path, categories: Sequence[str] | None = None, image_size: Size | None = None, test: bool = True
) -> list[CategorySplit]:
    """Find the samples under ``root`` in any supported layout.

    ``root`` may be a JSON-lines file, an MVTec-style category, a folder of
    MVTec-style categories (``categories`` picks some; default all), or a flat
    tutorial folder. Without ``test`` only the training images are read (what fitting uses).
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: data set path not found")
    if root.is_file():
        splits = discover_jsonl(root, image_size, test)
    elif is_mvtec_category(root):
        splits = [discover_mvtec(root.parent, root.name, image_size, test)]
    else:
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and is_mvtec_category(d))
        if found:
            missing = sorted(set(categories or []) - set(found))
            if missing:
                raise DatasetError(f"{root}: categories {missing} not found; available: {found}")
            splits = [discover_mvtec(root, c, image_size, test) for c in (categories or found)]
        elif any(p.name.startswith("train") for p in _images(root)):
            splits = [discover_flat(root, image_size, clsname="unknown", test=test)]
        else:
            raise DatasetError(
                f"{root}: empty or unrecognised data set (expected <category>/train/good/, "
                "train*/test* images, or a .jsonl list)"
            )
    if categories:
        splits = [s for s in splits if s.name in set(categories)]
        if not splits:
            raise DatasetError(f"{root}: none of the categories {list(categories)} found")
    return splits
