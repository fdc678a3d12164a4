"""Parts shared by the ViT-token detectors (ViTAD, Dinomaly, INP-Former).

Everything here works on token sequences ``[B, N, C]`` or token grids
``[B, C, h, w]`` and knows nothing of Lightning or of the encoder:

- token grid <-> sequence conversion and the mean of several layers;
- attention variants: linear attention (Dinomaly), prototype cross-attention
  with ReLU similarity (INP-Former's guided decoder) and softmax cross-attention
  (INP-Former's prototype extractor), and the pre-norm blocks around them;
- the MLP bottleneck with dropout noise;
- the global cosine reconstruction loss, with per-point gradient scaling for
  hard mining (Dinomaly) and soft mining (INP-Former), and the cosine-distance
  anomaly map;
- :class:`StableAdamW`;
- :class:`ViTTokenDetector`, the :class:`~hiad_pl.detectors.base.HRDetector`
  base of the three detectors: a frozen ViT token extractor (shared per run),
  the decoders' head count, float32 token grids, ``torch.inference_mode`` at
  inference, and step-based training defaults.
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors.base import HRDetector, warmup_cosine_schedule
from hiad_pl.detectors.features import FeatureExtractor, nearest_multiple
from hiad_pl.postprocess import ImageScore

#: LayerNorm epsilon of the Dinomaly / INP-Former decoders.
DECODER_NORM_EPS = 1e-8


# ----------------------------------------------------------------- token shapes


def grid_to_tokens(grid: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, h * w, C]`` (row-major tokens)."""
    return grid.flatten(2).transpose(1, 2)


def tokens_to_grid(tokens: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """``[B, h * w, C]`` -> ``[B, C, h, w]``.

    Raises:
        ValueError: when the token count is not ``h * w``.
    """
    batch, count, channels = tokens.shape
    height, width = grid_size
    if count != height * width:
        raise ValueError(f"{count} tokens do not fill a {height} x {width} grid")
    return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def mean_of(tensors: Sequence[Tensor]) -> Tensor:
    """Element-wise mean of equally shaped tensors."""
    return torch.stack(list(tensors)).mean(0)


def check_grids(grids: Sequence[Tensor], count: int, channels: int, what: str) -> tuple[int, int]:
    """The common ``(h, w)`` of ``count`` grids ``[B, channels, h, w]``.

    Raises:
        ValueError: naming ``what`` when the count, channels or sizes do not fit.
    """
    if len(grids) != count:
        raise ValueError(f"{what}: expected {count} feature grids, got {len(grids)}")
    shapes = {tuple(int(v) for v in g.shape) for g in grids}  # ints also while an export traces
    if len(shapes) != 1:
        raise ValueError(f"{what}: feature grids differ in shape: {sorted(shapes)}")
    shape = next(iter(shapes))
    if len(shape) != 4 or shape[1] != channels:
        raise ValueError(f"{what}: expected grids [B, {channels}, h, w], got {list(shape)}")
    return int(shape[2]), int(shape[3])


# ------------------------------------------------------------------- attention


class LinearAttention(nn.Module):
    """Multi-head linear attention with the ``elu + 1`` feature map (cost linear in the token count).

    ``out_i = sum_j phi(q_i) . phi(k_j) v_j / sum_j phi(q_i) . phi(k_j)`` computed as
    ``phi(q_i) (phi(K)^T V) / (phi(q_i) . sum_j phi(k_j))``: it cannot focus
    sharply on one token, which keeps Dinomaly's decoder from copying its input.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``."""
        batch, count, dim = x.shape
        qkv = self.qkv(x).reshape(batch, count, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = F.elu(qkv[0]) + 1.0, F.elu(qkv[1]) + 1.0, qkv[2]
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        normaliser = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)).reciprocal()
        out = torch.einsum("bhnd,bhde,bhn->bhne", q, kv, normaliser)
        return self.proj(out.transpose(1, 2).reshape(batch, count, dim))


