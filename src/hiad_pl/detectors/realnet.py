"""RealNet: feature reconstruction with anomaly-aware feature selection (Zhang et al., CVPR 2024).

"RealNet: A Feature Selection Network with Realistic Synthetic Anomaly for
Anomaly Detection". On the features of a frozen CNN (WideResNet-50 layer2 and
layer3 in the original high-resolution project, one *block* per layer):

* **AFS** (anomaly-aware feature selection) keeps, per block, the
  ``afs_channels`` channels whose feature change under synthetic anomalies
  best matches the anomaly mask: for each channel, the squared difference
  between corrupted and clean features, min-max normalised over the batch's
  positions, is compared with the mask by mean squared error; the scores are
  summed over the first ``init_bsn`` synthetic batches and the channels with
  the lowest sums are kept, then frozen;
* one **reconstruction network** per block (a diffusion-style UNet without time
  input: residual blocks, widths ``width_ratio x C x channel_mult``, attention
  at downsampling factors ``attention_at``) restores the clean features from
  the corrupted ones (MSE loss);
* **RRS** (reconstruction residual selection) takes the squared residuals of
  every block on the finest grid, normalises them with a BatchNorm without
  affine parameters, and keeps per image the top channels by spatial maximum
  and by spatial mean (``rrs_modes`` / ``rrs_counts``); a small discriminator
  turns them into two-class logits at the patch size (cross-entropy loss).

The anomaly map is the discriminator's anomaly probability. The paper draws
its synthetic anomalies from a diffusion model (SDAS), which takes days to
train; like the original high-resolution project this module is trained with
image blending under Perlin masks instead. AFS, the reconstruction networks and
RRS make up the detector's ``model`` (:class:`RealNetModel`, a
:class:`~hiad_pl.detectors.map_model.PatchMapModel`), which scores the
backbone's maps alone and which the ONNX export traces.

Memory (float32 parameters): with WideResNet-50 (layer2 512 -> 256 kept,
layer3 1024 -> 512 kept), width ratio 0.5 and multipliers ``[1, 2, 4]``, the
two reconstruction networks hold about 265 M parameters (~1 GB; Adam's
moments triple that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.synthesis import AnomalySynthesizer, ImageBlendingSynthesizer, build_synthesizer
from hiad_pl.detectors.base import HRDetector
from hiad_pl.detectors.features import FeatureExtractor
from hiad_pl.detectors.map_model import MoveKeysUnder, PatchMapModel
from hiad_pl.postprocess import ImageScore

#: Groups of the group norms (fewer when the width is not a multiple).
NORM_GROUPS = 32
#: Channels per attention head (one head when the width is not a multiple).
HEAD_CHANNELS = 64
#: RRS channel-ranking modes.
RRS_MODES: tuple[str, ...] = ("max", "mean")
#: Momentum of RRS's normalisation (PyTorch convention: weight of the new batch), as in the paper's code.
RRS_NORM_MOMENTUM = 0.9
#: Keeps the min-max normalisation of AFS finite on constant channels.
AFS_EPSILON = 1e-4


def group_norm(channels: int) -> nn.GroupNorm:
    """Group norm with :data:`NORM_GROUPS` groups, or the largest divisor of ``channels`` that divides it."""
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


ConvT = TypeVar("ConvT", nn.Conv1d, nn.Conv2d)


def zero_initialised(conv: ConvT) -> ConvT:
    """``conv`` with weight and bias set to zero (a residual branch that starts as the identity)."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


# ---------------------------------------------------------------- AFS


