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

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiad_pl.detectors.dinomaly import ENCODER_BLOCKS, GROUPS, check_groups, grouped
from hiad_pl.detectors.vit_parts import (
    NoisyBottleneck,
    PrototypeExtractorBlock,
    PrototypeGuidedBlock,
    check_grids,
    global_cosine_loss,
    grid_to_tokens,
    init_small_weights,
    mean_of,
    soft_mining_rule,
)

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


def inpformer_loss(targets: Sequence[Tensor], reconstructions: Sequence[Tensor], coherence: Tensor) -> Tensor:
    """Soft-mining global cosine loss plus 0.2 x the coherence loss."""
    reconstruction = global_cosine_loss(targets, reconstructions, soft_mining_rule(SOFT_MINING_POWER))
    return reconstruction + COHERENCE_WEIGHT * coherence
