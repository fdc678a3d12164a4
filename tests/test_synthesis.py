"""Anomaly synthesisers: masks, labels, reproducibility and low-resolution consistency."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hiad_pl.data.sample import LRPatch
from hiad_pl.data.synthesis import ellipse_mask, paste_into_low_resolution, perlin_mask, perlin_noise
from hiad_pl.data.tiling import HRImageIndex
from hiad_pl.syn import (
    AnomalySynthesizer,
    ColorShiftSynthesizer,
    CutPasteAnomalySynthesizer,
    ImageBlendingSynthesizer,
    RandomBoxSynthesizer,
    RandomeBoxSynthesizer,
    SimplexNoiseSynthesizer,
)

SIZE = 64
WINDOW = HRImageIndex(16, 8, SIZE // 2, SIZE // 2)  # the patch seen at half resolution


@pytest.fixture(scope="module")
def texture_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of generated textures, one of them in a sub-folder."""
    root = tmp_path_factory.mktemp("textures")
    (root / "nested").mkdir()
    rng = np.random.default_rng(0)
    for i, folder in enumerate([root, root, root / "nested"]):
        pixels = rng.integers(0, 256, (40 + 8 * i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"texture_{i}.png")
    return root


Factory = Callable[..., AnomalySynthesizer]


@pytest.fixture(
    params=["blend", "blend_self", "blend_procedural", "box", "cutpaste", "scar", "color_perlin", "color_ellipse", "simplex"],
)
def factory(request: pytest.FixtureRequest, texture_folder: Path) -> Factory:
    """Builds one kind of synthesiser from ``p`` and ``seed``."""
    builders: dict[str, Factory] = {
        "blend": lambda **kw: ImageBlendingSynthesizer(anomaly_source=texture_folder, **kw),
        "blend_self": lambda **kw: ImageBlendingSynthesizer(anomaly_source="self", **kw),
        "blend_procedural": lambda **kw: ImageBlendingSynthesizer(**kw),
        "simplex": lambda **kw: SimplexNoiseSynthesizer(box_size=(0.2, 0.5), **kw),
        # uniform noise differs from any grey by >= 64 levels on average: widen the original's 20-60
        "box": lambda **kw: RandomeBoxSynthesizer(diff_threshold=(20, 128), **kw),
        "cutpaste": lambda **kw: CutPasteAnomalySynthesizer(**kw),
        "scar": lambda **kw: CutPasteAnomalySynthesizer(variant="scar", **kw),
        "color_perlin": lambda **kw: ColorShiftSynthesizer(**kw),
        "color_ellipse": lambda **kw: ColorShiftSynthesizer(region="ellipse", **kw),
    }
    return builders[request.param]


def noisy_patch(seed: int = 0, size: int = SIZE) -> LRPatch:
    """A textured patch with one half-resolution crop around it."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    low = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return LRPatch(
        image=image,
        label=0,
        clsname="toy",
        main_index=HRImageIndex(128, 64, size, size),
        low_resolution_images=[low],
        low_resolution_indexes=[WINDOW],
    )


def snapshot(patch: LRPatch) -> tuple[np.ndarray, list[np.ndarray]]:
    return patch.image.copy(), [low.copy() for low in patch.low_resolution_images or []]


def test_anomalous_patch_contract(factory: Factory) -> None:
    synth = factory(p=1.0, seed=0)
    for seed in range(4):
        patch = noisy_patch(seed)
        image, lows = snapshot(patch)
        out = synth(patch)
        # the input is left alone
        np.testing.assert_array_equal(patch.image, image)
        np.testing.assert_array_equal(patch.low_resolution_images[0], lows[0])
        assert patch.mask is None and patch.label == 0
        # a new, anomalous patch
        assert out is not patch and out.image is not patch.image
        assert out.image.shape == image.shape and out.image.dtype == np.uint8
        assert out.mask.shape == image.shape[:2] and out.mask.dtype == np.uint8
        assert set(np.unique(out.mask)) == {0, 1}
        assert out.label == 1
        assert out.clsname == "toy" and out.main_index == patch.main_index
        assert out.low_resolution_indexes == [WINDOW]
        inside = out.mask.astype(bool)
        np.testing.assert_array_equal(out.image[~inside], image[~inside])
        change = np.abs(out.image.astype(int) - image).max(axis=-1)
        assert change[inside].min() >= synth.min_change


def test_p_zero_never_changes(factory: Factory) -> None:
    synth = factory(p=0.0, seed=0)
    for seed in range(5):
        patch = noisy_patch(seed)
        out = synth(patch)
        np.testing.assert_array_equal(out.image, patch.image)
        np.testing.assert_array_equal(out.low_resolution_images[0], patch.low_resolution_images[0])
        assert out.image is not patch.image
        assert out.label == 0 and out.mask.dtype == np.uint8 and not out.mask.any()


def test_seeded_synthesis_is_reproducible(factory: Factory) -> None:
    patches = [noisy_patch(seed) for seed in range(3)]
    first, second, other = factory(p=1.0, seed=7), factory(p=1.0, seed=7), factory(p=1.0, seed=8)
    runs = [[synth(patch) for patch in patches] for synth in (first, second, other)]
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.low_resolution_images[0], b.low_resolution_images[0])
    assert any(not np.array_equal(a.mask, c.mask) for a, c in zip(runs[0], runs[2]))


def test_rng_per_item_ignores_own_state(factory: Factory) -> None:
    synth = factory(p=1.0, seed=0)
    patch = noisy_patch(1)
    first = synth(patch, rng=np.random.default_rng(42))
    synth(patch)  # advances the synthesiser's own generator
    again = synth(patch, rng=np.random.default_rng(42))
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.mask, again.mask)


def test_pickled_synthesiser_draws_the_same(factory: Factory) -> None:
    synth = factory(p=1.0, seed=3)
    clone = pickle.loads(pickle.dumps(synth))
    patch = noisy_patch(2)
    np.testing.assert_array_equal(synth(patch).image, clone(patch).image)


def test_low_resolution_crop_updated_only_inside_window(factory: Factory) -> None:
    synth = factory(p=1.0, seed=5)
    patch = noisy_patch(4)
    low = patch.low_resolution_images[0]
    out = synth(patch)
    new_low = out.low_resolution_images[0]
    rows, cols = WINDOW.slices
    outside = np.ones(low.shape[:2], bool)
    outside[rows, cols] = False
    np.testing.assert_array_equal(new_low[outside], low[outside])
    # each low-resolution pixel covers a 2x2 block of the patch
    blocks = out.mask.reshape(SIZE // 2, 2, SIZE // 2, 2)
    touched, full = blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))
    window_old, window_new = low[rows, cols], new_low[rows, cols]
    np.testing.assert_array_equal(window_new[~touched], window_old[~touched])
    block_mean = out.image.astype(float).reshape(SIZE // 2, 2, SIZE // 2, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(window_new[touched], block_mean[touched], atol=1.0)
    assert full.any() and (window_new[full] != window_old[full]).any()


def test_low_resolution_window_enlarged_patch() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 1
    low = np.zeros((40, 40, 3), np.uint8)
    window = HRImageIndex(4, 6, 32, 32)
    (new_low,) = paste_into_low_resolution([low], [window], image, mask)
    changed = (new_low != 0).any(axis=-1)
    ys, xs = np.nonzero(changed)
    # the 4x4 masked block at 2x lands near rows/cols 8..16 of the window
    assert ys.min() >= window.y + 6 and ys.max() <= window.y + 17
    assert xs.min() >= window.x + 6 and xs.max() <= window.x + 17
    assert changed[window.y + 9 : window.y + 15, window.x + 9 : window.x + 15].all()


def test_window_outside_crop_is_an_error() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="outside its 10x10 crop"):
        paste_into_low_resolution([np.zeros((10, 10, 3), np.uint8)], [HRImageIndex(5, 0, 8, 8)], image, image[..., 0])


def test_probability_is_respected() -> None:
    synth = RandomBoxSynthesizer(p=0.5, seed=0)
    patch = grey_patch(0, size=64)
    labels = [synth(patch).label for _ in range(200)]
    assert 0.38 < np.mean(labels) < 0.62


def grey_patch(seed: int, size: int = 256) -> LRPatch:
    """A mid-grey textured patch (grey levels 80-179), as industrial surfaces rather than uniform noise."""
    return LRPatch(image=np.random.default_rng(seed).integers(80, 180, (size, size, 3), dtype=np.uint8))


class RecordingBoxes(RandomeBoxSynthesizer):
    """Records every accepted box with the image it was painted on."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[list[tuple[slice, slice, np.ndarray, np.ndarray]]] = []

    def synthesize(self, image: np.ndarray, rng: np.random.Generator):
        self.calls.append([])
        return super().synthesize(image, rng)

    def _box(self, image: np.ndarray, rng: np.random.Generator):
        before = image.copy()
        box = super()._box(image, rng)
        if box is not None:
            self.calls[-1].append((*box, before, image.copy()))
        return box


def test_boxes_follow_the_original_rule() -> None:
    synth = RecordingBoxes(p=1.0, diff_threshold=(20, 50), seed=0)
    assert (synth.max_patch_num, synth.anomaly_sizes) == (5, [(16.0, 40.0), (80.0, 100.0)])
    for seed in range(150):
        synth(grey_patch(seed))
    counts = [len(boxes) for boxes in synth.calls]
    # the first box always, each of 4 more with probability 1/2: 1 + Binomial(4, 1/2), mean 3
    assert set(counts) == {1, 2, 3, 4, 5} and 2.7 < np.mean(counts) < 3.3
    classes = []
    for rows, cols, before, after in (box for boxes in synth.calls for box in boxes):
        sides = (rows.stop - rows.start, cols.stop - cols.start)
        small = all(16 <= s < 40 for s in sides)
        assert small or all(80 <= s < 100 for s in sides)  # height and width from the same range
        classes.append(small)
        region = after[rows, cols].reshape(-1, 3)
        assert len(np.unique(region)) == 1  # one grey value, equal in the three channels
        difference = np.abs(before[rows, cols].astype(np.float32) - region[0, 0]).mean()
        assert 20 <= difference <= 50  # the threshold decided the box
    assert 0.4 < np.mean(classes) < 0.6


def test_box_mask_is_the_changed_pixels() -> None:
    synth = RandomeBoxSynthesizer(p=1.0, seed=3)
    for seed in range(10):
        patch = grey_patch(seed, size=128)
        out = synth(patch)
        changed = (out.image != patch.image).any(-1)
        assert out.label == 1 and np.array_equal(out.mask.astype(bool), changed)


def test_box_threshold_and_patch_size_can_leave_a_patch_normal() -> None:
    flat = LRPatch(image=np.full((128, 128, 3), 128, np.uint8))
    # no grey differs from 128 by 200 levels: every box is refused and the patch stays normal
    out = RandomeBoxSynthesizer(p=1.0, diff_threshold=(200, 255), seed=0)(flat)
    assert out.label == 0 and not out.mask.any()
    tiny = RandomeBoxSynthesizer(p=1.0, seed=0)(grey_patch(0, size=12))  # no box of 16 px fits
    assert tiny.label == 0
    assert RandomBoxSynthesizer is RandomeBoxSynthesizer


def test_invisible_change_is_not_an_anomaly() -> None:
    flat = LRPatch(image=np.full((SIZE, SIZE, 3), 120, np.uint8))
    out = CutPasteAnomalySynthesizer(p=1.0, color_jitter=0.0, seed=0)(flat)
    assert out.label == 0 and not out.mask.any()
    np.testing.assert_array_equal(out.image, flat.image)


def test_blending_reads_textures_recursively(texture_folder: Path) -> None:
    synth = ImageBlendingSynthesizer(p=1.0, anomaly_source=texture_folder)
    assert len(synth.anomaly_files) == 3
    assert any("nested" in path for path in synth.anomaly_files)
    assert str(texture_folder) in repr(synth) and "anomaly_files" not in repr(synth)


def test_blending_source_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dtd"
    with pytest.raises(FileNotFoundError, match="no_such_dtd"):
        ImageBlendingSynthesizer(anomaly_source=missing)
    empty = tmp_path / "empty_dtd"
    empty.mkdir()
    (empty / "readme.txt").write_text("not an image")
    with pytest.raises(ValueError, match="empty_dtd.*no images"):
        ImageBlendingSynthesizer(anomaly_source=empty)


@pytest.mark.parametrize(
    "build",
    [
        lambda: RandomeBoxSynthesizer(p=1.5),
        lambda: RandomeBoxSynthesizer(anomaly_sizes=[(40, 16)]),
        lambda: RandomeBoxSynthesizer(diff_threshold=(60, 20)),
        lambda: RandomeBoxSynthesizer(max_patch_num=0),
        lambda: CutPasteAnomalySynthesizer(variant="deep"),
        lambda: ColorShiftSynthesizer(region="square"),
        lambda: ImageBlendingSynthesizer(blend_factor=(0.5, 2.0)),
        lambda: ImageBlendingSynthesizer(min_change=0),
    ],
)
def test_bad_arguments(build: Callable[[], AnomalySynthesizer]) -> None:
    with pytest.raises(ValueError):
        build()


def test_bad_image_is_named() -> None:
    with pytest.raises(ValueError, match="uint8 \\[h, w, 3\\].*float32"):
        RandomeBoxSynthesizer(p=1.0)(LRPatch(image=np.zeros((8, 8, 3), np.float32)))


def test_anomaly_synthesize_alias() -> None:
    out = RandomeBoxSynthesizer(p=1.0, seed=0).anomaly_synthesize(grey_patch(0, size=64))
    assert out.label == 1 and out.mask.any()


def test_perlin_noise_is_smooth_and_seeded() -> None:
    a = perlin_noise((64, 48), (4, 3), np.random.default_rng(0), angle=0.4)
    b = perlin_noise((64, 48), (4, 3), np.random.default_rng(0), angle=0.4)
    c = perlin_noise((64, 48), (4, 3), np.random.default_rng(1), angle=0.4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (64, 48) and not np.array_equal(a, c)
    assert -1.5 < a.min() < 0 < a.max() < 1.5
    assert np.abs(np.diff(a, axis=0)).max() < 0.2 and np.abs(np.diff(a, axis=1)).max() < 0.2


def test_masks_have_shape_and_content() -> None:
    rng = np.random.default_rng(0)
    masks = [perlin_mask((40, 56), rng) for _ in range(20)]
    assert all(m.shape == (40, 56) and m.dtype == bool for m in masks)
    assert any(m.any() for m in masks) and all(m.mean() < 0.6 for m in masks)
    ellipse = ellipse_mask((64, 64), rng, axes=(8, 8))
    assert 0.7 * np.pi * 64 < ellipse.sum() < 1.3 * np.pi * 64


def test_configurable_from_yaml_dict() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--synthesizer", type=AnomalySynthesizer)
    config = parser.parse_object(
        {
            "synthesizer": {
                "class_path": "hiad_pl.syn.RandomeBoxSynthesizer",
                "init_args": {"p": 1.0, "anomaly_sizes": [[4, 12]], "max_patch_num": 2, "diff_threshold": [20, 50], "seed": 3},
            }
        }
    )
    synth = parser.instantiate_classes(config).synthesizer
    assert isinstance(synth, RandomeBoxSynthesizer)
    assert synth.anomaly_sizes == [(4.0, 12.0)] and synth.max_patch_num == 2 and synth.diff_threshold == (20.0, 50.0)
    assert synth.seed == 3


def test_procedural_fallback_is_logged_once(texture_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    from hiad_pl.data import synthesis

    synthesis._warn_procedural_fallback.cache_clear()
    with caplog.at_level("WARNING", logger="hiad_pl.data.synthesis"):
        ImageBlendingSynthesizer(anomaly_source=texture_folder)
        ImageBlendingSynthesizer(anomaly_source="procedural")  # chosen by name: nothing to warn about
        assert not caplog.records
        first = ImageBlendingSynthesizer()
        ImageBlendingSynthesizer(p=1.0)
    assert first.texture_source == "procedural"
    assert len(caplog.records) == 1 and "procedural textures, not DTD" in caplog.records[0].getMessage()
    assert "images/<category>/*.jpg" in caplog.records[0].getMessage()
