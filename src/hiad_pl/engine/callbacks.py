"""Validation on synthetic anomalies: metrics, checkpoint selection, normalisation statistics.

Each task's detector is validated on its own held-out patches with synthetic
anomalies. The best validation (image AUROC, ties broken by the mean of the
other metrics) is kept: its weights are restored at the end of fitting and its
score statistics normalise that task's maps to [0, 1] at inference.

A gradient-trained detector's best weights live on disk, in the checkpoint
that Lightning's ``ModelCheckpoint`` keeps for the best selection score
(:func:`epoch_checkpoint`); that callback and the selector's own state travel
in ``last.ckpt``, so a resumed fit still knows the best epoch of before the
interruption. A one-pass detector is validated once, so its weights are the best.

A detector may declare validations that must not select it
(:meth:`~hiad_pl.detectors.base.HRDetector.ready_for_selection`, e.g. DeSTSeg
before its segmentation network trains): they are logged, but neither kept as
the best epoch (:class:`SelectionCheckpoint`, :class:`ValidationSelector`) nor
counted by early stopping (:class:`SelectionEarlyStopping`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from hiad_pl.data.datamodule import HighResDataModule
from hiad_pl.data.tiling import inner_maps
from hiad_pl.detectors.base import HRDetector
from hiad_pl.engine.validation import NORMALIZATION_SCOPES, ValidationConfig
from hiad_pl.metrics import UndefinedMetricError, compute_imagewise_metrics, compute_pixelwise_metrics
from hiad_pl.postprocess import ImageScore
from hiad_pl.run_folder import load_checkpoint

log = logging.getLogger("hiad_pl")

SELECTION_METRIC = "val/selection"
NORMAL_QUANTILE = 0.99
NORMAL_SAMPLE = 1_000_000  # pixels sampled for the quantile (torch.quantile caps its input size)
SKETCH_SIZE = 512  # quantiles of normal scores kept per task, to pool statistics across tasks


def default_validation_evaluators() -> list[Callable[..., dict]]:
    """Image AUROC and pixel AUROC/AP: cheap enough to run every epoch on the CPU."""
    return [compute_imagewise_metrics, compute_pixelwise_metrics]


def selection_score(values: dict[str, float]) -> float:
    """Image AUROC, with the mean of the other finite metrics as a tie-breaker below 1e-6."""
    finite = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v) and "threshold" not in k}
    if not finite:
        return -math.inf
    primary = finite.get("image_auroc", float(np.mean(list(finite.values()))))
    others = [v for k, v in finite.items() if k != "image_auroc"]
    return primary + 1e-6 * (float(np.mean(others)) if others else 0.0)


def normalization_statistics(
    maps: torch.Tensor, labels: torch.Tensor | None = None, scope: str = "task"
) -> dict[str, Any]:
    """``low``/``high`` that map a task's scores to [0, 1], and what pooling them across tasks needs.

    ``low`` is the 99th percentile of the pixel scores of normal validation
    patches (the top of normal variation), ``high`` the largest validation
    score. After normalisation normal pixels sit at or near 0 in every task and
    in the thumbnail branch, so merging branches by per-pixel maximum adds a
    branch's detections without adding its normal noise.

    ``normal_sketch`` (:data:`SKETCH_SIZE` evenly spaced quantiles of the normal
    pixel scores) and ``normal_count`` let :func:`pooled_statistics` compute
    the statistics of several tasks together; ``scope`` records whether the run
    asked for that (``"shared"``) or for per-task statistics (``"task"``).
    """
    if scope not in NORMALIZATION_SCOPES:
        raise ValueError(f"normalization must be one of {NORMALIZATION_SCOPES}, got {scope!r}")
    normal = maps if labels is None or not bool((labels == 0).any()) else maps[labels == 0]
    values = normal.flatten().float()
    count = values.numel()
    if values.numel() > NORMAL_SAMPLE:
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:NORMAL_SAMPLE]]
    low = float(torch.quantile(values, NORMAL_QUANTILE))
    high = float(maps.max())
    sketch = torch.quantile(values, (torch.arange(SKETCH_SIZE, dtype=torch.float32) + 0.5) / SKETCH_SIZE)
    return {
        "low": low,
        "high": max(high, low + 1e-6),
        "scope": scope,
        "normal_sketch": sketch.tolist(),
        "normal_count": int(count),
    }


def pooled_statistics(statistics: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``low``/``high`` of several tasks' validation sets taken together.

    ``low`` is the 99th percentile of all their normal pixels (each task's
    quantile sketch weighted by its pixel count), ``high`` the largest of their
    ``high``. One shared affine map keeps the tasks' raw scores comparable, as
    they are when every task runs the same detector on the same features.
    """
    if not statistics:
        raise ValueError("no statistics to pool")
    missing = [k for k, s in enumerate(statistics) if "normal_sketch" not in s]
    if missing:
        raise ValueError("shared normalisation needs normal_sketch in every task's statistics (fit again)")
    values = torch.cat([torch.as_tensor(s["normal_sketch"], dtype=torch.float64) for s in statistics])
    weights = torch.cat(
        [torch.full((len(s["normal_sketch"]),), s["normal_count"] / len(s["normal_sketch"]), dtype=torch.float64)
         for s in statistics]
    )
    order = values.argsort()
    cumulative = weights[order].cumsum(0) / weights.sum()
    position = int(torch.searchsorted(cumulative, torch.tensor(NORMAL_QUANTILE, dtype=torch.float64)).clamp(max=len(order) - 1))
    low = float(values[order][position])
    high = max(float(s["high"]) for s in statistics)
    return {"low": low, "high": max(high, low + 1e-6)}


