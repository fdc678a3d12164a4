"""One task's Lightning fit: Trainer options, loggers, callbacks, warning filters, the final checkpoint.

The options stack, last wins: hiad-pl's own (no progress bar in workers, no model
summary, checkpointing only for gradient-trained detectors), the detector's
:meth:`~hiad_pl.detectors.base.HRDetector.trainer_defaults`, the options the
branch's settings imply, then the user's Trainer options. Loggers and callbacks
are built fresh for every task from their specs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from hiad_pl.checkpoint_io import AtomicCheckpointIO
from hiad_pl.config import task_callbacks, task_loggers
from hiad_pl.data.datamodule import HighResDataModule
from hiad_pl.detectors.base import HRDetector
from hiad_pl.engine.callbacks import ValidationSelector, epoch_checkpoint, validation_callbacks
from hiad_pl.engine.validation import ValidationConfig
from hiad_pl.interrupts import lightning_stop
from hiad_pl.run_folder import check_checkpoint
from hiad_pl.tasks.base import Task

log = logging.getLogger("hiad_pl")

RUN_INFO_KEY = "hiad_pl"
# Lightning advice that does not apply here: loaders are sized per task on purpose,
# and tasks without a validation set have no validation loader.
QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*val_dataloader.*",
    ".*validation_step.*",
    ".*number of training batches.*log_every_n_steps.*",
    ".*LeafSpec.*",
    ".*Checkpoint directory.*exists and is not empty.*",
    ".*across ranks is zero.*",
    ".*overridden `transfer_batch_to_device`.*",
)
#: Trainer options built fresh for every task from their specs.
PER_TASK_TRAINER_KEYS = ("logger", "callbacks")
#: Loggers through which Lightning prints its advertising tips ("💡 Tip: ... try installing litlogger").
LIGHTNING_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _LightningTipFilter(logging.Filter):
    """Drops Lightning's advertising tips (records starting with "💡 Tip:"); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning_tips() -> None:
    """Silence Lightning's product tips at the loggers that print them (once per process)."""
    for name in LIGHTNING_TIP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LightningTipFilter) for f in logger.filters):
            logger.addFilter(_LightningTipFilter())


def lightning_device(device: str) -> dict[str, Any]:
    """Trainer ``accelerator``/``devices`` for a torch device string."""
    if device.startswith("cuda"):
        return {"accelerator": "gpu", "devices": [int(device.split(":")[1]) if ":" in device else 0]}
    return {"accelerator": "cpu", "devices": 1}


def atomic_save_checkpoint(trainer: L.Trainer, path: Path) -> None:
    """Save the trainer's checkpoint so that ``path`` is either absent or complete (its plugin writes atomically)."""
    trainer.save_checkpoint(path, weights_only=False)  # keep callback entries (run info)


class RunInfo(Callback):
    """Writes what inference needs besides the weights into every checkpoint."""

    def __init__(self, detector_class: str, task: Task, input_size: tuple[int, int], context_margin: int = 0) -> None:
        self.info = {
            "detector_class": detector_class,
            "task": task.name,
            "input_size": list(input_size),
            "context_margin": context_margin,
        }

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        normalization = pl_module.hiad_normalization if isinstance(pl_module, HRDetector) else None
        checkpoint[RUN_INFO_KEY] = {**self.info, "normalization": normalization}


class TaskTrainer:
    """Builds and runs the Lightning fit of one task's detector.

    Args:
        trainer_kwargs: the user's ``lightning.Trainer`` options; ``logger`` and ``callbacks``
            are ``{class_path, init_args}`` specs built fresh for every task.
        root: the model folder (Lightning's ``default_root_dir``; loggers' default home).
        log_root: TensorBoard folder; each task logs to ``<log_root>/<task>``.
        early_stop_epochs: stop after this many validations without improvement (-1: never).
    """

    def __init__(self, trainer_kwargs: Mapping[str, Any], root: Path, log_root: Path, early_stop_epochs: int = -1) -> None:
        self.trainer_kwargs = dict(trainer_kwargs)
        self.root = root
        self.log_root = log_root
        self.early_stop_epochs = early_stop_epochs

    def callbacks(
        self,
        detector: HRDetector,
        data: HighResDataModule,
        val_config: ValidationConfig | None,
        run_info: RunInfo,
        epoch_dir: Path,
    ) -> list[Callback]:
        """hiad-pl's callbacks (run info, epoch checkpoints, validation selection), then the user's."""
        callbacks: list[Callback] = [run_info]
        validated = val_config is not None and data.has_validation
        if not detector.fits_in_one_pass:
            callbacks.append(epoch_checkpoint(epoch_dir, validated=validated))
        if val_config is not None:
            callbacks.extend(validation_callbacks(detector, data, val_config, self.early_stop_epochs))
        callbacks.extend(task_callbacks(self.trainer_kwargs.get("callbacks")))
        return callbacks

    def options(self, detector: HRDetector, branch_trainer: Mapping[str, Any], progress: bool) -> dict[str, Any]:
        """The Trainer options of one task (see the module docstring for their order)."""
        options: dict[str, Any] = {
            "enable_progress_bar": progress,
            "enable_model_summary": False,
            "enable_checkpointing": not detector.fits_in_one_pass,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
        }
        options.update(detector.trainer_defaults())
        options.update(branch_trainer)
        options.update({k: v for k, v in self.trainer_kwargs.items() if k not in PER_TASK_TRAINER_KEYS})
        return options

    def fit(
        self,
        task: Task,
        detector: HRDetector,
        data: HighResDataModule,
        val_config: ValidationConfig | None,
        device: str,
        branch_trainer: Mapping[str, Any],
        run_info: RunInfo,
        epoch_dir: Path,
        checkpoint: Path,
        progress: bool = False,
    ) -> Path:
        """Fit ``detector`` on ``data`` (resuming from ``epoch_dir/last.ckpt``), keep its best validated
        weights, and write the final ``checkpoint`` atomically."""
        quiet_lightning_tips()
        trainer = L.Trainer(
            **self.options(detector, branch_trainer, progress),
            **lightning_device(device),
            callbacks=self.callbacks(detector, data, val_config, run_info, epoch_dir),
            plugins=[AtomicCheckpointIO()],
            logger=task_loggers(self.trainer_kwargs.get("logger"), task.name, self.root, self.log_root),
            default_root_dir=str(self.root),
        )
        gradient = not detector.fits_in_one_pass
        last = epoch_dir / "last.ckpt"
        resume = str(last) if gradient and last.is_file() else None
        if resume:
            check_checkpoint(last, task.name)
            log.info("%s: resuming from %s", task.name, last)
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            if gradient:
                with lightning_stop(trainer):
                    trainer.fit(detector, datamodule=data, ckpt_path=resume)
            else:
                # one pass: the memory bank is built at the end of the epoch, so validate after fitting
                with lightning_stop(trainer):
                    trainer.fit(detector, train_dataloaders=data.train_dataloader())
                if data.has_validation:
                    with lightning_stop(trainer):
                        trainer.validate(detector, dataloaders=data.val_dataloader(), verbose=False)
        restore_best(trainer, detector)
        atomic_save_checkpoint(trainer, checkpoint)
        return checkpoint


def restore_best(trainer: L.Trainer, detector: HRDetector) -> None:
    """After fitting: restore the best validated weights and statistics when a selector kept them."""
    # Trainer.callbacks is public but assigned by Lightning's callback connector, undeclared on the class
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, ValidationSelector):
            callback.restore_best(trainer, detector)