class CrossAttention(nn.Module):
    """Softmax multi-head attention of queries ``[B, T, C]`` over a context ``[B, N, C]``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        """``[B, T, C]`` queries attending over ``[B, N, C]`` -> ``[B, T, C]``."""
        batch, count, dim = queries.shape
        heads = self.num_heads
        q = self.q(queries).reshape(batch, count, heads, dim // heads).transpose(1, 2)
        kv = self.kv(context).reshape(batch, context.shape[1], 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.transpose(1, 2).reshape(batch, count, dim))


class PrototypeAttention(nn.Module):
    """Tokens attend to prototypes only: cosine similarity x a learned per-head scale, ReLU, no softmax.

    Queries come from the tokens, keys and values from the prototypes, so a
    token's output depends on that token and the prototypes alone.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor, prototypes: Tensor) -> Tensor:
        """``[B, N, C]`` tokens, ``[B, P, C]`` prototypes -> ``[B, N, C]``."""
        batch, count, dim = tokens.shape
        heads = self.num_heads
        q = self.q(tokens).reshape(batch, count, heads, dim // heads).transpose(1, 2)
        kv = self.kv(prototypes).reshape(batch, prototypes.shape[1], 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        weights = F.relu(F.normalize(q, dim=-1) @ F.normalize(kv[0], dim=-1).transpose(-2, -1) * self.scale)
        out = weights @ kv[1]
        return self.proj(out.transpose(1, 2).reshape(batch, count, dim))


def mlp(dim: int, ratio: float = 4.0, dropout: float = 0.0) -> nn.Sequential:
    """Linear - GELU - (dropout) - Linear - (dropout): the feed-forward part of a transformer block."""
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))


class LinearAttentionBlock(nn.Module):
    """Pre-norm transformer block with :class:`LinearAttention` (Dinomaly's decoder block)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=DECODER_NORM_EPS)
        self.attn = LinearAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=DECODER_NORM_EPS)
        self.mlp = mlp(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PrototypeExtractorBlock(nn.Module):
    """Learnable queries gather prototypes from the tokens: residual cross-attention, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=DECODER_NORM_EPS)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=DECODER_NORM_EPS)
        self.mlp = mlp(dim, mlp_ratio)

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        """``[B, P, C]`` queries over ``[B, N, C]`` tokens -> ``[B, P, C]`` prototypes."""
        # One norm for both sides, as in the paper's code: queries and tokens share a scale.
        queries = queries + self.attn(self.norm1(queries), self.norm1(tokens))
        return queries + self.mlp(self.norm2(queries))


class PrototypeGuidedBlock(nn.Module):
    """INP-guided decoder block: tokens are rebuilt from the prototypes, then refined by an MLP.

    The attention output replaces the tokens (no residual path around it), so
    what reaches the next block is made of prototypes: an anomalous token
    cannot pass through unchanged.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=DECODER_NORM_EPS)
        self.attn = PrototypeAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=DECODER_NORM_EPS)
        self.mlp = mlp(dim, mlp_ratio)

    def forward(self, tokens: Tensor, prototypes: Tensor) -> Tensor:
        """``[B, N, C]`` tokens, ``[B, P, C]`` prototypes -> ``[B, N, C]``."""
        x = self.attn(self.norm1(tokens), self.norm1(prototypes))
        return x + self.mlp(self.norm2(x))


class NoisyBottleneck(nn.Module):
    """MLP bottleneck ``dim -> 4 dim -> dim`` with dropout on its input, hidden layer and output.

    With ``dropout > 0`` (Dinomaly: 0.2) the dropout is the noise that keeps the
    decoder from learning an identity map; ``dropout = 0`` is a plain MLP (INP-Former).
    """

    def __init__(self, dim: int, ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.layers = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``."""
        return self.layers(x)