def afs_channel_scores(corrupted: Tensor, clean: Tensor, mask: Tensor) -> Tensor:
    """How badly each channel's feature change matches the anomaly mask: ``[C]``, lower is better.

    Args:
        corrupted, clean: ``[B, C, h, w]`` features of corrupted and clean patches.
        mask: ``[B, H, W]`` synthetic anomaly masks (resized to ``(h, w)`` by nearest neighbour).

    The squared difference of each channel is min-max normalised over all the
    batch's positions, then compared with the mask by mean squared error.
    """
    channels = corrupted.shape[1]
    change = (corrupted.float() - clean.float()).square().transpose(0, 1).reshape(channels, -1)
    low, high = change.min(1, keepdim=True).values, change.max(1, keepdim=True).values
    change = (change - low) / (high - low + AFS_EPSILON)
    target = F.interpolate(mask[:, None].float(), size=corrupted.shape[-2:], mode="nearest").reshape(1, -1)
    return (change - target).square().mean(1)


class FeatureSelection(nn.Module):
    """AFS: per block, the channel indices kept, decided from accumulated :func:`afs_channel_scores`.

    Args:
        channels: channels of each block's features.
        kept: channels to keep per block.
        init_batches: synthetic batches whose scores decide the selection.

    Before the selection is decided, :meth:`forward` keeps the first ``kept``
    channels. Scores, the batch count and the chosen indices are buffers, so
    an interrupted fit resumes where it was.
    """

    batches_seen: Tensor

    def __init__(self, channels: Sequence[int], kept: Sequence[int], init_batches: int) -> None:
        super().__init__()
        if len(channels) != len(kept):
            raise ValueError(f"afs_channels needs one count per block ({len(channels)}), got {list(kept)}")
        for c, k in zip(channels, kept):
            if not 1 <= k <= c:
                raise ValueError(f"AFS cannot keep {k} of {c} channels: give 1 <= afs_channels <= channels")
        if init_batches < 1:
            raise ValueError(f"init_bsn must be at least 1, got {init_batches}")
        self.init_batches = int(init_batches)
        self.kept = [int(k) for k in kept]
        for i, (c, k) in enumerate(zip(channels, kept)):
            self.register_buffer(f"scores_{i}", torch.zeros(int(c)))
            self.register_buffer(f"indices_{i}", torch.arange(int(k)))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    @property
    def decided(self) -> bool:
        """Whether the selection is final (``init_batches`` batches were seen)."""
        return int(self.batches_seen) >= self.init_batches

    def indices(self) -> list[Tensor]:
        """Kept channel indices per block (sorted)."""
        return [getattr(self, f"indices_{i}") for i in range(len(self.kept))]

    @torch.no_grad()
    def accumulate(self, corrupted: Sequence[Tensor], clean: Sequence[Tensor], mask: Tensor) -> None:
        """Add one synthetic batch's scores; on the ``init_batches``-th batch the selection is decided.

        Patches without any anomaly are left out (they carry no evidence).
        """
        if self.decided:
            return
        anomalous = mask.flatten(1).amax(1) > 0
        if not bool(anomalous.any()):
            return
        for i, (a, c) in enumerate(zip(corrupted, clean)):
            getattr(self, f"scores_{i}").add_(afs_channel_scores(a[anomalous], c[anomalous], mask[anomalous]))
        self.batches_seen.add_(1)
        if self.decided:
            for i, k in enumerate(self.kept):
                scores = getattr(self, f"scores_{i}")
                scores = torch.where(torch.isnan(scores), torch.full_like(scores, float("inf")), scores)
                chosen = torch.topk(scores, k, largest=False).indices.sort().values
                getattr(self, f"indices_{i}").copy_(chosen)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The kept channels of each block's features."""
        return [f.index_select(1, idx) for f, idx in zip(features, self.indices())]


# ---------------------------------------------------------------- reconstruction network