def ready_for_selection(module: L.LightningModule | None) -> bool:
    """Whether ``module``'s current weights may be selected by validation (``True`` for modules without the hook)."""
    return module.ready_for_selection() if isinstance(module, HRDetector) else True


class SelectionCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never keeps, as the best, weights whose detector is not :func:`ready_for_selection`."""

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if not ready_for_selection(trainer.lightning_module):
            return False
        return super().check_monitor_top_k(trainer, current)


class SelectionEarlyStopping(EarlyStopping):
    """``EarlyStopping`` that skips validations of a detector that is not :func:`ready_for_selection`."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not ready_for_selection(pl_module):
            return
        super().on_validation_end(trainer, pl_module)


def epoch_checkpoint(dirpath: str | Path, validated: bool) -> ModelCheckpoint:
    """Epoch checkpoints of a gradient-trained detector: ``last.ckpt`` to resume, ``epoch=NNN.ckpt`` and, when
    ``validated``, ``best-epoch<NNN>.ckpt`` with the best :data:`SELECTION_METRIC` so far
    (among the validations the detector is :func:`ready_for_selection` for)."""
    if validated:
        return SelectionCheckpoint(
            dirpath=dirpath,
            filename="best-epoch{epoch:03d}",
            monitor=SELECTION_METRIC,
            mode="max",
            save_top_k=1,
            save_last=True,
            auto_insert_metric_name=False,
        )
    # "epoch=NNN.ckpt"; Lightning would insert the metric name itself ("epochepoch=NNN") without auto_insert_metric_name=False
    return ModelCheckpoint(
        dirpath=dirpath, filename="epoch={epoch:03d}", save_last=True, save_top_k=1, auto_insert_metric_name=False
    )


