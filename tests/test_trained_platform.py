"""Frozen teachers beside trainable parts, phases, warm-up + cosine schedules and manual optimisation."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import loader
from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors import DETECTORS, HRDetector
from hiad_pl.detectors.base import warmup_cosine_schedule


class HRTeacherStudent(HRDetector):
    """A toy two-phase detector: a frozen random teacher, a trained student and a trained head."""

    frozen_submodules = ("teacher",)

    def __init__(self, weights: str = "none", input_size: int = 32, warmup_steps: int = 2, total_steps: int = 8) -> None:
        super().__init__("resnet18", ["layer1"], weights, input_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)  # a teacher rebuilt from hyperparameters is the same network
            self.teacher = nn.Conv2d(64, 16, 1)
        self.student = nn.Conv2d(64, 16, 1)
        self.head = nn.Conv2d(16, 1, 1)
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    @property
    def automatic_optimization(self) -> bool:
        return False

    def configure_optimizers(self):
        student = torch.optim.SGD(self.parameters_of("student"), lr=0.1)
        head = torch.optim.SGD(self.parameters_of("head"), lr=0.1)
        schedule = warmup_cosine_schedule(student, self.warmup_steps, self.total_steps)
        return [student, head], [{"scheduler": schedule, "interval": "step"}]

    def training_step(self, batch: PatchBatch, batch_idx: int) -> Tensor:
        features = self.embedding(batch.image)[0]
        loss = F.mse_loss(self.student(features), self.teacher(features))
        phase = [0] if self.current_epoch == 0 else [1]  # phase 1 trains the student, phase 2 the head
        if phase == [1]:
            loss = loss.detach() + self.head(self.student(features).detach()).square().mean()
        self.step_optimizers(loss, batch_idx, optimizers=phase, clip_norm=1.0)
        return loss.detach()

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        features = self.embedding(batch.image)[0]
        distance = (self.student(features) - self.teacher(features)).square().sum(1, keepdim=True)
        return F.interpolate(distance, size=batch.image.shape[-2:], mode="bilinear")[:, 0]


def test_frozen_teacher_stays_out_of_checkpoints_and_phases_step_their_optimizers(tmp_path: Path) -> None:
    detector = HRTeacherStudent()
    assert DETECTORS["teacherstudent"] is HRTeacherStudent
    assert set(detector.frozen_modules) == {"backbone", "teacher"}
    assert {"student", "head"} <= set(detector.trainable_modules)
    teacher_before = detector.teacher.weight.clone()
    head_before = detector.head.weight.clone()
    trainer = lightning.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(detector, loader(torch.randn(8, 3, 32, 32), batch_size=2))
    assert not detector.teacher.weight.requires_grad and not detector.teacher.training
    assert torch.equal(detector.teacher.weight, teacher_before)
    assert torch.equal(detector.head.weight, head_before)  # phase 2's optimiser did not step in phase 1
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4  # stepped with each of the 4 optimiser steps
    path = tmp_path / "toy.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert any(k.startswith("student.") for k in checkpoint["state_dict"])
    assert not any(k.startswith(("teacher.", "backbone.")) for k in checkpoint["state_dict"])
    assert len(checkpoint["optimizer_states"]) == 2 and len(checkpoint["lr_schedulers"]) == 1
    restored = HRTeacherStudent.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(restored.teacher.weight, teacher_before)
    assert torch.equal(restored.student.weight, detector.student.weight)


def test_warmup_cosine_schedule_rises_then_decays() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine_schedule(optimizer, warmup_steps=3, total_steps=13, final_factor=0.1)
    rates = []
    for _ in range(14):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == sorted(rates[:4]) and rates[3] == pytest.approx(1.0)
    assert rates[3:] == sorted(rates[3:], reverse=True) and rates[13] == pytest.approx(0.1)


def test_a_misnamed_frozen_part_is_reported() -> None:
    class HRMisnamed(HRTeacherStudent):
        frozen_submodules = ("techer",)

    with pytest.raises(ValueError, match="techer"):
        HRMisnamed().setup("fit")
    DETECTORS.pop("misnamed", None)
