"""Backbones: names, layers, the four weight sources and their errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image

from hiad_pl.detectors import backbones
from hiad_pl.detectors.backbones import create_feature_extractor, offline_lite0_state_dict, resolve_backbone_name

# ImageNet classes a photograph of a Chinese temple may fairly be called.
TEMPLE_CLASSES = {442, 497, 538, 663, 698, 832}  # bell cote, church, dome, monastery, palace, stupa


def test_tutorial_alias_resolves_to_timm_name() -> None:
    assert resolve_backbone_name("wideresnet50") == "wide_resnet50_2.tv_in1k"
    assert resolve_backbone_name("resnet18") == "resnet18"


def test_unknown_backbone_names_option_and_close_matches() -> None:
    with pytest.raises(ValueError, match="backbone_name") as info:
        resolve_backbone_name("resnt18")
    assert "resnet18" in str(info.value)


def test_layers_come_back_in_requested_order() -> None:
    extractor = create_feature_extractor("resnet18", ["layer3", "layer2"], weights="none")
    maps = extractor(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 256, 4, 6), (1, 128, 8, 12)]
    assert extractor.channels == [256, 128]
    assert extractor.reductions == [16, 8]
    assert not extractor.training


def test_unknown_layer_lists_available_layers() -> None:
    with pytest.raises(ValueError, match="layer9.*available layers: act1, layer1, layer2, layer3, layer4"):
        create_feature_extractor("resnet18", ["layer9"], weights="none")


def test_random_init_is_reproducible() -> None:
    first = create_feature_extractor("resnet18", ["layer2"], weights="none").state_dict()
    second = create_feature_extractor("resnet18", ["layer2"], weights="none").state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_offline_weights_classify_a_photograph() -> None:
    state = offline_lite0_state_dict()
    assert len(state) == backbones.OFFLINE_TENSOR_COUNT == 296
    model = timm.create_model(backbones.OFFLINE_ARCHITECTURE).eval()
    model.load_state_dict(state)  # strict: every tensor has its place
    image = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1).float()[None] / 255
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        probabilities = model((image - 0.5) / 0.5).softmax(-1)[0]
        untrained = timm.create_model(backbones.OFFLINE_ARCHITECTURE).eval()((image - 0.5) / 0.5).softmax(-1)[0]
    top5 = set(probabilities.topk(5).indices.tolist())
    assert top5 & TEMPLE_CLASSES
    assert probabilities.max() > 0.2 > untrained.max()


def test_offline_extractor_holds_the_shipped_tensors() -> None:
    extractor = create_feature_extractor("efficientnet_lite0", ["blocks.2", "blocks.4"], weights="offline")
    shipped = offline_lite0_state_dict()
    loaded = extractor.model.state_dict()
    assert all(torch.equal(loaded[key], shipped[key]) for key in loaded)
    running_vars = [v for k, v in loaded.items() if k.endswith("running_var")]
    assert all(not torch.allclose(v, torch.ones_like(v)) for v in running_vars)
    random_extractor = create_feature_extractor("efficientnet_lite0", ["blocks.2", "blocks.4"], weights="none")
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(extractor(image)[1], random_extractor(image)[1], atol=1e-3)


@pytest.mark.parametrize(
    ("backbone", "tensors", "side", "channels"),
    [("efficientnet_lite1", 386, 240, [40, 112]), ("efficientnet_lite2", 386, 260, [48, 120])],
)
def test_lite1_and_lite2_offline_weights_are_the_shipped_imagenet_tensors(
    backbone: str, tensors: int, side: int, channels: list[int]
) -> None:
    shipped = backbones.offline_state_dict(backbone)
    assert len(shipped) == backbones.OFFLINE_WEIGHTS[backbone].tensor_count == tensors
    extractor = create_feature_extractor(backbone, ["blocks.2", "blocks.4"], weights="offline")
    loaded = extractor.model.state_dict()
    assert all(torch.equal(loaded[key], shipped[key]) for key in loaded)
    assert extractor.channels == channels and extractor.reductions == [8, 16] and extractor.renormalises
    maps = extractor(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, channels[0], 8, 12), (1, channels[1], 4, 6)]
    # They are ImageNet weights: the full model names the temple in the photograph.
    model = timm.create_model(f"tf_{backbone}").eval()
    model.load_state_dict(shipped)
    image = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1).float()[None] / 255
    image = torch.nn.functional.interpolate(image, size=(side, side), mode="bilinear", antialias=True)
    with torch.no_grad():
        probabilities = model((image - 0.5) / 0.5).softmax(-1)[0]
    assert int(probabilities.argmax()) in TEMPLE_CLASSES and float(probabilities.max()) > 0.2


def test_offline_features_are_spatially_aligned() -> None:
    """A spot's feature response is centred on the spot (the TF padding of the shipped weights)."""
    extractor = create_feature_extractor("efficientnet_lite0", ["blocks.2", "blocks.4"], weights="offline")
    flat = torch.zeros(1, 3, 128, 128)
    spot = flat.clone()
    spot[..., 60:68, 60:68] = 2.0  # centre at pixel 64
    with torch.no_grad():
        responses = [(b - a).norm(dim=1)[0] for a, b in zip(extractor(flat), extractor(spot))]
    for response, stride in zip(responses, extractor.reductions):
        weights = response.square() / response.square().sum()
        centres = (torch.arange(response.shape[0]) + 0.5) * stride
        row_centroid = (weights.sum(1) * centres).sum()
        col_centroid = (weights.sum(0) * centres).sum()
        assert abs(row_centroid - 64) < 4 and abs(col_centroid - 64) < 4


