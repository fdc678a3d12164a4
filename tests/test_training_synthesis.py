"""Training-time anomaly synthesis: (clean, corrupted, mask) batches, seeded per epoch, crops consistent."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.datamodule import HighResDataModule, tensor_to_image
from hiad_pl.data.synthesis import build_synthesizer, procedural_texture
from hiad_pl.syn import ImageBlendingSynthesizer, SimplexNoiseSynthesizer
from hiad_pl.utils.split_and_gather import HRSample, MultiResolutionHRImageSpliter


@pytest.fixture()
def samples(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for k in range(2):
        image = rng.integers(60, 200, (128, 128, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f"{k}.png")
        out.append(HRSample(tmp_path / f"{k}.png", label=0))
    return out


def training_module(samples, synthesizer, shuffle: bool = True) -> HighResDataModule:
    indexes = MultiResolutionHRImageSpliter(128, 64, ds_factors=[0, 1])
    return HighResDataModule(samples, indexes, batch_size=4, shuffle=shuffle, train_synthesizer=synthesizer, seed=3)


def images_of(batch: PatchBatch, field: str) -> list[np.ndarray]:
    return [tensor_to_image(t) for t in getattr(batch, field)]


@pytest.mark.parametrize(
    "synthesizer",
    [SimplexNoiseSynthesizer(p=1.0, box_size=(0.2, 0.4)), ImageBlendingSynthesizer(p=1.0, blend_factor=(0.5, 0.8))],
    ids=["simplex", "blend_procedural"],
)
def test_batches_carry_clean_corrupted_and_the_changed_pixels(samples, synthesizer) -> None:
    data = training_module(samples, synthesizer)
    batches = list(data.train_dataloader())
    assert sum(len(b) for b in batches) == 8
    for batch in batches:
        assert batch.is_synthetic and batch.clean_low_resolution_images is not None
        corrupted, clean = images_of(batch, "image"), images_of(batch, "clean_image")
        for k in range(len(batch)):
            changed = (corrupted[k] != clean[k]).any(-1)
            assert changed.any() and batch.label[k] == 1
            np.testing.assert_array_equal(batch.mask[k].numpy().astype(bool), changed)
            # the low-resolution crop changes only inside the patch's window, where the defect is
            x, y, w, h = batch.low_resolution_windows[k, 0].tolist()
            low = tensor_to_image(batch.low_resolution_images[k, 0])
            low_clean = tensor_to_image(batch.clean_low_resolution_images[k, 0])
            low_changed = (low != low_clean).any(-1)
            assert low_changed.any()
            outside = np.ones_like(low_changed)
            outside[y : y + h, x : x + w] = False
            assert not low_changed[outside].any()
            # and it shows the corrupted patch there: resized, the window equals the resized corrupted patch
            expected = cv2.resize(corrupted[k], (w, h), interpolation=cv2.INTER_AREA)
            window_changed = low_changed[y : y + h, x : x + w]
            diff = np.abs(low[y : y + h, x : x + w].astype(int) - expected.astype(int))[window_changed]
            assert diff.max() <= 2  # uint8 round trip through the normalised tensors
        clean_view = batch.clean()
        assert torch.equal(clean_view.image, batch.clean_image) and clean_view.mask.sum() == 0


def test_synthesis_is_seeded_and_new_every_epoch(samples) -> None:
    def epoch_images(epoch: int) -> dict[int, np.ndarray]:
        data = training_module(samples, SimplexNoiseSynthesizer(p=1.0), shuffle=True)
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        out = {}
        for batch in loader:
            for k in range(len(batch)):
                out[tuple(batch.index[k].tolist()) + (int(batch.image_id[k]),)] = batch.image[k].numpy()
        return out

    first, again, second = epoch_images(0), epoch_images(0), epoch_images(1)
    assert first.keys() == second.keys() and len(first) == 8
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert not any(np.array_equal(first[key], second[key]) for key in first)


def test_without_a_synthesizer_batches_are_clean_only(samples) -> None:
    batch = next(iter(training_module(samples, None).train_dataloader()))
    assert not batch.is_synthetic
    with pytest.raises(ValueError, match="training-time anomaly synthesis"):
        batch.clean()


def test_thumbnail_training_batches_are_synthetic_too(samples) -> None:
    data = HighResDataModule(samples, thumbnail_size=64, batch_size=2, shuffle=True, train_synthesizer=SimplexNoiseSynthesizer(p=1.0))
    batch = next(iter(data.train_dataloader()))
    assert batch.is_synthetic and tuple(batch.clean_image.shape) == (2, 3, 64, 64) and batch.label.tolist() == [1, 1]


def test_synthesizers_build_from_both_config_shapes(tmp_path) -> None:
    tutorial = build_synthesizer(
        {"name": "ImageBlendingSynthesizer", "kwargs": {"p": 1.0, "transparency_range": [0.2, 0.5], "perlin_scale": 3}}
    )
    assert isinstance(tutorial, ImageBlendingSynthesizer)
    assert tutorial.blend_factor == (0.2, 0.5) and tutorial.texture_source == "procedural"
    Image.fromarray(procedural_texture((32, 32), np.random.default_rng(0))).save(tmp_path / "t.png")
    folder = build_synthesizer({"class_path": "hiad_pl.syn.ImageBlendingSynthesizer", "init_args": {"anomaly_source": str(tmp_path)}})
    assert folder.texture_source == "folder" and len(folder.anomaly_files) == 1
    with pytest.raises(ValueError, match="unknown synthesizer 'Nope'"):
        build_synthesizer({"name": "Nope"})
    with pytest.raises(ValueError, match="bad arguments"):
        build_synthesizer({"name": "SimplexNoiseSynthesizer", "kwargs": {"strength": 2}})


def test_procedural_textures_are_varied_and_seeded() -> None:
    a = procedural_texture((64, 64), np.random.default_rng(1))
    b = procedural_texture((64, 64), np.random.default_rng(1))
    c = procedural_texture((64, 64), np.random.default_rng(2))
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and a.std() > 5
