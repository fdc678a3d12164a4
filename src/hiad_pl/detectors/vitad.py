"""ViTAD: a plain-ViT teacher and a ViT decoder that reconstructs its features in reverse order.

Zhang et al., "Exploring Plain ViT Reconstruction for Multi-class Unsupervised
Anomaly Detection" (2023). A frozen ViT (DINO ViT-S/16 in the paper, ViT-B/16
at 384-px patches in HiAD) gives teacher features after its blocks 3, 6 and 9
and a neck feature after block 12. A linear fusion maps the neck to the
decoder's width; a 9-block ViT decoder (learned position embedding, no class
token) rebuilds the teacher: its outputs after decoder blocks 3, 6 and 9 are
paired with the teacher's in reverse (decoder 9 with teacher 3, 6 with 6,
3 with 9), so the shallowest teacher level is the decoder's last output. The
loss is the global cosine distance summed over the three levels; the anomaly
map is the sum of the per-point ``1 - cos`` of the levels.

Training: AdamW (lr 1e-4, weight decay 1e-4), the learning rate divided by 10
after 80 % of the epochs, gradients clipped to norm 5.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import Tensor, nn

from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors.features import FeatureExtractor
from hiad_pl.detectors.vit_parts import (
    ViTTokenDetector,
    check_grids,
    check_positive,
    cosine_distance_map,
    global_cosine_loss,
    grid_to_tokens,
    tokens_to_grid,
)
from hiad_pl.postprocess import ImageScore

#: Teacher blocks (1-based, as in the paper) and the neck block of a 12-block ViT.
TEACHER_BLOCKS: tuple[int, ...] = (3, 6, 9)
NECK_BLOCKS: tuple[int, ...] = (12,)
#: Decoder depth and the decoder blocks (1-based) whose outputs are compared with the teacher.
DECODER_DEPTH = 9
DECODER_TAPS: tuple[int, ...] = (3, 6, 9)
#: Optimiser and schedule of the paper and HiAD.
LR = 1e-4
WEIGHT_DECAY = 1e-4
LR_DECAY_AT = 0.8
LR_DECAY_RATE = 0.1
GRADIENT_CLIP_NORM = 5.0
EPOCHS = 200
#: HiAD's encoder (timm name; the paper's is ``vit_small_patch16_224.dino``) and its layers: teachers, then the neck.
BACKBONE = "vit_base_patch16_384.augreg_in21k_ft_in1k"
LAYERS: tuple[str, ...] = tuple(f"blocks.{b - 1}" for b in TEACHER_BLOCKS + NECK_BLOCKS)


class ViTADDecoder(nn.Module):
    """Linear fusion of the neck features, then a ViT decoder whose tapped outputs rebuild the teacher.

    Args:
        dim: token width of the encoder (and decoder).
        num_heads: attention heads of the decoder blocks.
        grid_size: ``(h, w)`` token grid the position embedding is built for;
            other grids get it resampled (bicubic), so any patch shape works.
        neck_count: number of neck grids concatenated before the fusion.
        depth: decoder blocks.
        taps: decoder blocks (1-based) whose outputs are returned.
        mlp_ratio: hidden width of the blocks' MLPs per channel.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
        neck_count: int = len(NECK_BLOCKS),
        depth: int = DECODER_DEPTH,
        taps: Sequence[int] = DECODER_TAPS,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        taps = tuple(int(t) for t in taps)
        if not taps or list(taps) != sorted(set(taps)) or taps[0] < 1 or taps[-1] > depth:
            raise ValueError(f"decoder taps must be increasing block numbers in 1..{depth}, got {list(taps)}")
        self.dim = dim
        self.neck_count = neck_count
        self.taps = taps
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.fusion = nn.Linear(dim * neck_count, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            # timm builds norms with norm_layer(dim) and passes such partials itself; its hint names only classes
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)  # type: ignore[arg-type]
            for _ in range(depth)
        )
        # timm's ViT initialisation (truncated normal, std 0.02), as the paper's decoder is a timm ViT.
        for module in (self.fusion, self.blocks):
            module.apply(init_weights_vit_timm)

    def position_embedding(self, grid_size: tuple[int, int]) -> Tensor:
        """``[1, h * w, C]`` position embedding for a ``grid_size`` token grid."""
        if tuple(grid_size) == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid_size), list(self.grid_size), num_prefix_tokens=0)

    def forward(self, neck_grids: Sequence[Tensor]) -> list[Tensor]:
        """Decoder grids ``[B, C, h, w]`` after the tapped blocks, deepest first (paired with the teacher's shallowest first)."""
        grid_size = check_grids(neck_grids, self.neck_count, self.dim, "ViTAD neck")
        x = self.fusion(torch.cat([grid_to_tokens(g) for g in neck_grids], dim=2))
        x = x + self.position_embedding(grid_size)
        outputs = []
        for number, block in enumerate(self.blocks, start=1):
            x = block(x)
            if number in self.taps:
                outputs.append(tokens_to_grid(x, grid_size))
        return outputs[::-1]


def vitad_loss(teacher: Sequence[Tensor], decoded: Sequence[Tensor]) -> Tensor:
    """Global cosine distance of each level, summed over the levels (the paper's ``avg=False``)."""
    return global_cosine_loss(teacher, decoded, reduce="sum")