def test_offline_rejects_other_backbones() -> None:
    with pytest.raises(ValueError, match="offline is only available"):
        create_feature_extractor("resnet18", ["layer2"], weights="offline")


def _resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("resnet18").state_dict()


def test_local_file_with_wrapper_prefix_loads(tmp_path: Path) -> None:
    state = _resnet18_state(seed=7)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    extractor = create_feature_extractor("resnet18", ["layer2"], weights=str(path))
    loaded = extractor.model.state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in loaded)


def test_headless_safetensors_file_loads(tmp_path: Path) -> None:
    state = {k: v for k, v in _resnet18_state(seed=3).items() if not k.startswith("fc.")}
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    extractor = create_feature_extractor("resnet18", ["layer1"], weights=str(path))
    assert torch.equal(extractor.model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_mismatched_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "not_resnet34.pth"
    torch.save(_resnet18_state(seed=0), path)
    with pytest.raises(ValueError, match="not_resnet34.pth.*missing keys"):
        create_feature_extractor("resnet34", ["layer2"], weights=str(path))


def test_bad_weights_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither 'hub', 'offline', 'none'"):
        create_feature_extractor("resnet18", ["layer2"], weights="imagenet")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        create_feature_extractor("resnet18", ["layer2"], weights=str(tmp_path / "absent.pth"))


def test_hub_failure_explains_offline_options(monkeypatch: pytest.MonkeyPatch) -> None:
    real_create = timm.create_model

    def unreachable_hub(*args, pretrained: bool = False, **kwargs):
        if pretrained:
            raise OSError("Temporary failure in name resolution")
        return real_create(*args, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", unreachable_hub)
    with pytest.raises(RuntimeError) as info:
        create_feature_extractor("resnet18", ["layer2"], weights="hub")
    message = str(info.value)
    expected = ("could not be downloaded", "weights: offline", "weights: /path/to/model.safetensors", "weights: none")
    assert all(phrase in message for phrase in expected)
    # The message names the file that holds the weights in timm's layout.
    assert "model.safetensors of the Hugging Face repository timm/resnet18" in message


def test_inputs_renormalised_only_for_non_imagenet_models() -> None:
    assert not create_feature_extractor("resnet18", ["layer1"], weights="none").renormalises
    offline = create_feature_extractor("efficientnet_lite0", ["blocks.2"], weights="offline")
    assert offline.renormalises
    # An ImageNet-normalised mid-grey becomes the model's own normalisation of mid-grey (0 for mean/std 0.5).
    grey = (torch.full((1, 3, 1, 1), 0.5) - torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        backbones.IMAGENET_STD
    ).view(1, 3, 1, 1)
    assert torch.allclose(grey * offline._scale + offline._shift, torch.zeros(1, 3, 1, 1), atol=1e-6)


def _batch_norms(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())


@pytest.mark.parametrize(("name", "layers"), [("efficientnet_lite0", ["blocks.2", "blocks.4"]), ("resnet18", ["layer2", "layer3"])])
def test_folded_batch_norms_give_the_same_maps(name: str, layers: list[str]) -> None:
    weights = "offline" if name == "efficientnet_lite0" else "none"
    original = create_feature_extractor(name, layers, weights)
    folded = create_feature_extractor(name, layers, weights)
    norms = _batch_norms(folded)
    sample = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert backbones.fold_batch_norms(folded, sample) == norms > 0
    assert _batch_norms(folded) == 0
    images = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(2))  # not the checked size
    with torch.no_grad():
        for mine, reference in zip(folded(images), original(images)):
            assert mine.shape == reference.shape
            assert float((mine - reference).abs().max()) <= 1e-4 * float(reference.abs().max())


class _RawOutputAlsoUsed(torch.nn.Module):
    """A convolution whose output feeds ``after`` and, as it is, the output too: folding or fusing ``after`` would change it."""

    def __init__(self, after: torch.nn.Module) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.after = after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.after(y) + y


def test_folding_that_would_change_the_outputs_is_undone(caplog: pytest.LogCaptureFixture) -> None:
    norm = torch.nn.BatchNorm2d(4)
    norm.running_mean.fill_(0.5)
    norm.running_var.fill_(4.0)
    model = _RawOutputAlsoUsed(norm).eval()
    sample = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(sample)
    assert backbones.fold_batch_norms(model, sample) == 0
    assert "left unfolded" in caplog.text
    assert model.after is norm and model.conv.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(sample), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="eval-mode"):
        backbones.fold_batch_norms(model.train(), sample)


