"""HRPatchCore: it learns, it survives a checkpoint, its coreset covers, its k-NN is exact."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors import HRPatchCore
from hiad_pl.detectors.backbones import IMAGENET_MEAN, IMAGENET_STD
from hiad_pl.detectors.feature_store import FeatureStore
from hiad_pl.detectors.nn_search import NearestNeighbourIndex, choose_search_kind
from hiad_pl.detectors.patchcore import coreset_subsample, greedy_coreset_indices

SIZE = 96
SPOT_RADIUS = 4


def textures(count: int, seed: int, spots: bool = False) -> tuple[Tensor, list[tuple[int, int]]]:
    """ImageNet-normalised periodic textures with noise; with ``spots``, a bright or dark disc each."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    phases = torch.rand(count, 2, 1, 1, generator=generator) * 2 * math.pi
    wave = torch.sin(2 * math.pi * cols / 16 + phases[:, 0]) * torch.sin(2 * math.pi * rows / 16 + phases[:, 1])
    tint = torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    images = (0.5 + 0.2 * wave[:, None]) * tint + 0.03 * torch.randn(count, 3, SIZE, SIZE, generator=generator)
    centres = []
    if spots:
        centres = [tuple(torch.randint(20, SIZE - 20, (2,), generator=generator).tolist()) for _ in range(count)]
        for i, (row, col) in enumerate(centres):
            disc = (rows - row) ** 2 + (cols - col) ** 2 <= SPOT_RADIUS**2
            images[i, :, disc] = 1.0 if i % 2 == 0 else 0.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.clamp(0, 1) - mean) / std, centres


def loader(images: Tensor, batch_size: int = 4) -> DataLoader:
    items = [
        PatchBatch(
            image=image[None],
            mask=torch.zeros(1, SIZE, SIZE),
            label=torch.zeros(1, dtype=torch.long),
            index=torch.zeros(1, 4, dtype=torch.long),
        )
        for image in images
    ]
    return DataLoader(items, batch_size=batch_size, collate_fn=PatchBatch.collate)


def batch_of(images: Tensor) -> PatchBatch:
    size, _, height, width = images.shape
    return PatchBatch(image=images, mask=torch.zeros(size, height, width), label=torch.zeros(size, dtype=torch.long),
                      index=torch.zeros(size, 4, dtype=torch.long))


def make_trainer(detector: HRPatchCore) -> lightning.Trainer:
    return lightning.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **detector.trainer_defaults(),
    )


@pytest.fixture(scope="module")
def fitted() -> tuple[HRPatchCore, lightning.Trainer, list[warnings.WarningMessage]]:
    detector = HRPatchCore(weights="offline", input_size=SIZE, percentage=0.5, coreset_max_candidates=None)
    trainer = make_trainer(detector)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(detector, loader(textures(12, seed=1)[0]))
    return detector, trainer, list(caught)


def test_patchcore_separates_and_localises_spots(fitted) -> None:
    detector, trainer, _ = fitted
    normal, _ = textures(4, seed=2)
    defective, centres = textures(4, seed=3, spots=True)
    maps = torch.cat(trainer.predict(detector, loader(torch.cat([normal, defective]))))
    assert maps.shape == (8, SIZE, SIZE) and maps.dtype == torch.float32
    peaks = maps.flatten(1).max(1).values
    assert peaks[4:].min() > peaks[:4].max()  # image AUROC 1.0
    for score_map, (row, col) in zip(maps[4:], centres):
        peak_row, peak_col = divmod(int(score_map.argmax()), SIZE)
        assert math.hypot(peak_row - row, peak_col - col) <= 8


def test_fit_is_one_quiet_pass(fitted) -> None:
    detector, _, caught = fitted
    assert detector.model.memory_bank.shape == (math.ceil(0.5 * 12 * 12 * 12), detector.model.embed_dimension)
    assert not detector.has_pending_fit()
    noisy = [str(w.message) for w in caught if "optimizer" in str(w.message) or "eval mode" in str(w.message)]
    assert noisy == []


