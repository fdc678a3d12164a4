"""HRDetector: frozen backbone, Trainer defaults, registry and multi-resolution feature fusion."""

from __future__ import annotations

import lightning
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.tiling import MultiResolutionHRImageSpliter, low_resolution_window
from hiad_pl.detectors import DETECTORS, HRDetector, HRPatchCore, OnePassDetector, get_detector
from hiad_pl.detectors.base import window_boxes


class FeatureNormDetector(HRDetector):
    """The smallest concrete detector: norm of the fused first-layer features."""

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        norms = self.fused_embedding(batch)[0].norm(dim=1, keepdim=True)
        return F.interpolate(norms, size=batch.image.shape[-2:], mode="bilinear")[:, 0]


class PooledPixelsDetector(FeatureNormDetector):
    """Its 'backbone features' are 4x4 average-pooled pixels: a linear image stays linear."""

    def embedding(self, images: Tensor) -> list[Tensor]:
        return [F.avg_pool2d(images, 4)]


def make_detector(cls: type[HRDetector] = FeatureNormDetector, **kwargs) -> HRDetector:
    return cls(
        backbone_name="resnet18", layers_to_extract_from=["layer1", "layer2"], weights="none", input_size=64, **kwargs
    )


def make_batch(image: Tensor, low: Tensor | None = None, windows: Tensor | None = None) -> PatchBatch:
    size = image.shape[0]
    return PatchBatch(
        image=image,
        mask=torch.zeros(size, *image.shape[-2:]),
        label=torch.zeros(size, dtype=torch.long),
        index=torch.zeros(size, 4, dtype=torch.long),
        low_resolution_images=low,
        low_resolution_windows=windows,
    )


def test_backbone_frozen_and_kept_in_eval_mode() -> None:
    detector = make_detector()
    assert not any(p.requires_grad for p in detector.backbone.parameters())
    detector.train()
    assert detector.training and not detector.backbone.training
    maps = detector.embedding(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 16, 16), (2, 128, 8, 8)]
    assert detector.input_size == (64, 64)


def test_trainer_defaults_and_one_pass_plumbing() -> None:
    assert make_detector().trainer_defaults() == {}
    patchcore = HRPatchCore(weights="none", input_size=32)
    assert isinstance(patchcore, OnePassDetector) and patchcore.fits_in_one_pass
    assert patchcore.trainer_defaults() == {"max_epochs": 1, "num_sanity_val_steps": 0}
    assert patchcore.configure_optimizers() == [] and not patchcore.automatic_optimization
    patchcore.automatic_optimization = False  # what Lightning's own idiom sets: accepted
    with pytest.raises(ValueError, match="fitted in one pass"):
        patchcore.automatic_optimization = True
    assert not patchcore.automatic_optimization


def test_predict_step_returns_float_maps_at_input_size() -> None:
    detector = make_detector()
    maps = detector.predict_step(make_batch(torch.randn(3, 3, 48, 80)), 0)
    assert maps.shape == (3, 48, 80) and maps.dtype == torch.float32


def test_registry_resolves_names_and_paths() -> None:
    assert DETECTORS["patchcore"] is HRPatchCore
    assert get_detector("patchcore") is HRPatchCore
    assert get_detector("HRPatchCore") is HRPatchCore
    assert get_detector("hiad_pl.detectors.patchcore.HRPatchCore") is HRPatchCore
    assert get_detector(HRPatchCore) is HRPatchCore
    with pytest.raises(ValueError, match="unknown detector .padding.; known names: .*patchcore"):
        get_detector("padding")
    with pytest.raises(ValueError, match="not a subclass"):
        get_detector("torch.nn.Linear")


def test_without_fusion_weights_fused_is_plain() -> None:
    detector = make_detector()
    image = torch.randn(2, 3, 64, 64)
    low = torch.randn(2, 1, 3, 64, 64)
    windows = torch.tensor([[[0, 0, 32, 32]], [[32, 32, 32, 32]]])
    plain = detector.embedding(image)
    for fused, expected in zip(detector.fused_embedding(make_batch(image, low, windows)), plain):
        assert torch.equal(fused, expected)


def test_zero_low_resolution_weight_gives_plain_features() -> None:
    detector = make_detector(fusion_weights=[2.0, 0.0])
    image = torch.randn(2, 3, 64, 64)
    low = torch.randn(2, 1, 3, 64, 64)
    windows = torch.tensor([[[0, 0, 32, 32]], [[16, 32, 32, 32]]])
    for fused, expected in zip(detector.fused_embedding(make_batch(image, low, windows)), detector.embedding(image)):
        assert torch.allclose(fused, expected, atol=1e-6)


def test_full_window_of_identical_crop_gives_plain_features() -> None:
    detector = make_detector(fusion_weights=[0.3, 0.7])
    image = torch.randn(2, 3, 64, 96)
    windows = torch.tensor([0, 0, 96, 64]).expand(2, 1, 4)
    fused = detector.fused_embedding(make_batch(image, image[:, None], windows))
    for got, expected in zip(fused, detector.embedding(image)):
        assert torch.allclose(got, expected, atol=1e-5)


