"""DeSTSeg: shapes, losses against hand-computed values, phases."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from conftest import batch_of, fit_and_score, loader, tensorboard_scalars, texture_split
from hiad_pl.data.datamodule import HighResDataModule
from hiad_pl.detectors import DETECTORS, HRDesTSeg
from hiad_pl.detectors.destseg import (
    SEGMENTATION_PHASE,
    STUDENT_PHASE,
    DenoisingStudent,
    DeSTSegModel,
    SegmentationNet,
    binary_mask,
    cosine_distance_loss,
    cosine_distance_maps,
    focal_loss,
    segmentation_input,
    student_anomaly_map,
    training_phase,
)
from hiad_pl.orchestrator import TaskOrchestrator

TEACHER_CHANNELS = [8, 16]
GRIDS = [(4, 4), (2, 2)]


def teacher_maps(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, *g, generator=generator) for c, g in zip(TEACHER_CHANNELS, GRIDS)]


def tiny_model() -> DeSTSegModel:
    return DeSTSegModel(TEACHER_CHANNELS, student_encoder="resnet10t", decoder_blocks=1, segmentation_width=8)


def test_student_returns_one_map_per_teacher_layer_on_its_grid() -> None:
    student = DenoisingStudent(TEACHER_CHANNELS, encoder_name="resnet10t", decoder_blocks=1)
    maps = student(torch.randn(2, 3, 32, 32), GRIDS)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 4, 4), (2, 16, 2, 2)]
    with pytest.raises(ValueError, match="2 layers"):
        student(torch.randn(1, 3, 32, 32), GRIDS[:1])


def test_student_maps_are_non_negative_with_the_final_relu_and_signed_without() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    with_relu = DenoisingStudent(TEACHER_CHANNELS, encoder_name="resnet10t", decoder_blocks=2).eval()
    assert all(bool((m >= 0).all()) for m in with_relu(images, GRIDS))
    signed = DenoisingStudent(TEACHER_CHANNELS, encoder_name="resnet10t", decoder_blocks=2, final_relu=False).eval()
    assert all(bool((m < 0).any()) for m in signed(images, GRIDS))
    # only the stage outputs lose their ReLU: the first of each stage's two blocks keeps it
    assert [[block.final_relu for block in stage] for stage in signed.stages] == [[True, False], [True, False]]
    assert all(block.final_relu for block in signed.bottom)


def test_a_non_negative_map_cannot_point_along_signed_features() -> None:
    # the floor a ReLU student hits on a teacher with signed features: its best map is the positive part
    teacher = torch.tensor([3.0, -4.0]).view(1, 2, 1, 1)
    best_non_negative = teacher.clamp(min=0)
    (distance,) = cosine_distance_maps([teacher], [best_non_negative])
    assert float(distance) == pytest.approx(1 - 3 / 5)
    (exact,) = cosine_distance_maps([teacher], [teacher * 2])
    assert float(exact) == pytest.approx(0.0, abs=1e-6)


def test_aspp_has_image_pooling_and_one_branch_per_rate_as_in_the_paper() -> None:
    from hiad_pl.detectors.destseg import ASPP

    aspp = ASPP(8, 4, rates=(1, 2, 3))
    assert [branch[0].kernel_size for branch in aspp.branches] == [(1, 1), (3, 3), (3, 3)]
    assert [branch[0].dilation for branch in aspp.branches] == [(1, 1), (2, 2), (3, 3)]
    assert aspp.fusion[0].in_channels == (1 + 3) * 4  # pooled + one per rate, no extra 1x1 branch
    assert aspp(torch.randn(2, 8, 6, 6)).shape == (2, 4, 6, 6)


def test_segmentation_net_outputs_probabilities_on_the_input_grid() -> None:
    net = SegmentationNet(24, width=8, atrous_rates=(1, 2))
    out = net(torch.randn(2, 24, 8, 8))
    assert out.shape == (2, 1, 8, 8) and bool(((out > 0) & (out < 1)).all())
    # paper's split: residual blocks and the ASPP head are separate parameter groups
    assert {n.split(".")[0] for n, _ in net.named_parameters()} == {"res", "head"}


def test_cosine_maps_loss_and_student_map_match_hand_computed_values() -> None:
    teacher = [torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(2, 2, 2, 2).clone()]
    student = [teacher[0].clone()]
    student[0][0, :, 0, 0] = torch.tensor([0.0, 3.0])  # orthogonal: distance 1
    student[0][1, :, 1, 1] = torch.tensor([-2.0, 0.0])  # opposite: distance 2
    (distances,) = cosine_distance_maps(teacher, student)
    assert distances.shape == (2, 1, 2, 2)
    assert distances[0, 0, 0, 0] == pytest.approx(1.0) and distances[1, 0, 1, 1] == pytest.approx(2.0)
    assert float(distances.sum()) == pytest.approx(3.0, abs=1e-6)
    # summed over the batch, averaged over the 4 positions of the layer
    assert float(cosine_distance_loss([distances])) == pytest.approx(3.0 / 4)
    two_layers = [distances, torch.full((2, 1, 1, 1), 0.5)]
    assert float(cosine_distance_loss(two_layers)) == pytest.approx(0.75 + 1.0)
    product = student_anomaly_map(two_layers)
    assert product.shape == (2, 1, 2, 2) and float(product[1, 0, 1, 1]) == pytest.approx(1.0)


def test_segmentation_input_is_minus_normalised_products_on_the_first_grid() -> None:
    teacher, student = teacher_maps(), teacher_maps(seed=1)
    x = segmentation_input(teacher, student)
    assert x.shape == (2, 24, 4, 4)
    first = -torch.nn.functional.normalize(teacher[0], dim=1) * torch.nn.functional.normalize(student[0], dim=1)
    assert torch.allclose(x[:, :8], first, atol=1e-6)
    # channel sums of the first layer's block are minus the cosine similarity
    assert torch.allclose(-x[:, :8].sum(1), torch.nn.functional.cosine_similarity(teacher[0], student[0], dim=1), atol=1e-5)


def test_focal_loss_matches_hand_computed_values() -> None:
    p = torch.tensor([0.5, 0.9, 0.2])
    target = torch.tensor([1.0, 1.0, 0.0])
    expected = [math.log(2) * 0.5**4, -math.log(0.9) * 0.1**4, -math.log(0.8) * 0.2**4]
    assert float(focal_loss(p, target, gamma=4)) == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert float(focal_loss(p, target, gamma=0)) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy(p, target)), rel=1e-6
    )


def test_binary_mask_resizes_and_thresholds() -> None:
    mask = torch.zeros(1, 8, 8)
    mask[0, :4, :4] = 1
    small = binary_mask(mask, (2, 2))
    assert small.shape == (1, 1, 2, 2) and small.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_phase_switches_exactly_at_de_st_steps() -> None:
    assert [training_phase(s, 3) for s in range(5)] == [STUDENT_PHASE] * 3 + [SEGMENTATION_PHASE] * 2
    assert training_phase(0, 0) == SEGMENTATION_PHASE


def test_each_phase_changes_only_its_own_parameters() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    images = torch.randn(2, 3, 32, 32)
    teacher, clean_teacher = teacher_maps(), teacher_maps(seed=2)
    mask = torch.zeros(2, 32, 32)
    mask[:, 8:20, 8:20] = 1
    for phase, trained, fixed in ((STUDENT_PHASE, "student", "segmentation"), (SEGMENTATION_PHASE, "segmentation", "student")):
        model.set_phase(phase)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        student = model.student(images, [t.shape[-2:] for t in teacher])
        losses = model.losses(student, teacher, clean_teacher, mask, phase)
        assert set(losses) == ({"loss", "cosine_loss"} if phase == STUDENT_PHASE else {"loss", "focal_loss", "l1_loss"})
        model.zero_grad()
        losses["loss"].backward()
        grads = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads == {trained}
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        after = model.state_dict()
        # the fixed network runs in eval mode: neither weights nor BatchNorm statistics move
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(fixed))
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(trained))
    with pytest.raises(ValueError, match="unknown phase"):
        model.losses(student, teacher, clean_teacher, mask, "both")


def test_forward_scores_the_patches_from_their_pixels_and_teacher_maps() -> None:
    model = tiny_model().eval()
    images, teacher = torch.randn(2, 3, 32, 32), teacher_maps()
    with torch.no_grad():
        maps = model(images, teacher, (32, 32))
        student = model.student(images, GRIDS)
        segmentation = model.segmentation(segmentation_input(teacher, student))
    assert maps.shape == (2, 32, 32) and bool(((maps > 0) & (maps < 1)).all())
    # the segmentation network's [B, 1, 4, 4] output on the first layer's grid, upsampled
    expected = torch.nn.functional.interpolate(segmentation, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(maps, expected)
    model.map_source = "student"
    with torch.no_grad():
        assert torch.equal(model.score(teacher, student, (4, 4))[:, None],
                           student_anomaly_map(cosine_distance_maps(teacher, student)))
    with pytest.raises(ValueError, match="map_source"):
        DeSTSegModel(TEACHER_CHANNELS, student_encoder="resnet10t", map_source="teacher")


# ---------------------------------------------------------------- the detector

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: A teacher and student small enough for fits of a few steps.
TINY = {
    "backbone_name": "resnet18",
    "weights": "none",
    "layers_to_extract_from": ["layer1", "layer2"],
    "student_encoder": "mobilenetv3_small_050",
    "decoder_blocks": 1,
    "segmentation_width": 16,
}


def quickstart_options() -> dict:
    """The detector options of configs/destseg_quickstart.yaml."""
    return dict(yaml.safe_load((CONFIGS / "destseg_quickstart.yaml").read_text())["detector"]["init_args"])


class PhaseRecorder(Callback):
    """Records, per optimiser step, which of the two networks' weights changed."""

    def __init__(self) -> None:
        self.changed: list[set[str]] = []
        self.ready: list[bool] = []
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = pl_module.model.state_dict()
        self.changed.append({k.split(".")[0] for k, v in after.items() if not torch.equal(v, self._before[k])})
        self.ready.append(pl_module.ready_for_selection())


