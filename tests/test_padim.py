"""HRPaDiM: it learns, its statistics are NumPy's, it survives a checkpoint, it streams."""

from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from torch import Tensor

from conftest import batch_of, fit_and_score, loader
from hiad_pl.detectors import DETECTORS, HRPaDiM

PADIM_TEST_CONFIG = {
    "backbone_name": "efficientnet_lite0",
    "weights": "offline",
    "layers_to_extract_from": ["blocks.2", "blocks.4"],
    "d_reduced": 100,
}


class GivenFeaturePaDiM(HRPaDiM):
    """PaDiM whose 'backbone features' are its inputs: 64-channel maps scored on their own grid."""

    def embedding(self, images: Tensor) -> list[Tensor]:
        return [images]


def given_feature_padim(d_reduced: int | None, seed: int = 0) -> GivenFeaturePaDiM:
    # resnet18's layer1 has 64 channels, the width of the 'features' fed in.
    return GivenFeaturePaDiM(
        backbone_name="resnet18", layers_to_extract_from=["layer1"], weights="none", input_size=3, d_reduced=d_reduced, seed=seed
    )


def test_padim_separates_defects_on_demo_images(small_demo: Path, tmp_path: Path) -> None:
    image_auroc = fit_and_score(small_demo, tmp_path, HRPaDiM, PADIM_TEST_CONFIG, batch_size=8)
    assert image_auroc >= 0.9


def numpy_reference(features: np.ndarray, tests: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position mean, inverse of ``np.cov + epsilon I`` and Mahalanobis distances ``[B, P]``."""
    train = features.reshape(features.shape[0], features.shape[1], -1)  # [N, d, P]
    means, inverses, distances = [], [], []
    for position in range(train.shape[2]):
        samples = train[:, :, position]
        mean = samples.mean(0)
        inverse = np.linalg.inv(np.cov(samples, rowvar=False) + epsilon * np.eye(samples.shape[1]))
        diff = tests.reshape(tests.shape[0], tests.shape[1], -1)[:, :, position] - mean
        means.append(mean)
        inverses.append(inverse)
        distances.append(np.sqrt(np.einsum("bi,ij,bj->b", diff, inverse, diff)))
    return np.stack(means), np.stack(inverses), np.stack(distances, axis=1)


def test_streamed_statistics_and_distances_equal_numpy() -> None:
    generator = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.5, 2.0, 64).view(1, 64, 1, 1)
    train = torch.randn(13, 64, 3, 3, generator=generator) * scale + 1.0
    tests = torch.randn(4, 64, 3, 3, generator=generator) * scale * 1.5 + 1.0
    detector = given_feature_padim(d_reduced=8)
    for chunk in train.split(5):  # three uneven batches: the sums must stream exactly
        detector.accumulate(batch_of(chunk))
    assert detector.has_pending_fit()
    detector.finalize()
    assert not detector.has_pending_fit()

    chosen = detector.model.channel_index
    assert chosen.shape == (8,) and torch.equal(chosen, chosen.unique())  # sorted, distinct
    mean, inverse, distances = numpy_reference(train[:, chosen].double().numpy(), tests[:, chosen].double().numpy(), 0.01)
    assert np.allclose(detector.model.mean.numpy(), mean, atol=1e-5)
    assert np.allclose(detector.model.inv_covariance.numpy(), inverse, rtol=1e-4, atol=1e-4)
    scores = detector.anomaly_map(batch_of(tests))
    assert scores.shape == (4, 3, 3)
    assert np.allclose(scores.reshape(4, -1).numpy(), distances, rtol=1e-4)


def test_channel_selection_is_seeded() -> None:
    assert torch.equal(given_feature_padim(8, seed=3).model.channel_index, given_feature_padim(8, seed=3).model.channel_index)
    assert not torch.equal(given_feature_padim(8, seed=3).model.channel_index, given_feature_padim(8, seed=4).model.channel_index)
    assert torch.equal(given_feature_padim(None).model.channel_index, torch.arange(64))


def test_lightning_fit_and_checkpoint_round_trip(tmp_path: Path) -> None:
    detector = HRPaDiM(backbone_name="resnet18", layers_to_extract_from=["layer1", "layer2"], weights="none", input_size=32, d_reduced=20)
    trainer = lightning.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **detector.trainer_defaults(),
    )
    trainer.fit(detector, loader(torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))))
    assert detector.model.mean.shape == (8 * 8, 20) and detector.model.inv_covariance.shape == (8 * 8, 20, 20)

    path = tmp_path / "task_0.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert {"model.mean", "model.inv_covariance", "model.channel_index"} <= set(state)
    assert not any(key.startswith("backbone.") for key in state)
    restored = HRPaDiM.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(restored.model.inv_covariance, detector.model.inv_covariance)
    batch = batch_of(torch.randn(3, 3, 32, 32))
    maps = restored.predict_step(batch, 0)
    assert maps.shape == (3, 32, 32) and torch.equal(maps, detector.predict_step(batch, 0))


def test_fits_and_scores_fused_multi_resolution_features() -> None:
    detector = HRPaDiM(
        backbone_name="resnet18", layers_to_extract_from=["layer1", "layer2"], weights="none", input_size=32, fusion_weights=[0.5, 0.5]
    )
    batch = batch_of(torch.randn(3, 3, 32, 32))
    batch.low_resolution_images = torch.randn(3, 1, 3, 32, 32)
    batch.low_resolution_windows = torch.tensor([[[0, 0, 16, 16]], [[16, 0, 16, 16]], [[0, 16, 16, 16]]])
    detector.accumulate(batch)
    detector.finalize()
    assert detector.model.mean.shape == (64, 100) and detector.anomaly_map(batch).shape == (3, 32, 32)


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"d_reduced must be an integer in \[1, 64\]"):
        given_feature_padim(d_reduced=65)
    with pytest.raises(ValueError, match="epsilon"):
        HRPaDiM(backbone_name="resnet18", layers_to_extract_from=["layer1"], weights="none", epsilon=0.0)
    detector = given_feature_padim(d_reduced=4)
    with pytest.raises(RuntimeError, match="no statistics"):
        detector.anomaly_map(batch_of(torch.randn(1, 64, 3, 3)))
    detector.accumulate(batch_of(torch.randn(2, 64, 3, 3)))
    with pytest.raises(ValueError, match="same size"):
        detector.accumulate(batch_of(torch.randn(2, 64, 4, 4)))
    detector.finalize()
    with pytest.raises(ValueError, match="fitted on 9 feature positions"):
        detector.anomaly_map(batch_of(torch.randn(1, 64, 4, 4)))


def test_registered() -> None:
    assert DETECTORS["padim"] is HRPaDiM
