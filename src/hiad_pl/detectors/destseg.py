"""DeSTSeg: a denoising student and a segmentation network on a frozen teacher (Zhang et al., CVPR 2023).

"DeSTSeg: Segmentation Guided Denoising Student-Teacher for Anomaly Detection".
Three networks share each patch:

* the **teacher**, a frozen ImageNet CNN (ResNet-18 layers 2 and 3 in the
  original high-resolution project; layers 1-3 in the paper), the detector's
  backbone;
* the **denoising student**, a randomly initialised encoder (ResNet-18) and
  decoder that sees the *corrupted* patch and learns to produce the teacher's
  features of the *clean* patch, layer by layer (cosine distance loss);
* the **segmentation network** (two residual blocks, ASPP, a small head,
  sigmoid) that reads the channel-wise products of the L2-normalised teacher
  and student features of the corrupted patch and predicts the synthetic
  anomaly mask (focal loss with ``gamma`` 4 + L1).

Training has two phases: for the first ``de_st_steps`` optimiser steps only
the student trains (SGD lr 0.4), then only the segmentation network (SGD, lr
0.1 on the residual blocks, 0.01 on the ASPP head), all with momentum 0.9 and
weight decay 1e-4. The anomaly map is the segmentation output; with
``map_source: student`` it is the product over layers of the student's cosine
distances (the paper's "DeST" map).

Shapes: teacher and student maps ``[B, C_l, h_l, w_l]`` per layer; the
segmentation input is their products resized to the first layer's grid
(``[B, sum C_l, h_0, w_0]``) and its output ``[B, 1, h_0, w_0]`` in ``(0, 1)``.

The detector's ``model`` (:class:`DeSTSegModel`, a plain ``nn.Module``) holds
the student and the segmentation network and scores patches without
Lightning. It is no :class:`~hiad_pl.detectors.map_model.PatchMapModel`: the
student reads the patches' pixels, not only the teacher's maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.synthesis import AnomalySynthesizer, ImageBlendingSynthesizer, build_synthesizer
from hiad_pl.detectors.base import HRDetector
from hiad_pl.detectors.features import FeatureExtractor
from hiad_pl.detectors.map_model import MoveKeysUnder
from hiad_pl.postprocess import TOPK_PIXELS, ImageScore

#: Phases of training, in order.
STUDENT_PHASE = "student"
SEGMENTATION_PHASE = "segmentation"
#: SGD settings shared by both phases (the paper's).
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 1e-4
#: Dilations of the ASPP branches.
ASPP_RATES: tuple[int, ...] = (6, 12, 18)


#: What the anomaly map is made of.
MAP_SOURCES: tuple[str, ...] = ("segmentation", "student")


def checked_map_source(map_source: str) -> str:
    """``map_source`` when it is one of :data:`MAP_SOURCES`.

    Raises:
        ValueError: otherwise.
    """
    if map_source not in MAP_SOURCES:
        raise ValueError(f"map_source must be one of {MAP_SOURCES}, got {map_source!r}")
    return map_source


def grid_of(maps: Tensor) -> tuple[int, int]:
    """``(h, w)`` of a ``[B, C, h, w]`` map."""
    return int(maps.shape[-2]), int(maps.shape[-1])


def training_phase(step: int, de_st_steps: int) -> str:
    """The phase of optimiser step ``step`` (0-based): the student before ``de_st_steps``, then segmentation."""
    return STUDENT_PHASE if step < de_st_steps else SEGMENTATION_PHASE


# ---------------------------------------------------------------- building blocks


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, ReLU, with a 1x1 conv + BN shortcut when channels change.

    ``final_relu=False`` leaves out the ReLU after the sum, so the block's
    output can take both signs.
    """

    def __init__(self, in_channels: int, out_channels: int, final_relu: bool = True) -> None:
        super().__init__()
        self.final_relu = bool(final_relu)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """``relu(body(x) + shortcut(x))`` (without the ReLU when ``final_relu`` is off), same grid."""
        out = self.body(x) + self.shortcut(x)
        return F.relu(out) if self.final_relu else out


