"""FastFlow: 2D normalising flows that map normal backbone features to a standard Gaussian.

Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D
Normalizing Flows" (2021). Each chosen backbone layer gets its own flow: a
layer norm over the feature map, then ``flow_steps`` steps, each an affine
coupling block (3x3 and 1x1 convolution subnetworks in turn), a learned
per-channel affine map and a fixed channel permutation. Training minimises the
negative log-likelihood of the features under the flow, summed over each sample's
positions and channels and averaged over the batch (the reference code's
reduction, which sets the balance of Adam's weight decay); a test position scores
``-exp(-0.5 * mean_c z^2)`` (minus its likelihood as a probability), averaged
over layers after upsampling to the patch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors.base import DEFAULT_LAYERS, HRDetector
from hiad_pl.detectors.features import FeatureExtractor
from hiad_pl.detectors.map_model import MoveKeysUnder, PatchMapModel
from hiad_pl.postprocess import ImageScore

#: The coupling subnetwork's output is damped by this factor, so that every step starts close to identity.
COUPLING_DAMPING = 0.1


def coupling_subnet(in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv - ReLU - Conv with 'same' padding: predicts the coupling's log-scales and shifts."""
    padding = kernel_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=padding),
        nn.ReLU(),
        nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=padding),
    )


class AffineCouplingStep(nn.Module):
    """One invertible flow step on ``[B, C, H, W]`` maps: affine coupling, channel affine, permutation.

    The first ``C - C // 2`` channels pass unchanged and condition a subnetwork that
    predicts a log-scale ``s`` (bounded to ``(-clamp, clamp)`` by ``clamp * tanh``)
    and a shift ``t`` for the other ``C // 2`` channels: ``y2 = x2 * exp(s) + t``.
    A learned per-channel scale and offset follows, then a fixed random channel
    permutation so that every channel is transformed in later steps.

    Args:
        channels: channels ``C`` of the maps (at least 2).
        kernel_size: kernel of the subnetwork's convolutions (3 or 1).
        hidden_ratio: hidden channels of the subnetwork per conditioning channel.
        clamp: bound of the coupling's log-scales.
        seed: seed of the channel permutation.
    """

    def __init__(self, channels: int, kernel_size: int, hidden_ratio: float, clamp: float, seed: int) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling step needs at least 2 channels, got {channels}")
        self.kept = channels - channels // 2
        self.changed = channels // 2
        self.clamp = float(clamp)
        hidden = max(1, int(self.kept * hidden_ratio))
        self.subnet = coupling_subnet(self.kept, 2 * self.changed, hidden, kernel_size)
        self.channel_log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.channel_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        permutation = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.permutation: Tensor
        self.inverse_permutation: Tensor
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", permutation.argsort())

    def _scale_and_shift(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        """Bounded log-scales and shifts ``[B, C // 2, H, W]`` from the kept channels."""
        raw = self.subnet(kept) * COUPLING_DAMPING
        log_scale, shift = raw.split(self.changed, dim=1)
        return self.clamp * torch.tanh(log_scale), shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log_det)``: the transformed maps and ``log |det dy/dx|`` per position ``[B, H, W]``."""
        kept, changed = x.split([self.kept, self.changed], dim=1)
        log_scale, shift = self._scale_and_shift(kept)
        y = torch.cat([kept, changed * log_scale.exp() + shift], dim=1)
        y = y * self.channel_log_scale.exp() + self.channel_offset
        log_det = log_scale.sum(1) + self.channel_log_scale.sum()
        return y[:, self.permutation], log_det

    def inverse(self, y: Tensor) -> Tensor:
        """The ``x`` whose :meth:`forward` is ``y``."""
        y = y[:, self.inverse_permutation]
        y = (y - self.channel_offset) * (-self.channel_log_scale).exp()
        kept, changed = y.split([self.kept, self.changed], dim=1)
        log_scale, shift = self._scale_and_shift(kept)
        return torch.cat([kept, (changed - shift) * (-log_scale).exp()], dim=1)


class FeatureFlow(nn.Module):
    """The flow of one feature layer: a layer norm over the map, then ``steps`` coupling steps.

    Args:
        channels: channels of the layer's maps.
        grid: ``(h, w)`` of the layer's maps (the layer norm is over ``[C, h, w]``, as in the paper).
        steps: number of coupling steps.
        conv3x3_only: use 3x3 subnetworks in every step (otherwise 3x3 and 1x1 alternate).
        hidden_ratio: hidden channels of the subnetworks per conditioning channel.
        clamp: bound of the coupling's log-scales.
        seed: seed of the steps' permutations.
    """

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int],
        steps: int,
        conv3x3_only: bool,
        hidden_ratio: float,
        clamp: float,
        seed: int,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm([channels, *grid])
        self.steps = nn.ModuleList(
            AffineCouplingStep(channels, 3 if conv3x3_only or i % 2 == 0 else 1, hidden_ratio, clamp, seed + i)
            for i in range(steps)
        )

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log_det)``: the latent maps of ``features`` and ``log |det|`` per position ``[B, h, w]``."""
        z = self.norm(features)
        log_det = z.new_zeros(z.shape[0], *z.shape[2:])
        for step in self.steps:
            z, step_log_det = step(z)
            log_det = log_det + step_log_det
        return z, log_det


