"""RD++: reverse distillation with multi-task projection (Tien et al., CVPR 2023).

"Revisiting Reverse Distillation for Anomaly Detection". A frozen encoder
(the teacher: WideResNet-50 layers 1-3 in the paper) gives per-layer features.
Trainable **multi-projection layers** map them to a compact "normal" feature
space; the **one-class bottleneck embedding** (OCBE) fuses all layers into one
low-resolution embedding; a **reverse decoder** (the student) rebuilds every
encoder layer from it, deepest first. Training patches come in pairs (clean,
corrupted by synthetic anomalies) and the loss is

    L = L_distill + weight_proj * (L_ot + 0.01 L_recon + 0.1 L_contrast) / 1.11

* ``L_distill``: sum over layers of ``1 - cos`` between the flattened encoder
  map and the decoder's rebuild of it (clean patches);
* ``L_ot``: Sinkhorn optimal-transport divergence (geomloss) between the
  softmax-normalised projected features of the clean batch and of the same
  batch shuffled, summed over layers, as in the authors' code (the shuffled
  batch is the same set of points, so this debiased divergence stays near
  zero: it is kept for fidelity and logged as ``train/ot_loss``);
* ``L_recon``: ``1 - cos`` (channel-wise) between the projections of the
  corrupted and the clean patches: the projection removes anomalies;
* ``L_contrast``: cosine-embedding loss (margin 0.5) pushing the corrupted
  encoder features away from the clean projections.

Two Adam optimisers with betas (0.5, 0.999): the projection layers (lr
``proj_lr``) and the OCBE + decoder (lr ``distill_lr``); gradients are
accumulated over ``accumulate_batches`` batches before each step, as in the
paper's code. The anomaly map is the sum over layers of ``1 - cos`` between
encoder features and their rebuild, upsampled to the patch.

The OCBE and the decoder are built from the encoder's ``channels`` and
``reductions`` (its timm ``feature_info``), so any CNN backbone with
power-of-two strides works: WideResNet-50 (the paper) and the offline
EfficientNet-Lite0 alike. Each layer is brought to the deepest layer's stride
by stride-2 convolutions doubling the channels; the concatenation passes
``ocbe_blocks`` residual bottleneck blocks (the first with stride 2) to
``2 x C_deepest`` channels. Each decoder stage is ``decoder_blocks`` residual
bottleneck blocks (deepest stage first) whose first block upsamples by 2 with
2x2 transposed convolutions in its body and its shortcut, as in the official
de-ResNet (WideResNet-50's stages: 3, 4 and 6 blocks, 17.84 M, 5.32 M and 1.76 M
parameters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.synthesis import AnomalySynthesizer, SimplexNoiseSynthesizer, build_synthesizer
from hiad_pl.detectors.base import HRDetector
from hiad_pl.detectors.features import FeatureExtractor
from hiad_pl.detectors.map_model import MoveKeysUnder, PatchMapModel
from hiad_pl.postprocess import ImageScore

#: Weights of the three self-supervised terms inside the projection loss (the paper's code).
RECONSTRUCTION_WEIGHT = 0.01
CONTRAST_WEIGHT = 0.1
CONTRAST_MARGIN = 0.5
#: Sinkhorn settings of the paper's code (geomloss.SamplesLoss).
SINKHORN_OPTIONS: dict[str, Any] = {"loss": "sinkhorn", "p": 2, "blur": 0.05, "scaling": 0.95, "diameter": 1e7, "truncate": 10}
#: Adam betas of both optimisers.
ADAM_BETAS = (0.5, 0.999)
#: Residual blocks per decoder stage, deepest first, of the official WideResNet-50 decoder (de_wide_resnet50_2).
OFFICIAL_DECODER_BLOCKS = (3, 4, 6)


class ProjectionLayer(nn.Module):
    """Four 3x3 convolutions ``C -> C/2 -> C/4 -> C/2 -> C``, each with instance norm and leaky ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        widths = [channels, max(1, channels // 2), max(1, channels // 4), max(1, channels // 2), channels]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.InstanceNorm2d(c_out), nn.LeakyReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        """Projected ``[B, C, h, w]`` features of the same shape."""
        return self.layers(features)


class ResidualBottleneck(nn.Module):
    """ResNet bottleneck ``1x1 -> 3x3 (stride) -> 1x1`` with batch norm and a projected shortcut when shapes change.

    With ``upsample`` it is the reverse decoder's first block of a stage (RD4AD / RD++'s
    de-ResNet): the middle convolution is a 2x2 transposed convolution of stride 2 and the
    shortcut a 2x2 transposed convolution with batch norm, so the block doubles the map's sides.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        if upsample and stride != 1:
            raise ValueError("an upsampling block has stride 1 (it doubles the sides by its transposed convolution)")
        width = max(1, out_channels // 2)  # wide bottlenecks, as in WideResNet-50's
        middle: nn.Module = (
            nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
            if upsample
            else nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        )
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            middle,
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if upsample:
            self.shortcut = nn.Sequential(
                nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False), nn.BatchNorm2d(out_channels)
            )
        elif stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        """``relu(body(x) + shortcut(x))``."""
        return F.relu(self.body(x) + self.shortcut(x))


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def stride_steps(reductions: Sequence[int]) -> list[int]:
    """Factor-2 steps from each layer's stride to the deepest one's.

    Raises:
        ValueError: strides that do not grow from layer to layer by powers of two.
    """
    steps = []
    for reduction in reductions:
        ratio = reductions[-1] / reduction
        if ratio < 1 or not float(math.log2(ratio)).is_integer():
            raise ValueError(
                f"RD++ needs layers ordered from shallow to deep with power-of-two strides, got strides {list(reductions)}"
            )
        steps.append(int(math.log2(ratio)))
    return steps


class OneClassBottleneck(nn.Module):
    """OCBE: every layer downsampled to the deepest stride, concatenated, and squeezed by residual blocks.

    Args:
        channels: channels of each encoder layer (shallow to deep).
        reductions: stride of each encoder layer.
        blocks: residual bottleneck blocks after the concatenation (the first has stride 2).
    """

    def __init__(self, channels: Sequence[int], reductions: Sequence[int], blocks: int = 3) -> None:
        super().__init__()
        self.downsamplers = nn.ModuleList()
        fused = 0
        for c, steps in zip(channels, stride_steps(reductions)):
            stages = [conv_bn_relu(c * 2**k, c * 2 ** (k + 1), stride=2) for k in range(steps)]
            self.downsamplers.append(nn.Sequential(*stages))
            fused += c * 2**steps
        #: Channels of the embedding: twice the deepest layer's.
        self.out_channels = 2 * channels[-1]
        layers = [ResidualBottleneck(fused, self.out_channels, stride=2)]
        layers += [ResidualBottleneck(self.out_channels, self.out_channels) for _ in range(blocks - 1)]
        self.fuse = nn.Sequential(*layers)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``[B, 2 C_deep, h_deep / 2, w_deep / 2]`` embedding of the per-layer features."""
        height, width = features[-1].shape[-2:]
        size = (height, width)
        parts = []
        for down, f in zip(self.downsamplers, features):
            part = down(f)
            parts.append(part if part.shape[-2:] == size else F.adaptive_avg_pool2d(part, size))
        return self.fuse(torch.cat(parts, dim=1))


class ReverseDecoder(nn.Module):
    """The student: rebuilds each encoder layer from the OCBE embedding, deepest layer first.

    Args:
        channels: channels of each encoder layer (shallow to deep).
        reductions: stride of each encoder layer.
        in_channels: channels of the embedding (at twice the deepest stride).
        blocks: residual blocks per stage, deepest stage first (one int for all); ``None``:
            the official WideResNet-50 decoder's 3, 4, 6 (6 for any further stage).
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        in_channels: int,
        blocks: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if blocks is None:
            per_stage = [OFFICIAL_DECODER_BLOCKS[min(i, len(OFFICIAL_DECODER_BLOCKS) - 1)] for i in range(len(channels))]
        elif isinstance(blocks, int):
            per_stage = [int(blocks)] * len(channels)
        else:
            per_stage = [int(b) for b in blocks]
        if len(per_stage) != len(channels) or min(per_stage) < 1:
            raise ValueError(f"decoder_blocks needs one positive count per layer ({len(channels)}), got {blocks!r}")
        # strides walked backwards: the embedding sits one factor 2 below the deepest layer.
        steps = [1] + [int(math.log2(reductions[i + 1] / reductions[i])) for i in reversed(range(len(channels) - 1))]
        stride_steps(reductions)  # same checks as the bottleneck
        self.stages = nn.ModuleList()
        previous = in_channels
        for step, c, count in zip(steps, reversed(list(channels)), per_stage):
            # As the official de-ResNet: the stage's first block(s) upsample inside the residual
            # block (one per factor 2), the rest keep the size; a stage at an unchanged stride
            # starts with a plain block whose shortcut projects the channels.
            layers: list[nn.Module] = [ResidualBottleneck(previous if k == 0 else c, c, upsample=True) for k in range(step)]
            if step == 0:
                layers.append(ResidualBottleneck(previous, c))
            layers += [ResidualBottleneck(c, c) for _ in range(count - len(layers))]
            self.stages.append(nn.Sequential(*layers))
            previous = c

    def forward(self, embedding: Tensor, sizes: Sequence[torch.Size]) -> list[Tensor]:
        """Rebuilt maps, shallow to deep, each at the matching encoder map's ``(h, w)`` in ``sizes``."""
        rebuilt = []
        x = embedding
        for stage, size in zip(self.stages, reversed(list(sizes))):
            x = stage(x)
            if x.shape[-2:] != size:  # odd sides: strided convolutions round up
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            rebuilt.append(x)
        return rebuilt[::-1]


def distillation_loss(encoder: Sequence[Tensor], decoder: Sequence[Tensor]) -> Tensor:
    """Sum over layers of the batch mean of ``1 - cos`` between flattened encoder and decoder maps."""
    return sum(
        (1 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean() for e, d in zip(encoder, decoder)
    )  # type: ignore[return-value]


def sinkhorn_loss() -> Any:
    """The paper's Sinkhorn divergence (geomloss), with its settings."""
    try:
        import geomloss
    except ImportError as err:  # a dependency, but say what to install when it is missing
        raise RuntimeError("HRRDPP needs the 'geomloss' package (pip install geomloss)") from err
    return geomloss.SamplesLoss(**SINKHORN_OPTIONS)


def optimal_transport_loss(projected: Sequence[Tensor], permutation: Tensor, sinkhorn: Any) -> Tensor:
    """Sum over layers of the Sinkhorn divergence between the batch and the batch permuted.

    Each sample's projected map is flattened and softmax-normalised; the ``B``
    samples are the points of one cloud, ``permutation`` reorders them for the
    other (the authors' batched formulation).
    """
    total = projected[0].new_zeros(())
    for features in projected:
        points = torch.softmax(features.flatten(1), dim=-1)
        total = total + sinkhorn(points, points[permutation])
    return total


def reconstruction_loss(projected_corrupted: Sequence[Tensor], projected_clean: Sequence[Tensor]) -> Tensor:
    """Sum over layers of the mean channel-wise ``1 - cos`` between projections of corrupted and clean patches."""
    return sum(
        (1 - F.cosine_similarity(a, b, dim=1)).mean() for a, b in zip(projected_corrupted, projected_clean)
    )  # type: ignore[return-value]


def contrast_loss(corrupted: Sequence[Tensor], projected_clean: Sequence[Tensor]) -> Tensor:
    """Sum over layers of ``mean(max(0, cos - margin))`` between corrupted encoder maps and clean projections."""
    return sum(
        F.cosine_embedding_loss(
            a.flatten(1), b.flatten(1), -torch.ones(a.shape[0], device=a.device), margin=CONTRAST_MARGIN
        )
        for a, b in zip(corrupted, projected_clean)
    )  # type: ignore[return-value]


class RDPPModel(PatchMapModel):
    """RD++'s trained parts (projection layers, OCBE, reverse decoder) and the anomaly map they give.

    Args:
        channels: channels of each encoder layer (shallow to deep).
        reductions: stride of each encoder layer.
        ocbe_blocks: residual blocks of the bottleneck.
        decoder_blocks: residual blocks per decoder stage (see :class:`ReverseDecoder`).
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        ocbe_blocks: int = 3,
        decoder_blocks: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.projection = nn.ModuleList(ProjectionLayer(c) for c in channels)
        self.bottleneck = OneClassBottleneck(channels, reductions, ocbe_blocks)
        self.decoder = ReverseDecoder(channels, reductions, self.bottleneck.out_channels, decoder_blocks)

    def project(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The projection layers applied to each layer's features."""
        return [layer(f.float()) for layer, f in zip(self.projection, features)]

    def rebuild(self, projected: Sequence[Tensor]) -> list[Tensor]:
        """The decoder's rebuild of every encoder layer from projected features."""
        return self.decoder(self.bottleneck(projected), [f.shape[-2:] for f in projected])

    def forward(self, features: Sequence[Tensor], output_size: Sequence[int]) -> Tensor:
        """Sum over layers of ``1 - cos`` between encoder features and their rebuild, at ``output_size``."""
        features = [f.float() for f in features]
        rebuilt = self.rebuild(self.project(features))
        maps = [
            F.interpolate(
                (1 - F.cosine_similarity(f, r, dim=1))[:, None], size=output_size, mode="bilinear", align_corners=True
            )
            for f, r in zip(features, rebuilt)
        ]
        return torch.stack(maps).sum(0)[:, 0]


class HRRDPP(HRDetector):
    """RD++ (reverse distillation with multi-task projection) on high-resolution patches.

    Args:
        backbone_name: the frozen encoder (timm CNN or alias, e.g. ``wideresnet50``).
        layers_to_extract_from: encoder layers, shallow to deep (``[layer1, layer2, layer3]`` in the paper).
        weights: encoder weights: ``hub``, ``offline``, ``none`` or a file path.
        input_size: ``(width, height)`` or one int: patch size the detector sees.
        fusion_weights: multi-resolution fusion weights (see :class:`HRDetector`).
        feature_kind: must resolve to ``cnn`` (the decoder mirrors a CNN's strides).
        backbone_kwargs: extra ``timm.create_model`` options.
        epochs: training epochs (the Trainer's default ``max_epochs``).
        proj_lr: learning rate of the projection layers' Adam.
        distill_lr: learning rate of the OCBE + decoder Adam.
        weight_proj: weight of the projection loss.
        accumulate_batches: batches whose gradients are summed per optimiser step.
        ocbe_blocks: residual blocks of the bottleneck.
        decoder_blocks: residual blocks per decoder stage (one int, or one per layer, deepest first);
            ``None``: the official decoder's 3, 4, 6 (WideResNet-50's layer3, layer2, layer1 stages).
        synthesizer: training corruption ``{class_path, init_args}`` (or ``{name, kwargs}``);
            default: the paper's simplex noise (:class:`SimplexNoiseSynthesizer`, p 1).
        image_score: overrides of the image-score rule (default: the largest 16 x 16 window mean, as HiAD
            scores this method; see :class:`HRDetector`).
    """

    def __init__(
        self,
        backbone_name: str = "wideresnet50",
        layers_to_extract_from: Sequence[str] = ("layer1", "layer2", "layer3"),
        weights: str = "hub",
        input_size: int | tuple[int, int] = 256,
        fusion_weights: Sequence[float] | None = None,
        feature_kind: str = "cnn",
        backbone_kwargs: dict[str, Any] | None = None,
        epochs: int = 50,
        proj_lr: float = 1e-3,
        distill_lr: float = 5e-3,
        weight_proj: float = 0.2,
        accumulate_batches: int = 2,
        ocbe_blocks: int = 3,
        decoder_blocks: int | list[int] | None = None,
        synthesizer: dict[str, Any] | None = None,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__(
            backbone_name, layers_to_extract_from, weights, input_size, fusion_weights, feature_kind, backbone_kwargs,
            image_score=image_score,
        )
        for name, value in (("epochs", epochs), ("accumulate_batches", accumulate_batches), ("ocbe_blocks", ocbe_blocks)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, rate in (("proj_lr", proj_lr), ("distill_lr", distill_lr)):
            if not rate > 0:
                raise ValueError(f"{name} must be positive, got {rate!r}")
        if not weight_proj >= 0:
            raise ValueError(f"weight_proj must be non-negative, got {weight_proj!r}")
        self.epochs = epochs
        self.proj_lr = float(proj_lr)
        self.distill_lr = float(distill_lr)
        self.weight_proj = float(weight_proj)
        self.accumulate_batches = accumulate_batches
        self.synthesizer_spec = synthesizer
        build_synthesizer(synthesizer)  # a bad spec fails here, before any training
        encoder = cast(FeatureExtractor, self.backbone)
        channels, reductions = encoder.channels, encoder.reductions
        #: The method: projection layers, bottleneck and decoder (what export traces).
        self.model = RDPPModel(channels, reductions, ocbe_blocks, decoder_blocks)
        # two optimisers stepped together after gradient accumulation (step_optimizers)
        self.automatic_optimization = False
        self._sinkhorn = sinkhorn_loss()
        # checkpoints written before the trained parts moved into the model kept them at the top level
        self.register_load_state_dict_pre_hook(MoveKeysUnder(("projection", "bottleneck", "decoder")))

    def trainer_defaults(self) -> dict[str, Any]:
        """``max_epochs`` from ``epochs``; a user's trainer options override it."""
        return {"max_epochs": self.epochs}

    def training_synthesizer(self) -> AnomalySynthesizer:
        """The configured corruption of training patches, or the paper's simplex noise."""
        return build_synthesizer(self.synthesizer_spec) or SimplexNoiseSynthesizer(p=1.0)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam on the projection layers (``proj_lr``) and Adam on the OCBE + decoder (``distill_lr``)."""
        model = self.model
        projection = torch.optim.Adam(model.projection.parameters(), lr=self.proj_lr, betas=ADAM_BETAS)
        distill = [*model.bottleneck.parameters(), *model.decoder.parameters()]
        distillation = torch.optim.Adam(distill, lr=self.distill_lr, betas=ADAM_BETAS)
        return [projection, distillation]

    def losses(self, batch: PatchBatch) -> dict[str, Tensor]:
        """Every term of the RD++ loss for a synthetic batch (``clean_image`` + corrupted ``image``)."""
        clean = [f.float() for f in self.fused_embedding(batch.clean())]
        corrupted = [f.float() for f in self.fused_embedding(batch)]
        projected_clean, projected_corrupted = self.model.project(clean), self.model.project(corrupted)
        permutation = torch.randperm(len(batch), device=batch.image.device)
        ot = optimal_transport_loss(projected_clean, permutation, self._sinkhorn)
        reconstruction = reconstruction_loss(projected_corrupted, projected_clean)
        contrast = contrast_loss(corrupted, projected_clean)
        total_weight = 1 + RECONSTRUCTION_WEIGHT + CONTRAST_WEIGHT
        projection = (ot + RECONSTRUCTION_WEIGHT * reconstruction + CONTRAST_WEIGHT * contrast) / total_weight
        distill = distillation_loss(clean, self.model.rebuild(projected_clean))
        return {
            "loss": distill + self.weight_proj * projection,
            "distillation_loss": distill,
            "projection_loss": projection,
            "ot_loss": ot,
            "reconstruction_loss": reconstruction,
            "contrast_loss": contrast,
        }

    def training_step(self, batch: PatchBatch, batch_idx: int) -> Tensor:
        """All loss terms; both optimisers step every ``accumulate_batches`` batches."""
        losses = self.losses(batch)
        self.step_optimizers(losses["loss"], batch_idx, accumulate=self.accumulate_batches)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=False, on_epoch=True, prog_bar=name == "loss", batch_size=len(batch))
        return losses["loss"].detach()

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """Sum over layers of ``1 - cos`` between encoder features and their rebuild, at the patch size."""
        return self.model(self.fused_embedding(batch), batch.image.shape[-2:])