def test_checkpoint_round_trip(fitted, tmp_path: Path) -> None:
    detector, trainer, _ = fitted
    path = tmp_path / "task_0.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert "model.memory_bank" in checkpoint["state_dict"]
    assert not any(key.startswith("backbone.") for key in checkpoint["state_dict"])  # rebuilt from hparams
    assert checkpoint["hyper_parameters"]["weights"] == "offline"
    restored = HRPatchCore.load_from_checkpoint(path)
    assert torch.equal(restored.model.memory_bank, detector.model.memory_bank)
    batch = next(iter(loader(textures(2, seed=4, spots=True)[0])))
    assert torch.equal(restored.predict_step(batch, 0), detector.predict_step(batch, 0))


def test_empty_bank_refuses_to_score() -> None:
    detector = HRPatchCore(weights="none", input_size=32)
    with pytest.raises(RuntimeError, match="empty memory bank"):
        detector.predict_step(next(iter(loader(torch.randn(1, 3, SIZE, SIZE)))), 0)


def test_bank_is_built_before_validation() -> None:
    detector = HRPatchCore(weights="none", input_size=32, percentage=1.0)
    detector.accumulate(next(iter(loader(torch.randn(2, 3, 32, 32)))))
    assert detector.has_pending_fit()
    detector.on_validation_epoch_start()
    assert detector.model.memory_bank.shape == (2 * 4 * 4, detector.model.embed_dimension)


def test_embedding_dimensions_and_fusion() -> None:
    detector = HRPatchCore(
        weights="none", input_size=64, pretrain_embed_dimension=32, target_embed_dimension=48, fusion_weights=[0.5, 0.5]
    )
    image = torch.randn(2, 3, 64, 64)
    batch = next(iter(loader(image, batch_size=2)))
    batch.low_resolution_images = torch.randn(2, 1, 3, 64, 64)
    batch.low_resolution_windows = torch.tensor([[[0, 0, 32, 32]], [[32, 0, 32, 32]]])
    features = detector.patch_features(batch)
    assert features.shape == (2, 8, 8, 48) == (2, 8, 8, detector.model.embed_dimension)
    detector.accumulate(batch)
    detector.finalize()
    assert detector.anomaly_map(batch).shape == (2, 64, 64)


def test_invalid_options_are_named() -> None:
    with pytest.raises(ValueError, match="merge_size"):
        HRPatchCore(weights="none", merge_size=2)
    with pytest.raises(ValueError, match="percentage"):
        HRPatchCore(weights="none", percentage=0.0)
    with pytest.raises(ValueError, match="num_neighbors"):
        HRPatchCore(weights="none", num_neighbors=0)
    with pytest.raises(ValueError, match="search_precision"):
        HRPatchCore(weights="none", search_precision="float16")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_search_precision_reaches_the_index(precision: str) -> None:
    detector = HRPatchCore(weights="none", search="ivf", search_precision=precision)
    detector.model.memory_bank = torch.randn(400, detector.model.embed_dimension, generator=torch.Generator().manual_seed(0))
    detector.prepare_scoring()
    assert detector.model._search[1].scan_dtype == getattr(torch, precision)


def covering_radius(points: Tensor, chosen: Tensor) -> float:
    """Largest distance from a point to its nearest chosen point."""
    return float(torch.cdist(points, points[chosen]).min(dim=1).values.max())


def test_greedy_coreset_covers_better_than_random() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 8, generator=generator) * 10
    sizes = torch.randint(5, 200, (20,), generator=generator)  # very uneven clusters
    points = torch.cat([c + torch.randn(int(n), 8, generator=generator) for c, n in zip(centres, sizes)])
    chosen = greedy_coreset_indices(points, 40, generator)
    assert chosen.shape == (40,) and chosen.unique().numel() == 40
    random_subsets = [torch.randperm(len(points), generator=generator)[:40] for _ in range(5)]
    random_radius = min(covering_radius(points, subset) for subset in random_subsets)
    assert covering_radius(points, chosen) <= random_radius
    # Every cluster holds a selected point: no cluster is left to the nearest neighbour's mercy.
    labels = torch.repeat_interleave(torch.arange(20), sizes)
    assert labels[chosen].unique().numel() == 20