def negative_log_likelihood(z: Tensor, log_det: Tensor) -> Tensor:
    """``0.5 * ||z||^2 - log |det J|`` (constants dropped), summed over each sample's channels and positions, batch mean.

    The reference FastFlow's (and anomalib's) reduction. Averaging over positions too would
    divide the gradient by ``h * w`` (1,024-4,096 on 512-px patches) and so multiply Adam's
    weight decay relative to it by as much.
    """
    return (0.5 * z.square().sum(1) - log_det).flatten(1).sum(1).mean()


def likelihood_map(z: Tensor) -> Tensor:
    """``exp(-0.5 * mean_c z^2)`` per position ``[B, 1, h, w]``: 1 where the feature is typical."""
    return torch.exp(-0.5 * z.square().mean(1, keepdim=True))


class FastFlowModel(PatchMapModel):
    """FastFlow's flows (one per backbone layer) and the anomaly map they give.

    Args:
        channels: channels of each backbone layer (shallow to deep).
        grids: ``(h, w)`` of each layer's maps for the patch size (the flows' layer norms are over ``[C, h, w]``).
        flow_steps: coupling steps per flow.
        conv3x3_only: use 3x3 subnetworks in every step instead of alternating 3x3 and 1x1.
        hidden_ratio: hidden channels of the coupling subnetworks per conditioning channel.
        clamp: bound of the coupling log-scales.
        seed: seed of the channel permutations.
    """

    def __init__(
        self,
        channels: Sequence[int],
        grids: Sequence[tuple[int, int]],
        flow_steps: int = 8,
        conv3x3_only: bool = False,
        hidden_ratio: float = 1.0,
        clamp: float = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.flows = nn.ModuleList(
            FeatureFlow(c, grid, flow_steps, conv3x3_only, hidden_ratio, clamp, seed + 1000 * i)
            for i, (c, grid) in enumerate(zip(channels, grids))
        )

    def latents(self, features: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """``(z, log_det)`` of every layer's flow for per-layer (fused) maps."""
        return [flow(f.float()) for flow, f in zip(self.flows, features)]

    def forward(self, features: Sequence[Tensor], output_size: Sequence[int]) -> Tensor:
        """Minus the per-position likelihood, upsampled to ``output_size`` and averaged over layers."""
        maps = [
            F.interpolate(-likelihood_map(z), size=output_size, mode="bilinear", align_corners=False)
            for z, _ in self.latents(features)
        ]
        return torch.stack(maps).mean(0)[:, 0]


class HRFastFlow(HRDetector):
    """FastFlow on high-resolution patches, trained by gradient descent on frozen backbone features.

    Args:
        backbone_name: timm backbone (or tutorial alias, e.g. ``wideresnet50``).
        layers_to_extract_from: backbone layers; each gets an independent flow.
        weights: backbone weights: ``hub``, ``offline``, ``none`` or a file path.
        input_size: ``(width, height)`` or one int: patch size the detector sees.
        fusion_weights: multi-resolution fusion weights (see :class:`HRDetector`).
        flow_steps: coupling steps per flow.
        hidden_ratio: hidden channels of the coupling subnetworks per conditioning channel.
        conv3x3_only: use 3x3 subnetworks in every step instead of alternating 3x3 and 1x1.
        clamp: bound of the coupling log-scales.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        epochs: training epochs (the Trainer's default ``max_epochs``).
        seed: seed of the channel permutations.
        image_score: overrides of the image-score rule (default: the largest 16 x 16 window mean, as HiAD
            scores this method; see :class:`HRDetector`).
    """

    #: HiAD's option names in its config files (configs/fastflow_patch.yaml), and ours.
    hiad_option_names: ClassVar[dict[str, str]] = {"flow_step": "flow_steps", "num_epochs": "epochs"}

    def __init__(
        self,
        backbone_name: str = "efficientnet_lite0",
        layers_to_extract_from: Sequence[str] = DEFAULT_LAYERS,
        weights: str = "hub",
        input_size: int | tuple[int, int] = 512,
        fusion_weights: Sequence[float] | None = None,
        flow_steps: int = 8,
        hidden_ratio: float = 1.0,
        conv3x3_only: bool = False,
        clamp: float = 2.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        epochs: int = 300,
        seed: int = 0,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__(
            backbone_name, layers_to_extract_from, weights, input_size, fusion_weights, image_score=image_score
        )
        for name, value in (("flow_steps", flow_steps), ("epochs", epochs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, rate in (("hidden_ratio", hidden_ratio), ("clamp", clamp), ("lr", lr)):
            if not rate > 0:
                raise ValueError(f"{name} must be positive, got {rate!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.epochs = epochs
        #: The method: one flow per layer (what export traces).
        self.model = FastFlowModel(
            cast(FeatureExtractor, self.backbone).channels, self._feature_grids(), flow_steps, conv3x3_only, hidden_ratio, clamp, seed
        )
        # checkpoints written before the flows moved into the model kept them at the top level
        self.register_load_state_dict_pre_hook(MoveKeysUnder(("flows",)))

    def _feature_grids(self) -> list[tuple[int, int]]:
        """``(h, w)`` of each layer's maps for an input of :attr:`input_size` (one probe forward pass)."""
        width, height = self.input_size
        probe = torch.zeros(1, 3, height, width)
        return [(int(m.shape[-2]), int(m.shape[-1])) for m in self.embedding(probe)]

    def trainer_defaults(self) -> dict[str, Any]:
        """``max_epochs`` from ``epochs``; a user's trainer options override it."""
        return {"max_epochs": self.epochs}

    def latents(self, batch: PatchBatch) -> list[tuple[Tensor, Tensor]]:
        """``(z, log_det)`` of every layer's flow for the batch's (fused) features."""
        return self.model.latents(self.fused_embedding(batch))

    def training_step(self, batch: PatchBatch, batch_idx: int) -> Tensor:
        """Negative log-likelihood of the batch's features, summed over layers."""
        losses = [negative_log_likelihood(z, log_det) for z, log_det in self.latents(batch)]
        loss = sum(losses[1:], losses[0])
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the flows (the backbone is frozen)."""
        return torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """Minus the per-position likelihood, upsampled to the patch size and averaged over layers."""
        return self.model(self.fused_embedding(batch), batch.image.shape[-2:])