def test_shared_frozen_extractor_is_folded_a_trained_one_is_not() -> None:
    from hiad_pl.detectors.features import FeatureSettings, create_extractor, shared_feature_extractor

    settings = FeatureSettings.of("efficientnet_lite0", ["blocks.1", "blocks.2"], "offline")
    shared, own = shared_feature_extractor(settings), create_extractor(settings)
    assert _batch_norms(shared) == 0 and _batch_norms(own) > 0
    assert len(shared.model.blocks) == 3 and len(own.model.blocks) == 7  # blocks.0-2 are all blocks.2 needs
    # the shared one's convolutions run channels-last (NHWC activations), the trained one's as built
    convolutions = [m.weight for m in shared.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    assert not all(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in own.modules() if isinstance(m, torch.nn.Conv2d))
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for mine, reference in zip(shared(images), own(images)):
            assert mine.is_contiguous(memory_format=torch.channels_last)
            assert float((mine - reference).abs().max()) <= 1e-4 * float(reference.abs().max())


def _same_convolutions(kernel: int, groups: int) -> torch.nn.Sequential:
    from timm.layers.conv2d_same import Conv2dSame

    return torch.nn.Sequential(Conv2dSame(4, 8, kernel, stride=2, groups=groups), Conv2dSame(8, 8, kernel, stride=1))


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("groups", [1, 4])
def test_symmetric_same_convolution_equals_timm_padded_one(kernel: int, groups: int) -> None:
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    # even sizes pad one more after than before (the grown kernel), odd ones the same (the kernel as it is)
    for height, width in ((32, 32), (33, 32), (30, 31), (7, 9)):
        model, x = _same_convolutions(kernel, groups), torch.randn(2, 4, height, width)
        with torch.no_grad():
            expected = model(x)
            assert backbones.symmetric_same_padding(model) == 2
            found = model(x)
        assert all(isinstance(m, backbones.SymmetricSameConv2d) for m in model)
        torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-6)
    assert backbones.symmetric_same_padding(Conv2dSame(4, 4, 3, stride=2, dilation=2)) == 0  # cannot grow by one tap
    # the grown kernels are buffers: they follow the module's memory format and dtype
    model.to(memory_format=torch.channels_last)
    assert model[0]._grown_11.shape[-2:] == (kernel + 1, kernel + 1)
    assert model[0]._grown_11.is_contiguous(memory_format=torch.channels_last)
    assert model.double()[0]._grown_10.dtype == torch.float64