def residual_layer(in_channels: int, out_channels: int, blocks: int = 2, final_relu: bool = True) -> nn.Sequential:
    """``blocks`` basic blocks from ``in_channels`` to ``out_channels`` (He-initialised, BN weight 1, bias 0).

    ``final_relu=False``: the last block ends without its ReLU (signed output).
    """
    layer = nn.Sequential(
        *(
            BasicBlock(in_channels if i == 0 else out_channels, out_channels, final_relu or i < blocks - 1)
            for i in range(blocks)
        )
    )
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return layer


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    """Convolution ('same' padding), batch norm, ReLU."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: image pooling and one branch per rate, fused by a 3x3 conv.

    As in the paper's code, there is no separate 1x1 branch: a rate of 1 gives
    a 1x1 convolution, any other rate a 3x3 convolution with that dilation.
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = ASPP_RATES) -> None:
        super().__init__()
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, out_channels, 1))
        self.branches = nn.ModuleList(
            conv_bn_relu(in_channels, out_channels, 1 if rate == 1 else 3, dilation=rate) for rate in rates
        )
        self.fusion = conv_bn_relu((1 + len(rates)) * out_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, out_channels, h, w]`` on the input's grid."""
        pooled = self.pooled(x).expand(-1, -1, *x.shape[-2:])
        return self.fusion(torch.cat([pooled] + [branch(x) for branch in self.branches], dim=1))


# ---------------------------------------------------------------- networks


class DenoisingStudent(nn.Module):
    """Randomly initialised encoder-decoder producing one map per teacher layer.

    The encoder is a timm CNN without pretrained weights (``resnet18`` as in the
    paper). Its deepest map passes ``decoder_blocks`` basic blocks, then, deepest
    teacher layer first, the decoder resizes the running map to each teacher
    layer's grid and turns it into that layer's channels with ``decoder_blocks``
    basic blocks. With ResNet-18 and teacher layers 2-3 this is the paper's
    decoder (512 -> 512 -> 256 -> 128 channels).

    Every stage ends with a ReLU, as in the paper, whose ResNet teacher gives
    post-ReLU (non-negative) features. A teacher whose layers end in a linear
    projection (EfficientNet blocks) has features of both signs, which a
    non-negative map cannot point along: the cosine distance then stays above
    a floor however long the student trains (for EfficientNet-Lite0's stride-8
    and stride-16 blocks on the demo texture, about 0.22 and 0.33). With
    ``final_relu=False`` each stage's map is the sum of its last block without
    the ReLU, free in sign.

    Args:
        teacher_channels: channels of each teacher layer, shallow to deep.
        encoder_name: timm model of the encoder (random init).
        decoder_blocks: basic blocks per decoder stage.
        final_relu: end each decoder stage with a ReLU (the paper's student).
    """

    # a timm features_only model: feature_info is not nn.Module's
    encoder: Any

    def __init__(
        self, teacher_channels: Sequence[int], encoder_name: str = "resnet18", decoder_blocks: int = 2, final_relu: bool = True
    ) -> None:
        super().__init__()
        if not teacher_channels:
            raise ValueError("the student needs at least one teacher layer")
        self.encoder = timm.create_model(encoder_name, pretrained=False, features_only=True)
        self.teacher_channels = [int(c) for c in teacher_channels]
        deepest = int(self.encoder.feature_info.channels()[-1])
        self.bottom = residual_layer(deepest, deepest, decoder_blocks)
        widths = [deepest] + self.teacher_channels[::-1]
        self.stages = nn.ModuleList(
            residual_layer(a, b, decoder_blocks, final_relu) for a, b in zip(widths[:-1], widths[1:])
        )

    def forward(self, images: Tensor, grids: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Student maps ``[B, C_l, h_l, w_l]`` on the teacher's ``grids`` (shallow to deep order)."""
        if len(grids) != len(self.teacher_channels):
            raise ValueError(f"the student was built for {len(self.teacher_channels)} layers, got {len(grids)} grids")
        x = self.bottom(self.encoder(images)[-1])
        outputs = []
        for stage, grid in zip(self.stages, list(grids)[::-1]):
            x = stage(F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False))
            outputs.append(x)
        return outputs[::-1]


