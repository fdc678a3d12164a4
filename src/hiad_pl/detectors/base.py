"""The shared interface of every detector, and multi-resolution feature fusion.

A detector is a :class:`lightning.LightningModule` that sees batches of patches
(:class:`~hiad_pl.data.batch.PatchBatch`) and returns one anomaly map per patch.
:class:`HRDetector` owns what all detectors share: the frozen timm backbone
(:meth:`HRDetector.embedding`), feature fusion with the low-resolution views of
each patch (:meth:`HRDetector.fused_embedding`), the anomaly-map contract of
:meth:`HRDetector.predict_step`, and the Trainer defaults of the method.

Gradient-trained detectors subclass :class:`HRDetector` and write ordinary
``training_step`` / ``configure_optimizers``. They name their frozen parts in
:attr:`HRDetector.frozen_modules` (kept in eval mode, left out of checkpoints,
rebuilt from hyperparameters) and may train with several optimisers, parameter
groups, phases and schedulers; :meth:`HRDetector.step_optimizers` is the manual
optimisation step (accumulation, clipping, schedulers) for detectors that need
it. Detectors fitted from one pass over the training patches (PatchCore, PaDiM)
subclass :class:`OnePassDetector`, which runs without optimiser and calls
:meth:`OnePassDetector.accumulate` per batch and :meth:`OnePassDetector.finalize`
once the pass is over.

Every concrete subclass registers itself under :attr:`HRDetector.detector_name`
(default: the class name without a leading ``HR``, lower case) in
:data:`~hiad_pl.registry.DETECTOR_REGISTRY`; nothing keeps a hand-written list.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import lightning
import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.datamodule import Synthesizer
from hiad_pl.data.tiling import as_pair
from hiad_pl.detectors.features import FeatureSettings, create_extractor, shared_feature_extractor
from hiad_pl.postprocess import ImageScore
from hiad_pl.registry import DETECTOR_REGISTRY, declare_detector_base

#: Layers of the default backbone (EfficientNet-Lite0): strides 8 and 16.
DEFAULT_LAYERS: tuple[str, ...] = ("blocks.2", "blocks.4")
#: State-dict prefix of the backbone inside a detector.
BACKBONE_PREFIX = "backbone."


def register_detector(cls: type[HRDetector], name: str | None = None) -> type[HRDetector]:
    """Add ``cls`` to :data:`DETECTOR_REGISTRY` under ``name`` (default :attr:`HRDetector.detector_name`).

    Re-defining a class of the same module and name (a reloaded module, a
    re-run notebook cell) replaces it.

    Raises:
        ValueError: when another detector already holds the name.
    """
    key = (name or cls.detector_name or default_detector_name(cls)).lower()
    held = DETECTOR_REGISTRY.get(key)
    if held is not None and held is not cls and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"detector name {key!r} of {cls.__module__}.{cls.__qualname__} is taken by "
            f"{held.__module__}.{held.__qualname__}; set detector_name = '...' on the class"
        )
    DETECTOR_REGISTRY[key] = cls
    return cls


def default_detector_name(cls: type) -> str:
    """``HRPatchCore`` -> ``patchcore``; ``MeanFeatureDistance`` -> ``meanfeaturedistance``."""
    name = cls.__name__
    return (name[2:] if name.startswith("HR") and len(name) > 2 else name).lower()


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, final_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``final_factor`` x lr at ``total_steps``."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got {warmup_steps}, {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def normalise_fusion_weights(fusion_weights: Sequence[float] | None) -> tuple[float, ...] | None:
    """``fusion_weights`` scaled to sum to 1 (``None`` stays ``None``).

    Raises:
        ValueError: for negative weights or weights that sum to zero.
    """
    if fusion_weights is None:
        return None
    weights = [float(w) for w in fusion_weights]
    if not weights or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"fusion_weights must be non-negative with a positive sum, got {list(fusion_weights)}")
    total = sum(weights)
    return tuple(w / total for w in weights)


def window_boxes(windows: Tensor, crop_size: tuple[int, int], feature_size: tuple[int, int]) -> Tensor:
    """``roi_align`` boxes ``[K, 5]`` of patch windows, in feature-map coordinates.

    Args:
        windows: ``[K, 4]`` ``(x, y, width, height)`` of each patch inside its
            resized low-resolution crop, in crop pixels.
        crop_size: ``(height, width)`` of the crops in pixels.
        feature_size: ``(height, width)`` of the crops' feature maps.

    Returns:
        Rows ``(k, x0, y0, x1, y1)``: crop ``k``'s window scaled to its feature map,
        in the continuous coordinates of ``roi_align(..., aligned=True)`` where
        feature cell ``j`` spans ``[j, j + 1)``.
    """
    scale_y = feature_size[0] / crop_size[0]
    scale_x = feature_size[1] / crop_size[1]
    win = windows.reshape(-1, 4).to(torch.float32)
    x0, y0 = win[:, 0] * scale_x, win[:, 1] * scale_y
    x1, y1 = (win[:, 0] + win[:, 2]) * scale_x, (win[:, 1] + win[:, 3]) * scale_y
    crop_ids = torch.arange(win.shape[0], device=win.device, dtype=torch.float32)
    return torch.stack([crop_ids, x0, y0, x1, y1], dim=1)


class HRDetector(lightning.LightningModule, ABC):
    """Shared interface of all detectors: features, fusion, anomaly maps, Trainer defaults.

    Args:
        backbone_name: timm model (or tutorial alias such as ``wideresnet50``) whose
            features the detector uses.
        layers_to_extract_from: module names of the backbone layers to return
            (``layer2``, ``layer3`` for ResNets; ``blocks.2``, ``blocks.4`` for EfficientNets).
        weights: ``hub`` (timm pretrained), ``offline`` (EfficientNet-Lite0 weights
            shipped with a package), ``none`` (random init) or a state-dict file path.
        input_size: ``(width, height)`` (or one int) of the patches the detector sees.
        fusion_weights: weights of the patch and each low-resolution view in
            feature fusion (length ``1 + len(low-resolution views)``, i.e. the length
            of the spliter's ``ds_factors``); ``None`` disables fusion.

    Subclasses add their own typed keyword arguments and call ``super().__init__``;
    every argument is saved by ``save_hyperparameters`` and must be a plain type so
    that checkpoints load with ``torch.load(weights_only=True)`` and
    ``type(det).load_from_checkpoint(path)`` rebuilds the detector.

        feature_kind: ``auto`` (``vit`` for vision transformers, else ``cnn``),
            ``cnn`` (timm ``features_only`` maps) or ``vit`` (block token grids).
        backbone_kwargs: extra ``timm.create_model`` options (``img_size``,
            ``dynamic_img_size`` for ViTs).
        image_score: how an anomaly map becomes an image score, in validation
            (checkpoint selection) and at inference: the fields given (``rule``,
            ``window``, ``k``; e.g. ``{rule: topk_mean, k: 100}``) override the
            method's own rule, :attr:`default_image_score`.

    A frozen backbone (the default, :attr:`freeze_backbone`) stays in eval mode
    and is left out of checkpoints: it is rebuilt from the hyperparameters when
    a checkpoint is loaded, and detectors with the same backbone settings share
    one instance (:func:`~hiad_pl.detectors.features.shared_feature_extractor`).
    Other frozen parts (a teacher network) are named in :attr:`frozen_modules`
    and handled the same way.
    """

    #: Short name in :data:`DETECTOR_REGISTRY` (default: class name without ``HR``, lower case).
    detector_name: ClassVar[str | None] = None
    #: True for detectors fitted from one pass with no optimiser (PatchCore, PaDiM).
    fits_in_one_pass: ClassVar[bool] = False
    #: Keep the backbone frozen, in eval mode and out of checkpoints.
    freeze_backbone: ClassVar[bool] = True
    #: Further frozen submodules (attribute names): eval mode, no gradients, out of checkpoints.
    frozen_submodules: ClassVar[tuple[str, ...]] = ()
    #: Buffers whose size is only known after fitting; loading a checkpoint resizes them.
    resizable_buffers: ClassVar[tuple[str, ...]] = ()
    #: The method's image-score rule (HiAD's: the largest 16 x 16 window mean unless the method has its own).
    default_image_score: ClassVar[ImageScore] = ImageScore()
    #: Validation statistics ``{low, high, ...}`` of the selected weights, set by validation; saved with checkpoints.
    hiad_normalization: dict[str, Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register every concrete subclass under its :attr:`detector_name`."""
        super().__init_subclass__(**kwargs)
        if not inspect.isabstract(cls):
            register_detector(cls)

    def __init__(
        self,
        backbone_name: str = "efficientnet_lite0",
        layers_to_extract_from: Sequence[str] = DEFAULT_LAYERS,
        weights: str = "hub",
        input_size: int | tuple[int, int] = 512,
        fusion_weights: Sequence[float] | None = None,
        feature_kind: str = "auto",
        backbone_kwargs: dict[str, Any] | None = None,
        image_score: ImageScore | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        #: The image-score rule of this detector: :attr:`default_image_score` with the fields ``image_score`` gives.
        self.image_score: ImageScore = ImageScore.of(image_score, self.default_image_score)
        # the checkpoint keeps the rule in full and as plain values (weights_only loading)
        self.hparams["image_score"] = self.image_score.todict()
        #: ``(width, height)`` of the patches this detector is built for.
        self.input_size: tuple[int, int] = as_pair(input_size, "input_size")
        #: Fusion weights normalised to sum 1, or ``None`` (no fusion).
        self.fusion_weights = normalise_fusion_weights(fusion_weights)
        #: What defines the backbone; equal settings share one frozen instance.
        self.feature_settings = FeatureSettings.of(
            backbone_name, list(layers_to_extract_from), weights, feature_kind, backbone_kwargs
        )
        if self.freeze_backbone:
            self.backbone = shared_feature_extractor(self.feature_settings)
        else:  # a trained backbone is this detector's own
            self.backbone = create_extractor(self.feature_settings).requires_grad_(True)

    # ---------------------------------------------------------------- contract

    def trainer_defaults(self) -> dict[str, Any]:
        """Defaults for ``lightning.Trainer`` that a user's config always overrides."""
        if self.fits_in_one_pass:
            return {"max_epochs": 1, "num_sanity_val_steps": 0}
        return {}

    @property
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Frozen parts by attribute name: the backbone (when frozen) and :attr:`frozen_submodules`."""
        # parts built after super().__init__ are absent until then (setup checks they exist)
        return {name: module for name in self._frozen_names() if (module := getattr(self, name, None)) is not None}

    def _frozen_names(self) -> tuple[str, ...]:
        return (("backbone",) if self.freeze_backbone else ()) + tuple(self.frozen_submodules)

    @property
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Trained parts by attribute name: every direct submodule that is not frozen."""
        frozen = self.frozen_modules
        return {name: module for name, module in self.named_children() if name not in frozen}

    def parameters_of(self, *names: str) -> Iterator[nn.Parameter]:
        """Parameters of the named trainable submodules (for one optimiser or parameter group)."""
        trainable = self.trainable_modules
        unknown = [n for n in names if n not in trainable]
        if unknown:
            raise ValueError(f"{type(self).__name__}: no trainable submodule {unknown}; trainable: {sorted(trainable)}")
        for name in names:
            yield from trainable[name].parameters()

    def ready_for_selection(self) -> bool:
        """Whether a validation of the current weights may select them (best checkpoint, early stopping).

        ``True`` by default. A detector whose anomaly map means nothing in part
        of its training (DeSTSeg's segmentation network before its phase starts)
        returns ``False`` there: such validations are still logged, but they
        are neither kept as the best epoch nor counted by early stopping.
        """
        return True

    def training_synthesizer(self) -> Synthesizer | None:
        """The synthesiser the data module applies to training patches (``None``: clean patches only).

        Detectors that learn from synthetic anomalies return one; their training
        batches then carry the corrupted patch in ``image`` / ``mask`` and the
        clean one in ``clean_image`` (see :meth:`PatchBatch.clean`).
        """
        return None

    def step_optimizers(
        self,
        loss: Tensor,
        batch_idx: int,
        optimizers: Sequence[int] | None = None,
        accumulate: int = 1,
        clip_norm: float | None = None,
    ) -> bool:
        """One manual-optimisation step: backward, then every ``accumulate`` batches step the optimisers.

        Args:
            loss: the batch loss (divided by ``accumulate`` here, so gradients are averages).
            batch_idx: the batch's index in the epoch (decides when to step).
            optimizers: positions of the optimisers to step (all by default): a
                detector that trains in phases steps only the current phase's.
            accumulate: batches whose gradients are summed per step.
            clip_norm: clip each optimiser's gradients to this norm first.

        Returns:
            Whether the optimisers stepped. Schedulers with ``interval: step``
            step with them; epoch schedulers step at the epoch's end (see
            :meth:`on_train_epoch_end`).
        """
        all_optimizers = self.optimizers()
        all_optimizers = list(all_optimizers) if isinstance(all_optimizers, (list, tuple)) else [all_optimizers]
        chosen = [all_optimizers[i] for i in (range(len(all_optimizers)) if optimizers is None else optimizers)]
        self.manual_backward(loss / accumulate)
        last_batch = self.trainer is not None and batch_idx + 1 == self.trainer.num_training_batches
        if (batch_idx + 1) % accumulate != 0 and not last_batch:
            return False
        for optimizer in chosen:
            if clip_norm is not None:  # clipping reads the wrapped optimiser's parameter groups
                self.clip_gradients(optimizer.optimizer, gradient_clip_val=clip_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            optimizer.zero_grad()
        for config in self._scheduler_configs("step"):
            config.scheduler.step()
        return True

    def _scheduler_configs(self, interval: str) -> list[Any]:
        """The trainer's scheduler configs with the given ``interval`` (manual optimisation steps them)."""
        if self.trainer is None or self.automatic_optimization:
            return []
        return [config for config in self.trainer.lr_scheduler_configs if config.interval == interval]

    def on_train_epoch_end(self) -> None:
        """Step epoch-interval schedulers under manual optimisation (Lightning does it otherwise)."""
        for config in self._scheduler_configs("epoch"):
            config.scheduler.step()

    def embedding(self, images: Tensor) -> list[Tensor]:
        """Backbone feature maps ``[B, C_l, h_l, w_l]`` of ``images`` for the chosen layers."""
        if not self.freeze_backbone:
            return self.backbone(images)
        if self.backbone.training:  # whatever switched it, a frozen backbone runs in eval mode
            self.backbone.eval()
        with torch.no_grad():
            return self.backbone(images)

    def fused_embedding(self, batch: PatchBatch) -> list[Tensor]:
        """Per-layer features of the patches, fused with their low-resolution views.

        Each layer's map is ``w_0 * f(patch) + sum_i w_i * resize(window_i of
        f(low_res_crop_i))`` on the patch's feature grid, where ``window_i`` is
        where the patch lies inside the ``i``-th resized crop. All windows of a
        layer are cut and resized in one ``roi_align`` call. Without
        low-resolution crops or without ``fusion_weights`` this is
        ``embedding(batch.image)``.

        Raises:
            ValueError: when ``fusion_weights`` does not have one weight for the
                patch plus one per low-resolution view, or windows are missing.
        """
        crops = self.fusion_crops(batch)
        patch_maps = self.embedding(batch.image)
        return self.fuse_embedding(patch_maps, None if crops is None else self.embedding(crops), batch)

    def fusion_crops(self, batch: PatchBatch) -> Tensor | None:
        """The low-resolution crops ``[B * L, 3, h, w]`` fused into the patches' features, or ``None`` without fusion.

        Raises:
            ValueError: as :meth:`fused_embedding`.
        """
        low = batch.low_resolution_images
        if low is None or self.fusion_weights is None:
            return None
        if low.ndim != 5 or low.shape[0] != batch.image.shape[0]:
            raise ValueError(f"low_resolution_images must be [B, L, 3, h, w], got {tuple(low.shape)}")
        views = low.shape[1]
        if len(self.fusion_weights) != views + 1:
            raise ValueError(
                f"fusion_weights has {len(self.fusion_weights)} weights but the batch has {views} "
                f"low-resolution views: give one weight per entry of ds_factors ({views + 1} weights: "
                "the patch itself first, then one per low-resolution view)"
            )
        if batch.low_resolution_windows is None:
            raise ValueError("batch has low_resolution_images but no low_resolution_windows")
        return low.flatten(0, 1)

    def fuse_embedding(self, patch_maps: list[Tensor], crop_maps: list[Tensor] | None, batch: PatchBatch) -> list[Tensor]:
        """:meth:`fused_embedding` from backbone maps computed elsewhere (e.g. once for several detectors)."""
        if crop_maps is None:
            return patch_maps
        low, windows = batch.low_resolution_images, batch.low_resolution_windows
        if low is None or windows is None:
            raise ValueError("crop maps were given for a batch without low_resolution_images and low_resolution_windows")
        crop_size = (low.shape[-2], low.shape[-1])
        return [
            self._fuse_layer(patch_map, crop_map, windows, crop_size)
            for patch_map, crop_map in zip(patch_maps, crop_maps)
        ]

    def _fuse_layer(self, patch_map: Tensor, crop_map: Tensor, windows: Tensor, crop_size: tuple[int, int]) -> Tensor:
        """Weighted sum of one layer's patch map and its crops' windows resized onto it."""
        batch, channels, height, width = patch_map.shape
        boxes = window_boxes(windows.to(crop_map.device), crop_size, (crop_map.shape[-2], crop_map.shape[-1]))
        # aligned=True samples cell centres, so a full-crop box returns the map unchanged.
        resized = roi_align(
            crop_map,
            boxes.to(crop_map.dtype),
            output_size=(height, width),
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        ).reshape(batch, -1, channels, height, width)
        weights = torch.tensor(self.fusion_weights, dtype=resized.dtype, device=resized.device)
        fused = weights[0] * patch_map + torch.einsum("l,blchw->bchw", weights[1:], resized)
        return fused.to(patch_map.dtype)

    @abstractmethod
    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        """Raw anomaly scores ``[B, h, w]`` at the input's resolution; higher is more anomalous."""

    def prepare_scoring(self) -> None:
        """Build once what scoring needs beyond the weights (PatchCore: its search index); a no-op by default.

        The inference pipeline calls it for every detector before the first image,
        so a one-time cost is not charged to the first image scored.
        """

    # ------------------------------------------------- sharing the frozen backbone

    #: True for detectors whose :meth:`score_embedding` scores features computed elsewhere.
    scores_shared_embedding: ClassVar[bool] = False

    def score_embedding(self, embedding: list[Tensor], batch: PatchBatch) -> Tensor:
        """:meth:`anomaly_map` from this detector's :meth:`fused_embedding` of ``batch``, computed elsewhere."""
        raise NotImplementedError(f"{type(self).__name__} scores its own features (scores_shared_embedding is False)")

    def frozen_backbone_key(self) -> tuple | None:
        """What builds the frozen backbone; detectors with equal keys can share one (``None``: it trains)."""
        if not self.freeze_backbone:
            return None
        hparams = self.hparams
        return (hparams["backbone_name"], tuple(hparams["layers_to_extract_from"]), hparams["weights"])

    def share_backbone(self, backbone: torch.nn.Module) -> None:
        """Use ``backbone`` by reference: another detector's frozen backbone with the same :meth:`frozen_backbone_key`."""
        if not self.freeze_backbone:
            raise ValueError(f"{type(self).__name__} trains its backbone: it cannot share one")
        self.backbone = backbone

    def predict_step(self, batch: PatchBatch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Anomaly maps ``[B, h, w]`` (float32) of a batch of patches."""
        with torch.no_grad():
            return self.anomaly_map(batch).float()

    def validation_step(self, batch: PatchBatch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Anomaly maps of validation patches; the validation callback scores them against their masks."""
        return self.predict_step(batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------- Lightning plumbing

    def train(self, mode: bool = True) -> HRDetector:
        """Set training mode; frozen parts stay in eval mode (their BatchNorm statistics are fixed)."""
        super().train(mode)
        for module in self.frozen_modules.values():
            module.eval()
        return self

    def setup(self, stage: str) -> None:
        """Freeze the frozen parts (a teacher built after ``super().__init__`` included) before optimisers exist.

        Raises:
            ValueError: when a name in :attr:`frozen_submodules` is not a submodule.
        """
        missing = [name for name in self._frozen_names() if not isinstance(getattr(self, name, None), nn.Module)]
        if missing:
            raise ValueError(f"{type(self).__name__}.frozen_submodules names {missing}, which are not submodules")
        for module in self.frozen_modules.values():
            module.requires_grad_(False).eval()

    def on_fit_start(self) -> None:
        """Show Lightning's start-of-training mode check frozen parts in train mode.

        The check warns about every module in eval mode, and frozen parts are in
        eval mode by design; :meth:`on_train_start` (and :meth:`embedding`) put
        them back before any batch is seen.
        """
        for module in self.frozen_modules.values():
            module.train()

    def on_train_start(self) -> None:
        """Put frozen parts back in eval mode for training."""
        for module in self.frozen_modules.values():
            module.eval()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move a :class:`PatchBatch` (or anything Lightning knows) to ``device``."""
        if isinstance(batch, PatchBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _frozen_state(self) -> Mapping[str, Tensor]:
        """State-dict entries of the frozen parts, under their keys in this detector."""
        state: dict[str, Tensor] = {}
        for name, module in self.frozen_modules.items():
            state.update(module.state_dict(prefix=f"{name}."))
        return state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave frozen parts out of the checkpoint: hyperparameters rebuild them."""
        prefixes = tuple(f"{name}." for name in self.frozen_modules)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(prefixes)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill the frozen parts' weights, absent from the checkpoint, from the rebuilt parts."""
        state = checkpoint["state_dict"]
        for key, value in self._frozen_state().items():
            state.setdefault(key, value)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Fitted buffers (a memory bank, statistics) have sizes unknown at construction.
        for name in self.resizable_buffers:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is not None and incoming.shape != current.shape:
                setattr(self, name, torch.empty(incoming.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


declare_detector_base(HRDetector)


class OnePassDetector(HRDetector):
    """Base of detectors fitted from one pass over the training patches, with no optimiser.

    ``training_step`` hands each batch to :meth:`accumulate`; once the pass is
    over :meth:`finalize` builds the fitted state (a memory bank, Gaussian
    statistics), which must live in buffers so that it travels with checkpoints.
    The fitted state is built before any validation of the same epoch runs.
    """

    fits_in_one_pass: ClassVar[bool] = True

    @property
    def automatic_optimization(self) -> bool:
        """Always ``False``: nothing is optimised, so Lightning needs no optimiser."""
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError(f"{type(self).__name__} is fitted in one pass without an optimiser: it cannot optimise automatically")

    def configure_optimizers(self) -> list:
        """No optimiser (an empty list, which Lightning accepts without warnings)."""
        return []

    @abstractmethod
    def accumulate(self, batch: PatchBatch) -> None:
        """Take what the fit needs from one training batch."""

    @abstractmethod
    def finalize(self) -> None:
        """Build the fitted buffers from everything accumulated, then drop the accumulation."""

    @abstractmethod
    def has_pending_fit(self) -> bool:
        """Whether batches were accumulated since the last :meth:`finalize`."""

    def training_step(self, batch: PatchBatch, batch_idx: int) -> None:
        """Accumulate one batch (no loss)."""
        self.accumulate(batch)

    def on_validation_epoch_start(self) -> None:
        """Build the fitted state before validation (Lightning validates before ``on_train_epoch_end``)."""
        if self.has_pending_fit():
            self.finalize()

    def on_train_epoch_end(self) -> None:
        """Build the fitted state once the pass over the training patches is over."""
        if self.has_pending_fit():
            self.finalize()
