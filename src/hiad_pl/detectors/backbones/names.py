"""Which timm model a backbone name stands for, and which layers it can return.

The tutorial's short names (``wideresnet50``, ``efficientnet_b5`` ...) map to
timm names; any other timm name is taken as it is. Layers are named as the
model's modules are (``layer2`` for ResNets, ``blocks.4`` for EfficientNets).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

#: Short names of the tutorial's configs and the timm models they stand for.
BACKBONE_ALIASES: dict[str, str] = {
    "wideresnet50": "wide_resnet50_2.tv_in1k",  # torchvision's weights, as the original project's models.wide_resnet50_2
    "wideresnet101": "wide_resnet101_2",
    "resnext101": "resnext101_32x8d",
    "efficientnet_b1": "tf_efficientnet_b1",
    "efficientnet_b3": "tf_efficientnet_b3",
    "efficientnet_b5": "tf_efficientnet_b5",
    "efficientnet_b7": "tf_efficientnet_b7",
    "efficientnetv2_m": "tf_efficientnetv2_m",
    "efficientnetv2_l": "tf_efficientnetv2_l",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
}
#: Backbone names that no longer exist, and what replaces them.
RETIRED_BACKBONES: dict[str, str] = {
    "vit_lite0_hybrid": (
        "vit_lite0_hybrid was removed: its ViT blocks were random, so its taps were nearly identical. "
        "Use lite0_token_pyramid (token grids of pretrained EfficientNet-Lite0 blocks, weights: offline), "
        "or a DINO / DINOv2 / DINOv3 ViT with weights from a local file (docs/vit_weights.md)"
    ),
}


def resolve_backbone_name(backbone_name: str) -> str:
    """The timm model name for ``backbone_name`` (an alias of the tutorial or a timm name).

    Raises:
        ValueError: when timm knows no such model; the message suggests close names.
    """
    if backbone_name in RETIRED_BACKBONES:
        raise ValueError(RETIRED_BACKBONES[backbone_name])
    name = BACKBONE_ALIASES.get(backbone_name, backbone_name)
    if timm.is_model(name):
        return name
    known = timm.list_models()
    close = difflib.get_close_matches(name, known + list(BACKBONE_ALIASES), n=5, cutoff=0.6)
    close += [m for m in timm.list_models(f"*{name}*") if m not in close][: 5 - len(close)]
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ValueError(
        f"unknown backbone_name {backbone_name!r}: timm has no model of that name.{hint} "
        f"Short names accepted: {', '.join(sorted(BACKBONE_ALIASES))}; "
        "timm.list_models('*pattern*') lists the rest."
    )


def skeleton(timm_name: str, **model_kwargs: Any) -> nn.Module:
    """The full timm model without weights, on the meta device (no memory) when it can be built there."""
    try:
        with torch.device("meta"):
            return timm.create_model(timm_name, pretrained=False, **model_kwargs)
    except Exception:  # a few models compute with real values at construction
        return timm.create_model(timm_name, pretrained=False, **model_kwargs)


def feature_layer_names(timm_name: str, **model_kwargs: Any) -> list[str]:
    """Module names a timm model can return features from (``out_indices`` index this list)."""
    info = getattr(skeleton(timm_name, **model_kwargs), "feature_info", None)
    if not info:
        raise ValueError(f"backbone {timm_name!r} cannot return intermediate features (timm features_only)")
    return [entry["module"] for entry in info]


def layer_out_indices(timm_name: str, layers: Sequence[str], **model_kwargs: Any) -> list[int]:
    """Positions in ``feature_info`` of the requested layer names."""
    if not layers:
        raise ValueError("layers_to_extract_from must name at least one layer")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers_to_extract_from has duplicates: {list(layers)}")
    available = feature_layer_names(timm_name, **model_kwargs)
    unknown = [layer for layer in layers if layer not in available]
    if unknown:
        raise ValueError(
            f"layers_to_extract_from {list(layers)}: {', '.join(unknown)} not available in backbone "
            f"{timm_name!r}; available layers: {', '.join(available)}"
        )
    return sorted(available.index(layer) for layer in layers)
