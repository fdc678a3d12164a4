"""Datasets and loaders: image-major patches, shuffling within images, validation splits, thumbnails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hiad_pl.data.datamodule import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    HighResDataModule,
    ImageGroupedSampler,
    PatchDataset,
    ThumbnailDataset,
    capped_items,
    image_to_tensor,
    split_validation,
    tensor_to_image,
)
from hiad_pl.syn import RandomBoxSynthesizer
from hiad_pl.utils.split_and_gather import HRSample, MultiResolutionHRImageSpliter


@pytest.fixture()
def samples(tmp_path):
    out = []
    for k in range(4):
        image = np.full((64, 128, 3), 40 * k, np.uint8)
        Image.fromarray(image).save(tmp_path / f"{k}.png")
        out.append(HRSample(tmp_path / f"{k}.png", label=0))
    return out


def test_patch_dataset_is_image_major_and_batches_carry_positions(samples):
    indexes = MultiResolutionHRImageSpliter((128, 64), 32, ds_factors=[0, 1])
    data = HighResDataModule(samples, indexes, batch_size=8)
    batches = list(data.train_dataloader())
    assert sum(len(b) for b in batches) == 4 * 8
    first = batches[0]
    assert first.image.shape == (8, 3, 32, 32) and first.low_resolution_images.shape == (8, 1, 3, 32, 32)
    assert first.image_id.tolist() == [0] * 8
    assert first.index[:, :2].tolist() == [[i.main_index.x, i.main_index.y] for i in indexes]
    assert first.low_resolution_windows[0, 0].tolist() == [0, 0, 16, 16]
    np.testing.assert_array_equal(tensor_to_image(batches[1].image[0]), np.full((32, 32, 3), 40, np.uint8))


def test_shuffled_sampler_keeps_images_together_and_changes_every_epoch(samples):
    dataset = PatchDataset(samples, MultiResolutionHRImageSpliter((128, 64), 32))
    sampler = ImageGroupedSampler(dataset, shuffle=True, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(32)) and first != second
    images = [k // 8 for k in first]
    assert all(images[i] == images[i + 1] for i in range(31) if (i + 1) % 8)  # runs of one image


def test_validation_split_and_caps(samples):
    train, val = split_validation(samples, 0.25, seed=0)
    assert len(val) == 1 and len(train) == 3 and not set(map(id, val)) & set(map(id, train))
    assert split_validation(samples, 0.25, seed=0)[1][0] is val[0]
    with pytest.raises(ValueError, match="val_sample_ratio"):
        split_validation(samples, 1.5)
    assert capped_items(4, 8, None) is None and capped_items(4, 8, 100) is None
    assert len(capped_items(4, 8, 5)) == 5 and capped_items(4, 8, 5, seed=1) == capped_items(4, 8, 5, seed=1)
    routed = [30, 2, 9, 17, 21]  # a retrieval task's own items: the cap draws from them alone
    assert capped_items(4, 8, None, items=routed) == sorted(routed) == capped_items(4, 8, 5, items=routed)
    drawn = capped_items(4, 8, 3, seed=2, items=routed)
    assert len(drawn) == 3 and set(drawn) <= set(routed)


def test_validation_thumbnails_repeat_with_distinct_anomalies(samples):
    data = HighResDataModule(
        samples[:2], thumbnail_size=32, batch_size=64, val_samples=samples[2:], val_synthesizer=RandomBoxSynthesizer(p=0.5, seed=0)
    )
    (batch,) = list(data.val_dataloader())
    assert len(batch) == 16 and batch.image.shape[-2:] == (32, 32)
    assert 0 < int(batch.label.sum()) < 16
    assert isinstance(data.train_dataloader().dataset, ThumbnailDataset)


def test_image_tensor_round_trip():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 5, 7) and abs(float(tensor.mean())) < 3
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(tensor, expected)  # ImageNet normalisation, to float32 rounding
    np.testing.assert_array_equal(tensor_to_image(tensor), image)
    assert torch.is_floating_point(tensor)


def test_image_patches_to_batch_equals_patch_by_patch_batches(tmp_path):
    from hiad_pl.data.batch import PatchBatch
    from hiad_pl.data.datamodule import image_patches_to_batch, patch_to_batch

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((rng.random((96, 128)) > 0.9).astype(np.uint8) * 255).save(tmp_path / "a_mask.png")
    sample = HRSample(tmp_path / "a.png", tmp_path / "a_mask.png", label=1, clsname="tile")
    mains = [i.main_index for i in MultiResolutionHRImageSpliter((128, 96), 32, stride=24)]
    with sample:
        expected = PatchBatch.collate([patch_to_batch(sample[i], 7) for i in mains])
        batch = image_patches_to_batch(sample.image.open(), mains, 7, sample.label, sample.clsname)
    assert torch.equal(batch.image, expected.image)  # the same values, bit for bit
    assert batch.image.is_contiguous(memory_format=torch.channels_last)
    assert batch.mask.shape == expected.mask.shape and not batch.mask.any() and not any(batch.mask.stride())
    for name in ("label", "index", "image_id"):
        assert torch.equal(getattr(batch, name), getattr(expected, name)), name
    assert batch.clsname == expected.clsname
    # two images' batches: the broadcast masks stay broadcast, the rest is concatenated
    both = PatchBatch.collate([batch, batch])
    assert both.mask.shape == (2 * len(mains), 32, 32) and not any(both.mask.stride())
    assert torch.equal(both.image[len(mains):], batch.image)
    assert PatchBatch.collate([batch]) is batch
    with pytest.raises(ValueError, match="share one size"):
        image_patches_to_batch(sample.image.open(), [mains[0], mains[0].__class__(0, 0, 16, 32)])