def test_window_boxes_scale_each_axis() -> None:
    windows = torch.tensor([[16, 8, 32, 16], [0, 24, 64, 24]])
    boxes = window_boxes(windows, crop_size=(48, 64), feature_size=(6, 16))  # x scale 1/4, y scale 1/8
    expected = torch.tensor([[0, 4, 1, 12, 3], [1, 0, 3, 16, 6]], dtype=torch.float32)
    assert torch.equal(boxes, expected)


def linear_image(x0: float, y0: float, width: int, height: int, step_x: float, step_y: float) -> Tensor:
    """``[3, height, width]`` samples of f(u, v) = (u, 2v, u + v) / 100 at pixel centres.

    Pixel ``(r, c)`` sits at ``u = x0 + (c + 0.5) * step_x``, ``v = y0 + (r + 0.5) * step_y``.
    """
    u = x0 + (torch.arange(width) + 0.5) * step_x
    v = y0 + (torch.arange(height) + 0.5) * step_y
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, 2 * vv, uu + vv]) / 100


def test_fused_window_features_match_patch_features_non_square() -> None:
    """Each patch's window of its half-resolution crop yields the patch's own features (interior cells)."""
    patch_w, patch_h = 64, 32
    indexes = MultiResolutionHRImageSpliter(image_size=(256, 128), patch_size=(patch_w, patch_h), ds_factors=[0, 1])
    patches, crops, windows = [], [], []
    for index in indexes:
        main, low = index.main_index, index.low_resolution_indexes[0]
        patches.append(linear_image(main.x, main.y, patch_w, patch_h, 1.0, 1.0))
        crops.append(linear_image(low.x, low.y, patch_w, patch_h, low.width / patch_w, low.height / patch_h))
        window = low_resolution_window(main, low, (patch_w, patch_h))
        windows.append([window.x, window.y, window.width, window.height])
    batch = make_batch(torch.stack(patches), torch.stack(crops)[:, None], torch.tensor(windows)[:, None])
    detector = make_detector(PooledPixelsDetector, fusion_weights=[0.0, 1.0])
    fused = detector.fused_embedding(batch)[0]
    plain = detector.embedding(batch.image)[0]
    assert fused.shape == plain.shape == (len(indexes), 3, 8, 16)
    assert torch.allclose(fused[..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1], atol=1e-5)
    # The half-resolution crop itself, unwindowed, is different: the check above is not vacuous.
    assert not torch.allclose(detector.embedding(batch.low_resolution_images[:, 0])[0], plain, atol=1e-2)


def test_fusion_weight_count_must_match_views() -> None:
    detector = make_detector(fusion_weights=[0.5, 0.3, 0.2])
    image = torch.randn(1, 3, 64, 64)
    batch = make_batch(image, image[:, None], torch.tensor([[[0, 0, 64, 64]]]))
    with pytest.raises(ValueError, match="fusion_weights.*ds_factors"):
        detector.fused_embedding(batch)


def test_fusion_weights_must_be_non_negative() -> None:
    with pytest.raises(ValueError, match="fusion_weights"):
        make_detector(fusion_weights=[1.0, -0.5])


def test_crop_maps_without_low_resolution_views_are_refused() -> None:
    detector = make_detector(fusion_weights=[0.5, 0.5])
    maps = [torch.randn(1, 4, 8, 8)]
    with pytest.raises(ValueError, match="without low_resolution_images"):
        detector.fuse_embedding(maps, maps, make_batch(torch.randn(1, 3, 32, 32)))


class ClippedStepDetector(FeatureNormDetector):
    """A 1x1 head trained by ``step_optimizers`` with a loss large enough that clipping decides the step."""

    def __init__(self, clip_norm: float) -> None:
        super().__init__("resnet18", ["layer1"], "none", 64)
        self.head = nn.Conv2d(64, 1, 1)
        self.clip_norm = clip_norm
        self.automatic_optimization = False

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=1.0)

    def training_step(self, batch: PatchBatch, batch_idx: int) -> None:
        loss = 1e3 * self.head(self.embedding(batch.image)[0]).square().mean()
        self.step_optimizers(loss, batch_idx, clip_norm=self.clip_norm)


def test_step_optimizers_clips_the_gradients_to_clip_norm() -> None:
    torch.manual_seed(0)
    detector = ClippedStepDetector(clip_norm=0.01)
    before = [p.detach().clone() for p in detector.head.parameters()]
    trainer = lightning.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(detector, DataLoader([make_batch(torch.randn(2, 3, 64, 64))], batch_size=None))
    # one SGD step of rate 1 moves the weights by the clipped gradient: norm 0.01, not the raw gradient's
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(detector.head.parameters(), before)])
    assert float(step.norm()) == pytest.approx(0.01, rel=1e-3)
