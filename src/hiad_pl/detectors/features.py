"""Frozen feature extractors behind one small protocol: CNN feature maps and ViT token grids.

Every extractor maps ImageNet-normalised images ``[B, 3, H, W]`` to one map
``[B, C_l, h_l, w_l]`` per named layer, and says what it returns
(:attr:`FeatureExtractor.layers`, ``channels``, ``reductions``). Two kinds:

``cnn``
    timm ``features_only`` maps of named modules (``layer2``, ``blocks.4``), see
    :mod:`hiad_pl.detectors.backbones`.
``vit``
    patch tokens of named transformer blocks (``blocks.2``, ``blocks.5``) from
    timm's ``forward_intermediates``, class / register tokens dropped, reshaped
    to grids. timm options (``img_size``, ``dynamic_img_size``) pass through;
    ``dynamic_img_size`` defaults to true so that any patch size works. A side
    that is not a multiple of the patch size (512 px for a /14 model) is resized
    to the nearest multiple before the forward pass; detectors upsample their
    maps to the patch size as always, which resizes them back.

``kind: auto`` picks ``vit`` for timm models with a patch embedding and
transformer blocks, ``cnn`` otherwise. Weights come from ``hub``, ``offline``,
``none`` or a file, with the errors of :mod:`hiad_pl.detectors.backbones`.

Sharing. Extractors hold no per-detector state (only the frozen model and
constant buffers), so one instance serves every detector of a run:
:func:`shared_feature_extractor` returns the same instance for the same
:class:`FeatureSettings` (a per-process cache), and detectors hold it by
reference. A detector that trains its backbone must build a private one with
:func:`create_extractor`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiad_pl.detectors.backbones import (
    TimmFeatureExtractor,
    build_timm_model,
    create_feature_extractor,
    drop_unused_blocks,
    fold_batch_norms,
    fuse_conv_activations,
    renormalisation,
    resolve_backbone_name,
    skeleton,
    symmetric_same_padding,
    weights_architecture,
)

FEATURE_KINDS: tuple[str, ...] = ("auto", "cnn", "vit")
#: Extractors kept alive by :func:`shared_feature_extractor` (most recently used last).
SHARED_CACHE_SIZE = 4


@runtime_checkable
class FeatureExtractor(Protocol):
    """What every extractor offers: named layers, their channels and strides, and ``__call__``."""

    layers: list[str]
    channels: list[int]
    reductions: list[int]

    def __call__(self, images: Tensor) -> list[Tensor]:
        """``[B, C_l, h_l, w_l]`` maps of ImageNet-normalised ``images``, one per layer, in ``layers`` order."""
        ...


def nearest_multiple(side: int, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``side`` (at least ``multiple``)."""
    return max(multiple, int(round(side / multiple)) * multiple)


