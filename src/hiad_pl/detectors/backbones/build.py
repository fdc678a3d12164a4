"""The frozen feature extractor: a timm ``features_only`` model returning the asked layers' maps in the asked order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hiad_pl.detectors.backbones.names import layer_out_indices, resolve_backbone_name
from hiad_pl.detectors.backbones.weights import build_timm_model, weights_architecture

#: Normalisation of the images detectors receive.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def renormalisation(model: nn.Module) -> tuple[bool, Tensor, Tensor]:
    """Whether ImageNet-normalised inputs need converting to ``model``'s own normalisation, and how.

    Returns ``(needed, scale, shift)`` with ``[1, 3, 1, 1]`` tensors such that the
    model's input is ``image * scale + shift``.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
    shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
    return (mean, std) != (IMAGENET_MEAN, IMAGENET_STD), scale.reshape(1, 3, 1, 1), shift.reshape(1, 3, 1, 1)


class TimmFeatureExtractor(nn.Module):
    """A timm ``features_only`` model returning the chosen layers' maps in the order asked for."""

    # a timm features_only model: feature_info is not nn.Module's
    model: Any
    _scale: Tensor
    _shift: Tensor

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)
        info = self.model.feature_info
        names = info.module_name()
        # timm returns the maps sorted by depth; remember where each asked layer sits.
        sorted_layers = [name for name in names if name in self.layers]
        self._order = [sorted_layers.index(layer) for layer in self.layers]
        by_name = {name: (c, r) for name, c, r in zip(names, info.channels(), info.reduction())}
        #: Channels of each returned map.
        self.channels: list[int] = [by_name[layer][0] for layer in self.layers]
        #: Stride of each returned map relative to the input.
        self.reductions: list[int] = [by_name[layer][1] for layer in self.layers]
        #: Whether inputs are converted from ImageNet normalisation to the model's own.
        self.renormalises, scale, shift = renormalisation(model)
        self.register_buffer("_scale", scale, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``[B, C_l, h_l, w_l]`` feature maps of ImageNet-normalised ``images`` for each chosen layer."""
        if self.renormalises:
            images = images * self._scale.to(images.dtype) + self._shift.to(images.dtype)
        maps = self.model(images)
        return [maps[i] for i in self._order]


def create_feature_extractor(
    backbone_name: str,
    layers: Sequence[str],
    weights: str = "hub",
    **model_kwargs: Any,
) -> TimmFeatureExtractor:
    """Build the timm feature extractor for ``layers`` of ``backbone_name`` with ``weights``.

    Args:
        backbone_name: a tutorial alias (``wideresnet50``) or any timm model name.
        layers: module names of the layers to return (``layer2``, ``blocks.4`` ...).
        weights: ``hub``, ``offline``, ``none`` or the path of a state-dict file.
        model_kwargs: passed to ``timm.create_model``.

    Raises:
        ValueError: unknown backbone, layer or weights option, or a weights file that does not fit.
        RuntimeError: ``hub`` weights that cannot be downloaded.
    """
    timm_name = weights_architecture(backbone_name, resolve_backbone_name(backbone_name), weights)
    out_indices = layer_out_indices(timm_name, layers, **model_kwargs)
    model = build_timm_model(timm_name, weights, features_only=True, out_indices=out_indices, **model_kwargs)
    return TimmFeatureExtractor(model, layers).eval()
