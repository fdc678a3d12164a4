"""DeSTSeg: shapes, losses against hand-computed values, phases."""

from __future__ import annotations

import math

import pytest
import torch

from hiad_pl.detectors.destseg import (
    SEGMENTATION_PHASE,
    STUDENT_PHASE,
    DeSTSegModel,
    DenoisingStudent,
    SegmentationNet,
    binary_mask,
    cosine_distance_loss,
    cosine_distance_maps,
    focal_loss,
    segmentation_input,
    student_anomaly_map,
    training_phase,
)

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


def test_forward_gives_segmentation_and_student_maps() -> None:
    model = tiny_model().eval()
    segmentation, student = model(torch.randn(2, 3, 32, 32), teacher_maps())
    assert segmentation.shape == (2, 1, 4, 4)
    assert [tuple(s.shape) for s in student] == [(2, 8, 4, 4), (2, 16, 2, 2)]
