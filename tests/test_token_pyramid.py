"""Token pyramids: ViT-shaped token grids from pretrained EfficientNet-Lite depths, and their weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_image
from torch import Tensor

from hiad_pl.detectors.backbones import IMAGENET_MEAN, IMAGENET_STD, offline_state_dict
from hiad_pl.detectors.features import (
    FeatureSettings,
    ViTTokenExtractor,
    create_extractor,
)
from hiad_pl.detectors.token_pyramid import TokenPyramid, fixed_projection
from hiad_pl.errors import WeightsUnavailableError

LITE0_TAPS = [f"blocks.{i}" for i in range(16)]


def photograph(height: int = 256, width: int = 384) -> Tensor:
    """An ImageNet-normalised crop of a real photograph (scikit-learn's temple picture, shipped offline)."""
    image = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1).float()[None] / 255
    crop = image[..., 60 : 60 + height, 120 : 120 + width]
    return (crop - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def token_cosine(a: Tensor, b: Tensor) -> float:
    """Mean per-token cosine of two ``[B, C, h, w]`` grids."""
    return float(F.cosine_similarity(a, b, dim=1).mean())


def linear_cka(a: Tensor, b: Tensor) -> float:
    """Linear centred kernel alignment of two grids' token sets: 1 for the same content up to rotation and scale."""
    x = a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1]).double()
    y = b.flatten(2).transpose(1, 2).reshape(-1, b.shape[1]).double()
    x, y = x - x.mean(0), y - y.mean(0)
    return float((x.T @ y).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


@pytest.fixture(scope="module")
def lite0_taps() -> list[Tensor]:
    extractor = create_extractor(FeatureSettings.of("lite0_token_pyramid", LITE0_TAPS, "offline"))
    with torch.no_grad():
        return extractor(photograph())


def test_shallow_and_deep_taps_differ_on_a_real_photograph(lite0_taps: list[Tensor]) -> None:
    shallow, deep = lite0_taps[0], lite0_taps[-1]
    assert token_cosine(shallow, deep) < 0.5
    # Not only other coordinates: other content (CKA ignores rotations and scale).
    assert linear_cka(shallow, deep) < 0.7
    # ViTAD's quickstart teachers (ends of stages 2, 3, 4) against its neck (the deepest block).
    assert all(linear_cka(lite0_taps[i], lite0_taps[15]) < 0.8 for i in (4, 7, 10))
    # Dinomaly's / INP-Former's quickstart groups: blocks 3-6 against blocks 7-10.
    shallow_group = torch.stack(lite0_taps[3:7]).mean(0)
    deep_group = torch.stack(lite0_taps[7:11]).mean(0)
    assert linear_cka(shallow_group, deep_group) < 0.9


def test_blocks_of_one_stage_form_a_residual_stream(lite0_taps: list[Tensor]) -> None:
    # Blocks 8-10 (stage 4) update one residual stream, as a ViT's blocks do: close, not equal.
    for i in (8, 9):
        assert 0.8 < token_cosine(lite0_taps[i], lite0_taps[i + 1]) < 0.995
    # Tokens change across the picture (a constant grid would also have a low cosine to others).
    for grid in (lite0_taps[0], lite0_taps[15]):
        tokens = F.normalize(grid.flatten(2)[0].T, dim=1)
        assert float((tokens @ tokens.T).mean()) < 0.6


def test_taps_are_the_shipped_cnn_blocks_resampled_and_projected() -> None:
    images = photograph(128, 160)
    pyramid = create_extractor(FeatureSettings.of("lite0_token_pyramid", ["blocks.10", "blocks.4", "blocks.15"], "offline"))
    cnn = create_extractor(FeatureSettings.of("efficientnet_lite0", ["blocks.2", "blocks.4", "blocks.6"], "offline"))
    assert isinstance(pyramid, ViTTokenExtractor) and pyramid.renormalises
    assert pyramid.patch_size == (16, 16) and pyramid.channels == [384] * 3 and pyramid.reductions == [16] * 3
    model: TokenPyramid = pyramid.model
    with torch.no_grad():
        grids = pyramid(images)
        stride8, stride16, stride32 = cnn(images)
    assert [tuple(g.shape) for g in grids] == [(1, 384, 8, 10)] * 3
    expected = {
        0: model.tap(10, stride16, (8, 10)),  # stride 16: only projected
        1: model.tap(4, stride8, (8, 10)),  # stride 8: averaged 2 x 2
        2: model.tap(15, stride32, (8, 10)),  # stride 32: bilinear
    }
    for position, grid in expected.items():
        torch.testing.assert_close(grids[position], grid, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        expected[1], model.tap(4, F.avg_pool2d(stride8, 2), (8, 10)), rtol=1e-5, atol=1e-5
    )
    shipped = offline_state_dict("efficientnet_lite0")
    assert torch.equal(model.blocks[10].conv_pwl.weight, shipped["blocks.4.2.conv_pwl.weight"])
    assert torch.equal(model.patch_embed.conv_stem.weight, shipped["conv_stem.weight"])


def test_projections_are_fixed_orthonormal_and_seeded() -> None:
    narrow = fixed_projection(40, 96, seed=3)
    torch.testing.assert_close(narrow @ narrow.T, torch.eye(40), atol=1e-5, rtol=0)  # distances kept
    wide = fixed_projection(320, 96, seed=3)
    torch.testing.assert_close(wide.T @ wide, torch.eye(96), atol=1e-5, rtol=0)
    assert torch.equal(narrow, fixed_projection(40, 96, seed=3)) and not torch.equal(narrow, fixed_projection(40, 96, seed=4))
    images = photograph(64, 96)
    settings = FeatureSettings.of("lite0_token_pyramid", ["blocks.7"], "offline", model_kwargs={"embed_dim": 96})
    with torch.no_grad():
        first, second = create_extractor(settings)(images)[0], create_extractor(settings)(images)[0]
        other_seed = create_extractor(
            FeatureSettings.of("lite0_token_pyramid", ["blocks.7"], "offline", model_kwargs={"embed_dim": 96, "projection_seed": 1})
        )(images)[0]
    assert torch.equal(first, second)
    assert not torch.allclose(first, other_seed, atol=1e-2)
    assert not any(key.startswith("projection") for key in create_extractor(settings).model.state_dict())


@pytest.mark.parametrize(("name", "depth"), [("lite1_token_pyramid", 21), ("lite2_token_pyramid", 21)])
def test_lite1_and_lite2_pyramids_run_only_the_blocks_asked_for(name: str, depth: int) -> None:
    extractor = create_extractor(FeatureSettings.of(name, ["blocks.6", "blocks.2"], "offline", model_kwargs={"embed_dim": 64}))
    assert len(extractor.model.blocks) == depth
    calls = [0] * depth
    hooks = [
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(extractor.model.blocks)
    ]
    with torch.no_grad():
        grids = extractor(torch.randn(2, 3, 72, 100))  # sides rounded to 64 x 96 px of tokens
    for hook in hooks:
        hook.remove()
    assert calls == [1] * 7 + [0] * (depth - 7)
    assert [tuple(g.shape) for g in grids] == [(2, 64, 4, 6)] * 2
    assert not any(p.requires_grad for p in extractor.parameters()) and not extractor.training


def test_pyramid_weights_from_a_cnn_file_and_clear_errors(tmp_path: Path) -> None:
    cnn = timm.create_model("tf_efficientnet_lite0")
    torch.manual_seed(5)
    for parameter in cnn.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    path = tmp_path / "lite0.pth"
    torch.save(cnn.state_dict(), path)
    loaded = create_extractor(FeatureSettings.of("lite0_token_pyramid", ["blocks.15"], str(path))).model
    assert torch.equal(loaded.blocks[15].conv_pwl.weight, cnn.blocks[6][0].conv_pwl.weight)
    assert torch.equal(loaded.blocks[3].bn1.running_mean, cnn.blocks[2][0].bn1.running_mean)
    wrong = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), wrong)
    with pytest.raises(ValueError, match=r"resnet\.pth.*do not match backbone 'lite0_token_pyramid'"):
        create_extractor(FeatureSettings.of("lite0_token_pyramid", ["blocks.1"], str(wrong)))
    lite2 = tmp_path / "lite2.pth"
    torch.save(timm.create_model("tf_efficientnet_lite2").state_dict(), lite2)
    with pytest.raises(ValueError, match="lite2.pth"):
        create_extractor(FeatureSettings.of("lite0_token_pyramid", ["blocks.1"], str(lite2)))
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        create_extractor(FeatureSettings.of("lite0_token_pyramid", ["blocks.1"], str(tmp_path / "absent.pth")))
    with pytest.raises(WeightsUnavailableError, match="no hub weights.*weights: offline"):
        create_extractor(FeatureSettings.of("lite0_token_pyramid", ["blocks.1"], "hub"))
    with pytest.raises(ValueError, match="blocks.0 ... blocks.15"):
        create_extractor(FeatureSettings.of("lite0_token_pyramid", ["blocks.16"], "none"))
    with pytest.raises(ValueError, match="embed_dim and projection_seed only"):
        create_extractor(FeatureSettings.of("lite0_token_pyramid", ["blocks.1"], "none", model_kwargs={"depth": 3}))


def test_the_random_block_hybrid_is_gone_with_a_pointer_to_its_replacement() -> None:
    with pytest.raises(ValueError, match="random.*lite0_token_pyramid"):
        create_extractor(FeatureSettings.of("vit_lite0_hybrid", ["blocks.1"], "offline"))