def best_checkpoint_path(trainer: L.Trainer) -> str | None:
    """The file of the best validated epoch, kept by the trainer's :func:`epoch_checkpoint` (None without one)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor == SELECTION_METRIC and callback.best_model_path:
            return callback.best_model_path
    return None


class ValidationSelector(Callback):
    """Scores each validation epoch, logs metrics, keeps the best epoch and its statistics.

    The best weights themselves are on disk (:func:`epoch_checkpoint`) for
    gradient-trained detectors, and in the module for one-pass detectors,
    which are validated once. With ``context_margin`` (patches read with
    image context) maps and masks are cropped to the patches first.
    """

    def __init__(
        self, evaluators: Sequence[Callable[..., dict]] | None = None, scope: str = "task", context_margin: int = 0
    ) -> None:
        self.evaluators = list(evaluators) if evaluators else default_validation_evaluators()
        self.scope = scope
        self.context_margin = context_margin
        self.best_score = -math.inf
        self.best_epoch: int | None = None
        self.best_statistics: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []
        self._maps: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maps, self._masks, self._labels = [], [], []

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        maps = outputs if isinstance(outputs, torch.Tensor) else outputs["anomaly_map"]
        masks, labels = batch.mask.detach().cpu(), batch.label.detach().cpu()
        if self.context_margin:
            # Patches read with context: the patch alone is scored, as inference stitches it. A
            # synthetic defect that lies wholly in the context leaves the patch normal.
            inner = torch.as_tensor(inner_maps(masks, self.context_margin))
            in_context_only = (masks.flatten(1) > 0).any(1) & ~(inner.flatten(1) > 0).any(1)
            labels = torch.where(in_context_only, torch.zeros_like(labels), labels)
            maps, masks = inner_maps(maps, self.context_margin), inner
        self._maps.append(maps.detach().float().cpu())
        self._masks.append(masks)
        self._labels.append(labels)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._maps or trainer.sanity_checking:
            return
        maps, masks, labels = torch.cat(self._maps), torch.cat(self._masks), torch.cat(self._labels)
        values = self.evaluate(maps, masks, labels, pl_module.image_score if isinstance(pl_module, HRDetector) else None)
        score = selection_score(values)
        for name, value in values.items():
            if math.isfinite(value):
                pl_module.log(f"val/{name}", value, prog_bar=name == "image_auroc")
        ready = ready_for_selection(pl_module)
        # -1 (below any AUROC) when there is nothing to select by, so a monitor never prefers it.
        pl_module.log(SELECTION_METRIC, score if ready and math.isfinite(score) else -1.0)
        # Epochs trained so far (1-based): a validation inside fit runs before the epoch counter
        # moves on; a one-pass detector is validated by trainer.validate once its epoch is done.
        trained = trainer.current_epoch + (1 if trainer.state.fn == TrainerFn.FITTING else 0)
        self.history.append({"epoch": trained, "score": score, "ready": ready, **values})
        if not ready:
            log.info("validation after epoch %s not used for selection: the detector is not ready for it", trained)
        # Strictly better, as ModelCheckpoint(mode="max") decides, so both keep the same epoch.
        elif score > self.best_score or self.best_epoch is None:
            self.best_score = score
            self.best_epoch = trained
            self.best_statistics = normalization_statistics(maps, labels, self.scope)
        # torch annotates Module.__setattr__ values as Tensor | Module; plain attributes are allowed
        pl_module.hiad_normalization = copy.deepcopy(self.best_statistics)  # type: ignore[assignment]

    def evaluate(
        self, maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, image_score: ImageScore | None = None
    ) -> dict[str, float]:
        """Run the evaluators on validation patch maps, scoring each patch by ``image_score`` (the detector's rule)."""
        scores = (image_score or ImageScore())(maps).numpy()
        label_array = labels.numpy().astype(int)
        values: dict[str, float] = {}
        for evaluator in self.evaluators:
            try:
                result = evaluator(scores, label_array, list(maps.numpy()), list(masks.numpy().astype(np.uint8)))
            except UndefinedMetricError as error:  # e.g. a small validation set drew no anomaly
                log.info("validation metric skipped: %s", error)
                continue
            values.update({k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and v is not None})
        return values

    def restore_best(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the best validated weights (from the best epoch's checkpoint) and statistics into the module."""
        if self.best_epoch is None:
            return
        path = best_checkpoint_path(trainer)
        if path is not None:
            checkpoint = load_checkpoint(path)
            pl_module.on_load_checkpoint(checkpoint)  # fills in what the checkpoint leaves out (frozen backbone)
            pl_module.load_state_dict(checkpoint["state_dict"])
        # torch annotates Module.__setattr__ values as Tensor | Module; plain attributes are allowed
        pl_module.hiad_normalization = copy.deepcopy(self.best_statistics)  # type: ignore[assignment]
        log.info("kept the weights after epoch %s (validation score %.4f)", self.best_epoch, self.best_score)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_statistics": self.best_statistics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score", -math.inf)
        self.best_epoch = state_dict.get("best_epoch")
        self.best_statistics = state_dict.get("best_statistics")


def validation_callbacks(
    detector: HRDetector, data: HighResDataModule, val_config: ValidationConfig, early_stop_epochs: int
) -> list[Callback]:
    """The selector, plus early stopping when ``early_stop_epochs`` > 0."""
    callbacks: list[Callback] = [ValidationSelector(val_config.evaluators, val_config.normalization, data.context_margin)]
    if early_stop_epochs > 0 and not detector.fits_in_one_pass:
        callbacks.append(
            SelectionEarlyStopping(
                monitor=SELECTION_METRIC, mode="max", patience=early_stop_epochs, check_on_train_epoch_end=False
            )
        )
    return callbacks