def test_coreset_subsample_sizes_and_candidate_cap(caplog: pytest.LogCaptureFixture) -> None:
    features = torch.randn(1000, 200)
    bank = coreset_subsample(features, 0.1, projection_dim=16)
    assert bank.shape == (100, 200)
    assert (bank[:, None] == features[None]).all(-1).any(-1).all()  # rows of the input, unprojected
    assert torch.equal(coreset_subsample(features, 1.0), features)
    with caplog.at_level("INFO"), pytest.warns(UserWarning, match=r"random 300 of them and 700 \(70.0%\) are dropped"):
        capped = coreset_subsample(features, 0.1, projection_dim=16, max_candidates=300)
    assert capped.shape == (30, 200)
    assert "coreset_max_candidates=300" in caplog.text


def test_chunked_coreset_considers_every_feature() -> None:
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(1000, 8, generator=generator)
    features[::97] = 50 * F.normalize(torch.randn(11, 8, generator=generator), dim=1)  # 11 rare, far-off features
    bank = coreset_subsample(features, 0.1, projection_dim=8, chunk_size=256)
    assert bank.shape == (4 * 25, 8)  # four chunks of 250, each keeps 10%
    assert (bank[:, None] == features[::97][None]).all(-1).any(0).all()


def test_streamed_fit_equals_in_memory_fit() -> None:
    images = textures(6, seed=5)[0]
    detector = HRPatchCore(weights="none", input_size=SIZE, percentage=0.2, feature_dtype="float32", coreset_chunk_size=300)
    in_memory = []
    for batch in loader(images, batch_size=2):
        detector.accumulate(batch)
        in_memory.append(detector.patch_features(batch).reshape(-1, detector.model.embed_dimension))
    store = detector._train_features
    assert store.path.is_file() and len(store) == 6 * 12 * 12
    detector.finalize()
    assert not store.path.exists()  # the temporary file is gone with the pass
    expected = coreset_subsample(torch.cat(in_memory), 0.2, chunk_size=300)
    assert torch.equal(detector.model.memory_bank, expected)
    # float16 streaming chooses from the same features rounded to half precision.
    half = FeatureStore("float16")
    half.append(torch.cat(in_memory))
    assert torch.allclose(half.read(0, len(half)), torch.cat(in_memory), rtol=1e-3, atol=1e-3)
    half.close()


def test_channel_pooling_never_inflates() -> None:
    detector = HRPatchCore(weights="none", input_size=64, pretrain_embed_dimension=1024, target_embed_dimension=1024)
    assert detector.model.embed_dimension == 40 + 112  # EfficientNet-Lite0 blocks.2 + blocks.4 keep their channels
    features = detector.patch_features(next(iter(loader(torch.randn(1, 3, 64, 64)))))
    assert features.shape[-1] == 152
    assert HRPatchCore(weights="none", pretrain_embed_dimension=64, target_embed_dimension=96).model.embed_dimension == 96


def test_neighbourhood_aggregation_keeps_the_positions_side_by_side() -> None:
    detector = HRPatchCore(weights="none", input_size=64, aggregation="neighbourhood", merge_size=3)
    assert detector.model.embed_dimension == 9 * (40 + 112)
    fine = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    coarse = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 3, 4, 4) + 1000
    features = detector.model.locally_aware_features([fine, coarse])
    assert features.shape == (1, 8, 8, 9 * 2 + 9 * 3)
    # an inner location holds its 3 x 3 window of each channel of the fine layer, channel by channel
    assert torch.equal(features[0, 3, 5, :18], fine[0, :, 2:5, 4:7].reshape(-1))
    # the patch border is zero-padded, as in the reference implementation
    assert float(features[0, 0, 0, 0]) == 0.0 and float(features[0, 0, 0, 4]) == float(fine[0, 0, 0, 0])
    mean = HRPatchCore(weights="none", input_size=64, aggregation="mean").model.locally_aware_features([fine, coarse])
    assert torch.allclose(mean[0, 3, 5, :2], fine[0, :, 2:5, 4:7].mean(dim=(1, 2)))