def init_small_weights(modules: Iterable[nn.Module]) -> None:
    """Dinomaly's initialisation: Linear weights truncated normal (std 0.01, within +-0.03), zero biases; unit LayerNorms."""
    for root in modules:
        for module in root.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.01, a=-0.03, b=0.03)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------- losses


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a fixed tensor."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        # torch hands backward a context that has saved_tensors; the FunctionCtx stub does not declare it
        (scale,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * scale, None


def scale_gradient(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` unchanged, but its gradient is multiplied by ``scale`` (broadcast to ``x``)."""
    return _ScaleGradient.apply(x, scale.detach())


def point_distances(targets: Tensor, predictions: Tensor) -> Tensor:
    """``1 - cos`` over channels at every point: ``[B, C, h, w]`` x 2 -> ``[B, 1, h, w]``."""
    return 1.0 - F.cosine_similarity(targets, predictions, dim=1).unsqueeze(1)


#: A rule that maps detached point distances ``[B, 1, h, w]`` of one group to gradient scales.
GradientRule = Callable[[Tensor], Tensor]


def hard_mining_rule(share: float, factor: float = 0.1) -> GradientRule:
    """Dinomaly's hard mining: the easiest ``share`` of points (smallest distance) get ``factor`` x gradient.

    The threshold is the ``k``-th largest distance of the batch with
    ``k = int(points * (1 - share))`` (at least one point), as in the paper's code:
    points strictly below it are the easy ones.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"hard-mining share must be in [0, 1), got {share}")

    def rule(distances: Tensor) -> Tensor:
        flat = distances.reshape(-1)
        kept = max(1, int(flat.numel() * (1.0 - share)))
        threshold = flat.topk(kept).values[-1]
        return torch.where(distances < threshold, torch.full_like(distances, factor), torch.ones_like(distances))

    return rule


def soft_mining_rule(power: float = 3.0) -> GradientRule:
    """INP-Former's soft mining: each point's gradient is scaled by ``(distance / mean distance) ** power``."""

    def rule(distances: Tensor) -> Tensor:
        return (distances / distances.mean().clamp_min(1e-12)) ** power

    return rule


def hard_mining_share(step: int, final_share: float = 0.9, ramp_steps: int = 1000) -> float:
    """The share of easy points at optimiser ``step``: a linear ramp from 0 to ``final_share`` over ``ramp_steps``."""
    if ramp_steps <= 0:
        return final_share
    return min(final_share * step / ramp_steps, final_share)


def global_cosine_loss(
    targets: Sequence[Tensor],
    predictions: Sequence[Tensor],
    gradient_rule: GradientRule | None = None,
    reduce: str = "mean",
) -> Tensor:
    """``1 - cos(flatten(target), flatten(prediction))`` averaged over images, then averaged (or summed) over groups.

    Each image's whole map is one vector (a *global* cosine, looser than a
    point-wise one). Targets are detached. With ``gradient_rule`` the gradient
    reaching each prediction point is scaled by the rule's value for the
    point's own (detached) cosine distance; the loss value is unchanged.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    if len(targets) != len(predictions) or not targets:
        raise ValueError(f"need as many target as prediction groups (>= 1), got {len(targets)} and {len(predictions)}")
    total = targets[0].new_zeros(())
    for target, prediction in zip(targets, predictions):
        target = target.detach()
        if gradient_rule is not None:
            with torch.no_grad():
                scale = gradient_rule(point_distances(target, prediction))
            prediction = scale_gradient(prediction, scale)
        total = total + (1.0 - F.cosine_similarity(target.flatten(1), prediction.flatten(1), dim=1)).mean()
    return total / len(targets) if reduce == "mean" else total


def cosine_distance_map(
    targets: Sequence[Tensor], predictions: Sequence[Tensor], size: Sequence[int], reduce: str = "mean"
) -> Tensor:
    """Per-point ``1 - cos`` of each group, upsampled to ``size`` ``(H, W)`` and summed or averaged: ``[B, H, W]``."""
    maps = torch.cat([point_distances(t, p) for t, p in zip(targets, predictions)], dim=1)
    maps = F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=False)
    if reduce == "sum":
        return maps.sum(1)
    if reduce == "mean":
        return maps.mean(1)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


# -------------------------------------------------------------------- optimiser


class StableAdamW(torch.optim.Optimizer):
    """AdamW whose update is damped per tensor when it is large relative to Adam's own scale.

    The StableAdamW of Wortsman et al. (2023) as Dinomaly uses it: decoupled
    weight decay (``p *= 1 - lr * weight_decay``), the Adam (optionally AMSGrad)
    update ``m_hat / (sqrt(v_hat) + eps)``, and each tensor's step divided by
    ``max(1, RMS(grad / (sqrt(v_hat) + eps)) / clip_threshold)``, which tames
    the spikes of rarely updated or freshly initialised weights.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        clip_threshold: float = 1.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or clip_threshold <= 0:
            raise ValueError(f"invalid StableAdamW settings: lr={lr}, eps={eps}, weight_decay={weight_decay}, clip={clip_threshold}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, clip_threshold=clip_threshold)
        super().__init__(params, defaults)

    # Optimizer.step is typed as two overloads (with and without a closure); one signature serves both
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimisation step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(param)
                param.mul_(1.0 - group["lr"] * group["weight_decay"])
                state["step"] += 1
                step = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                denom = (second.sqrt() / math.sqrt(1.0 - beta2**step)).add_(group["eps"])
                rms = (grad / denom).square().mean().sqrt()
                damping = torch.clamp(rms / group["clip_threshold"], min=1.0)
                step_size = group["lr"] / (1.0 - beta1**step)
                param.addcdiv_(exp_avg / damping, denom, value=-step_size)
        return loss


# ------------------------------------------------------------ detector base


def check_positive(**values: float) -> None:
    """Raise ``ValueError`` naming the first value that is not positive."""
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be positive, got {value!r}")


class ViTTokenDetector(HRDetector, ABC):
    """Base of the detectors that rebuild frozen ViT tokens (ViTAD, Dinomaly, INP-Former).

    The encoder is the platform's ViT token extractor (``feature_kind: vit``):
    one frozen instance per run, shared by every task, returning the patch
    tokens of the chosen blocks as ``[B, C, h, w]`` grids in one batched
    ``forward_intermediates`` pass. Inference runs under ``torch.inference_mode``.
    """

    def __init__(
        self,
        backbone_name: str,
        layers_to_extract_from: Sequence[str],
        weights: str,
        input_size: int | tuple[int, int],
        fusion_weights: Sequence[float] | None,
        feature_kind: str,
        backbone_kwargs: dict[str, Any] | None,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__(
            backbone_name, layers_to_extract_from, weights, input_size, fusion_weights, feature_kind, backbone_kwargs,
            image_score=image_score,
        )
        patch_size = getattr(self.backbone, "patch_size", None)
        if patch_size is None:
            raise ValueError(
                f"{type(self).__name__} rebuilds ViT tokens: backbone_name must be a vision transformer "
                f"and feature_kind 'vit' or 'auto' (got {backbone_name!r} with feature_kind {feature_kind!r})"
            )
        #: ``(h, w)`` pixels per token of the encoder.
        self.token_patch_size: tuple[int, int] = (int(patch_size[0]), int(patch_size[1]))
        widths = set(cast(FeatureExtractor, self.backbone).channels)
        if len(widths) != 1:
            raise ValueError(f"{type(self).__name__}: the chosen blocks differ in width {sorted(widths)}")
        #: Token width of the encoder.
        self.token_dim: int = widths.pop()

    def encoder_heads(self) -> int:
        """The encoder's attention heads (the decoders use as many), else one head per 64 channels."""
        blocks = getattr(getattr(self.backbone, "model", None), "blocks", None)
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks else None
        return int(heads) if heads else max(1, self.token_dim // 64)

    def token_grid_size(self) -> tuple[int, int]:
        """``(h, w)`` of the token grids for a patch of :attr:`input_size` (the extractor rounds sides to whole tokens)."""
        width, height = self.input_size
        patch_h, patch_w = self.token_patch_size
        return nearest_multiple(height, patch_h) // patch_h, nearest_multiple(width, patch_w) // patch_w

    def encoder_grids(self, batch: PatchBatch) -> list[Tensor]:
        """The (fused) token grids of the batch's patches, in float32."""
        return [grid.float() for grid in self.fused_embedding(batch)]

    def predict_step(self, batch: PatchBatch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Anomaly maps ``[B, h, w]`` (float32), computed under ``torch.inference_mode``."""
        with torch.inference_mode():
            return self.anomaly_map(batch).float()


def step_trainer_defaults(total_steps: int, eval_every: int, gradient_clip_norm: float) -> dict[str, Any]:
    """Trainer defaults of step-counted training: ``max_steps``, validation every ``eval_every`` steps, norm clipping."""
    return {
        "max_steps": total_steps,
        "max_epochs": -1,
        "val_check_interval": eval_every,
        "check_val_every_n_epoch": None,
        "gradient_clip_val": gradient_clip_norm,
        "gradient_clip_algorithm": "norm",
    }


def stable_adamw_warmup_cosine(
    parameters: Iterable[Tensor], lr: float, final_lr: float, warmup_steps: int, total_steps: int, weight_decay: float
) -> OptimizerLRSchedulerConfig:
    """Dinomaly's optimiser: StableAdamW (AMSGrad, eps 1e-10) with warm-up then cosine decay to ``final_lr``, per step."""
    optimizer = StableAdamW(parameters, lr=lr, betas=(0.9, 0.999), eps=1e-10, weight_decay=weight_decay, amsgrad=True)
    schedule = warmup_cosine_schedule(optimizer, min(warmup_steps, total_steps), total_steps, final_lr / lr)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
