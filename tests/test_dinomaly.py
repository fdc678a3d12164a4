"""HRDinomaly: loose two-group reconstruction, noisy bottleneck, hard-mining loss."""

from __future__ import annotations

import pytest
import torch

from hiad_pl.detectors.dinomaly import DinomalyReconstructor, dinomaly_anomaly_map, dinomaly_loss


def tiny_reconstructor() -> DinomalyReconstructor:
    torch.manual_seed(0)
    return DinomalyReconstructor(dim=8, num_heads=2)


def test_groups_average_taps_and_reversed_decoder_outputs() -> None:
    model = tiny_reconstructor().eval()
    taps = [torch.randn(2, 8, 3, 5) for _ in range(8)]  # non-square grid
    recorded: list[torch.Tensor] = []
    for block in model.decoder:
        block.register_forward_hook(lambda m, i, o: recorded.append(o))
    targets, reconstructions = model(taps)
    assert len(targets) == len(reconstructions) == 2
    assert torch.allclose(targets[0], torch.stack(taps[:4]).mean(0)) and torch.allclose(targets[1], torch.stack(taps[4:]).mean(0))
    # Reversed: the last four decoder blocks rebuild the shallow taps 0-3.
    last_four = torch.stack(recorded[4:]).mean(0).transpose(1, 2).reshape(2, 8, 3, 5)
    assert torch.allclose(reconstructions[0], last_four, atol=1e-6)
    assert dinomaly_anomaly_map(targets, reconstructions, (42, 70)).shape == (2, 42, 70)


def test_bottleneck_dropout_is_noise_in_training_only() -> None:
    model = tiny_reconstructor()
    taps = [torch.randn(1, 8, 2, 2)] * 8
    model.train()
    assert not torch.equal(model(taps)[1][0], model(taps)[1][0])
    model.eval()
    assert torch.equal(model(taps)[1][0], model(taps)[1][0])


def test_loss_uses_the_share_of_its_step() -> None:
    model = tiny_reconstructor().eval()
    taps = [torch.randn(1, 8, 4, 5) for _ in range(8)]

    def gradient(step: int) -> torch.Tensor:
        model.zero_grad()
        targets, reconstructions = model(taps)
        dinomaly_loss(targets, reconstructions, step).backward()
        return model.decoder[-1].mlp[3].bias.grad.clone()

    # At step 0 nothing is mined; later the easy 90 % of points lose most of their gradient.
    assert gradient(1000).norm() < 0.6 * gradient(0).norm()
    assert torch.allclose(gradient(0), gradient(0))


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match="groups"):
        DinomalyReconstructor(dim=8, num_heads=2, groups=[[0, 8]])
    with pytest.raises(ValueError, match="divisible"):
        DinomalyReconstructor(dim=9, num_heads=2)
    with pytest.raises(ValueError, match="expected 8 feature grids"):
        tiny_reconstructor()([torch.randn(1, 8, 2, 2)] * 7)
