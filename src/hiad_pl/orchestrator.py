"""TaskOrchestrator: fits one detector per task across devices, then scores whole images.

A model folder holds everything inference needs::

    <root>/tasks.json                 the tasks (patch indexes, retrieval centres, thumbnail)
    <root>/checkpoints/<task>.ckpt    one Lightning checkpoint per task, written atomically
    <root>/checkpoints/<task>/        per-epoch checkpoints of gradient-trained detectors (resume)
    <root>/tensorboard/<task>/        one TensorBoard run per task (or <log_root>/<task>/)
    <root>/retrieval/                 routing of the training patches to retrieval tasks (computed once)

A rerun skips tasks whose final checkpoint exists and resumes interrupted ones,
when it has the settings the folder was fitted with (``fit_settings.json``, see
:mod:`hiad_pl.fit_settings`); other settings are refused unless a refit is asked for.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import logging
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from hiad_pl import fit_settings
from hiad_pl.checkpoint_io import AtomicCheckpointIO
from hiad_pl.config import (
    DetectorConfig,
    RayOptions,
    check_trainer_options,
    class_path,
    import_class,
    task_callbacks,
    task_loggers,
)
from hiad_pl.data.datamodule import MIN_RELIABLE_VALIDATION_PATCHES, HighResDataModule, split_validation
from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionIndex, as_pair, check_context_margin
from hiad_pl.errors import ConfigError, DatasetError, MissingFileError, UserError
from hiad_pl.inference import InferencePipeline, Prediction, share_frozen_backbones
from hiad_pl.interrupts import lightning_stop
from hiad_pl.launchers import Launcher, make_launcher
from hiad_pl.run_folder import (
    LOCK_NAME,
    atomic_write,
    check_checkpoint,
    load_checkpoint,
    locks_root,
    remove_stale_temporaries,
)
from hiad_pl.tasks.base import Task, load_tasks, save_tasks, thumbnail_task
from hiad_pl.tasks.retrieval import retrieval_train_items
from hiad_pl.utils.allocator import keep_freed_memory
from hiad_pl.utils.array_store import ArrayStore

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
#: Where a refit moves a model folder's old contents before deleting them (left over only by a crash).
DISCARDED_PREFIX = ".discarded-"


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


def resolve_devices(devices: Sequence[int | str] | int | str | None) -> list[str]:
    """Normalise ``gpu_ids``/``devices`` to torch device strings.

    ``None`` or ``[]`` is one CPU; ints are CUDA ids; ``"cpu"`` entries are CPU
    worker processes (``["cpu", "cpu"]`` fits two tasks at a time).
    """
    if devices is None or devices == [] or devices == ():
        return ["cpu"]
    if isinstance(devices, (int, str)):
        devices = [devices]
    resolved = []
    for device in devices:
        if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
            if not torch.cuda.is_available():
                raise ConfigError(f"GPU id {device} requested but CUDA is not available; use gpu_ids=[] for CPU")
            if int(device) >= torch.cuda.device_count():
                raise ConfigError(f"GPU id {device} requested but only {torch.cuda.device_count()} GPU(s) are visible")
            resolved.append(f"cuda:{int(device)}")
        elif str(device) == "cpu" or str(device).startswith("cuda"):
            resolved.append(str(device))
        else:
            raise ConfigError(f"unknown device {device!r}: use GPU ids (0, 1, ...) or 'cpu'")
    return resolved


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
        checkpoint[RUN_INFO_KEY] = {**self.info, "normalization": getattr(pl_module, "hiad_normalization", None)}


@dataclass
class ValidationConfig:
    """The tutorial's ``val_config``: a validation set of training images with synthetic anomalies."""

    anomaly_syn_fn: Callable[..., Any]
    val_sample_ratio: float = 0.2
    max_patch_number: int | None = None
    evaluators: list[Callable[..., dict]] = field(default_factory=list)
    #: "task": each task normalised with its own validation statistics; "shared": the patch
    #: tasks share statistics pooled over all their validation patches (the thumbnail keeps its own).
    normalization: str = "task"

    def __post_init__(self) -> None:
        from hiad_pl.callbacks import NORMALIZATION_SCOPES

        if self.normalization not in NORMALIZATION_SCOPES:
            raise ConfigError(f"val_config normalization must be one of {NORMALIZATION_SCOPES}, got {self.normalization!r}")

    @staticmethod
    def from_any(value: ValidationConfig | dict | None) -> ValidationConfig | None:
        """Accept the tutorial's dict or an instance."""
        if value is None or isinstance(value, ValidationConfig):
            return value
        unknown = set(value) - {"anomaly_syn_fn", "val_sample_ratio", "max_patch_number", "evaluators", "normalization"}
        if unknown:
            raise ConfigError(f"val_config has unknown keys {sorted(unknown)}")
        if "anomaly_syn_fn" not in value:
            raise ConfigError("val_config needs 'anomaly_syn_fn' (a synthesiser from hiad_pl.syn)")
        return ValidationConfig(**value)


