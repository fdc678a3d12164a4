"""Shared ViT-detector parts: token shapes, linear attention, gradient mining, StableAdamW, schedules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiad_pl.detectors.vit_parts import (
    LinearAttention,
    StableAdamW,
    cosine_distance_map,
    global_cosine_loss,
    grid_to_tokens,
    hard_mining_rule,
    hard_mining_share,
    soft_mining_rule,
    tokens_to_grid,
)


def test_grid_and_tokens_round_trip_on_non_square_grids() -> None:
    grid = torch.randn(2, 5, 3, 7)
    tokens = grid_to_tokens(grid)
    assert tokens.shape == (2, 21, 5)
    assert torch.equal(tokens[:, 7 + 2], grid[:, :, 1, 2])  # row-major
    assert torch.equal(tokens_to_grid(tokens, (3, 7)), grid)
    with pytest.raises(ValueError, match="3 x 6"):
        tokens_to_grid(tokens, (3, 6))


def test_linear_attention_is_the_normalised_elu_kernel_attention() -> None:
    torch.manual_seed(0)
    attention = LinearAttention(dim=8, num_heads=2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = attention.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)
    expected = (weights / weights.sum(-1, keepdim=True)) @ v
    expected = attention.proj(expected.transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(attention(x), expected, atol=1e-12)


def _gradient(targets: torch.Tensor, predictions: torch.Tensor, rule) -> torch.Tensor:
    predictions = predictions.clone().requires_grad_(True)
    global_cosine_loss([targets], [predictions], rule).backward()
    return predictions.grad


def test_hard_mining_scales_the_gradient_of_the_easiest_points_by_a_tenth() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(2, 6, 4, 5, generator=generator)
    predictions = targets + torch.randn(2, 6, 4, 5, generator=generator) * torch.linspace(0.01, 2, 40).reshape(2, 1, 4, 5)
    plain = _gradient(targets, predictions, None)
    mined = _gradient(targets, predictions, hard_mining_rule(0.75, factor=0.1))
    distances = (1 - F.cosine_similarity(targets, predictions, dim=1)).reshape(-1)
    hard = distances >= distances.topk(10).values[-1]  # 40 points, 25 % = 10 hardest keep their gradient
    assert int(hard.sum()) == 10
    ratio = (mined / plain).permute(0, 2, 3, 1).reshape(40, 6)
    assert torch.allclose(ratio[hard], torch.ones_like(ratio[hard]), atol=1e-5)
    assert torch.allclose(ratio[~hard], torch.full_like(ratio[~hard], 0.1), atol=1e-5)
    # Mining changes gradients only, never the loss value.
    assert torch.equal(global_cosine_loss([targets], [predictions], hard_mining_rule(0.75)), global_cosine_loss([targets], [predictions]))


def test_hard_mining_share_ramps_to_nine_tenths_over_a_thousand_steps() -> None:
    assert [hard_mining_share(s) for s in (0, 250, 500, 1000, 5000)] == pytest.approx([0.0, 0.225, 0.45, 0.9, 0.9])
    with pytest.raises(ValueError, match="share"):
        hard_mining_rule(1.0)


def test_soft_mining_scales_each_gradient_by_the_cubed_relative_distance() -> None:
    generator = torch.Generator().manual_seed(1)
    targets = torch.randn(1, 4, 3, 3, generator=generator)
    predictions = targets + 0.5 * torch.randn(1, 4, 3, 3, generator=generator)
    distances = 1 - F.cosine_similarity(targets, predictions, dim=1, eps=1e-8)
    expected = (distances / distances.mean()) ** 3
    ratio = _gradient(targets, predictions, soft_mining_rule(3.0)) / _gradient(targets, predictions, None)
    assert torch.allclose(ratio, expected.unsqueeze(1).expand_as(ratio), rtol=1e-4)


def test_global_cosine_compares_whole_maps_and_the_map_is_pointwise() -> None:
    targets = torch.ones(1, 2, 2, 2)
    predictions = targets.clone()
    predictions[0, :, 0, 0] = torch.tensor([1.0, -1.0])  # one point orthogonal to its target
    assert float(global_cosine_loss([targets], [predictions])) == pytest.approx(1 - 3 / 4)
    amap = cosine_distance_map([targets, targets], [predictions, targets], (2, 2), reduce="sum")
    assert amap.shape == (1, 2, 2) and float(amap[0, 0, 0]) == pytest.approx(1.0) and float(amap[0, 1, 1]) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(cosine_distance_map([targets, targets], [predictions, targets], (2, 2)), amap / 2)
    assert cosine_distance_map([targets], [predictions], (5, 9)).shape == (1, 5, 9)


def test_stable_adamw_is_adamw_when_updates_are_small_and_damps_large_ones() -> None:
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    grads = [torch.randn(4, 3) for _ in range(3)]

    def run(optimizer_class, **kwargs) -> torch.Tensor:
        param = torch.nn.Parameter(start.clone())
        optimizer = optimizer_class([param], lr=0.1, weight_decay=0.01, **kwargs)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        return param.detach()

    # Huge clip threshold: never damped, so exactly AdamW (plain and AMSGrad).
    for amsgrad in (False, True):
        expected = run(torch.optim.AdamW, amsgrad=amsgrad)
        assert torch.allclose(run(StableAdamW, amsgrad=amsgrad, clip_threshold=1e9), expected, atol=1e-6)
    # The first Adam update has RMS 1 (grad / |grad|): a threshold of 0.5 halves the step.
    param = torch.nn.Parameter(torch.zeros(5))
    optimizer = StableAdamW([param], lr=0.1, weight_decay=0.0, eps=1e-12, clip_threshold=0.5)
    param.grad = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])
    optimizer.step()
    assert torch.allclose(param.detach(), -0.05 * param.grad.sign(), atol=1e-6)
    # Its state is a plain state dict (resumable).
    restored = StableAdamW([torch.nn.Parameter(torch.zeros(5))], lr=0.1)
    restored.load_state_dict(optimizer.state_dict())
    assert float(restored.state_dict()["state"][0]["step"]) == 1.0