def test_equal_layer_weighting_gives_each_layer_one_share_of_the_distance() -> None:
    detector = HRPatchCore(weights="none", input_size=64, layer_weighting="equal", merge_size=1)
    narrow, wide = torch.ones(1, 4, 8, 8), torch.ones(1, 36, 8, 8)
    features = detector.model.locally_aware_features([narrow, wide])[0, 0, 0]
    assert features.shape == (40,)
    # squared distance to the zero feature: 36 from each layer instead of 4 against 36
    assert torch.allclose(features[:4].square().sum(), features[4:].square().sum())
    assert torch.allclose(features[4:], torch.ones(36))
    with pytest.raises(ValueError, match="layer_weighting"):
        HRPatchCore(weights="none", layer_weighting="width")
    with pytest.raises(ValueError, match="aggregation"):
        HRPatchCore(weights="none", aggregation="max")


def feature_maps_as_images(detector: HRPatchCore) -> HRPatchCore:
    """``detector`` reading its two layers' maps straight from the patch pixels (channels 0-1 and 2-3)."""
    detector.fused_embedding = lambda batch: [batch.image[:, :2], F.avg_pool2d(batch.image[:, 2:], 2)]
    return detector


def test_rare_normal_features_stay_in_the_bank_by_default() -> None:
    """Image-score regression guard: with the defaults every training feature is a coreset candidate.

    A look that appears at one training location in 20 patches (5,120 locations) is normal;
    a bank chosen from a random subset of the features loses it, and a normal image showing
    it then outscores a real defect (what a capped candidate set did on the magnetic tiles).
    """
    generator = torch.Generator().manual_seed(0)
    train = 0.05 * torch.randn(20, 4, 16, 16, generator=generator)
    train[7, :, 5, 9] = 3.0  # the rare normal look, at one location of one training patch
    rare_normal, defect = 0.05 * torch.randn(2, 4, 16, 16, generator=generator)
    rare_normal[:, 5, 9] = 3.0
    defect[:, 10, 4] = 1.5  # never seen in training
    scores = {}
    for cap in (None, 500):
        detector = feature_maps_as_images(HRPatchCore(weights="none", merge_size=1, percentage=0.2, coreset_max_candidates=cap))
        for start in range(0, 20, 4):
            detector.accumulate(batch_of(train[start : start + 4]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            detector.finalize()
        maps = detector.anomaly_map(batch_of(torch.stack([rare_normal, defect])))
        scores[cap] = maps.amax(dim=(1, 2))
    assert float(scores[None][0]) < 0.5 * float(scores[None][1])  # the defect outscores the rare normal look
    assert float(scores[500][0]) > float(scores[500][1])  # a random 10% of candidates loses the rare look


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_search_recall_is_measured(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(64, 32, generator=generator) * 4
    vectors = centres.repeat_interleave(100, 0) + torch.randn(6400, 32, generator=generator)
    queries = centres.repeat_interleave(8, 0) + torch.randn(512, 32, generator=generator)
    index = NearestNeighbourIndex(vectors, kind=kind, nprobe=8, scan_dtype="float32")
    assert index.recall_at_1 is None
    with caplog.at_level("INFO"):
        distances = index.search(queries, 1)
    exact = torch.cdist(queries, vectors).min(dim=1).values
    recall = float((distances[:, 0] - exact).abs().lt(1e-3).float().mean())
    assert index.recall_at_1 is not None and abs(index.recall_at_1 - recall) <= 0.1  # a sample of 256 queries
    assert recall >= 0.9 and (distances[:, 0] >= exact - 1e-3).all()  # never closer than the true neighbour
    assert "recall@1" in caplog.text
    assert choose_search_kind(6400, "auto", exact_max=10_000) == "exact"
    assert choose_search_kind(6400, "auto", exact_max=1000) == "ivf"


@pytest.mark.parametrize("backend", ["faiss-cpu", "torch"])
def test_nearest_neighbour_search_is_exact(backend: str) -> None:
    generator = torch.Generator().manual_seed(1)
    vectors, queries = torch.randn(300, 24, generator=generator), torch.randn(50, 24, generator=generator)
    index = NearestNeighbourIndex(vectors, backend=backend)
    expected = torch.cdist(queries, vectors).topk(3, largest=False).values
    assert torch.allclose(index.search(queries, 3), expected, atol=1e-3)
    assert index.search(queries, 1000).shape == (50, 300)  # k is capped at the bank size
