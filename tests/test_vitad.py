"""HRVitAD: the decoder pairs its outputs with the teacher's in reverse, on any grid shape."""

from __future__ import annotations

import pytest
import torch

from hiad_pl.detectors.vitad import ViTADDecoder, step_decay_epochs, vitad_anomaly_map, vitad_loss


def tiny_decoder(grid: tuple[int, int] = (3, 4)) -> ViTADDecoder:
    torch.manual_seed(0)
    return ViTADDecoder(dim=8, num_heads=2, grid_size=grid).eval()


def block_outputs(decoder: ViTADDecoder, neck: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder block's output (as grids), recorded by forward hooks."""
    recorded: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda m, i, o: recorded.append(o)) for block in decoder.blocks]
    decoder([neck])
    for hook in hooks:
        hook.remove()
    h, w = neck.shape[-2:]
    return [o.transpose(1, 2).reshape(o.shape[0], -1, h, w) for o in recorded]


def test_decoder_outputs_pair_with_the_teacher_in_reverse() -> None:
    decoder = tiny_decoder()
    assert len(decoder.blocks) == 9 and decoder.taps == (3, 6, 9)
    neck = torch.randn(2, 8, 3, 4)
    outputs = decoder([neck])
    blocks = block_outputs(decoder, neck)
    # Deepest first: decoder block 9 meets teacher block 3, 6 meets 6, 3 meets 9.
    assert [torch.equal(o, b) for o, b in zip(outputs, (blocks[8], blocks[5], blocks[2]))] == [True] * 3
    teacher = [blocks[8], blocks[5], blocks[2]]  # teacher blocks 3, 6, 9 as the decoder rebuilt them
    assert float(vitad_loss(teacher, outputs).detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(vitad_loss(teacher[::-1], outputs).detach()) > 0.01
    amap = vitad_anomaly_map(teacher, outputs, (48, 64))
    assert amap.shape == (2, 48, 64) and float(amap.detach().abs().max()) < 1e-5


def test_loss_is_the_sum_over_levels_and_the_map_sums_levels() -> None:
    teacher = [torch.ones(1, 2, 2, 2)] * 3
    student = [torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2), -torch.ones(1, 2, 2, 2)]
    assert float(vitad_loss(teacher, student)) == pytest.approx(2.0)  # 0 + 0 + 2, not their mean
    assert torch.allclose(vitad_anomaly_map(teacher, student, (4, 4)), torch.full((1, 4, 4), 2.0))


def test_non_square_grids_resample_the_position_embedding() -> None:
    decoder = tiny_decoder((3, 4))
    assert torch.equal(decoder.position_embedding((3, 4)), decoder.pos_embed)
    outputs = decoder([torch.randn(1, 8, 5, 2)])  # another, non-square grid
    assert [tuple(o.shape) for o in outputs] == [(1, 8, 5, 2)] * 3
    with pytest.raises(ValueError, match="ViTAD neck"):
        decoder([torch.randn(1, 6, 3, 4)])
    with pytest.raises(ValueError, match="taps"):
        ViTADDecoder(dim=8, num_heads=2, grid_size=(2, 2), depth=4, taps=(3, 6))


def test_step_decay_after_four_fifths_of_training() -> None:
    assert step_decay_epochs(200) == 160 and step_decay_epochs(1) == 1
