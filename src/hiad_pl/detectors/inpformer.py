"""INP-Former: intrinsic normal prototypes of each image guide the reconstruction of its features.

Luo et al., "Exploring Intrinsic Normal Prototypes within a Single Image for
Universal Anomaly Detection" (CVPR 2025). Dinomaly's encoder (DINOv2 with
registers, blocks 2-9) and loose two-group reconstruction, with two changes:

- an INP extractor: 6 learnable queries cross-attend to the image's fused
  tokens (the mean of the taps) and become the image's own normal prototypes;
  a coherence loss pulls every token towards its nearest prototype
  (the mean over tokens of the smallest ``1 - cos``);
- an INP-guided decoder: after an MLP bottleneck, 8 blocks in which the
  tokens attend to the prototypes only (cosine similarity x a learned scale,
  ReLU, no residual around the attention), so each token is rebuilt from
  normal patterns and an anomaly cannot be copied through.

The reconstruction loss is the global cosine distance with soft mining (each
point's gradient scaled by ``(d / mean d) ** 3``); the total loss adds 0.2 x
the coherence loss. The anomaly map is Dinomaly's. Training: StableAdamW
(lr 1e-3, weight decay 1e-4, AMSGrad, eps 1e-10), 100 warm-up steps, cosine
to 1e-4, gradient norm clipped to 0.1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors.dinomaly import (
    BACKBONE,
    ENCODER_BLOCKS,
    EVAL_EVERY,
    GROUPS,
    LAYERS,
    check_groups,
    dinomaly_anomaly_map,
    grouped,
)
from hiad_pl.detectors.features import FeatureExtractor
from hiad_pl.detectors.vit_parts import (
    NoisyBottleneck,
    PrototypeExtractorBlock,
    PrototypeGuidedBlock,
    ViTTokenDetector,
    check_grids,
    check_positive,
    global_cosine_loss,
    grid_to_tokens,
    init_small_weights,
    mean_of,
    soft_mining_rule,
    stable_adamw_warmup_cosine,
    step_trainer_defaults,
)
from hiad_pl.postprocess import TOPK_PIXELS, ImageScore

NUM_PROTOTYPES = 6
DECODER_DEPTH = 8
#: Weight of the coherence loss and power of the soft mining.
COHERENCE_WEIGHT = 0.2
SOFT_MINING_POWER = 3.0
#: Optimiser and schedule of the paper.
LR = 1e-3
FINAL_LR = 1e-4
WARMUP_STEPS = 100
WEIGHT_DECAY = 1e-4
GRADIENT_CLIP_NORM = 0.1
TOTAL_STEPS = 5000


def coherence_loss(tokens: Tensor, prototypes: Tensor) -> Tensor:
    """Mean over tokens ``[B, N, C]`` of ``1 - cos`` to the nearest of the prototypes ``[B, P, C]``."""
    distances = 1.0 - F.cosine_similarity(tokens.unsqueeze(2), prototypes.unsqueeze(1), dim=-1)
    return distances.min(dim=2).values.mean()


class INPFormerReconstructor(nn.Module):
    """INP extractor, bottleneck and INP-guided decoder over the mean of the encoder taps.

    Args:
        dim: token width of the encoder.
        num_heads: attention heads of the extractor and decoder.
        num_taps: encoder grids given to :meth:`forward`.
        num_prototypes: learnable queries, i.e. prototypes per image.
        depth: INP-guided decoder blocks.
        groups: indices of the taps (and reversed decoder outputs) averaged together.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_taps: int = len(ENCODER_BLOCKS),
        num_prototypes: int = NUM_PROTOTYPES,
        depth: int = DECODER_DEPTH,
        groups: Sequence[Sequence[int]] = GROUPS,
    ) -> None:
        super().__init__()
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be at least 1, got {num_prototypes}")
        self.dim = dim
        self.num_taps = num_taps
        self.groups = check_groups(groups, min(num_taps, depth))
        self.prototype_queries = nn.Parameter(torch.randn(num_prototypes, dim))
        self.extractor = PrototypeExtractorBlock(dim, num_heads)
        self.bottleneck = NoisyBottleneck(dim, dropout=0.0)
        self.decoder = nn.ModuleList(PrototypeGuidedBlock(dim, num_heads) for _ in range(depth))
        init_small_weights([self.extractor, self.bottleneck, self.decoder])

    def prototypes(self, tokens: Tensor) -> Tensor:
        """The image's prototypes ``[B, P, C]`` from its fused tokens ``[B, N, C]``."""
        queries = self.prototype_queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.extractor(queries, tokens)

    def forward(self, encoder_grids: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """``(targets, reconstructions, coherence loss)``: one ``[B, C, h, w]`` grid per group for each side."""
        grid_size = check_grids(encoder_grids, self.num_taps, self.dim, "INP-Former encoder")
        tokens = [grid_to_tokens(g) for g in encoder_grids]
        fused = mean_of(tokens)
        prototypes = self.prototypes(fused)
        coherence = coherence_loss(fused, prototypes)
        x = self.bottleneck(fused)
        decoded = []
        for block in self.decoder:
            x = block(x, prototypes)
            decoded.append(x)
        return grouped(tokens, self.groups, grid_size), grouped(decoded[::-1], self.groups, grid_size), coherence


def inpformer_loss(
    targets: Sequence[Tensor], reconstructions: Sequence[Tensor], coherence: Tensor, coherence_weight: float = COHERENCE_WEIGHT
) -> Tensor:
    """Soft-mining global cosine loss plus ``coherence_weight`` (0.2) x the coherence loss."""
    reconstruction = global_cosine_loss(targets, reconstructions, soft_mining_rule(SOFT_MINING_POWER))
    return reconstruction + coherence_weight * coherence


class HRINPFormer(ViTTokenDetector):
    """INP-Former on high-resolution patches: per-image normal prototypes guide the rebuild of frozen ViT tokens.

    Args:
        backbone_name: timm ViT (Dinomaly's DINOv2 with registers in the paper).
        layers_to_extract_from: encoder blocks tapped (``blocks.2`` ... ``blocks.9`` of a ViT-B).
        weights: encoder weights: ``hub``, a local file (``model.safetensors`` in timm's layout), ``none``, or
            ``offline`` for the token pyramids ``lite{0,1,2}_token_pyramid`` (pretrained EfficientNet-Lite blocks; the quickstarts).
        input_size: ``(width, height)`` or one int: the patch size.
        fusion_weights: multi-resolution fusion weights (see :class:`HRDetector`).
        feature_kind: ``vit`` (or ``auto``).
        backbone_kwargs: extra ``timm.create_model`` options.
        num_prototypes: learnable queries (prototypes per image).
        groups: indices of the taps (and reversed decoder outputs) averaged and compared together.
        decoder_depth: INP-guided decoder blocks.
        coherence_weight: weight of the coherence loss.
        lr: peak learning rate of StableAdamW.
        final_lr: learning rate at the last step (cosine decay).
        warmup_steps: linear warm-up steps.
        weight_decay: decoupled weight decay.
        total_steps: optimiser steps (the Trainer's default ``max_steps``).
        eval_every: steps between validations (the Trainer's default ``val_check_interval``).
        gradient_clip_norm: gradient norm clip (the Trainer's default ``gradient_clip_val``).
        image_score: overrides of the image-score rule (default: the mean of the 100 largest pixels, as HiAD
            scores INP-Former; see :class:`HRDetector`).
    """

    #: INP-Former's image score in HiAD: the mean of the 100 largest pixels of the map.
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
        num_prototypes: int = NUM_PROTOTYPES,
        groups: Sequence[Sequence[int]] = GROUPS,
        decoder_depth: int = DECODER_DEPTH,
        coherence_weight: float = COHERENCE_WEIGHT,
        lr: float = LR,
        final_lr: float = FINAL_LR,
        warmup_steps: int = WARMUP_STEPS,
        weight_decay: float = WEIGHT_DECAY,
        total_steps: int = TOTAL_STEPS,
        eval_every: int = EVAL_EVERY,
        gradient_clip_norm: float = GRADIENT_CLIP_NORM,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__(
            backbone_name, layers_to_extract_from, weights, input_size, fusion_weights, feature_kind, backbone_kwargs,
            image_score=image_score,
        )
        check_positive(lr=lr, final_lr=final_lr, total_steps=total_steps, eval_every=eval_every, gradient_clip_norm=gradient_clip_norm)
        if warmup_steps < 0 or weight_decay < 0 or coherence_weight < 0:
            raise ValueError(
                f"warmup_steps, weight_decay and coherence_weight must be non-negative, got "
                f"{warmup_steps}, {weight_decay}, {coherence_weight}"
            )
        self.lr, self.final_lr, self.weight_decay = float(lr), float(final_lr), float(weight_decay)
        self.warmup_steps, self.total_steps, self.eval_every = warmup_steps, total_steps, eval_every
        self.coherence_weight = float(coherence_weight)
        self.gradient_clip_norm = float(gradient_clip_norm)
        self.reconstructor = INPFormerReconstructor(
            self.token_dim, self.encoder_heads(), len(cast(FeatureExtractor, self.backbone).layers), num_prototypes, decoder_depth, groups
        )

    def trainer_defaults(self) -> dict[str, Any]:
        """``max_steps``, validation every ``eval_every`` steps and gradient clipping; a user's trainer options override them."""
        return step_trainer_defaults(self.total_steps, self.eval_every, self.gradient_clip_norm)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """StableAdamW over the queries, extractor, bottleneck and decoder, warm-up then cosine decay per step."""
        return stable_adamw_warmup_cosine(
            self.parameters_of("reconstructor"), self.lr, self.final_lr, self.warmup_steps, self.total_steps, self.weight_decay
        )

    def training_step(self, batch: PatchBatch, batch_idx: int) -> Tensor:
        """Soft-mining global cosine loss plus ``coherence_weight`` x the coherence loss."""
        targets, reconstructions, coherence = self.reconstructor(self.encoder_grids(batch))
        loss = inpformer_loss(targets, reconstructions, coherence, self.coherence_weight)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch))
        self.log("train/coherence_loss", coherence.detach(), on_step=True, on_epoch=False, batch_size=len(batch))
        return loss

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """Mean over the groups of per-point ``1 - cos``, at the patch size (as Dinomaly)."""
        targets, reconstructions, _ = self.reconstructor(self.encoder_grids(batch))
        return dinomaly_anomaly_map(targets, reconstructions, tuple(batch.image.shape[-2:]))