class ViTTokenExtractor(nn.Module):
    """Patch tokens of chosen ViT blocks as ``[B, C, h, w]`` grids (prefix tokens dropped).

    The forward pass stops after the deepest chosen block: later blocks cost nothing.

    Args:
        model: a timm vision transformer with ``forward_intermediates``.
        layers: block names ``blocks.<i>`` (or plain indices ``"<i>"``), in the order returned.
    """

    # a timm vision transformer: blocks, patch_embed and forward_intermediates are not nn.Module's
    model: Any
    _scale: Tensor
    _shift: Tensor

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.block_indices = [block_index(name, len(self.model.blocks)) for name in self.layers]
        embed = self.model.patch_embed
        # A hybrid's patch embedding (a CNN stem) reduces by its feature stride times its patch size.
        patch = embed.feat_ratio(as_scalar=False) if hasattr(embed, "feat_ratio") else embed.patch_size
        #: ``(height, width)`` of one patch token in pixels.
        self.patch_size: tuple[int, int] = (int(patch[0]), int(patch[1]))
        width = int(getattr(model, "embed_dim", 0) or self.model.num_features)
        self.channels: list[int] = [width] * len(self.layers)
        self.reductions: list[int] = [self.patch_size[0]] * len(self.layers)
        self.renormalises, scale, shift = renormalisation(model)
        self.register_buffer("_scale", scale, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)
        # forward_intermediates returns blocks by depth; remember where each asked block sits.
        ordered = sorted(set(self.block_indices))
        self._order = [ordered.index(i) for i in self.block_indices]
        self._take = ordered

    def fix_input_size(self, height: int, width: int) -> None:
        """Resample the model's position embedding once for ``height x width`` inputs.

        A ViT built for another size resamples its position embedding on every
        forward pass (bicubic with antialiasing, an operation ONNX lacks); fixed to
        the patch size, the graph holds the resampled table as a constant. The
        values are those the forward pass would compute.
        """
        target = (nearest_multiple(height, self.patch_size[0]), nearest_multiple(width, self.patch_size[1]))
        if hasattr(self.model, "set_input_size") and getattr(self.model, "pos_embed", None) is not None:
            self.model.set_input_size(img_size=target)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``[B, C, H / p, W / p]`` token grids of each chosen block (sides rounded to multiples of ``p``)."""
        if self.renormalises:
            images = images * self._scale.to(images.dtype) + self._shift.to(images.dtype)
        height, width = int(images.shape[-2]), int(images.shape[-1])  # plain ints: constant per task graph in an export
        target = (nearest_multiple(height, self.patch_size[0]), nearest_multiple(width, self.patch_size[1]))
        if target != (height, width):
            images = F.interpolate(images, size=target, mode="bilinear", align_corners=False)
        # stop_early: the blocks after the deepest one asked for are not run.
        grids = self.model.forward_intermediates(
            images, indices=self._take, output_fmt="NCHW", intermediates_only=True, stop_early=True
        )
        return [grids[i] for i in self._order]


def block_index(name: str, depth: int) -> int:
    """The block number of ``blocks.<i>`` (or ``<i>``), checked against the model's ``depth``.

    Raises:
        ValueError: a name that is not a block of the model.
    """
    text = name.split(".", 1)[1] if name.startswith("blocks.") else name
    if not text.lstrip("-").isdigit():
        raise ValueError(f"ViT layer {name!r} is not a block name: use blocks.0 ... blocks.{depth - 1}")
    index = int(text)
    if not 0 <= index < depth:
        raise ValueError(f"ViT layer {name!r} does not exist: the model has blocks.0 ... blocks.{depth - 1}")
    return index


def is_vit(timm_name: str, **model_kwargs: Any) -> bool:
    """Whether a timm model is a vision transformer (patch embedding, blocks, ``forward_intermediates``)."""
    model = skeleton(timm_name, **model_kwargs)
    return all(hasattr(model, attr) for attr in ("patch_embed", "blocks", "forward_intermediates"))


def _freeze_key(value: Any) -> Any:
    """A hashable copy of a config value (lists become tuples, dicts sorted item tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze_key(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_key(v) for v in value)
    return value


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that defines a frozen extractor; equal settings give the same features.

    Args:
        backbone_name: timm name or tutorial alias (``wideresnet50``, ``vit_small``).
        layers: layer (CNN) or block (ViT) names.
        weights: ``hub``, ``offline``, ``none`` or a state-dict file.
        kind: ``auto``, ``cnn`` or ``vit``.
        model_kwargs: extra ``timm.create_model`` options (``img_size``, ``dynamic_img_size`` ...).
    """

    backbone_name: str
    layers: tuple[str, ...]
    weights: str = "hub"
    kind: str = "auto"
    model_kwargs: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    @staticmethod
    def of(
        backbone_name: str,
        layers: Sequence[str],
        weights: str = "hub",
        kind: str = "auto",
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> FeatureSettings:
        """Settings from config values (lists and dicts accepted)."""
        if kind not in FEATURE_KINDS:
            raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")
        return FeatureSettings(str(backbone_name), tuple(layers), str(weights), kind, _freeze_key(model_kwargs or {}))

    def kwargs(self) -> dict[str, Any]:
        """``model_kwargs`` as a dict for timm."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_kwargs}


def create_extractor(settings: FeatureSettings) -> nn.Module:
    """A new frozen extractor (eval mode, no gradients) for ``settings``.

    Raises:
        ValueError: unknown backbone, layer, kind or weights option, or a weights file that does not fit.
        RuntimeError: ``hub`` weights that cannot be downloaded.
    """
    if not settings.layers:
        raise ValueError("layers_to_extract_from must name at least one layer")
    kwargs = settings.kwargs()
    timm_name = resolve_backbone_name(settings.backbone_name)
    kind = settings.kind
    if kind == "auto":
        kind = "vit" if is_vit(timm_name, **kwargs) else "cnn"
    if kind == "cnn":
        extractor: nn.Module = create_feature_extractor(settings.backbone_name, settings.layers, settings.weights, **kwargs)
    else:
        if len(set(settings.layers)) != len(settings.layers):
            raise ValueError(f"layers_to_extract_from has duplicates: {list(settings.layers)}")
        timm_name = weights_architecture(settings.backbone_name, timm_name, settings.weights)
        if not is_vit(timm_name, **kwargs):
            raise ValueError(f"backbone {timm_name!r} is not a vision transformer; use kind: cnn")
        kwargs.setdefault("dynamic_img_size", True)
        extractor = ViTTokenExtractor(build_timm_model(timm_name, settings.weights, **kwargs), settings.layers)
    extractor.requires_grad_(False)
    return extractor.eval()


def check_sample(extractor: TimmFeatureExtractor) -> Tensor:
    """A fixed random batch for checking a trimmed or folded ``extractor``: two images, four cells of its coarsest map a side."""
    side = max(64, 4 * max(extractor.reductions))
    first = next((m for m in extractor.modules() if isinstance(m, nn.Conv2d)), None)
    channels = 3 if first is None else first.in_channels
    return torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))