class ResBlock(nn.Module):
    """Group norm, SiLU, (resample), 3x3 conv, plus a shortcut; ``resample`` is ``none``, ``up`` or ``down``.

    ``up`` doubles the grid with 4x4 stride-2 transposed convolutions, ``down``
    halves it with 2x2 average pooling, on both the body and the shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, resample: str = "none") -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm = nn.Sequential(group_norm(in_channels), nn.SiLU())
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if resample == "up":
            self.resample_body: nn.Module = nn.ConvTranspose2d(in_channels, in_channels, 4, stride=2, padding=1)
            self.resample_skip: nn.Module = nn.ConvTranspose2d(in_channels, in_channels, 4, stride=2, padding=1)
        elif resample == "down":
            self.resample_body = self.resample_skip = nn.AvgPool2d(2)
        elif resample == "none":
            self.resample_body = self.resample_skip = nn.Identity()
        else:
            raise ValueError(f"resample must be none, up or down, got {resample!r}")
        self.skip: nn.Module = nn.Identity() if out_channels == in_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``skip(resample(x)) + conv(resample(silu(norm(x))))``."""
        return self.skip(self.resample_skip(x)) + self.conv(self.resample_body(self.norm(x)))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the positions of a map, residual, output projection zero-initialised."""

    def __init__(self, channels: int, head_channels: int = HEAD_CHANNELS) -> None:
        super().__init__()
        self.heads = channels // head_channels if channels % head_channels == 0 else 1
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_initialised(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``x + proj(attention(norm(x)))``, same shape."""
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x).reshape(batch, channels, -1))
        q, k, v = qkv.reshape(batch * self.heads, 3 * channels // self.heads, -1).chunk(3, dim=1)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = self.proj(attended.transpose(1, 2).reshape(batch, channels, -1))
        return x + out.reshape(batch, channels, height, width)


def _level(in_channels: int, out_channels: int, attention: bool) -> nn.Sequential:
    """A residual block, followed by attention when asked."""
    layers: list[nn.Module] = [ResBlock(in_channels, out_channels)]
    if attention:
        layers.append(AttentionBlock(out_channels))
    return nn.Sequential(*layers)


class ReconstructionUNet(nn.Module):
    """UNet of residual blocks and attention mapping ``[B, C, h, w]`` features to ``[B, C, h, w]`` features.

    Args:
        channels: feature channels ``C`` (in and out).
        width_ratio: base width as a fraction of ``C``.
        channel_mult: width multipliers per level (the grid halves between levels).
        res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_at: downsampling factors (1, 2, 4 ...) whose levels get attention.

    The output convolution starts at zero, as in diffusion UNets. Grids whose
    sides are not multiples of ``2 ** (levels - 1)`` are resized back onto the
    skip connections' grids.
    """

    def __init__(
        self,
        channels: int,
        width_ratio: float = 0.5,
        channel_mult: Sequence[int] = (1, 2, 4),
        res_blocks: int = 2,
        attention_at: Sequence[int] = (2, 4),
    ) -> None:
        super().__init__()
        base = max(1, int(width_ratio * channels))
        widths = [int(m * base) for m in channel_mult]
        attention = {int(a) for a in attention_at}
        width = widths[0]
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [width]
        factor = 1
        for level, level_width in enumerate(widths):
            for _ in range(res_blocks):
                self.down.append(_level(width, level_width, factor in attention))
                width = level_width
                skips.append(width)
            if level < len(widths) - 1:
                self.down.append(ResBlock(width, resample="down"))
                skips.append(width)
                factor *= 2
        self.middle = nn.Sequential(ResBlock(width), AttentionBlock(width), ResBlock(width))
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(res_blocks + 1):
                stage = _level(width + skips.pop(), widths[level], factor in attention)
                width = widths[level]
                if level > 0 and i == res_blocks:
                    stage.append(ResBlock(width, resample="up"))
                    factor //= 2
                self.up.append(stage)
        self.out = nn.Sequential(group_norm(width), nn.SiLU(), zero_initialised(nn.Conv2d(width, channels, 3, padding=1)))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstructed features, same shape as ``x``."""
        h = self.stem(x)
        skips = [h]
        for module in self.down:
            h = module(h)
            skips.append(h)
        h = self.middle(h)
        for module in self.up:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = module(torch.cat([h, skip], dim=1))
        return self.out(h)


# ---------------------------------------------------------------- RRS and discriminator


def interpolation_matrix(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[size_out, size_in]`` weights of 1-D linear interpolation with aligned corners."""
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    position = torch.arange(size_out, device=device, dtype=torch.float64) * scale
    low = position.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    weight = position - low
    matrix = torch.zeros(size_out, size_in, device=device, dtype=torch.float64)
    rows = torch.arange(size_out, device=device)
    matrix.index_put_((rows, low), 1 - weight, accumulate=True)
    matrix.index_put_((rows, high), weight, accumulate=True)
    return matrix.to(dtype)


def resize_align_corners(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``[B, C, h, w]`` to ``size`` with aligned corners, as two matrix products.

    Equal to ``F.interpolate(..., mode="bilinear", align_corners=True)``; its shape is
    static in an exported graph, where a resize leaves the channel count unknown to the
    batch norm that follows.
    """
    rows = interpolation_matrix(int(grid.shape[-2]), size[0], grid.device, grid.dtype)
    cols = interpolation_matrix(int(grid.shape[-1]), size[1], grid.device, grid.dtype)
    return torch.matmul(torch.matmul(rows, grid), cols.T)


def top_channels(normalised: Tensor, count: int, mode: str) -> Tensor:
    """Per image, the ``count`` channels of ``[B, C, h, w]`` with the largest spatial ``mode`` (``max`` or ``mean``): ``[B, count]``."""
    flat = normalised.flatten(2)
    if mode == "max":
        summary = flat.amax(-1)
    elif mode == "mean":
        summary = flat.mean(-1)
    else:
        raise ValueError(f"RRS mode must be one of {RRS_MODES}, got {mode!r}")
    return torch.topk(summary, count, dim=1).indices


def select_residual_channels(residual: Tensor, normalised: Tensor, modes: Sequence[str], counts: Sequence[int]) -> Tensor:
    """Residual channels chosen on ``normalised`` by each mode, concatenated: ``[B, sum(counts), h, w]``."""
    chosen = []
    for mode, count in zip(modes, counts):
        idx = top_channels(normalised, count, mode)
        chosen.append(torch.gather(residual, 1, idx[:, :, None, None].expand(-1, -1, *residual.shape[-2:])))
    return torch.cat(chosen, dim=1)


class Residual(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))`` (no biases)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Same shape as ``x``."""
        return x + self.body(x)


class ResidualDiscriminator(nn.Module):
    """RRS and the discriminator: selected residual channels -> two-class logits at the patch size.

    Args:
        channels: total residual channels of all blocks.
        modes: ranking modes (``max``, ``mean``).
        counts: channels kept per mode.
        residual_layers: residual layers before the convolutional decoder.
        normalised_input: feed the selected channels after the ranking's normalisation
            instead of the raw residuals (the paper feeds raw ones). For backbones whose
            features are not post-ReLU (EfficientNet blocks) the squared residuals reach
            the hundreds and silence the decoder's narrow ReLU layers; normalised, they
            stay in range.
    """

    def __init__(
        self,
        channels: int,
        modes: Sequence[str] = RRS_MODES,
        counts: Sequence[int] = (256, 256),
        residual_layers: int = 2,
        normalised_input: bool = False,
    ) -> None:
        super().__init__()
        if len(modes) != len(counts) or not modes:
            raise ValueError(f"rrs_modes and rrs_counts must pair up, got {list(modes)} and {list(counts)}")
        for mode, count in zip(modes, counts):
            if mode not in RRS_MODES:
                raise ValueError(f"RRS mode must be one of {RRS_MODES}, got {mode!r}")
            if not 1 <= count <= channels:
                raise ValueError(f"RRS cannot keep {count} of {channels} residual channels ({mode})")
        self.modes = list(modes)
        self.counts = [int(c) for c in counts]
        self.normalised_input = bool(normalised_input)
        selected = sum(self.counts)
        self.norm = nn.BatchNorm2d(channels, momentum=RRS_NORM_MOMENTUM, affine=False)
        self.decoder = nn.Sequential(
            *(Residual(selected) for _ in range(residual_layers)),
            nn.ReLU(),
            nn.Conv2d(selected, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, residuals: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """Logits ``[B, 2, H, W]`` at ``size`` from the blocks' residuals (any grids; resized to the finest)."""
        sizes = [(int(r.shape[-2]), int(r.shape[-1])) for r in residuals]
        grid = max(sizes, key=lambda s: s[0] * s[1])
        residual = torch.cat([r if s == grid else resize_align_corners(r, grid) for r, s in zip(residuals, sizes)], dim=1)
        normalised = self.norm(residual)
        source = normalised if self.normalised_input else residual
        decoded = self.decoder(select_residual_channels(source, normalised.detach(), self.modes, self.counts))
        decoded = F.interpolate(decoded, scale_factor=2, mode="bilinear", align_corners=True)
        return F.interpolate(self.head(decoded), size=tuple(size), mode="bilinear", align_corners=True)


# ---------------------------------------------------------------- the model and its losses


class RealNetOutputs(NamedTuple):
    """What one pass of :class:`RealNetModel` computes."""

    #: AFS's kept channels of each block's features, ``[B, k_l, h_l, w_l]``.
    selected: list[Tensor]
    #: Their reconstructions, same shapes.
    reconstructed: list[Tensor]
    #: The discriminator's two-class logits ``[B, 2, H, W]``.
    logits: Tensor


def segmentation_cross_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Two-class cross-entropy of ``[B, 2, H, W]`` logits against ``[B, H, W]`` masks (> 0.5 is anomalous)."""
    return F.cross_entropy(logits.float(), (mask > 0.5).long())


def feature_mse(reconstructed: Sequence[Tensor], clean: Sequence[Tensor]) -> Tensor:
    """Sum over blocks of the mean squared error between reconstructed and clean (selected) features."""
    # sum() of tensors is a tensor; its int start value makes mypy see ``Tensor | int``
    return sum(F.mse_loss(r.float(), c.float()) for r, c in zip(reconstructed, clean))  # type: ignore[return-value]


class RealNetModel(PatchMapModel):
    """RealNet on a frozen backbone's block features: AFS, reconstruction, RRS; the detector's ``model``.

    Called on the blocks' maps it gives the discriminator's anomaly
    probabilities ``[B, H, W]`` (:meth:`forward`); :meth:`outputs` gives the
    intermediate results training needs. AFS's chosen channels and RRS's
    normalisation statistics are buffers, so a state dict restores it.

    Args:
        channels: channels of each block's backbone features.
        afs_channels: channels AFS keeps per block.
        init_bsn: synthetic batches that decide AFS.
        width_ratio, channel_mult, res_blocks, attention_at: reconstruction UNet shape.
        rrs_modes, rrs_counts, rrs_residual_layers, rrs_normalised_input: RRS and discriminator
            (see :class:`ResidualDiscriminator`).
    """

    def __init__(
        self,
        channels: Sequence[int],
        afs_channels: Sequence[int],
        init_bsn: int = 64,
        width_ratio: float = 0.5,
        channel_mult: Sequence[int] = (1, 2, 4),
        res_blocks: int = 2,
        attention_at: Sequence[int] = (2, 4),
        rrs_modes: Sequence[str] = RRS_MODES,
        rrs_counts: Sequence[int] = (256, 256),
        rrs_residual_layers: int = 2,
        rrs_normalised_input: bool = False,
    ) -> None:
        super().__init__()
        self.afs = FeatureSelection(channels, afs_channels, init_bsn)
        self.reconstruction = nn.ModuleList(
            ReconstructionUNet(k, width_ratio, channel_mult, res_blocks, attention_at) for k in afs_channels
        )
        self.discriminator = ResidualDiscriminator(
            sum(afs_channels), rrs_modes, rrs_counts, rrs_residual_layers, rrs_normalised_input
        )

    def outputs(self, features: Sequence[Tensor], size: Sequence[int]) -> RealNetOutputs:
        """Selected and reconstructed features per block and the discriminator's logits ``[B, 2, H, W]`` at ``size``."""
        selected = self.afs([f.float() for f in features])
        reconstructed = [net(f) for net, f in zip(self.reconstruction, selected)]
        residuals = [(f - r).square() for f, r in zip(selected, reconstructed)]
        return RealNetOutputs(selected, reconstructed, self.discriminator(residuals, size))

    def forward(self, features: Sequence[Tensor], output_size: Sequence[int]) -> Tensor:
        """Anomaly probabilities ``[B, H, W]`` at ``output_size`` of the blocks' maps ``[B, C_l, h_l, w_l]``."""
        return self.anomaly_probability(self.outputs(features, output_size).logits)

    def losses(self, features: Sequence[Tensor], clean_features: Sequence[Tensor], mask: Tensor) -> dict[str, Tensor]:
        """``loss`` = segmentation cross-entropy + feature MSE of one synthetic batch (corrupted ``features``)."""
        out = self.outputs(features, mask.shape[-2:])
        segmentation = segmentation_cross_entropy(out.logits, mask)
        mse = feature_mse(out.reconstructed, self.afs([f.float() for f in clean_features]))
        return {"loss": segmentation + mse, "segmentation_loss": segmentation, "feature_loss": mse}

    @staticmethod
    def anomaly_probability(logits: Tensor) -> Tensor:
        """Anomaly probability ``[B, H, W]`` from two-class logits."""
        return torch.softmax(logits.float(), dim=1)[:, 1]


# ---------------------------------------------------------------- the detector


def default_realnet_synthesizer() -> AnomalySynthesizer:
    """The original project's training corruption: image blending on half the patches, opacity 0.2-1, Perlin scale 6."""
    return ImageBlendingSynthesizer(p=0.5, blend_factor=(0.2, 1.0), perlin_scale=6, min_perlin_scale=0)


class HRRealNet(HRDetector):
    """RealNet on high-resolution patches: AFS, per-block reconstruction UNets and RRS on a frozen CNN.

    Args:
        backbone_name: the frozen CNN (timm name or alias); the original's is timm's
            ``wide_resnet50_2`` with timm's own weights (``wide_resnet50_2.racm_in1k``).
        layers_to_extract_from: backbone layers, one block each (``[layer2, layer3]``).
        weights: backbone weights: ``hub``, ``offline``, ``none`` or a file path.
        input_size: ``(width, height)`` or one int: patch size the detector sees.
        fusion_weights: multi-resolution fusion weights (see :class:`HRDetector`).
        feature_kind: must resolve to ``cnn``.
        backbone_kwargs: extra ``timm.create_model`` options.
        epochs: training epochs (the Trainer's default ``max_epochs``).
        lr: Adam learning rate.
        afs_channels: channels AFS keeps per block (default: half of each layer's).
        init_bsn: synthetic batches that decide AFS before training starts.
        width_ratio: reconstruction UNet base width as a fraction of the block's kept channels.
        channel_mult: UNet width multipliers per level.
        res_blocks: UNet residual blocks per level.
        attention_at: UNet downsampling factors with attention.
        rrs_modes: RRS ranking modes (``max``, ``mean``).
        rrs_counts: residual channels RRS keeps per mode.
        rrs_residual_layers: residual layers of the discriminator.
        rrs_normalised_input: feed the discriminator normalised residuals (for backbones
            without a final ReLU, such as EfficientNet blocks; off in the paper).
        synthesizer: training corruption ``{class_path, init_args}`` (or ``{name, kwargs}``); default
            image blending with Perlin masks on half the patches, opacity 0.2-1.
        image_score: overrides of the image-score rule (default: the largest 16 x 16 window mean, as HiAD
            scores this method; see :class:`HRDetector`).
    """

    def __init__(
        self,
        backbone_name: str = "wide_resnet50_2.racm_in1k",
        layers_to_extract_from: Sequence[str] = ("layer2", "layer3"),
        weights: str = "hub",
        input_size: int | tuple[int, int] = 512,
        fusion_weights: Sequence[float] | None = None,
        feature_kind: str = "cnn",
        backbone_kwargs: dict[str, Any] | None = None,
        epochs: int = 150,
        lr: float = 1e-4,
        afs_channels: Sequence[int] | None = None,
        init_bsn: int = 64,
        width_ratio: float = 0.5,
        channel_mult: Sequence[int] = (1, 2, 4),
        res_blocks: int = 2,
        attention_at: Sequence[int] = (2, 4),
        rrs_modes: Sequence[str] = RRS_MODES,
        rrs_counts: Sequence[int] = (256, 256),
        rrs_residual_layers: int = 2,
        rrs_normalised_input: bool = False,
        synthesizer: dict[str, Any] | None = None,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__(
            backbone_name, layers_to_extract_from, weights, input_size, fusion_weights, feature_kind, backbone_kwargs,
            image_score=image_score,
        )
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if not lr > 0 or not width_ratio > 0:
            raise ValueError(f"lr and width_ratio must be positive, got {lr!r} and {width_ratio!r}")
        self.epochs = epochs
        self.lr = float(lr)
        self.synthesizer_spec = synthesizer
        build_synthesizer(synthesizer)  # a bad spec fails here, before any training
        channels = list(cast(FeatureExtractor, self.backbone).channels)
        kept = [c // 2 for c in channels] if afs_channels is None else [int(k) for k in afs_channels]
        #: The method: AFS, reconstruction networks and RRS discriminator (what export traces).
        self.model = RealNetModel(
            channels, kept, init_bsn, width_ratio, channel_mult, res_blocks, attention_at,
            rrs_modes, rrs_counts, rrs_residual_layers, rrs_normalised_input,
        )
        # checkpoints written before the method was the detector's ``model`` held it as ``realnet``
        self.register_load_state_dict_pre_hook(
            MoveKeysUnder(("afs", "reconstruction", "discriminator"), old_owner="realnet")
        )

    def trainer_defaults(self) -> dict[str, Any]:
        """``max_epochs`` from ``epochs``; a user's trainer options override it."""
        return {"max_epochs": self.epochs}

    def training_synthesizer(self) -> AnomalySynthesizer:
        """The configured corruption of training patches, or image blending on half of them."""
        return build_synthesizer(self.synthesizer_spec) or default_realnet_synthesizer()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the reconstruction networks and the discriminator (AFS holds no parameters)."""
        return torch.optim.Adam(self.model.parameters(), lr=self.lr, betas=(0.9, 0.999))

    def on_train_start(self) -> None:
        """Decide AFS from the first ``init_bsn`` training batches (cycling the loader) unless a resumed fit already did."""
        super().on_train_start()
        afs = self.model.afs
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        if afs.decided or loader is None:
            return
        while not afs.decided:
            seen = int(afs.batches_seen)
            for batch in loader:
                self.select_features(self.transfer_batch_to_device(batch, self.device, 0))
                if afs.decided:
                    break
            if int(afs.batches_seen) == seen:
                raise RuntimeError("AFS saw no synthetic anomaly in a whole pass over the training patches: check the synthesizer's p")

    @torch.no_grad()
    def select_features(self, batch: PatchBatch) -> None:
        """Add one synthetic batch to the AFS scores."""
        self.model.afs.accumulate(self.fused_embedding(batch), self.fused_embedding(batch.clean()), batch.mask)

    def training_step(self, batch: PatchBatch, batch_idx: int) -> Tensor:
        """Segmentation cross-entropy + feature MSE of one synthetic batch."""
        losses = self.model.losses(self.fused_embedding(batch), self.fused_embedding(batch.clean()), batch.mask)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, prog_bar=name == "loss", batch_size=len(batch))
        return losses["loss"]

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """The discriminator's anomaly probability ``[B, H, W]`` at the patch size."""
        return self.model(self.fused_embedding(batch), batch.image.shape[-2:])
