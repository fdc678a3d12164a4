"""HRINPFormer: prototypes from learnable queries, a decoder that looks only at them, coherence loss."""

from __future__ import annotations

import pytest
import torch

from hiad_pl.detectors.inpformer import INPFormerReconstructor, coherence_loss, inpformer_loss
from hiad_pl.detectors.vit_parts import PrototypeGuidedBlock


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with large random weights, so that every path carries signal (attention scales stay positive)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            value = torch.randn(parameter.shape, generator=generator) * 0.5
            parameter.copy_(value.abs() + 1 if name.endswith("attn.scale") else value)
    return module


def test_guided_block_tokens_attend_only_to_the_prototypes() -> None:
    torch.manual_seed(0)
    block = perturbed(PrototypeGuidedBlock(dim=8, num_heads=2)).double()
    tokens, prototypes = torch.randn(1, 12, 8, dtype=torch.float64), torch.randn(1, 6, 8, dtype=torch.float64)
    output = block(tokens, prototypes)
    changed = tokens.clone()
    changed[0, 5] = torch.randn(8, dtype=torch.float64) * 10  # perturb one token
    other = [i for i in range(12) if i != 5]
    new_output = block(changed, prototypes)
    # no token sees another token: equal to float64 rounding (a blocked matrix product may round a row
    # differently when another row changes), where seeing the 10x token would move them by far more
    torch.testing.assert_close(new_output[0, other], output[0, other], rtol=0, atol=1e-12)
    assert not torch.allclose(new_output[0, 5], output[0, 5])
    assert not torch.allclose(block(tokens, prototypes.flip(-1)), output)  # the prototypes are what it looks at


def test_whole_decoder_keeps_tokens_apart_and_groups_like_dinomaly() -> None:
    torch.manual_seed(0)
    assert INPFormerReconstructor(dim=8, num_heads=2).prototype_queries.shape == (6, 8)
    # Two blocks: with large random weights deeper stacks collapse to one vector (ReLU similarities all 0).
    model = perturbed(INPFormerReconstructor(dim=8, num_heads=2, num_taps=2, depth=2, groups=[[0], [1]])).double().eval()
    taps = [torch.randn(1, 8, 3, 4, dtype=torch.float64) for _ in range(2)]  # non-square grid
    targets, reconstructions, coherence = model(taps)
    assert [tuple(t.shape) for t in reconstructions] == [(1, 8, 3, 4)] * 2 and coherence.ndim == 0
    # With the image's prototypes fixed, a decoded token depends on its own input token alone
    # (the prototypes themselves are gathered from all tokens).
    fused = torch.stack(taps).mean(0).flatten(2).transpose(1, 2)
    prototypes = model.prototypes(fused)
    x = model.bottleneck(fused)
    y = x.clone()
    y[0, 7] = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 5
    for block in model.decoder:
        x, y = block(x, prototypes), block(y, prototypes)
    assert torch.equal(x[0, :7], y[0, :7]) and not torch.allclose(x[0, 7], y[0, 7])


def test_coherence_loss_is_the_distance_to_the_nearest_prototype() -> None:
    prototypes = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    expected = (0.0 + 0.0 + (1 - 2**-0.5)) / 3
    assert float(coherence_loss(tokens, prototypes)) == pytest.approx(expected)


def test_total_loss_adds_a_fifth_of_the_coherence_and_its_gradients_reach_every_part() -> None:
    torch.manual_seed(0)
    model = INPFormerReconstructor(dim=8, num_heads=2, num_prototypes=3)
    taps = [torch.randn(2, 8, 2, 3) for _ in range(8)]
    targets, reconstructions, coherence = model(taps)
    loss = inpformer_loss(targets, reconstructions, coherence)
    zero_coherence = inpformer_loss(targets, reconstructions, torch.zeros(()))
    assert float((loss - zero_coherence).detach()) == pytest.approx(0.2 * float(coherence.detach()), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="num_prototypes"):
        INPFormerReconstructor(dim=8, num_heads=2, num_prototypes=0)