class SegmentationNet(nn.Module):
    """Residual blocks (``res``), then ASPP and a 3x3 + 1x1 head (``head``); a sigmoid gives the mask.

    Args:
        in_channels: channels of the teacher x student products.
        width: channels inside the network (256 in the paper).
        res_blocks: basic blocks of :attr:`res`.
        atrous_rates: dilations of the ASPP branches.
    """

    def __init__(self, in_channels: int, width: int = 256, res_blocks: int = 2, atrous_rates: Sequence[int] = ASPP_RATES) -> None:
        super().__init__()
        self.res = residual_layer(in_channels, width, res_blocks)
        self.head = nn.Sequential(ASPP(width, width, atrous_rates), conv_bn_relu(width, width, 3), nn.Conv2d(width, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Anomaly probabilities ``[B, 1, h, w]``."""
        return torch.sigmoid(self.head(self.res(x)))


# ---------------------------------------------------------------- maps and losses


def cosine_distance_maps(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> list[Tensor]:
    """``1 - cos(teacher, student)`` over channels, ``[B, 1, h_l, w_l]`` per layer."""
    return [1 - F.cosine_similarity(t, s, dim=1, eps=1e-12)[:, None] for t, s in zip(teacher, student)]


def student_anomaly_map(distances: Sequence[Tensor]) -> Tensor:
    """Product over layers of the cosine distances, on the first layer's grid: ``[B, 1, h_0, w_0]``."""
    size = distances[0].shape[-2:]
    resized = [F.interpolate(d, size=size, mode="bilinear", align_corners=False) for d in distances]
    return torch.stack(resized).prod(0)


def segmentation_input(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """``-t_hat * s_hat`` per layer (L2-normalised over channels), resized to the first layer's grid and concatenated."""
    size = student[0].shape[-2:]
    products = [
        F.interpolate(-F.normalize(t, dim=1) * F.normalize(s, dim=1), size=size, mode="bilinear", align_corners=False)
        for t, s in zip(teacher, student)
    ]
    return torch.cat(products, dim=1)


def cosine_distance_loss(distances: Sequence[Tensor]) -> Tensor:
    """Sum over layers of each layer's cosine distances summed over the batch and averaged over positions.

    The batch is summed, not averaged, as in the paper's code: the student's
    learning rate (0.4) was tuned with this scale.
    """
    # sum() of tensors is a tensor; its int start value makes mypy see ``Tensor | int``
    return sum(d.sum() / (d.shape[-2] * d.shape[-1]) for d in distances)  # type: ignore[return-value]


def focal_loss(probabilities: Tensor, target: Tensor, gamma: float = 4.0) -> Tensor:
    """Mean binary focal loss ``-(1 - p_t)^gamma log p_t`` of probabilities against a 0/1 target."""
    probabilities, target = probabilities.float(), target.float()
    cross_entropy = F.binary_cross_entropy(probabilities, target, reduction="none")
    p_t = probabilities * target + (1 - probabilities) * (1 - target)
    return (cross_entropy * (1 - p_t) ** gamma).mean()


def binary_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Pixel masks ``[B, H, W]`` resized (bilinear) to ``size`` and thresholded at 0.5: ``[B, 1, h, w]``."""
    resized = F.interpolate(mask[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return (resized >= 0.5).float()


class DeSTSegModel(nn.Module):
    """DeSTSeg's scoring and trained parts: the denoising student, the segmentation network and the losses.

    The detector holds it as ``model``; the frozen teacher stays outside.
    Unlike a :class:`~hiad_pl.detectors.map_model.PatchMapModel`, which scores
    backbone maps alone, it also needs the patches' pixels: the student reads
    them. :meth:`forward` therefore takes the patches and their teacher maps;
    :meth:`score` takes teacher and student maps computed elsewhere (the
    detector fuses the student's maps with the low-resolution views).

    Args:
        teacher_channels: channels of the teacher's layers, shallow to deep.
        student_encoder: timm model of the student's encoder (random init).
        decoder_blocks: basic blocks per student decoder stage.
        segmentation_width: channels inside the segmentation network.
        gamma: focusing parameter of the focal loss.
        student_final_relu: end each student decoder stage with a ReLU (see :class:`DenoisingStudent`).
        map_source: ``segmentation`` (the paper's map) or ``student`` (product of the student's cosine distances).
    """

    def __init__(
        self,
        teacher_channels: Sequence[int],
        student_encoder: str = "resnet18",
        decoder_blocks: int = 2,
        segmentation_width: int = 256,
        gamma: float = 4.0,
        student_final_relu: bool = True,
        map_source: str = "segmentation",
    ) -> None:
        super().__init__()
        self.student = DenoisingStudent(teacher_channels, student_encoder, decoder_blocks, student_final_relu)
        self.segmentation = SegmentationNet(sum(teacher_channels), segmentation_width)
        self.gamma = float(gamma)
        #: What the anomaly map is made of (one of :data:`MAP_SOURCES`).
        self.map_source = checked_map_source(map_source)

    def set_phase(self, phase: str) -> None:
        """Train mode for the phase's network, eval mode (fixed BatchNorm statistics) for the other."""
        if phase not in (STUDENT_PHASE, SEGMENTATION_PHASE):
            raise ValueError(f"unknown phase {phase!r}: use {STUDENT_PHASE!r} or {SEGMENTATION_PHASE!r}")
        self.student.train(phase == STUDENT_PHASE)
        self.segmentation.train(phase == SEGMENTATION_PHASE)

    def forward(self, images: Tensor, teacher: Sequence[Tensor], output_size: Sequence[int]) -> Tensor:
        """Anomaly maps ``[B, H, W]`` at ``output_size`` of ``images`` (``[B, 3, h, w]``) whose teacher maps are ``teacher``."""
        return self.score(teacher, self.student(images, [grid_of(t) for t in teacher]), output_size)

    def score(self, teacher: Sequence[Tensor], student: Sequence[Tensor], output_size: Sequence[int]) -> Tensor:
        """Anomaly maps ``[B, H, W]`` at ``output_size`` from teacher and student maps (one per layer, same grids).

        The segmentation network's probabilities, or with ``map_source``
        ``student`` the product of the layers' cosine distances, upsampled
        (bilinear) from the first layer's grid.
        """
        teacher = [t.float() for t in teacher]
        if self.map_source == "student":
            maps = student_anomaly_map(cosine_distance_maps(teacher, student))
        else:
            maps = self.segmentation(segmentation_input(teacher, student))
        return F.interpolate(maps, size=tuple(output_size), mode="bilinear", align_corners=False)[:, 0]

    def losses(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], clean_teacher: Sequence[Tensor], mask: Tensor, phase: str
    ) -> dict[str, Tensor]:
        """Loss terms of one batch of corrupted patches in ``phase``; ``loss`` is the phase's objective.

        Args:
            student: student maps of the corrupted patches (with gradients in the student phase).
            teacher: teacher maps of the corrupted patches (the segmentation network's input).
            clean_teacher: teacher maps of the clean patches (the student's target).
            mask: ``[B, H, W]`` synthetic anomaly masks.
            phase: :data:`STUDENT_PHASE` or :data:`SEGMENTATION_PHASE`.
        """
        if phase == STUDENT_PHASE:
            cosine = cosine_distance_loss(cosine_distance_maps(clean_teacher, student))
            return {"loss": cosine, "cosine_loss": cosine}
        if phase != SEGMENTATION_PHASE:
            raise ValueError(f"unknown phase {phase!r}: use {STUDENT_PHASE!r} or {SEGMENTATION_PHASE!r}")
        segmentation = self.segmentation(segmentation_input(teacher, [s.detach() for s in student]))
        target = binary_mask(mask, segmentation.shape[-2:])
        focal = focal_loss(segmentation, target, self.gamma)
        l1 = F.l1_loss(segmentation, target)
        return {"loss": focal + l1, "focal_loss": focal, "l1_loss": l1}


# ---------------------------------------------------------------- the detector

def default_destseg_synthesizer() -> AnomalySynthesizer:
    """The original project's training corruption: image blending on every patch, opacity 0.5-1."""
    return ImageBlendingSynthesizer(p=1.0, blend_factor=(0.5, 1.0))


class HRDesTSeg(HRDetector):
    """DeSTSeg on high-resolution patches: frozen teacher, denoising student, segmentation network.

    Args:
        backbone_name: the frozen teacher (timm CNN or alias; ``resnet18`` in the paper).
        layers_to_extract_from: teacher layers, shallow to deep (``[layer2, layer3]`` as in the original project).
        weights: teacher weights: ``hub``, ``offline``, ``none`` or a file path.
        input_size: ``(width, height)`` or one int: patch size the detector sees.
        fusion_weights: multi-resolution fusion weights (teacher and student alike, see :class:`HRDetector`).
        feature_kind: must resolve to ``cnn``.
        backbone_kwargs: extra ``timm.create_model`` options of the teacher.
        steps: optimiser steps in all (the Trainer's default ``max_steps``).
        de_st_steps: steps of the student phase; the segmentation phase follows.
        lr_de_st: SGD learning rate of the student.
        lr_res: SGD learning rate of the segmentation network's residual blocks.
        lr_seghead: SGD learning rate of its ASPP head.
        gamma: focal-loss focusing parameter.
        student_encoder: timm model of the student's encoder (random init).
        decoder_blocks: basic blocks per student decoder stage.
        segmentation_width: channels inside the segmentation network.
        map_source: ``segmentation`` (the paper's map) or ``student`` (product of the student's cosine distances).
        student_final_relu: end each student decoder stage with a ReLU, as in the paper (whose ResNet
            teacher is post-ReLU); turn it off for a teacher with signed features (EfficientNet blocks),
            which a non-negative student map cannot match (see :class:`DenoisingStudent`).
        student_bn_recalibration: training batches whose corrupted patches recompute the student's
            BatchNorm statistics (a plain average, in train mode, without gradients) when the
            segmentation phase starts; 0 (the paper) keeps the running averages of the student
            phase. After a few dozen student steps those averages lag far behind the weights: the
            student in eval mode, as the segmentation phase and inference run it, is then much
            worse than in training.
        synthesizer: training corruption ``{class_path, init_args}`` (or ``{name, kwargs}``); default
            image blending with Perlin masks on every patch, opacity 0.5-1.
        image_score: overrides of the image-score rule (default: the mean of the 100 largest pixels, as HiAD
            scores DeSTSeg; see :class:`HRDetector`).
    """

    #: DeSTSeg's image score: the mean of the 100 largest pixels of the map (HiAD, and the paper's code).
    default_image_score: ClassVar[ImageScore] = ImageScore("topk_mean", k=TOPK_PIXELS)

    def __init__(
        self,
        backbone_name: str = "resnet18",
        layers_to_extract_from: Sequence[str] = ("layer2", "layer3"),
        weights: str = "hub",
        input_size: int | tuple[int, int] = 512,
        fusion_weights: Sequence[float] | None = None,
        feature_kind: str = "cnn",
        backbone_kwargs: dict[str, Any] | None = None,
        steps: int = 3000,
        de_st_steps: int = 1000,
        lr_de_st: float = 0.4,
        lr_res: float = 0.1,
        lr_seghead: float = 0.01,
        gamma: float = 4.0,
        student_encoder: str = "resnet18",
        decoder_blocks: int = 2,
        segmentation_width: int = 256,
        map_source: str = "segmentation",
        student_final_relu: bool = True,
        student_bn_recalibration: int = 0,
        synthesizer: dict[str, Any] | None = None,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__(
            backbone_name, layers_to_extract_from, weights, input_size, fusion_weights, feature_kind, backbone_kwargs,
            image_score=image_score,
        )
        for name, value in (("steps", steps), ("decoder_blocks", decoder_blocks), ("segmentation_width", segmentation_width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(de_st_steps, int) or not 0 <= de_st_steps <= steps:
            raise ValueError(f"de_st_steps must be an integer in [0, steps={steps}], got {de_st_steps!r}")
        for name, rate in (("lr_de_st", lr_de_st), ("lr_res", lr_res), ("lr_seghead", lr_seghead)):
            if not rate > 0:
                raise ValueError(f"{name} must be positive, got {rate!r}")
        if not isinstance(student_bn_recalibration, int) or student_bn_recalibration < 0:
            raise ValueError(f"student_bn_recalibration must be a non-negative integer, got {student_bn_recalibration!r}")
        self.steps, self.de_st_steps = steps, de_st_steps
        self.lr_de_st, self.lr_res, self.lr_seghead = float(lr_de_st), float(lr_res), float(lr_seghead)
        self.student_bn_recalibration = student_bn_recalibration
        self.synthesizer_spec = synthesizer
        build_synthesizer(synthesizer)  # a bad spec fails here, before any training
        # each step updates only the current phase's optimiser (step_optimizers)
        self.automatic_optimization = False
        #: The method: denoising student and segmentation network (with the teacher's maps, what scores a patch).
        self.model = DeSTSegModel(
            cast(FeatureExtractor, self.backbone).channels, student_encoder, decoder_blocks, segmentation_width, gamma,
            student_final_relu, map_source,
        )
        # checkpoints written before the method was the detector's ``model`` held it as ``destseg``
        self.register_load_state_dict_pre_hook(MoveKeysUnder(("student", "segmentation"), old_owner="destseg"))

    @property
    def map_source(self) -> str:
        """What the anomaly map is made of: the plain model's ``map_source`` (one of :data:`MAP_SOURCES`)."""
        return self.model.map_source

    @map_source.setter
    def map_source(self, value: str) -> None:
        self.model.map_source = checked_map_source(value)

    def trainer_defaults(self) -> dict[str, Any]:
        """``max_steps`` from ``steps`` (epochs unbounded); a user's trainer options override it."""
        return {"max_steps": self.steps, "max_epochs": -1}

    def training_synthesizer(self) -> AnomalySynthesizer:
        """The configured corruption of training patches, or image blending on every patch."""
        return build_synthesizer(self.synthesizer_spec) or default_destseg_synthesizer()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """SGD on the student; SGD on the segmentation network (residual blocks and head at their own rates)."""
        student = torch.optim.SGD(
            self.model.student.parameters(), lr=self.lr_de_st, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY
        )
        segmentation = torch.optim.SGD(
            [
                {"params": self.model.segmentation.res.parameters(), "lr": self.lr_res},
                {"params": self.model.segmentation.head.parameters(), "lr": self.lr_seghead},
            ],
            lr=self.lr_res,
            momentum=SGD_MOMENTUM,
            weight_decay=SGD_WEIGHT_DECAY,
        )
        return [student, segmentation]

    def ready_for_selection(self) -> bool:
        """Validation may select these weights once the segmentation network has trained (or with the student's map).

        In the student phase the segmentation network is still at its random
        initialisation, so its map says nothing about the weights' quality; as
        in HiAD, those validations select nothing.
        """
        return self.map_source == "student" or self.global_step > self.de_st_steps

    @property
    def phase(self) -> str:
        """The phase of the next optimiser step."""
        return training_phase(self.global_step, self.de_st_steps)

    def student_embedding(self, batch: PatchBatch, grids: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Student maps of the batch's patches on the teacher's ``grids``, fused with the low-resolution views like the teacher's."""
        maps = self.model.student(batch.image, grids)
        low = batch.low_resolution_images
        if low is None or self.fusion_weights is None or batch.low_resolution_windows is None:
            return maps
        crop_size = (int(low.shape[-2]), int(low.shape[-1]))
        crop_grids = [(math.ceil(crop_size[0] / r), math.ceil(crop_size[1] / r)) for r in cast(FeatureExtractor, self.backbone).reductions]
        crop_maps = self.model.student(low.flatten(0, 1), crop_grids)
        return [self._fuse_layer(m, c, batch.low_resolution_windows, crop_size) for m, c in zip(maps, crop_maps)]

    @torch.no_grad()
    def recalibrate_student(self, grids: Sequence[tuple[int, int]]) -> int:
        """Recompute the student's BatchNorm statistics on up to ``student_bn_recalibration`` training batches.

        The statistics become the plain average over those batches of their
        corrupted patches (the student's training input), computed in train
        mode without gradients; the layers' momenta are restored afterwards.
        Returns the number of batches used.
        """
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if not self.student_bn_recalibration or loader is None:
            return 0
        norms = [m for m in self.model.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
        self.model.student.train()
        used = 0
        for batch in loader:
            self.student_embedding(self.transfer_batch_to_device(batch, self.device, 0), grids)
            used += 1
            if used >= self.student_bn_recalibration:
                break
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        return used

    def training_step(self, batch: PatchBatch, batch_idx: int) -> Tensor:
        """One step of the current phase: the student's cosine loss, or the segmentation's focal + L1 loss."""
        phase = self.phase
        teacher = [t.float() for t in self.fused_embedding(batch)]
        grids = [grid_of(t) for t in teacher]
        if self.global_step == self.de_st_steps > 0:  # the first segmentation step, met once even when resumed
            self.recalibrate_student(grids)
        self.model.set_phase(phase)
        if phase == STUDENT_PHASE:
            clean_teacher = [t.float() for t in self.fused_embedding(batch.clean())]
            student = self.student_embedding(batch, grids)
        else:
            clean_teacher = teacher  # unused by the segmentation loss
            with torch.no_grad():
                student = self.student_embedding(batch, grids)
        losses = self.model.losses(student, teacher, clean_teacher, batch.mask, phase)
        self.step_optimizers(losses["loss"], batch_idx, optimizers=[0 if phase == STUDENT_PHASE else 1])
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, prog_bar=name == "loss", batch_size=len(batch))
        return losses["loss"].detach()

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """The segmentation output (or the student's cosine-distance product), upsampled to the patch size."""
        teacher = self.fused_embedding(batch)
        student = self.student_embedding(batch, [grid_of(t) for t in teacher])
        return self.model.score(teacher, student, batch.image.shape[-2:])
