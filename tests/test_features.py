"""Feature extractors: CNN maps and ViT token grids behind one protocol, shared per run."""

from __future__ import annotations

import pytest
import torch

from hiad_pl.detectors import HRFastFlow
from hiad_pl.detectors.features import (
    FeatureExtractor,
    FeatureSettings,
    TimmFeatureExtractor,
    ViTTokenExtractor,
    create_extractor,
    shared_feature_extractor,
)


def test_random_vit_s16_gives_32x32_grids_for_three_blocks_on_512_px() -> None:
    settings = FeatureSettings.of("vit_small_patch16_224", ["blocks.8", "blocks.2", "blocks.5"], "none")
    extractor = create_extractor(settings)
    assert isinstance(extractor, ViTTokenExtractor) and isinstance(extractor, FeatureExtractor)
    images = torch.randn(2, 3, 512, 512)
    with torch.no_grad():
        grids = extractor(images)
        # this ViT was trained on inputs scaled to [-1, 1]: the extractor converts ImageNet-normalised ones
        assert extractor.renormalises
        model_input = images * extractor._scale + extractor._shift
        blocks = extractor.model.forward_intermediates(model_input, indices=[2, 5, 8], intermediates_only=True)
    assert [tuple(g.shape) for g in grids] == [(2, 384, 32, 32)] * 3
    assert extractor.channels == [384] * 3 and extractor.reductions == [16] * 3
    # returned in the order asked for, each the block's patch tokens
    for grid, block in zip(grids, (blocks[2], blocks[0], blocks[1])):
        torch.testing.assert_close(grid, block)
    assert not any(p.requires_grad for p in extractor.parameters()) and not extractor.training


def test_patch14_model_on_a_side_that_is_no_multiple_is_resized_to_the_nearest() -> None:
    settings = FeatureSettings.of("vit_small_patch14_reg4_dinov2", ["blocks.3"], "none", model_kwargs={"img_size": 224})
    extractor = create_extractor(settings)
    with torch.no_grad():
        (grid,) = extractor(torch.randn(1, 3, 512, 300))
    # 512 / 14 = 36.6 -> 37 tokens, 300 / 14 = 21.4 -> 21 tokens; the four registers and the class token are dropped
    assert tuple(grid.shape) == (1, 384, 37, 21)


def test_vit_block_names_are_checked() -> None:
    with pytest.raises(ValueError, match=r"blocks.0 \.\.\. blocks.11"):
        create_extractor(FeatureSettings.of("vit_small_patch16_224", ["blocks.12"], "none"))
    with pytest.raises(ValueError, match="not a block name"):
        create_extractor(FeatureSettings.of("vit_small_patch16_224", ["head"], "none"))
    with pytest.raises(ValueError, match="only available for backbone_name efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"):
        create_extractor(FeatureSettings.of("vit_small_patch16_224", ["blocks.1"], "offline"))


def test_cnn_kind_is_todays_features_only_path() -> None:
    extractor = create_extractor(FeatureSettings.of("efficientnet_lite0", ["blocks.4", "blocks.2"], "offline"))
    assert isinstance(extractor, TimmFeatureExtractor)
    assert extractor.channels == [112, 40] and extractor.reductions == [16, 8]


def test_detectors_with_equal_settings_share_one_frozen_extractor() -> None:
    first = HRFastFlow(weights="none", input_size=64, flow_steps=1)
    second = HRFastFlow(weights="none", input_size=128, flow_steps=2)
    other = HRFastFlow(weights="none", layers_to_extract_from=["blocks.2"], input_size=64, flow_steps=1)
    assert first.backbone is second.backbone is shared_feature_extractor(first.feature_settings)
    assert other.backbone is not first.backbone
    # the shared extractor stays out of every detector's checkpoint state
    checkpoint = {"state_dict": first.state_dict()}
    first.on_save_checkpoint(checkpoint)
    assert not any(key.startswith("backbone.") for key in checkpoint["state_dict"])
    assert list(first.frozen_modules) == ["backbone"] and "model" in first.trainable_modules


def test_vit_weights_from_a_local_file_load_at_another_size(tmp_path) -> None:
    import timm

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "vit_tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    settings = FeatureSettings.of("vit_tiny_patch16_224", ["blocks.1"], str(path), model_kwargs={"img_size": 128})
    extractor = create_extractor(settings)
    # the file's 14 x 14 position embedding is resampled to the 8 x 8 grid of a 128-px model
    assert tuple(extractor.model.pos_embed.shape) == (1, 65, 192)
    torch.testing.assert_close(extractor.model.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)
    with torch.no_grad():
        assert tuple(extractor(torch.randn(1, 3, 128, 128))[0].shape) == (1, 192, 8, 8)
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet18").state_dict(), wrong)
    with pytest.raises(ValueError, match="wrong.pth.*do not match backbone 'vit_tiny_patch16_224'"):
        create_extractor(FeatureSettings.of("vit_tiny_patch16_224", ["blocks.1"], str(wrong)))


def test_vit_extractor_runs_no_block_after_the_deepest_asked_for() -> None:
    kwargs = {"depth": 6, "embed_dim": 32, "num_heads": 2}
    extractor = create_extractor(FeatureSettings.of("vit_tiny_patch16_224", ["blocks.2", "blocks.0"], "none", model_kwargs=kwargs))
    calls = [0] * len(extractor.model.blocks)
    hooks = [
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(extractor.model.blocks)
    ]
    with torch.no_grad():
        grids = extractor(torch.randn(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert calls == [1, 1, 1, 0, 0, 0]  # blocks 3-5 cost nothing
    assert [tuple(g.shape) for g in grids] == [(1, 32, 4, 4)] * 2
