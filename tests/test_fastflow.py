"""HRFastFlow: it learns, its flow is invertible with the right log-determinant, its loss falls."""

from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from conftest import batch_of, fit_and_score, loader, texture_split
from hiad_pl.detectors import DETECTORS, HRFastFlow
from hiad_pl.detectors.fastflow import AffineCouplingStep, FeatureFlow, negative_log_likelihood

FASTFLOW_TEST_CONFIG = {
    "backbone_name": "efficientnet_lite0",
    "weights": "offline",
    "layers_to_extract_from": ["blocks.2", "blocks.4"],
    "flow_steps": 2,
    "epochs": 3,
}


def small_fastflow(**kwargs) -> HRFastFlow:
    return HRFastFlow(backbone_name="resnet18", layers_to_extract_from=["layer1", "layer2"], weights="none", input_size=32, **kwargs)


def test_fastflow_separates_defects_on_demo_images(small_demo: Path, tmp_path: Path) -> None:
    image_auroc = fit_and_score(small_demo, tmp_path, HRFastFlow, FASTFLOW_TEST_CONFIG, batch_size=4)
    assert image_auroc >= 0.9

    # 4 training images, one held out for the thresholds: 12 patches, batches of 4, 3 epochs:
    # one logged loss per step, and it fell.
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    assert len(losses) == 9
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` with every parameter redrawn at random, far from the identity it starts at."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module


@pytest.mark.parametrize("channels, kernel_size", [(4, 3), (5, 1)])
def test_coupling_step_inverts_and_its_log_det_is_exact(channels: int, kernel_size: int) -> None:
    step = perturbed(AffineCouplingStep(channels, kernel_size, hidden_ratio=1.0, clamp=2.0, seed=0), seed=1).double()
    x = torch.randn(2, channels, 3, 3, dtype=torch.float64)
    y, log_det = step(x)
    assert y.shape == x.shape and log_det.shape == (2, 3, 3)
    assert torch.allclose(step.inverse(y), x, atol=1e-10)
    for sample in range(2):
        jacobian = torch.autograd.functional.jacobian(lambda v: step(v[None])[0][0], x[sample])
        _, expected = torch.linalg.slogdet(jacobian.reshape(x[0].numel(), x[0].numel()))
        assert torch.allclose(log_det[sample].sum(), expected, atol=1e-8)


def test_flow_log_det_is_exact_after_the_layer_norm() -> None:
    flow = perturbed(FeatureFlow(4, (3, 3), steps=3, conv3x3_only=False, hidden_ratio=0.5, clamp=2.0, seed=0), seed=2).double()
    assert [s.subnet[0].kernel_size for s in flow.steps] == [(3, 3), (1, 1), (3, 3)]
    features = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    z, log_det = flow(features)
    normalised = flow.norm(features)

    def steps(v: Tensor) -> Tensor:
        for step in flow.steps:
            v = step(v)[0]
        return v

    # The layer norm is preprocessing, outside the likelihood (as in the paper): the log-det covers the steps.
    assert torch.allclose(steps(normalised), z)
    jacobian = torch.autograd.functional.jacobian(lambda v: steps(v[None])[0], normalised[0])
    _, expected = torch.linalg.slogdet(jacobian.reshape(36, 36))
    assert torch.allclose(log_det.sum(), expected, atol=1e-8)
    inverse = z
    for step in reversed(flow.steps):
        inverse = step.inverse(inverse)
    assert torch.allclose(inverse, normalised, atol=1e-10)


def test_negative_log_likelihood_is_summed_per_sample_as_the_reference() -> None:
    z, log_det = torch.ones(2, 3, 4, 4), torch.full((2, 4, 4), 0.5)
    # 16 positions of (0.5 * 3 - 0.5) per sample, averaged over the 2 samples
    assert torch.isclose(negative_log_likelihood(z, log_det), torch.tensor(16.0))
    generator = torch.Generator().manual_seed(0)
    z, log_det = torch.randn(3, 5, 6, 7, generator=generator), torch.randn(3, 6, 7, generator=generator)
    # the reference: per sample 0.5 * sum over (C, H, W) of z^2 minus its log-determinant summed over positions
    reference = torch.mean(0.5 * torch.sum(z**2, dim=(1, 2, 3)) - log_det.sum(dim=(1, 2)))
    torch.testing.assert_close(negative_log_likelihood(z, log_det), reference)
    # a position-averaged loss would be 42 (= 6 x 7 positions) times smaller, and so its gradient
    torch.testing.assert_close(negative_log_likelihood(z, log_det) / 42, (0.5 * z.square().sum(1) - log_det).mean())


class LossRecorder(Callback):
    """Collects the loss of every training step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_loss_decreases_and_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    detector = small_fastflow(flow_steps=2, epochs=4, lr=2e-3)
    assert detector.trainer_defaults() == {"max_epochs": 4}
    recorder = LossRecorder()
    trainer = lightning.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        **detector.trainer_defaults(),
    )
    trainer.fit(detector, loader(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))))
    assert len(recorder.losses) == 8
    assert np.mean(recorder.losses[-2:]) < np.mean(recorder.losses[:2])
    assert all(not p.requires_grad for p in detector.backbone.parameters())

    path = tmp_path / "task_0.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert any(key.startswith("model.flows.") for key in checkpoint["state_dict"])
    assert not any(key.startswith("backbone.") for key in checkpoint["state_dict"])
    restored = HRFastFlow.load_from_checkpoint(path, weights_only=True)
    batch = batch_of(torch.randn(3, 3, 32, 32))
    maps = restored.predict_step(batch, 0)
    assert maps.shape == (3, 32, 32) and bool((maps <= 0).all() and (maps >= -1).all())
    assert torch.equal(maps, detector.predict_step(batch, 0))


def test_scores_fused_multi_resolution_features() -> None:
    detector = small_fastflow(fusion_weights=[0.5, 0.5])
    batch = batch_of(torch.randn(2, 3, 32, 32))
    batch.low_resolution_images = torch.randn(2, 1, 3, 32, 32)
    batch.low_resolution_windows = torch.tensor([[[0, 0, 16, 16]], [[16, 16, 16, 16]]])
    fused = detector.predict_step(batch, 0)
    assert fused.shape == (2, 32, 32)
    batch.low_resolution_images = None
    assert not torch.allclose(fused, detector.predict_step(batch, 0))  # the low-resolution view counts


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match="flow_steps"):
        small_fastflow(flow_steps=0)
    with pytest.raises(ValueError, match="epochs"):
        small_fastflow(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        small_fastflow(lr=-1.0)


def test_registered() -> None:
    assert DETECTORS["fastflow"] is HRFastFlow


def test_interrupted_fit_resumes_from_its_last_epoch(small_demo: Path, tmp_path: Path) -> None:
    from hiad_pl.orchestrator import TaskOrchestrator

    split, tasks = texture_split(small_demo)
    config = {"backbone_name": "resnet18", "layers_to_extract_from": ["layer1"], "weights": "none", "flow_steps": 1}

    def fit(epochs: int) -> TaskOrchestrator:
        orchestrator = TaskOrchestrator(HRFastFlow, config, tasks, tmp_path, batch_size=8, trainer_kwargs={"max_epochs": epochs})
        orchestrator.fit(split.train[:2], [])
        return orchestrator

    first = fit(1)
    final = first.checkpoint_path(tasks[0])
    steps = torch.load(final, weights_only=True)["global_step"]
    final.unlink()  # as if the run had stopped before the task finished: only the epoch checkpoint is left
    assert (tmp_path / "checkpoints" / "task_0" / "last.ckpt").is_file()
    fit(3)
    resumed = torch.load(final, weights_only=True)
    assert resumed["epoch"] == 3
    assert resumed["global_step"] == 3 * steps  # continued: two more epochs, not three from scratch