def test_shared_tf_extractor_pads_without_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    from timm.layers.conv2d_same import Conv2dSame

    from hiad_pl.detectors.features import FeatureSettings, create_extractor, shared_feature_extractor

    settings = FeatureSettings.of("efficientnet_lite0", ["blocks.2", "blocks.4"], "offline")
    shared, own = shared_feature_extractor(settings), create_extractor(settings)
    assert not any(isinstance(m, Conv2dSame) for m in shared.modules())
    assert sum(isinstance(m, backbones.SymmetricSameConv2d) for m in shared.modules()) == 4  # the stride-2 ones
    if backbones.fused_convolution_available():  # and every ReLU6 runs inside its convolution
        assert sum(isinstance(m, backbones.ConvActivation) for m in shared.modules()) == 22
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = own(images)
        pads = []
        original_pad = torch.nn.functional.pad
        monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: pads.append(a[1]) or original_pad(*a, **k))
        mine = shared(images)
    assert pads == []
    for found, expected in zip(mine, reference):
        assert float((found - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


needs_fused_convolution = pytest.mark.skipif(
    not backbones.fused_convolution_available(), reason="torch built without oneDNN fused convolutions"
)


@needs_fused_convolution
@pytest.mark.parametrize(("name", "layers"), [("efficientnet_lite0", ["blocks.2", "blocks.4"]), ("resnet18", ["layer2", "layer3"])])
def test_fused_activations_give_the_same_maps(name: str, layers: list[str]) -> None:
    weights = "offline" if name == "efficientnet_lite0" else "none"
    original = create_feature_extractor(name, layers, weights)
    fused = create_feature_extractor(name, layers, weights)
    sample = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    backbones.fold_batch_norms(fused, sample)  # a convolution then its activation, as in a prepared backbone
    backbones.symmetric_same_padding(fused)  # TF-"same" convolutions fuse once they pad symmetrically
    merged = backbones.fuse_conv_activations(fused, sample)
    assert merged == sum(isinstance(m, backbones.ConvActivation) for m in fused.modules()) > 0
    if name == "efficientnet_lite0":  # every ReLU6 follows a convolution once the BatchNorms are folded
        assert merged == sum(isinstance(m, torch.nn.ReLU6) for m in original.modules())
    images = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(2))  # not the checked size
    with torch.no_grad():
        for mine, reference in zip(fused(images), original(images)):
            assert float((mine - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
        # other dtypes and graphs that need gradients run the two modules
        doubled = fused.double()(images.double())
        fused.float()
    grad_images = images.clone().requires_grad_()
    with_grad = fused(grad_images)
    with_grad[0].sum().backward()
    assert grad_images.grad is not None and grad_images.grad.abs().sum() > 0
    with torch.no_grad():
        references = original(images)
    for mine, reference, wide in zip(with_grad, references, doubled):
        assert float((mine.detach() - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
        assert float((wide.float() - reference).abs().max()) <= 1e-4 * float(reference.abs().max())


@needs_fused_convolution
def test_fusion_that_would_change_the_outputs_is_undone(caplog: pytest.LogCaptureFixture) -> None:
    model = _RawOutputAlsoUsed(torch.nn.ReLU()).eval()
    sample = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(sample)
    assert backbones.fuse_conv_activations(model, sample) == 0
    assert "left unfused" in caplog.text
    assert type(model.conv) is torch.nn.Conv2d and isinstance(model.after, torch.nn.ReLU)
    with torch.no_grad():
        torch.testing.assert_close(model(sample), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="post-operation"):
        backbones.ConvActivation(model.conv, torch.nn.Tanhshrink())


@needs_fused_convolution
def test_fusion_is_skipped_for_a_model_the_sample_does_not_fit(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval()
    assert backbones.fuse_conv_activations(model, torch.randn(1, 3, 8, 8)) == 0
    assert "convolution-activation fusion skipped" in caplog.text and isinstance(model[1], torch.nn.ReLU)


def test_folding_is_skipped_for_a_model_the_sample_does_not_fit(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    assert backbones.fold_batch_norms(model, torch.randn(1, 3, 8, 8)) == 0
    assert "skipped" in caplog.text and isinstance(model[1], torch.nn.BatchNorm2d)


@pytest.mark.parametrize(("conv_bias", "affine"), [(False, True), (True, False)])
def test_folding_matches_torchs_conv_bn_fusion(conv_bias: bool, affine: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1, bias=conv_bias), torch.nn.BatchNorm2d(6, affine=affine), torch.nn.ReLU()
    ).eval()
    with torch.no_grad():  # statistics far from the identity, so that a wrong fold shows
        model[1].running_mean.copy_(torch.randn(6, generator=generator))
        model[1].running_var.copy_(torch.rand(6, generator=generator) * 3 + 0.1)
        if affine:
            model[1].weight.copy_(torch.randn(6, generator=generator))
            model[1].bias.copy_(torch.randn(6, generator=generator))
    unfolded = torch.nn.Sequential(*[copy.deepcopy(m) for m in model]).eval()
    fused = torch.nn.utils.fuse_conv_bn_eval(unfolded[0], unfolded[1])
    images = torch.randn(2, 3, 16, 16, generator=generator)
    assert backbones.fold_batch_norms(model, images) == 1
    assert isinstance(model[1], torch.nn.Identity) and isinstance(model[2], torch.nn.ReLU)
    # torch's fusion in float32 against the fold's float64 rounded once
    torch.testing.assert_close(model[0].weight, fused.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[0].bias, fused.bias, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(images), unfolded(images), rtol=0, atol=1e-5)


def test_single_channel_shared_extractor_is_checked_on_single_channel_images() -> None:
    from hiad_pl.detectors.features import FeatureSettings, shared_feature_extractor

    settings = FeatureSettings.of("resnet18", ["layer1"], "none", model_kwargs={"in_chans": 1})
    extractor = shared_feature_extractor(settings)
    assert _batch_norms(extractor) == 0
    with torch.no_grad():
        (grid,) = extractor(torch.randn(1, 1, 64, 64))
    assert grid.shape == (1, 64, 16, 16)


def test_blocks_after_the_deepest_requested_layer_are_dropped() -> None:
    sample = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    full = create_feature_extractor("efficientnet_lite0", ["blocks.4", "blocks.2"], "offline")
    trimmed = create_feature_extractor("efficientnet_lite0", ["blocks.4", "blocks.2"], "offline")
    ran: list[str] = []
    for name, block in trimmed.model.blocks.named_children():
        block.register_forward_hook(lambda *_, name=name: ran.append(name))
    assert backbones.drop_unused_blocks(trimmed, sample) == 2 and len(trimmed.model.blocks) == 5
    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ran.clear()
        for mine, reference in zip(trimmed(images), full(images)):
            assert torch.equal(mine, reference)
    assert ran == ["0", "1", "2", "3", "4"]  # blocks.5 and blocks.6 no longer run
    deepest = create_feature_extractor("efficientnet_lite0", ["blocks.6"], "none")
    assert backbones.drop_unused_blocks(deepest, sample) == 0 and len(deepest.model.blocks) == 7
    resnet = create_feature_extractor("resnet18", ["layer2"], "none")  # timm already stops at layer2
    assert backbones.drop_unused_blocks(resnet, sample) == 0


@pytest.mark.parametrize(
    ("name", "layers"), [("efficientnet_lite0", ["blocks.2", "blocks.1"]), ("mobilenetv3_small_050", ["blocks.3", "blocks.1"])]
)
def test_early_stop_keeps_the_blocks_timms_own_pruning_keeps(name: str, layers: list[str]) -> None:
    full = create_feature_extractor(name, layers, "none")
    trimmed = create_feature_extractor(name, layers, "none")
    blocks = len(trimmed.model.blocks)
    sample = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    dropped = backbones.drop_unused_blocks(trimmed, sample)
    # timm's public pruning of the full model, for the same layers
    pruned = timm.create_model(name, pretrained=False)
    pruned.prune_intermediate_layers(backbones.layer_out_indices(name, layers), prune_head=True)
    assert dropped > 0 and len(trimmed.model.blocks) == blocks - dropped == len(pruned.blocks)
    ran: list[torch.nn.Module] = []
    for extractor in (full, trimmed):
        for block in extractor.model.blocks:
            block.register_forward_hook(lambda module, *_: ran.append(module))
    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = full(images)
        full_ran = len(ran)
        maps = trimmed(images)
    assert (full_ran, len(ran) - full_ran) == (blocks, blocks - dropped)  # the dropped blocks no longer run
    assert len(maps) == len(reference) == 2 and all(torch.equal(a, b) for a, b in zip(maps, reference))


class _NeedsEveryBlock(torch.nn.Module):
    """Says (in timm's FeatureInfo) that its map ends stage 1, yet its forward indexes its last block."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models import FeatureInfo

        self.blocks = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 1))
        self.feature_info = FeatureInfo([{"module": "blocks.0", "num_chs": 3, "reduction": 1, "stage": 1}], (0,))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.blocks[0](x) + 0 * self.blocks[2](x)]


def test_early_stop_keeps_the_blocks_when_the_forward_fails_without_them(caplog: pytest.LogCaptureFixture) -> None:
    model = _NeedsEveryBlock().eval()
    assert backbones.drop_unused_blocks(model, torch.randn(1, 3, 4, 4)) == 0
    assert len(model.blocks) == 3 and "kept them" in caplog.text
