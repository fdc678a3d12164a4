"""Patches read with real image context (``context_margin``): cutting, batching, validation, and seam-free maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PATCHCORE_TEST_CONFIG
from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.datamodule import image_patches_to_batch, patch_to_batch
from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import (
    HRImageIndex,
    MultiResolutionHRImageSpliter,
    crop_with_margin,
    inner_maps,
    seam_band,
)
from hiad_pl.engine.callbacks import ValidationSelector
from hiad_pl.errors import ConfigError
from hiad_pl.orchestrator import TaskOrchestrator, collect
from hiad_pl.task import A2OTaskGenerator

#: Score band on each side of an interior patch border, as the real benchmark's seam statistics.
SEAM_BAND = 8


def woven_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A seeded ``[size, size, 3]`` uint8 texture: crossed stripes with blocky noise (no defects)."""
    y, x = np.mgrid[0:size, 0:size]
    noise = np.kron(rng.normal(size=(size // 4, size // 4)), np.ones((4, 4)))
    base = 128 + 40 * np.sin(x / 3.0 + rng.uniform(0, 6)) * np.sin(y / 5.0 + rng.uniform(0, 6)) + 20 * noise
    return np.clip(np.stack([base, base * 0.9 + 10, base * 0.8 + 20], -1), 0, 255).astype(np.uint8)


def seam_ratio(maps: list[np.ndarray], size: int, patch: int) -> float:
    """Mean score within :data:`SEAM_BAND` px of an interior patch border over the mean elsewhere (1: no seam)."""
    band = seam_band(size, patch, SEAM_BAND)
    return float(np.mean([m[band].mean() / m[~band].mean() for m in maps]))


def test_crop_with_margin_reads_the_image_and_mirrors_only_off_it() -> None:
    image = np.arange(20 * 30 * 3, dtype=np.int64).reshape(20, 30, 3)
    inside = crop_with_margin(image, HRImageIndex(10, 6, 8, 8), 4)
    assert np.array_equal(inside, image[2:18, 6:22])
    corner = crop_with_margin(image, HRImageIndex(0, 0, 8, 8), 3)
    assert corner.shape == (14, 14, 3)
    assert np.array_equal(corner[3:, 3:], image[:11, :11])  # the real context right and below
    assert np.array_equal(corner[0, 3:], image[3, :11])  # above the image: row 3 mirrored over row 0
    assert np.array_equal(corner[3:, 0], image[:11, 3])
    assert np.array_equal(crop_with_margin(image, HRImageIndex(2, 2, 5, 5), 0), image[2:7, 2:7])


def test_inference_and_training_patches_are_read_alike(tmp_path: Path) -> None:
    """The scoring batch cut from the decoded image equals the training patches: the detector sees one geometry."""
    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
    sample = HRSample(path)
    mains = [i.main_index for i in MultiResolutionHRImageSpliter((96, 64), 32)]
    with sample:
        scored = image_patches_to_batch(sample.image.open(), mains, context_margin=8)
        trained = PatchBatch.collate([patch_to_batch(sample.patch(m, 8)) for m in mains])
    assert scored.image.shape == (6, 3, 48, 48)
    assert torch.equal(scored.image, trained.image)
    assert torch.equal(scored.index, trained.index)  # the index stays the patch itself
    assert inner_maps(scored.image, 8).shape == (6, 3, 32, 32)
    assert torch.equal(inner_maps(scored.image, 8), image_patches_to_batch(sample.image.open(), mains).image)


def test_low_resolution_views_frame_the_widened_patch(tmp_path: Path) -> None:
    """With fusion, each coarse view is widened at its own scale and its window is the widened patch."""
    ramp = np.repeat(np.repeat(np.arange(128, dtype=np.uint8)[None, :, None] * 2, 128, 0), 3, 2)
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp).save(path)
    sample = HRSample(path)
    index = next(i for i in MultiResolutionHRImageSpliter(128, 32, ds_factors=[0, 1]) if i.main_index.x == 32 and i.main_index.y == 32)
    with sample:
        patch = sample.patch(index, 8)
    (low,), (window,) = patch.low_resolution_images, patch.low_resolution_indexes
    assert patch.image.shape == low.shape == (48, 48, 3)
    # the widened patch spans x 24..72; the coarse view (x 0..64 widened by 16 to -16..80) shows it at 20..44
    assert (window.x, window.width) == (20, 24)
    seen = low[:, window.x : window.x + window.width, 0].astype(float).mean()
    assert abs(seen - patch.image[:, :, 0].astype(float).mean()) < 4


def test_validation_scores_the_patch_alone() -> None:
    """Maps and masks are cropped to the patch; a synthetic defect wholly in the context leaves the patch normal."""
    selector = ValidationSelector(context_margin=4)
    mask = torch.zeros(3, 16, 16)
    mask[0, 6:9, 6:9] = 1  # inside the patch
    mask[1, 0:2, 0:16] = 1  # only in the context above it
    batch = PatchBatch(
        image=torch.zeros(3, 3, 16, 16), mask=mask, label=torch.tensor([1, 1, 0]),
        index=torch.tensor([[4, 4, 8, 8]] * 3),
    )
    selector.on_validation_epoch_start(None, None)
    selector.on_validation_batch_end(None, None, torch.rand(3, 16, 16), batch, 0)
    assert selector._maps[0].shape == selector._masks[0].shape == (3, 8, 8)
    assert selector._labels[0].tolist() == [1, 0, 0]


def test_negative_margin_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="context_margin"):
        TaskOrchestrator("hiad_pl.detectors.HRPatchCore", dict(PATCHCORE_TEST_CONFIG), [], tmp_path, context_margin=-8)


def _texture_maps(tmp_path: Path, margin: int) -> tuple[list[np.ndarray], TaskOrchestrator]:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(6):
        paths.append(tmp_path / f"texture{k}.png")
        Image.fromarray(woven_texture(rng, 256)).save(paths[-1])
    train, test = [HRSample(p) for p in paths[:4]], [HRSample(p, label=0) for p in paths[4:]]
    indexes = MultiResolutionHRImageSpliter(256, 64)
    tasks = A2OTaskGenerator().create_tasks(train, indexes)
    config = {**PATCHCORE_TEST_CONFIG, "percentage": 0.25, "pretrain_embed_dimension": 64, "target_embed_dimension": 64}
    root = tmp_path / f"run_m{margin}"
    orchestrator = TaskOrchestrator(
        "hiad_pl.detectors.HRPatchCore", config, tasks, root, batch_size=8, context_margin=margin,
        trainer_kwargs={"enable_progress_bar": False},
    )
    orchestrator.fit(train, [])
    loaded = TaskOrchestrator("hiad_pl.detectors.HRPatchCore", config, tasks, root)  # the margin comes from the checkpoints
    loaded.load("cpu")
    _, maps = collect(loaded.pipeline("cpu").predict(test), len(test))
    return [np.asarray(m, np.float32) for m in maps], loaded


def test_context_margin_removes_patch_seams_on_a_seeded_texture(tmp_path: Path) -> None:
    """Normal texture, 64-px patches, offline Lite0 PatchCore: the border band runs hot without context, not with it."""
    bare, bare_run = _texture_maps(tmp_path, 0)
    widened, widened_run = _texture_maps(tmp_path, 16)
    assert bare_run.context_margin == 0 and widened_run.context_margin == 16
    assert widened[0].shape == bare[0].shape == (256, 256)
    without, with_context = seam_ratio(bare, 256, 64), seam_ratio(widened, 256, 64)
    assert without > 1.02, without
    assert with_context <= 1.02, with_context