def _callable_name(function: Any) -> str:
    """``module.name`` of an evaluator (a partial with its bound keywords), stable across processes."""
    if isinstance(function, functools.partial):
        bound = ", ".join(f"{k}={v!r}" for k, v in sorted(function.keywords.items()))
        return f"{_callable_name(function.func)}({bound})"
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{getattr(function, '__module__', type(function).__module__)}.{name}"


def default_validation() -> ValidationConfig:
    """Validation set used when one is needed (thumbnail branch) but none was configured."""
    from hiad_pl.syn import RandomBoxSynthesizer

    # the original run scripts' validation set: grey boxes on half of the patches, mean difference 20-50 levels
    synthesizer = RandomBoxSynthesizer(p=0.5, diff_threshold=(20, 50), seed=0)
    return ValidationConfig(synthesizer, val_sample_ratio=0.2, max_patch_number=200)


class TaskOrchestrator:
    """Fits and applies one detector per task.

    Args:
        detector_class: the :class:`~hiad_pl.detectors.base.HRDetector` subclass.
        patch_config: the detector's keyword arguments plus ``patch_size``.
        tasks: patch tasks from a task generator.
        root: the model folder.
        thumbnail_config: keyword arguments plus ``thumbnail_size`` for the low-resolution branch.
        batch_size: patches per step.
        seed: seed of every task's fit.
        fusion_weights: multi-resolution feature fusion weights (with ``ds_factors``).
        trainer_kwargs: ``lightning.Trainer`` arguments; they override the detector's defaults.
            ``logger`` and ``callbacks`` are ``{class_path, init_args}`` specs (or lists of
            them), built fresh for every task; the callbacks follow hiad-pl's own.
        num_workers: data loader workers per task.
        early_stop_epochs: stop a gradient-trained detector after this many validations without improvement (-1: never).
        log_root: TensorBoard folder (default ``<root>/tensorboard``); each task logs to ``<log_root>/<task>``.
        detectors: the config model (:class:`~hiad_pl.config.DetectorConfig`), given instead of
            ``patch_config`` and ``thumbnail_config``.
        context_margin: pixels of real image context read around every patch, in
            training, validation and inference alike (mirrored only at the image
            border). Patch detectors are built for the widened patch; their maps are
            cropped back to the patch before validation and stitching, so features
            at patch borders see the image around them instead of zero padding.
    """

    def __init__(
        self,
        detector_class: type | str,
        patch_config: dict[str, Any],
        tasks: Sequence[Task],
        root: str | Path,
        thumbnail_config: dict[str, Any] | None = None,
        batch_size: int = 8,
        seed: int = 0,
        fusion_weights: Sequence[float] | None = None,
        trainer_kwargs: dict[str, Any] | None = None,
        num_workers: int = 0,
        early_stop_epochs: int = -1,
        log_root: str | Path | None = None,
        detectors: DetectorConfig | None = None,
        context_margin: int = 0,
    ) -> None:
        if detectors is None:
            sections = {"patch": dict(patch_config)}
            if thumbnail_config is not None:
                sections["thumbnail"] = dict(thumbnail_config)
            detectors = DetectorConfig.from_tutorial(detector_class, sections)
        self.detectors = detectors
        self.detector_class = detectors.detector_class
        self.root = Path(root)
        self.log_root = self.root / "tensorboard" if log_root is None else Path(log_root)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.fusion_weights = None if fusion_weights is None else [float(w) for w in fusion_weights]
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.num_workers = int(num_workers)
        self.early_stop_epochs = int(early_stop_epochs)
        self.context_margin = check_context_margin(context_margin)
        check_trainer_options(self.trainer_kwargs)
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        unknown = sorted(set(self.trainer_kwargs) - set(inspect.signature(L.Trainer).parameters))
        if unknown:
            raise ConfigError(f"trainer: unknown lightning.Trainer options {unknown}")
        self.tasks = list(tasks)
        if detectors.thumbnail is not None and not any(t.is_thumbnail for t in self.tasks):
            self.tasks.append(thumbnail_task(detectors.thumbnail.size))
        self._detectors: dict[str, L.LightningModule] = {}
        self._normalization: dict[str, dict | None] = {}
        # Per split (training, validation): the image paths routed last and their routing.
        self._retrieval_cache: dict[bool, tuple[tuple[str, ...], tuple[list, dict[str, list[int]]]]] = {}

    # ------------------------------------------------------------------ paths
    @property
    def tasks_path(self) -> Path:
        """``tasks.json``."""
        return self.root / "tasks.json"

    def checkpoint_path(self, task: Task) -> Path:
        """Final checkpoint of a task."""
        return self.root / "checkpoints" / f"{task.name}.ckpt"

    # --------------------------------------------------------------- building
    def _config_for(self, task: Task) -> tuple[dict[str, Any], tuple[int, int]]:
        branch = self.detectors.branch(task.is_thumbnail)
        if task.is_thumbnail:
            size = task.thumbnail_size
        elif task.indexes:
            main = task.indexes[0].main_index
            size = (main.width + 2 * self.context_margin, main.height + 2 * self.context_margin)
        else:
            size = as_pair(512 if branch.size is None else branch.size, "patch_size")
        return dict(branch.options), size

    def build_detector(self, task: Task) -> L.LightningModule:
        """A fresh detector for ``task`` (validates the config: backbone, weights, layers)."""
        kwargs, size = self._config_for(task)
        fusion = None if task.is_thumbnail else self.fusion_weights
        if fusion is not None:
            kwargs["fusion_weights"] = fusion
        try:
            return self.detector_class(input_size=size, **kwargs)
        except UserError:
            raise
        except (TypeError, ValueError) as error:
            # the constructor's arguments all come from the config: what it rejects is a config value
            raise ConfigError(f"{self.detector_class.__name__}: bad config for task {task.name!r}: {error}") from error

    def check(self) -> None:
        """Fail before any training on a bad config (unknown backbone, unreachable weights, ...)."""
        seen = set()
        for task in self.tasks:
            key = task.is_thumbnail
            if key not in seen:
                seen.add(key)
                self.build_detector(task)

    # --------------------------------------------------------------- training
    def pending_tasks(self) -> list[Task]:
        """Tasks without a final checkpoint."""
        return [t for t in self.tasks if not self.checkpoint_path(t).is_file()]

    @property
    def settings_path(self) -> Path:
        """``fit_settings.json``: the settings the folder's models were fitted with."""
        return self.root / fit_settings.SETTINGS_NAME

    def fit_settings(
        self,
        train_samples: Sequence[HRSample],
        val_config: ValidationConfig | dict | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The settings that decide this folder's models (see :mod:`hiad_pl.fit_settings`), plus ``extra``."""
        val_config = ValidationConfig.from_any(val_config)
        patch, thumbnail = self.detectors.patch, self.detectors.thumbnail
        settings: dict[str, Any] = {
            "detector.class_path": class_path(self.detector_class),
            **fit_settings.flatten("detector.init_args", patch.options),
            "detector.patch_size": patch.size,
            "detector.trainer": patch.trainer,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "fusion_weights": self.fusion_weights,
            "early_stop_epochs": self.early_stop_epochs,
            # only when set: folders fitted before the option existed read the same without it
            **({"context_margin": self.context_margin} if self.context_margin else {}),
            **fit_settings.flatten(
                "trainer",
                {k: v for k, v in self.trainer_kwargs.items() if k not in fit_settings.NON_MODEL_TRAINER_KEYS},
            ),
            "training_images": fit_settings.training_images(s.get_image_path() for s in train_samples),
        }
        if thumbnail is not None:
            settings.update(
                {
                    "thumbnail.thumbnail_size": thumbnail.size,
                    **fit_settings.flatten("thumbnail.init_args", thumbnail.options),
                    "thumbnail.trainer": thumbnail.trainer,
                }
            )
        if val_config is not None:
            synthesizer = val_config.anomaly_syn_fn
            settings.update(
                {
                    "validation.anomaly_syn_fn": class_path(type(synthesizer)),
                    **fit_settings.flatten("validation.anomaly_syn_fn", fit_settings.public_state(synthesizer)),
                    "validation.val_sample_ratio": val_config.val_sample_ratio,
                    "validation.max_patch_number": val_config.max_patch_number,
                    "validation.normalization": val_config.normalization,
                    "validation.evaluators": [_callable_name(e) for e in val_config.evaluators],
                }
            )
        settings.update(extra or {})
        return fit_settings.plain(settings)

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse (:class:`~hiad_pl.fit_settings.SettingsChangedError`) when the folder was fitted with other ``settings``."""
        saved = fit_settings.load(self.settings_path)
        if saved is None:
            if self.tasks_path.is_file():
                log.warning(
                    "%s was fitted by an earlier hiad-pl without %s: its settings cannot be compared; resuming "
                    "with this run's settings (fit with --refit true to start again)", self.root, fit_settings.SETTINGS_NAME
                )
            return
        changed = fit_settings.differences(saved, settings)
        if changed:
            raise fit_settings.SettingsChangedError(
                f"{self.root} was fitted with other settings ({'; '.join(changed)}); its models are kept: "
                "rerun with --refit true (fit(refit=True)) to discard them and fit again, or use another run folder"
            )

    def discard_fitted(self) -> None:
        """Remove everything the folder holds (models, tasks, routing, logs) before a refit.

        The old contents are first renamed into one hidden folder (each rename is atomic),
        the new settings file replaces the old one only after that, and the hidden folder is
        deleted last; the old settings file goes only after every model has gone: a crash
        leaves old models under their own settings, or none, never old models under new settings.
        A leftover hidden folder is deleted by the next fit.
        """
        if not self.root.is_dir():
            return
        keep = {fit_settings.SETTINGS_NAME, fit_settings.HOLDOUT_NAME, LOCK_NAME}
        trash = self.root / f"{DISCARDED_PREFIX}{uuid.uuid4().hex[:8]}"
        entries = [p for p in self.root.iterdir() if p.name not in keep and not p.name.startswith(DISCARDED_PREFIX)]
        if entries:
            trash.mkdir()
            for entry in entries:
                entry.replace(trash / entry.name)
            log.info("%s: discarded %d old entries for the refit", self.root, len(entries))
        self.settings_path.unlink(missing_ok=True)

    def _remove_discarded(self) -> None:
        for leftover in self.root.glob(f"{DISCARDED_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    @locks_root
    def fit(
        self,
        train_samples: Sequence[HRSample],
        devices: Sequence[int | str] | None = None,
        val_config: ValidationConfig | dict | None = None,
        resume: bool = True,
        launcher: str | Launcher = "local",
        ray: RayOptions | dict | None = None,
        refit: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> list[Path]:
        """Fit every pending task; returns the final checkpoints of all tasks.

        With ``resume`` (the default) fitted tasks are skipped and interrupted
        gradient-trained tasks continue from their last epoch; without it, a
        model folder that already holds checkpoints is an error, never overwritten.
        A folder fitted with other settings (:meth:`fit_settings`, with ``settings``
        added by the caller) is refused with the differences listed; with ``refit``
        its models are discarded and every task is fitted again.
        A model folder that another live process is fitting is refused.
        ``launcher`` says where the fits run (``local`` processes or ``ray``, see
        :mod:`hiad_pl.launchers`; ``ray`` takes :class:`~hiad_pl.config.RayOptions`).
        """
        if not train_samples:
            raise DatasetError("no training samples")
        devices = resolve_devices(devices)
        val_config = ValidationConfig.from_any(val_config)
        if val_config is None and any(t.is_thumbnail for t in self.tasks):
            val_config = default_validation()
            log.warning(
                "the thumbnail branch is merged with the patch maps on the [0, 1] scale of validation "
                "statistics; no validation set was given, so %.0f%% of the training images are held out "
                "with synthetic boxes (RandomBoxSynthesizer)", 100 * val_config.val_sample_ratio
            )
        self.check()
        current = self.fit_settings(train_samples, val_config, settings)
        if refit:
            self.discard_fitted()
        else:
            self.check_settings(current)
        if not resume and any((self.root / "checkpoints").glob("**/*.ckpt")):
            raise ConfigError(
                f"{self.root} already holds checkpoints: resume, refit (--refit true), or choose another run folder"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.root)
        if self.tasks_path.is_file():
            saved = [t.todict() for t in load_tasks(self.tasks_path)]
            if saved != [t.todict() for t in self.tasks]:
                raise fit_settings.SettingsChangedError(
                    f"{self.tasks_path}: this model folder was fitted with other tasks ({len(saved)} -> "
                    f"{len(self.tasks)} tasks); rerun with --refit true to fit again, or use another run folder"
                )
        atomic_write(self.settings_path, fit_settings.dumps(current))
        self._remove_discarded()
        save_tasks(self.tasks, self.tasks_path)
        pending = self.pending_tasks()
        done = len(self.tasks) - len(pending)
        if done:
            log.info("%d task(s) already fitted in %s, skipped", done, self.root)
        self._route_retrieval_once(pending, list(train_samples), val_config)
        if pending:
            make_launcher(launcher, devices, ray).fit(self, pending, list(train_samples), val_config)
        return [self.checkpoint_path(t) for t in self.tasks]

    def fit_task(
        self,
        task: Task,
        train_samples: list[HRSample],
        device: str,
        val_config: ValidationConfig | None = None,
        progress: bool = False,
    ) -> Path:
        """Fit one task and write its final checkpoint atomically."""
        keep_freed_memory()
        L.seed_everything(self.seed, workers=True, verbose=False)
        detector = self.build_detector(task)
        fit_samples, val_samples = self._split(train_samples, val_config)
        gradient = not getattr(detector, "fits_in_one_pass", False)
        indexes, train_items, val_items = list(task.indexes), None, None
        margin = 0 if task.is_thumbnail else self.context_margin
        if task.centers is not None:
            indexes, train_items = self._retrieval_items(detector, task, fit_samples)
            if val_samples:
                val_items = self._retrieval_items(detector, task, val_samples, validation=True)[1]
        data = HighResDataModule(
            fit_samples,
            indexes=indexes,
            train_items=train_items,
            val_items=val_items,
            thumbnail_size=task.thumbnail_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=gradient,
            val_samples=val_samples,
            val_synthesizer=None if val_config is None else val_config.anomaly_syn_fn,
            max_val_patches=None if val_config is None else val_config.max_patch_number,
            seed=self.seed,
            train_synthesizer=detector.training_synthesizer() if hasattr(detector, "training_synthesizer") else None,
            context_margin=margin,
        )
        if data.has_validation and not task.is_thumbnail and data.num_val_patches < MIN_RELIABLE_VALIDATION_PATCHES:
            log.warning(
                "%s: only %d validation patches: its normalisation statistics (the top of normal scores, the "
                "largest anomalous score) rest on few samples and may not match the other tasks'; hold out "
                "more images (val_sample_ratio) or use fewer tasks",
                task.name,
                data.num_val_patches,
            )
        _, size = self._config_for(task)
        callbacks: list[Callback] = [RunInfo(class_path(self.detector_class), task, size, margin)]
        epoch_dir = self.root / "checkpoints" / task.name
        if gradient:
            from hiad_pl.callbacks import epoch_checkpoint

            callbacks.append(epoch_checkpoint(epoch_dir, validated=val_config is not None and data.has_validation))
        callbacks.extend(self._validation_callbacks(detector, data, val_config))
        callbacks.extend(task_callbacks(self.trainer_kwargs.get("callbacks")))
        options: dict[str, Any] = {
            "enable_progress_bar": progress,
            "enable_model_summary": False,
            "enable_checkpointing": gradient,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
        }
        options.update(detector.trainer_defaults())
        options.update(self.detectors.branch(task.is_thumbnail).trainer)
        options.update({k: v for k, v in self.trainer_kwargs.items() if k not in PER_TASK_TRAINER_KEYS})
        quiet_lightning_tips()
        trainer = L.Trainer(
            **options,
            **lightning_device(device),
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            logger=task_loggers(self.trainer_kwargs.get("logger"), task.name, self.root, self.log_root),
            default_root_dir=str(self.root),
        )
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
        self._finish_fit(trainer, detector, data)
        path = self.checkpoint_path(task)
        atomic_save_checkpoint(trainer, path)
        return path

    def _split(self, samples: list[HRSample], val_config: ValidationConfig | None) -> tuple[list[HRSample], list[HRSample]]:
        """Fitting and validation images (no validation images without a validation config)."""
        if val_config is None:
            return samples, []
        return split_validation(samples, val_config.val_sample_ratio, self.seed)

    def _route_retrieval_once(self, tasks: list[Task], samples: list[HRSample], val_config: ValidationConfig | None) -> None:
        """Route the patches of retrieval tasks before fitting them, so that worker processes share one routing."""
        task = next((t for t in tasks if t.centers is not None), None)
        if task is None:
            return
        detector = self.build_detector(task)
        fit_samples, val_samples = self._split(samples, val_config)
        self._retrieval_items(detector, task, fit_samples)
        if val_samples:
            self._retrieval_items(detector, task, val_samples, validation=True)

    def _retrieval_routing_path(self, paths: tuple[str, ...], validation: bool) -> Path:
        """Where the routing of these images is kept: it depends on the images, tasks and detector config."""
        key = json.dumps(
            [
                paths,
                [t.todict() for t in self.tasks if not t.is_thumbnail],
                class_path(self.detector_class),
                self.detectors.patch.options,
                self.detectors.patch.size,
                self.fusion_weights,
                self.context_margin,
            ],
            sort_keys=True,
            default=repr,
        )
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        return self.root / "retrieval" / f"{'validation' if validation else 'training'}-{digest}.json"

    def _retrieval_items(
        self, detector: L.LightningModule, task: Task, samples: list[HRSample], validation: bool = False
    ) -> tuple[list, list[int]]:
        """The grid and the items of ``samples`` routed to a retrieval task (computed once per model folder).

        Patches are routed with the rule inference uses, by a fresh detector:
        its frozen backbone embeds exactly as the fitted one will. Training
        patches go to their ``train_top_k`` nearest tasks; validation patches
        only to the nearest, where inference would send them, so each task is
        validated and normalised on the patches it will score. A task that no
        validation patch is routed to is validated at its own positions.
        The routing is kept in memory and in ``<root>/retrieval/``, so that every
        task, worker process and rerun reads it instead of embedding every
        training patch again.
        """
        paths = tuple(s.get_image_path() for s in samples)
        if validation not in self._retrieval_cache or self._retrieval_cache[validation][0] != paths:
            saved = self._retrieval_routing_path(paths, validation)
            if saved.is_file():
                data = json.loads(saved.read_text(encoding="utf-8"))
                routed = ([MultiResolutionIndex.from_str(i) for i in data["grid"]], data["items"])
            else:
                patch_tasks = [t for t in self.tasks if not t.is_thumbnail]
                top_k = 1 if validation else None
                routed = retrieval_train_items(detector, samples, patch_tasks, self.batch_size, top_k, self.context_margin)
                atomic_write(saved, json.dumps({"grid": [str(i) for i in routed[0]], "items": routed[1]}))
            self._retrieval_cache[validation] = (paths, routed)
        grid, items = self._retrieval_cache[validation][1]
        chosen = items[task.name]
        if validation and not chosen:
            own = {str(i) for i in task.indexes}
            chosen = [n * len(grid) + k for n in range(len(samples)) for k, i in enumerate(grid) if str(i) in own]
            log.info("%s: no validation patch is routed to this task; validating it at its own positions", task.name)
        return grid, chosen

    def _validation_callbacks(
        self, detector: L.LightningModule, data: HighResDataModule, val_config: ValidationConfig | None
    ) -> list[Callback]:
        """Checkpoint selection and early stopping on the validation set (none without one)."""
        if val_config is None:
            return []
        from hiad_pl.callbacks import validation_callbacks

        return validation_callbacks(detector, data, val_config, self.early_stop_epochs)

    def _finish_fit(self, trainer: L.Trainer, detector: L.LightningModule, data: HighResDataModule) -> None:
        """Hook after fitting: restore the best validated weights when a selector kept them."""
        # Trainer.callbacks is public but assigned by Lightning's callback connector, undeclared on the class
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            restore = getattr(callback, "restore_best", None)
            if callable(restore):
                restore(trainer, detector)

    # -------------------------------------------------------------- inference
    def load(self, device: str = "cpu") -> None:
        """Load tasks and every task's detector onto ``device``; frozen backbones are shared.

        :attr:`context_margin` becomes the one the patch tasks were fitted with
        (0 for checkpoints written before the option existed).

        Raises:
            ValueError: when the patch tasks were fitted with different context margins.
        """
        self.tasks = load_tasks(self.tasks_path)
        backbones: dict[tuple, torch.nn.Module] = {}
        margins: set[int] = set()
        missing = [t.name for t in self.tasks if not self.checkpoint_path(t).is_file()]
        if missing:
            raise MissingFileError(f"{self.root}: tasks {missing} have no checkpoint; run fit first")
        for task in self.tasks:
            path = self.checkpoint_path(task)
            checkpoint = load_checkpoint(path, task.name)
            info = checkpoint.get(RUN_INFO_KEY, {})
            cls = import_class(info["detector_class"]) if "detector_class" in info else self.detector_class
            detector = cls.load_from_checkpoint(path, map_location=device, weights_only=True)
            detector.eval().to(device)
            # One frozen backbone per run, however many tasks (dedupe as they load: two copies at most).
            share_frozen_backbones([detector], backbones)
            self._detectors[task.name] = detector
            self._normalization[task.name] = info.get("normalization")
            if not task.is_thumbnail:
                margins.add(int(info.get("context_margin", 0)))
        if len(margins) > 1:
            raise ValueError(f"{self.root}: the patch tasks were fitted with different context margins {sorted(margins)}")
        self.context_margin = margins.pop() if margins else 0
        self._share_normalization()

    def _share_normalization(self) -> None:
        """Give the patch tasks pooled statistics when they were fitted with ``normalization: shared``."""
        from hiad_pl.callbacks import pooled_statistics

        patch = [t.name for t in self.tasks if not t.is_thumbnail]
        stats = [self._normalization.get(name) for name in patch]
        if not any(s is not None and s.get("scope") == "shared" for s in stats):
            return
        if any(s is None for s in stats):
            return  # some task lacks statistics: scores stay raw (see ``normalized``)
        pooled = pooled_statistics(stats)
        for name in patch:
            self._normalization[name] = {**self._normalization[name], **pooled}

    @property
    def normalized(self) -> bool:
        """Whether every task has validation statistics, so scores lie in [0, 1]."""
        return bool(self._normalization) and all(v is not None for v in self._normalization.values())

    def detector(self, task_name: str) -> L.LightningModule:
        """The loaded detector of the task named ``task_name`` (see :meth:`load`)."""
        if task_name not in self._detectors:
            raise KeyError(f"{self.root}: no loaded detector for task {task_name!r}; call load() first")
        return self._detectors[task_name]

    def normalization(self, task_name: str) -> dict | None:
        """Validation statistics ``{low, high, ...}`` scores of ``task_name`` are normalised with (``None``: raw scores)."""
        return self._normalization.get(task_name) if self.normalized else None

    def pipeline(self, device: str = "cpu", prefetch: int | None = None, images_per_step: int | None = None) -> InferencePipeline:
        """The inference pipeline over the loaded detectors (loads them first if needed; ``prefetch`` and
        ``images_per_step``: see :class:`InferencePipeline`)."""
        if not self._detectors:
            self.load(device)
        stats = {name: self.normalization(name) for name in self._normalization}
        return InferencePipeline(
            self.tasks,
            self._detectors,
            stats,
            self.batch_size,
            device,
            prefetch=prefetch,
            images_per_step=images_per_step,
            context_margin=self.context_margin,
        )

    def detached(self) -> TaskOrchestrator:
        """A copy without loaded detectors, cheap to send to another process."""
        clone = copy.copy(self)
        clone._detectors, clone._normalization = {}, {}
        return clone

    def predict(self, samples: Sequence[HRSample], device: str = "cpu") -> Iterator[Prediction]:
        """Predictions for each sample, one at a time (maps are not accumulated)."""
        yield from self.pipeline(device).predict(samples)


def collect(
    predictions: Iterator[Prediction], count: int, store: ArrayStore | None = None, offset: int = 0
) -> tuple[np.ndarray, ArrayStore]:
    """Image scores and float16 maps of all predictions (float16 halves memory at 4K).

    The maps go into ``store`` (slots ``offset`` to ``offset + count``; default a
    new :class:`~hiad_pl.utils.array_store.ArrayStore` of ``count``), which keeps
    them in memory up to its budget and on disk beyond it.
    """
    scores = np.zeros(count, dtype=np.float64)
    maps = ArrayStore(count) if store is None else store
    for prediction in predictions:
        scores[prediction.sample_id] = prediction.score
        maps[offset + prediction.sample_id] = prediction.anomaly_map.numpy().astype(np.float16)
    return scores, maps
