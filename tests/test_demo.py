"""The procedural demo data set: layout, determinism, masks, defect sizes, object structure, invisibility at 256."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from hiad_pl.demo import (
    DEFAULT_CATEGORIES,
    DEFECT_KINDS,
    DEMO_CATEGORIES,
    OBJECT_GROUP_NAMES,
    OBJECT_PATCH_GROUPS,
    make_demo_dataset,
    render_demo_sample,
)

SMALL_DEFECT_CATEGORIES = ("texture", "object", "object_rotated", "texture_fine")
SIZE_RANGES = {"scratch": (14, 60), "spot": (6, 20), "missing": (6, 40), "stain": (8, 60)}
SOFT_EDGE = 13  # px; no pixel farther than this outside a mask is touched by its defect


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _difference(sample) -> np.ndarray:
    return sample.image.astype(np.float32).mean(-1) - sample.clean.astype(np.float32).mean(-1)


def _cell_contrast(difference: np.ndarray, cell: int) -> float:
    """Largest change of mean brightness over one ``cell`` x ``cell`` block: what one stride-``cell`` feature sees."""
    h, w = difference.shape
    return float(np.abs(difference.reshape(h // cell, cell, w // cell, cell).mean((1, 3))).max())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    summary = make_demo_dataset(root, image_size=256, num_train=2, num_test_good=1, num_test_defect=5, seed=3)
    return root, summary


def test_default_categories_are_a_texture_and_an_aligned_object() -> None:
    assert set(DEFAULT_CATEGORIES) == {"texture", "object"}
    assert set(DEFAULT_CATEGORIES) < set(DEMO_CATEGORIES)
    assert {"object_rotated", "texture_large", "texture_fine"} <= set(DEMO_CATEGORIES)


def test_layout_follows_mvtec(small_set: tuple[Path, dict]) -> None:
    root, summary = small_set
    assert sorted(summary["categories"]) == sorted(DEFAULT_CATEGORIES)
    assert (root / "README.txt").read_text().count("px, seed 3") == 2
    for name in DEFAULT_CATEGORIES:
        folder = root / name
        assert sorted(p.name for p in (folder / "train" / "good").iterdir()) == ["000.png", "001.png"]
        assert sorted(p.name for p in (folder / "test" / "good").iterdir()) == ["000.png"]
        # five defective images, kinds taken in turn: scratch gets the fifth
        assert summary["categories"][name]["test_defect"] == {"scratch": 2, "spot": 1, "missing": 1, "stain": 1}
        for kind in DEFECT_KINDS:
            images = sorted(p.name for p in (folder / "test" / kind).iterdir())
            masks = sorted(p.name for p in (folder / "ground_truth" / kind).iterdir())
            assert masks == [name.replace(".png", "_mask.png") for name in images]
        assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == sorted(DEFECT_KINDS)
        assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(DEFECT_KINDS + ("good",))


def test_images_are_rgb_and_masks_binary_and_non_empty(small_set: tuple[Path, dict]) -> None:
    root, _ = small_set
    for image_path in root.glob("*/*/*/*.png"):
        if image_path.parts[-3] == "ground_truth":
            continue
        with Image.open(image_path) as image:
            assert (image.mode, image.size) == ("RGB", (256, 256)), image_path
        mask_path = image_path.parents[2] / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
        assert mask_path.exists() == (image_path.parent.name != "good"), image_path
        if mask_path.exists():
            with Image.open(mask_path) as mask:
                assert (mask.mode, mask.size) == ("L", (256, 256))
                values = np.unique(np.asarray(mask))
            assert set(values.tolist()) == {0, 255}, mask_path


def test_files_are_what_render_demo_sample_draws(small_set: tuple[Path, dict]) -> None:
    root, _ = small_set
    sample = render_demo_sample("object", 256, seed=3, split="test", kind="spot", index=0)
    assert np.array_equal(np.asarray(Image.open(root / "object/test/spot/000.png")), sample.image)
    assert np.array_equal(np.asarray(Image.open(root / "object/ground_truth/spot/000_mask.png")), sample.mask)
    good = render_demo_sample("texture", 256, seed=3, split="train", kind="good", index=1)
    assert np.array_equal(np.asarray(Image.open(root / "texture/train/good/001.png")), good.image)
    assert not good.mask.any() and good.defects == ()


def test_same_seed_gives_identical_bytes_and_another_seed_differs(
    small_set: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = small_set
    make_demo_dataset(tmp_path / "again", image_size=256, num_train=2, num_test_good=1, num_test_defect=5, seed=3)
    assert _files(tmp_path / "again") == _files(root)
    make_demo_dataset(tmp_path / "other", image_size=256, num_train=2, num_test_good=1, num_test_defect=5, seed=4)
    ours, theirs = _files(root), _files(tmp_path / "other")
    pngs = [name for name in ours if name.endswith(".png") and "ground_truth" not in name]
    assert all(ours[name] != theirs[name] for name in pngs)


def test_rerun_skips_complete_categories_and_guards_other_data(tmp_path: Path) -> None:
    args = dict(categories="texture", image_size=256, num_train=1, num_test_good=0, num_test_defect=1)
    first = make_demo_dataset(tmp_path, **args)
    image = tmp_path / "texture/train/good/000.png"
    stamp = image.stat().st_mtime_ns
    again = make_demo_dataset(tmp_path, **args)
    assert not first["categories"]["texture"]["skipped"] and again["categories"]["texture"]["skipped"]
    assert image.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_demo_dataset(tmp_path, **(args | {"seed": 1}))
    replaced = make_demo_dataset(tmp_path, **(args | {"seed": 1}), overwrite=True)
    assert not replaced["categories"]["texture"]["skipped"]
    assert json.loads((tmp_path / "texture/.demo.json").read_text())["seed"] == 1
    image.unlink()  # a damaged set of the same parameters is written again
    assert not make_demo_dataset(tmp_path, **(args | {"seed": 1}))["categories"]["texture"]["skipped"]
    assert image.exists()
    marker = tmp_path / "texture/.demo.json"
    marker.write_text(json.dumps(json.loads(marker.read_text()) | {"format": 1}))  # drawn by an older generator
    assert not make_demo_dataset(tmp_path, **(args | {"seed": 1}))["categories"]["texture"]["skipped"]
    assert json.loads(marker.read_text())["format"] > 1
    (tmp_path / "object").mkdir()
    (tmp_path / "object" / "mine.txt").write_text("not a demo")
    with pytest.raises(FileExistsError, match="not written by make_demo_dataset"):
        make_demo_dataset(tmp_path, **(args | {"categories": "object"}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(categories="bottle"), "unknown demo category 'bottle'"),
        (dict(categories=[]), "categories is empty"),
        (dict(image_size=200), "at least 256"),
        (dict(image_size=258), "multiple of 4"),
        (dict(num_train=-1), "num_train must be a non-negative int"),
        (dict(seed=1.5), "seed must be a non-negative int"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_demo_dataset(tmp_path, **kwargs)


def test_render_rejects_images_the_set_does_not_hold() -> None:
    with pytest.raises(ValueError, match="kind 'scratch' is not in the train split"):
        render_demo_sample("texture", 256, split="train", kind="scratch")
    with pytest.raises(ValueError, match="kind 'spot' is not in the test split of 'texture_large'"):
        render_demo_sample("texture_large", 256, split="test", kind="spot")
    with pytest.raises(ValueError, match="split must be"):
        render_demo_sample("texture", 256, split="val")


@pytest.mark.parametrize("category", SMALL_DEFECT_CATEGORIES)
def test_defects_have_their_sizes_and_masks_mark_exactly_them(category: str) -> None:
    for kind in DEFECT_KINDS:
        for index in range(2):
            sample = render_demo_sample(category, 512, seed=1, split="test", kind=kind, index=index)
            inside = sample.mask > 0
            labels, count = ndimage.label(inside, structure=np.ones((3, 3)))
            assert 1 <= count == len(sample.defects) <= 3, (category, kind, index)
            low, high = SIZE_RANGES[kind]
            extents = [max(r.stop - r.start, c.stop - c.start) for r, c in ndimage.find_objects(labels)]
            assert sorted(extents) == sorted(d.size for d in sample.defects)
            assert all(low <= extent <= high for extent in extents), (category, kind, index, extents)
            if kind == "scratch":  # thin: area per unit length at most its width (3 px) plus the caps
                assert inside.sum() <= 3.5 * sum(d.size for d in sample.defects) * np.sqrt(2)
            change = np.abs(_difference(sample))
            assert np.all(change[ndimage.distance_transform_edt(~inside) > SOFT_EDGE] == 0)
            assert np.mean(change[inside] > 20) > 0.9, (category, kind, index)


def test_large_defects_cover_a_quarter_of_the_image() -> None:
    for kind in ("stain", "missing"):
        for index in range(2):
            sample = render_demo_sample("texture_large", 256, seed=2, split="test", kind=kind, index=index)
            assert len(sample.defects) == 1
            assert (sample.mask > 0).mean() >= 0.25


def test_small_defects_vanish_at_256_but_are_plain_at_full_resolution() -> None:
    """Contrast seen by one stride-8 feature cell, at 2048 and after downscaling to 256 (cells of 64 px)."""
    ratios = []
    for category in DEFAULT_CATEGORIES:
        for kind in DEFECT_KINDS:
            difference = _difference(render_demo_sample(category, 2048, split="test", kind=kind))
            assert np.abs(difference).max() >= 80, (category, kind)  # clearly visible at full resolution
            ratios.append(_cell_contrast(difference, 64) / _cell_contrast(difference, 8))
    assert max(ratios) < 0.5 and np.mean(np.array(ratios) < 0.25) >= 0.75, np.round(ratios, 2)
    large = _difference(render_demo_sample("texture_large", 2048, split="test", kind="missing"))
    assert _cell_contrast(large, 64) / _cell_contrast(large, 8) > 0.7  # the measure does see large defects


def _patch_features(image: np.ndarray) -> np.ndarray:
    """Mean and spread of each colour over each patch of the 4 x 4 grid, patch by patch row-wise."""
    side = image.shape[0] // 4
    patches = image.astype(np.float32).reshape(4, side, 4, side, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1, 3)
    return np.concatenate([patches.mean(1), patches.std(1)], axis=1)


def test_object_patch_groups_are_symmetric_and_found_in_the_pixels() -> None:
    groups = np.array(OBJECT_PATCH_GROUPS)
    assert groups.shape == (4, 4) and len(OBJECT_GROUP_NAMES) == 3
    for mirrored in (groups.T, groups[::-1], groups[:, ::-1]):
        assert np.array_equal(groups, mirrored)
    assert np.bincount(groups.ravel()).tolist() == [4, 8, 4]
    features = _patch_features(render_demo_sample("object", 512, seed=5, index=2).image)
    distance = np.linalg.norm(features[:, None] - features[None], axis=-1)
    same = groups.ravel()[:, None] == groups.ravel()[None]
    assert distance[same].max() < 0.5 * distance[~same].min()


def test_texture_is_stationary_unlike_the_object() -> None:
    spread = {c: _patch_features(render_demo_sample(c, 512).image)[:, :3].std(0).max() for c in DEFAULT_CATEGORIES}
    assert spread["texture"] < spread["object"] / 3


def test_normal_images_vary_but_stay_alike_and_the_rotated_object_turns() -> None:
    def likeness(category: str, index: int) -> float:
        """Correlation of two normal images seen at 64 px, where the layout shows and fine detail does not."""
        pair = (render_demo_sample(category, 512, index=i).image for i in (0, index))
        small = [np.asarray(Image.fromarray(x).convert("L").resize((64, 64), Image.Resampling.BOX)) for x in pair]
        return float(np.corrcoef(small[0].ravel(), small[1].ravel())[0, 1])

    aligned = [likeness("object", i) for i in (1, 2)]
    turned = [likeness("object_rotated", i) for i in (1, 2)]
    assert min(aligned) > 0.9 and max(turned) < 0.75 and max(aligned) < 1
    texture = [render_demo_sample("texture", 512, index=i).image.astype(np.float32) for i in (0, 1)]
    assert abs(texture[0].mean() - texture[1].mean()) < 15 and np.abs(texture[0] - texture[1]).mean() > 5


def test_rotated_board_moves_about_and_shows_no_mirrored_pieces() -> None:
    centres = []
    for index in range(6):
        image = render_demo_sample("object_rotated", 512, index=index).image.astype(np.int16)
        green = (image[..., 1] - np.maximum(image[..., 0], image[..., 2])) > 25  # solder mask, never the conveyor
        labels, count = ndimage.label(ndimage.binary_closing(green, iterations=3))
        sizes = np.bincount(labels.ravel())[1:]
        assert count >= 1 and sizes.max() > 0.15 * 512**2, index  # one board, about 21% of the image
        assert sizes.sum() - sizes.max() < 200, (index, sorted(sizes))  # nothing green besides it
        centres.append(ndimage.center_of_mass(labels == 1 + sizes.argmax()))
    spread = np.ptp(np.array(centres), axis=0)
    assert spread.min() > 0.1 * 512  # the board is not always in the same place