def test_fit_switches_phase_exactly_at_de_st_steps(small_demo: Path, tmp_path: Path) -> None:
    split, tasks = texture_split(small_demo)
    recorder = PhaseRecorder()
    detector = HRDesTSeg(**TINY, input_size=256, steps=4, de_st_steps=2, student_bn_recalibration=1)
    data = HighResDataModule(
        split.train[:2], indexes=tasks[0].indexes, batch_size=8, train_synthesizer=detector.training_synthesizer(),
    )
    trainer = lightning.Trainer(
        **detector.trainer_defaults(), callbacks=[recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(detector, datamodule=data)
    assert trainer.global_step == 4
    # the first segmentation step also recomputes the student's BatchNorm statistics (buffers, not weights)
    assert recorder.changed == [{"student"}, {"student"}, {"student", "segmentation"}, {"segmentation"}]
    # validation selects nothing until the segmentation network has trained at least one step
    assert recorder.ready == [False, False, True, True]
    unfitted = {**TINY, "input_size": 64, "steps": 4, "de_st_steps": 2}
    assert not HRDesTSeg(**unfitted).ready_for_selection()
    assert HRDesTSeg(**unfitted, map_source="student").ready_for_selection()  # the student's map counts from the start


def test_interrupted_fit_resumes_in_its_phase_with_both_optimizer_states(small_demo: Path, tmp_path: Path) -> None:
    split, tasks = texture_split(small_demo)
    config = {**TINY, "steps": 3, "de_st_steps": 1}

    def fit(steps: int) -> TaskOrchestrator:
        orchestrator = TaskOrchestrator(HRDesTSeg, config, tasks, tmp_path, batch_size=8, trainer_kwargs={"max_steps": steps})
        orchestrator.fit(split.train[:2], [])
        return orchestrator

    final = fit(2).checkpoint_path(tasks[0])
    first = torch.load(final, weights_only=True)
    assert first["global_step"] == 2
    final.unlink()  # as if the run had stopped before the task finished: only the epoch checkpoint is left
    fit(3)
    resumed = torch.load(final, weights_only=True)
    assert resumed["global_step"] == 3  # one more step, not three from scratch
    student_state, segmentation_state = resumed["optimizer_states"]
    assert student_state["state"] and segmentation_state["state"]  # SGD momenta of both phases kept
    assert not any(key.startswith("backbone.") for key in resumed["state_dict"])
    assert DETECTORS["destseg"] is HRDesTSeg


def test_student_batch_norm_statistics_are_recomputed_on_training_batches() -> None:
    torch.manual_seed(0)
    detector = HRDesTSeg(**TINY, input_size=64, student_bn_recalibration=2)
    images = torch.randn(6, 3, 64, 64)
    detector._trainer = SimpleNamespace(train_dataloader=loader(images, batch_size=2))  # 3 batches, 2 asked for
    first_norm = next(m for m in detector.model.student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_norm.running_mean.fill_(5.0)  # stale statistics of the student phase
    seen: list[torch.Tensor] = []
    hook = first_norm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    grids = [tuple(t.shape[-2:]) for t in detector.embedding(images[:1])]
    assert detector.recalibrate_student(grids) == 2
    hook.remove()
    # the plain average of the two batches' means, the momentum restored afterwards
    expected = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
    assert len(seen) == 2 and torch.allclose(first_norm.running_mean, expected, atol=1e-5)
    assert first_norm.momentum == 0.1 and int(first_norm.num_batches_tracked) == 2
    detector.student_bn_recalibration = 0
    assert detector.recalibrate_student(grids) == 0  # off, as in the paper
    with pytest.raises(ValueError, match="student_bn_recalibration"):
        HRDesTSeg(**TINY, input_size=64, student_bn_recalibration=-1)


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="de_st_steps"):
        HRDesTSeg(**TINY, input_size=64, steps=10, de_st_steps=11)
    with pytest.raises(ValueError, match="map_source"):
        HRDesTSeg(**TINY, input_size=64, map_source="teacher")


def test_both_maps_have_the_patch_size(small_demo: Path) -> None:
    detector = HRDesTSeg(**TINY, input_size=64).eval()
    batch = batch_of(torch.randn(2, 3, 64, 64))
    assert detector.predict_step(batch, 0).shape == (2, 64, 64)
    detector.map_source = "student"
    student_map = detector.predict_step(batch, 0)
    assert student_map.shape == (2, 64, 64) and bool((student_map >= 0).all())


@pytest.mark.slow  # minutes on one core; the fit, phase, recalibration and resume tests above cover the training code
def test_destseg_quickstart_learns_the_demo_texture(demo_1024_two_train: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((CONFIGS / "destseg_quickstart.yaml").read_text())
    options, data = quickstart_options(), config["data"]
    assert (data["image_size"], data["patch_size"]) == (1024, 256)  # the quickstart's own sizes
    image_auroc = fit_and_score(demo_1024_two_train, tmp_path, HRDesTSeg, options, batch_size=data["batch_size"], image_size=1024)
    losses = tensorboard_scalars(tmp_path / "logs", "train/loss")
    cosine = tensorboard_scalars(tmp_path / "logs", "train/cosine_loss")
    focal = tensorboard_scalars(tmp_path / "logs", "train/focal_loss")
    l1 = tensorboard_scalars(tmp_path / "logs", "train/l1_loss")
    assert len(losses) == options["steps"] and len(focal) == len(l1) == options["steps"] - options["de_st_steps"]
    assert np.mean(cosine[-3:]) < 0.5 * np.mean(cosine[:3])
    assert np.mean(focal[-3:]) + np.mean(l1[-3:]) < 0.5 * (np.mean(focal[:3]) + np.mean(l1[:3]))
    assert image_auroc >= 0.9