def vitad_anomaly_map(teacher: Sequence[Tensor], decoded: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """``[B, H, W]``: per-point ``1 - cos`` of each level, upsampled to ``size``, summed over levels."""
    return cosine_distance_map(teacher, decoded, size, reduce="sum")


def step_decay_epochs(epochs: int, decay_at: float = LR_DECAY_AT) -> int:
    """The epoch after which the learning rate drops (80 % of the training by default, at least 1)."""
    return max(1, int(epochs * decay_at))


class HRVitAD(ViTTokenDetector):
    """ViTAD on high-resolution patches: a ViT decoder rebuilds a frozen plain ViT's features in reverse.

    Args:
        backbone_name: timm ViT teacher (HiAD: ``vit_base_patch16_384.augreg_in21k_ft_in1k``; the paper:
            ``vit_small_patch16_224.dino``).
        layers_to_extract_from: teacher blocks then neck blocks (``blocks.2, blocks.5, blocks.8, blocks.11``:
            blocks 3, 6, 9 and 12 counted from 1).
        weights: encoder weights: ``hub``, a local file (``model.safetensors`` in timm's layout), ``none``, or
            ``offline`` for the token pyramids ``lite{0,1,2}_token_pyramid`` (pretrained EfficientNet-Lite blocks; the quickstarts).
        input_size: ``(width, height)`` or one int: the patch size (the decoder's position embedding is built
            for its token grid and resampled for others).
        fusion_weights: multi-resolution fusion weights (see :class:`HRDetector`).
        feature_kind: ``vit`` (or ``auto``).
        backbone_kwargs: extra ``timm.create_model`` options.
        num_neck_layers: how many of the last layers form the neck (the rest are teachers).
        decoder_depth: decoder blocks.
        decoder_taps: decoder blocks (1-based) paired, deepest first, with the teacher layers.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        epochs: training epochs (the Trainer's default ``max_epochs``); the rate drops 10x after 80 % of them.
        gradient_clip_norm: gradient norm clip (the Trainer's default ``gradient_clip_val``).
        image_score: overrides of the image-score rule (default: the largest 16 x 16 window mean, as HiAD
            scores this method; see :class:`HRDetector`).
    """

    def __init__(
        self,
        backbone_name: str = BACKBONE,
        layers_to_extract_from: Sequence[str] = LAYERS,
        weights: str = "hub",
        input_size: int | tuple[int, int] = 384,
        fusion_weights: Sequence[float] | None = None,
        feature_kind: str = "vit",
        backbone_kwargs: dict[str, Any] | None = None,
        num_neck_layers: int = len(NECK_BLOCKS),
        decoder_depth: int = DECODER_DEPTH,
        decoder_taps: Sequence[int] = DECODER_TAPS,
        lr: float = LR,
        weight_decay: float = WEIGHT_DECAY,
        epochs: int = EPOCHS,
        gradient_clip_norm: float = GRADIENT_CLIP_NORM,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__(
            backbone_name, layers_to_extract_from, weights, input_size, fusion_weights, feature_kind, backbone_kwargs,
            image_score=image_score,
        )
        check_positive(lr=lr, epochs=epochs, gradient_clip_norm=gradient_clip_norm)
        layer_count = len(cast(FeatureExtractor, self.backbone).layers)
        teachers = layer_count - num_neck_layers
        if num_neck_layers < 1 or teachers != len(tuple(decoder_taps)):
            raise ValueError(
                f"layers_to_extract_from must hold one teacher layer per decoder tap ({len(tuple(decoder_taps))}) "
                f"followed by num_neck_layers ({num_neck_layers}) neck layers; got {layer_count} layers"
            )
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        self.num_teacher_layers = teachers
        self.lr, self.weight_decay, self.epochs = float(lr), float(weight_decay), epochs
        self.gradient_clip_norm = float(gradient_clip_norm)
        self.decoder = ViTADDecoder(
            self.token_dim, self.encoder_heads(), self.token_grid_size(), num_neck_layers, decoder_depth, decoder_taps
        )

    def trainer_defaults(self) -> dict[str, Any]:
        """``max_epochs`` from ``epochs`` and gradient clipping; a user's trainer options override them."""
        return {"max_epochs": self.epochs, "gradient_clip_val": self.gradient_clip_norm, "gradient_clip_algorithm": "norm"}

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW over the fusion and decoder; the rate drops 10x after 80 % of the epochs."""
        optimizer = torch.optim.AdamW(self.parameters_of("decoder"), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_decay_epochs(self.epochs), gamma=LR_DECAY_RATE)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    def teacher_and_decoded(self, batch: PatchBatch) -> tuple[list[Tensor], list[Tensor]]:
        """Teacher grids (shallow first) and the decoder's grids paired with them (deepest first)."""
        grids = self.encoder_grids(batch)
        return grids[: self.num_teacher_layers], self.decoder(grids[self.num_teacher_layers :])

    def training_step(self, batch: PatchBatch, batch_idx: int) -> Tensor:
        """Global cosine distance summed over the teacher levels."""
        loss = vitad_loss(*self.teacher_and_decoded(batch))
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch))
        return loss

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """Sum over the levels of per-point ``1 - cos``, at the patch size."""
        return vitad_anomaly_map(*self.teacher_and_decoded(batch), tuple(batch.image.shape[-2:]))