_SHARED: OrderedDict[FeatureSettings, nn.Module] = OrderedDict()


def shared_feature_extractor(settings: FeatureSettings) -> nn.Module:
    """The one frozen extractor of this process for ``settings`` (built on first use).

    The last :data:`SHARED_CACHE_SIZE` settings stay cached, so the tasks of a
    run fitted one after another reuse one backbone instead of loading it again.
    A CNN is prepared for inference, each step checked to leave its maps as they were:

    - it runs only the blocks its layers need
      (:func:`~hiad_pl.detectors.backbones.drop_unused_blocks`);
    - its BatchNorms are folded into its convolutions
      (:func:`~hiad_pl.detectors.backbones.fold_batch_norms`);
    - its TF-"same" convolutions pad symmetrically with a grown kernel instead of
      copying their input into a padded tensor
      (:func:`~hiad_pl.detectors.backbones.symmetric_same_padding`);
    - its weights are stored channels-last, so that every activation is NHWC and
      oneDNN convolves it without reordering it to and from its own layout
      (16 patches of 512 through EfficientNet-Lite0 on 2 cores: 0.77 -> 0.47-0.55 s;
      resnet18 and wide_resnet50_2 27-30% faster; only the maps' strides differ);
    - each activation that follows a convolution runs inside it as a oneDNN
      post-operation (:func:`~hiad_pl.detectors.backbones.fuse_conv_activations`).

    The last two steps took Lite0 over 8 patches of 512 from 0.25 to 0.20 s
    (the padding 10%, the fusion 10%), with identical maps.
    """
    extractor = _SHARED.pop(settings, None)
    if extractor is None:
        extractor = create_extractor(settings)
        if isinstance(extractor, TimmFeatureExtractor):
            sample = check_sample(extractor)
            drop_unused_blocks(extractor, sample)
            fold_batch_norms(extractor, sample)
            symmetric_same_padding(extractor)
            extractor.to(memory_format=torch.channels_last)
            fuse_conv_activations(extractor, sample.contiguous(memory_format=torch.channels_last))
    _SHARED[settings] = extractor
    while len(_SHARED) > SHARED_CACHE_SIZE:
        _SHARED.popitem(last=False)
    return extractor


def clear_shared_extractors() -> None:
    """Forget every cached extractor (frees their memory once no detector holds them)."""
    _SHARED.clear()


__all__ = [
    "FEATURE_KINDS",
    "FeatureExtractor",
    "FeatureSettings",
    "TimmFeatureExtractor",
    "ViTTokenExtractor",
    "block_index",
    "clear_shared_extractors",
    "create_extractor",
    "is_vit",
    "nearest_multiple",
    "shared_feature_extractor",
]
