"""Dinomaly: a noisy bottleneck and a linear-attention decoder that loosely rebuild DINOv2 features.

Guo et al., "Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised
Anomaly Detection" (CVPR 2025). A frozen DINOv2-with-registers ViT gives the
tokens of its middle blocks (2-9 of a ViT-B, 0-based). Their mean passes an MLP
bottleneck with dropout 0.2 (the noise) and 8 decoder blocks with linear
attention (which cannot focus on a single token, so the decoder does not learn
an identity). The reconstruction is *loose*: the encoder taps and the decoder
outputs (reversed, the last decoder block first) are averaged in two groups of
four, and each group is compared as a whole image vector (global cosine).
Hard mining scales the gradient of the easiest share ``p`` of points by 0.1,
``p`` ramping linearly from 0 to 0.9 over the first 1000 steps. The anomaly map
is the mean over the groups of the per-point ``1 - cos``.

Training: StableAdamW (lr 2e-3, weight decay 1e-4, AMSGrad, eps 1e-10), 100
linear warm-up steps then cosine decay to 2e-4 at the last step, gradient
norm clipped to 0.1, 5000 steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors.features import FeatureExtractor
from hiad_pl.detectors.vit_parts import (
    LinearAttentionBlock,
    NoisyBottleneck,
    ViTTokenDetector,
    check_grids,
    check_positive,
    cosine_distance_map,
    global_cosine_loss,
    grid_to_tokens,
    hard_mining_rule,
    hard_mining_share,
    init_small_weights,
    mean_of,
    stable_adamw_warmup_cosine,
    step_trainer_defaults,
    tokens_to_grid,
)
from hiad_pl.postprocess import TOPK_PIXELS, ImageScore

#: Encoder blocks (0-based) of a 12-block ViT and the groups of taps / decoder outputs compared together.
ENCODER_BLOCKS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9)
GROUPS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (4, 5, 6, 7))
DECODER_DEPTH = 8
BOTTLENECK_DROPOUT = 0.2
#: Hard mining: final share of easy points, the steps it ramps over and their gradient factor.
HARD_MINING_SHARE = 0.9
HARD_MINING_RAMP_STEPS = 1000
HARD_MINING_FACTOR = 0.1
#: Optimiser and schedule of the paper and HiAD.
LR = 2e-3
FINAL_LR = 2e-4
WARMUP_STEPS = 100
WEIGHT_DECAY = 1e-4
GRADIENT_CLIP_NORM = 0.1
TOTAL_STEPS = 5000
EVAL_EVERY = 500
#: The paper's encoder (timm name) and its blocks as layer names.
BACKBONE = "vit_base_patch14_reg4_dinov2.lvd142m"
LAYERS: tuple[str, ...] = tuple(f"blocks.{i}" for i in ENCODER_BLOCKS)


def check_groups(groups: Sequence[Sequence[int]], count: int) -> tuple[tuple[int, ...], ...]:
    """``groups`` as tuples of indices into ``count`` taps.

    Raises:
        ValueError: an empty group or an index outside ``0 .. count - 1``.
    """
    checked = tuple(tuple(int(i) for i in group) for group in groups)
    if not checked or any(not group or min(group) < 0 or max(group) >= count for group in checked):
        raise ValueError(f"groups must be non-empty lists of indices in 0..{count - 1}, got {[list(g) for g in checked]}")
    return checked


def grouped(tokens: Sequence[Tensor], groups: Sequence[Sequence[int]], grid_size: tuple[int, int]) -> list[Tensor]:
    """The mean token sequence of each group, as grids ``[B, C, h, w]``."""
    return [tokens_to_grid(mean_of([tokens[i] for i in group]), grid_size) for group in groups]


class DinomalyReconstructor(nn.Module):
    """Noisy bottleneck + linear-attention decoder over the mean of the encoder taps.

    Args:
        dim: token width of the encoder.
        num_heads: attention heads of the decoder blocks.
        num_taps: encoder grids given to :meth:`forward`.
        depth: decoder blocks (their outputs, reversed, are grouped like the taps).
        groups: indices of the taps (and reversed decoder outputs) averaged together.
        dropout: dropout of the bottleneck.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_taps: int = len(ENCODER_BLOCKS),
        depth: int = DECODER_DEPTH,
        groups: Sequence[Sequence[int]] = GROUPS,
        dropout: float = BOTTLENECK_DROPOUT,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_taps = num_taps
        self.groups = check_groups(groups, min(num_taps, depth))
        self.bottleneck = NoisyBottleneck(dim, dropout=dropout)
        self.decoder = nn.ModuleList(LinearAttentionBlock(dim, num_heads) for _ in range(depth))
        init_small_weights([self.bottleneck, self.decoder])

    def forward(self, encoder_grids: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``(targets, reconstructions)``: one ``[B, C, h, w]`` grid per group for each side."""
        grid_size = check_grids(encoder_grids, self.num_taps, self.dim, "Dinomaly encoder")
        tokens = [grid_to_tokens(g) for g in encoder_grids]
        x = self.bottleneck(mean_of(tokens))
        decoded = []
        for block in self.decoder:
            x = block(x)
            decoded.append(x)
        return grouped(tokens, self.groups, grid_size), grouped(decoded[::-1], self.groups, grid_size)


def dinomaly_loss(
    targets: Sequence[Tensor], reconstructions: Sequence[Tensor], step: int, ramp_steps: int = HARD_MINING_RAMP_STEPS
) -> Tensor:
    """Global cosine loss with hard mining at the share of optimiser ``step`` (see :func:`hard_mining_share`)."""
    share = hard_mining_share(step, HARD_MINING_SHARE, ramp_steps)
    return global_cosine_loss(targets, reconstructions, hard_mining_rule(share, HARD_MINING_FACTOR))


def dinomaly_anomaly_map(targets: Sequence[Tensor], reconstructions: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """``[B, H, W]``: per-point ``1 - cos`` of each group, upsampled to ``size``, averaged over groups."""
    return cosine_distance_map(targets, reconstructions, size, reduce="mean")


class HRDinomaly(ViTTokenDetector):
    """Dinomaly on high-resolution patches: a noisy bottleneck and linear-attention decoder over frozen ViT tokens.

    Args:
        backbone_name: timm ViT (DINOv2 with registers, ``vit_base_patch14_reg4_dinov2.lvd142m``, in the paper).
        layers_to_extract_from: encoder blocks tapped (``blocks.2`` ... ``blocks.9`` of a ViT-B).
        weights: encoder weights: ``hub``, a local file (``model.safetensors`` in timm's layout), ``none``, or
            ``offline`` for the token pyramids ``lite{0,1,2}_token_pyramid`` (pretrained EfficientNet-Lite blocks; the quickstarts).
        input_size: ``(width, height)`` or one int: the patch size (sides need not be multiples of the ViT patch).
        fusion_weights: multi-resolution fusion weights (see :class:`HRDetector`).
        feature_kind: ``vit`` (or ``auto``).
        backbone_kwargs: extra ``timm.create_model`` options (e.g. ``depth`` of a random-init ViT).
        groups: indices of the taps (and reversed decoder outputs) averaged and compared together.
        decoder_depth: linear-attention decoder blocks.
        dropout: dropout (noise) of the bottleneck.
        lr: peak learning rate of StableAdamW.
        final_lr: learning rate at the last step (cosine decay).
        warmup_steps: linear warm-up steps.
        weight_decay: decoupled weight decay.
        total_steps: optimiser steps (the Trainer's default ``max_steps``).
        eval_every: steps between validations (the Trainer's default ``val_check_interval``).
        hard_mining_ramp_steps: steps over which the easy share ramps from 0 to 0.9.
        gradient_clip_norm: gradient norm clip (the Trainer's default ``gradient_clip_val``).
        image_score: overrides of the image-score rule (default: the mean of the 100 largest pixels, as HiAD
            scores Dinomaly; see :class:`HRDetector`).
    """

    #: Dinomaly's image score in HiAD: the mean of the 100 largest pixels of the map.
    default_image_score: ClassVar[ImageScore] = ImageScore("topk_mean", k=TOPK_PIXELS)

    def __init__(
        self,
        backbone_name: str = BACKBONE,
        layers_to_extract_from: Sequence[str] = LAYERS,
        weights: str = "hub",
        input_size: int | tuple[int, int] = 512,
        fusion_weights: Sequence[float] | None = None,
        feature_kind: str = "vit",
        backbone_kwargs: dict[str, Any] | None = None,
        groups: Sequence[Sequence[int]] = GROUPS,
        decoder_depth: int = DECODER_DEPTH,
        dropout: float = BOTTLENECK_DROPOUT,
        lr: float = LR,
        final_lr: float = FINAL_LR,
        warmup_steps: int = WARMUP_STEPS,
        weight_decay: float = WEIGHT_DECAY,
        total_steps: int = TOTAL_STEPS,
        eval_every: int = EVAL_EVERY,
        hard_mining_ramp_steps: int = HARD_MINING_RAMP_STEPS,
        gradient_clip_norm: float = GRADIENT_CLIP_NORM,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__(
            backbone_name, layers_to_extract_from, weights, input_size, fusion_weights, feature_kind, backbone_kwargs,
            image_score=image_score,
        )
        check_positive(lr=lr, final_lr=final_lr, total_steps=total_steps, eval_every=eval_every, gradient_clip_norm=gradient_clip_norm)
        if not 0 <= dropout < 1 or warmup_steps < 0 or weight_decay < 0 or hard_mining_ramp_steps < 0:
            raise ValueError(
                f"need 0 <= dropout < 1 and non-negative warmup_steps, weight_decay, hard_mining_ramp_steps; got "
                f"{dropout}, {warmup_steps}, {weight_decay}, {hard_mining_ramp_steps}"
            )
        self.lr, self.final_lr, self.weight_decay = float(lr), float(final_lr), float(weight_decay)
        self.warmup_steps, self.total_steps, self.eval_every = warmup_steps, total_steps, eval_every
        self.hard_mining_ramp_steps = hard_mining_ramp_steps
        self.gradient_clip_norm = float(gradient_clip_norm)
        self.reconstructor = DinomalyReconstructor(
            self.token_dim, self.encoder_heads(), len(cast(FeatureExtractor, self.backbone).layers), decoder_depth, groups, dropout
        )

    def trainer_defaults(self) -> dict[str, Any]:
        """``max_steps``, validation every ``eval_every`` steps and gradient clipping; a user's trainer options override them."""
        return step_trainer_defaults(self.total_steps, self.eval_every, self.gradient_clip_norm)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """StableAdamW over the bottleneck and decoder, warm-up then cosine decay per step."""
        return stable_adamw_warmup_cosine(
            self.parameters_of("reconstructor"), self.lr, self.final_lr, self.warmup_steps, self.total_steps, self.weight_decay
        )

    def training_step(self, batch: PatchBatch, batch_idx: int) -> Tensor:
        """Hard-mining global cosine loss; the easy share follows the optimiser step count."""
        targets, reconstructions = self.reconstructor(self.encoder_grids(batch))
        loss = dinomaly_loss(targets, reconstructions, self.global_step, self.hard_mining_ramp_steps)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch))
        return loss

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """Mean over the groups of per-point ``1 - cos``, at the patch size."""
        targets, reconstructions = self.reconstructor(self.encoder_grids(batch))
        return dinomaly_anomaly_map(targets, reconstructions, tuple(batch.image.shape[-2:]))
