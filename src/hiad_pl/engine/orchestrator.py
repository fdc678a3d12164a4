"""TaskOrchestrator: fits one detector per task across devices, then scores whole images.

It composes the engine's parts and keeps only the order of a fit:

- :class:`~hiad_pl.engine.run_folder.ModelFolder`: the folder's layout, its lock, and
  whether a fit may resume in it (``fit_settings.json``, ``tasks.json``, refits);
- :class:`~hiad_pl.engine.routing.RetrievalRouting`: the patches of retrieval tasks;
- :class:`~hiad_pl.engine.task_trainer.TaskTrainer`: one task's Lightning fit;
- :mod:`~hiad_pl.engine.launchers`: where the task fits run (local processes, Ray);
- :class:`~hiad_pl.engine.loading.FittedModels`: the fitted detectors and the inference pipeline.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from hiad_pl import fit_settings
from hiad_pl.config import DetectorConfig, RayOptions, check_trainer_options, class_path
from hiad_pl.data.datamodule import MIN_RELIABLE_VALIDATION_PATCHES, HighResDataModule, split_validation
from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionIndex, as_pair, check_context_margin
from hiad_pl.detectors.base import HRDetector
from hiad_pl.engine.launchers import Launcher, make_launcher, resolve_devices
from hiad_pl.engine.loading import FittedModels
from hiad_pl.engine.routing import RetrievalRouting
from hiad_pl.engine.run_folder import ModelFolder, locks_root
from hiad_pl.engine.task_trainer import RunInfo, TaskTrainer
from hiad_pl.engine.validation import ValidationConfig, callable_name, default_validation
from hiad_pl.errors import ConfigError, DatasetError, UserError
from hiad_pl.inference import InferencePipeline, Prediction
from hiad_pl.tasks.base import Task, thumbnail_task
from hiad_pl.utils.allocator import keep_freed_memory
from hiad_pl.utils.array_store import ArrayStore

log = logging.getLogger("hiad_pl")


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
        self.detector_class: type[HRDetector] = detectors.detector_class
        self.root = Path(root)
        self.folder = ModelFolder(self.root)
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
        thumbnail = detectors.thumbnail
        if thumbnail is not None and not any(t.is_thumbnail for t in self.tasks):
            if thumbnail.size is None:
                raise ConfigError("the thumbnail branch needs thumbnail_size")
            self.tasks.append(thumbnail_task(thumbnail.size))
        self.task_trainer = TaskTrainer(self.trainer_kwargs, self.root, self.log_root, self.early_stop_epochs)
        self.routing = RetrievalRouting(
            self.folder.retrieval_dir,
            [
                [t.todict() for t in self.tasks if not t.is_thumbnail],
                class_path(self.detector_class),
                self.detectors.patch.options,
                self.detectors.patch.size,
                self.fusion_weights,
                self.context_margin,
            ],
            self.batch_size,
            self.context_margin,
        )
        self.models = FittedModels(self.folder, self.detector_class)

    # ------------------------------------------------------------------ paths
    @property
    def tasks_path(self) -> Path:
        """``tasks.json``."""
        return self.folder.tasks_path

    @property
    def settings_path(self) -> Path:
        """``fit_settings.json``: the settings the folder's models were fitted with."""
        return self.folder.settings_path

    def checkpoint_path(self, task: Task) -> Path:
        """Final checkpoint of a task."""
        return self.folder.checkpoint_path(task)

    # --------------------------------------------------------------- building
    def _input_size(self, task: Task) -> tuple[int, int]:
        """The patch size ``task``'s detector is built for (a patch task's widened by the context margin)."""
        if task.thumbnail_size is not None:
            return task.thumbnail_size
        if task.indexes:
            main = task.indexes[0].main_index
            return (main.width + 2 * self.context_margin, main.height + 2 * self.context_margin)
        branch = self.detectors.branch(task.is_thumbnail)
        return as_pair(512 if branch.size is None else branch.size, "patch_size")

    def build_detector(self, task: Task) -> HRDetector:
        """A fresh detector for ``task`` (validates the config: backbone, weights, layers)."""
        kwargs = dict(self.detectors.branch(task.is_thumbnail).options)
        fusion = None if task.is_thumbnail else self.fusion_weights
        if fusion is not None:
            kwargs["fusion_weights"] = fusion
        try:
            return self.detector_class(input_size=self._input_size(task), **kwargs)
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
        return self.folder.pending(self.tasks)

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
                    "validation.evaluators": [callable_name(e) for e in val_config.evaluators],
                }
            )
        settings.update(extra or {})
        return fit_settings.plain(settings)

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse (:class:`~hiad_pl.fit_settings.SettingsChangedError`) when the folder was fitted with other ``settings``."""
        self.folder.check_settings(settings)

    def discard_fitted(self) -> None:
        """Remove the folder's models, tasks, routing and logs before a refit (see :meth:`ModelFolder.discard_fitted`)."""
        self.folder.discard_fitted()

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
        :mod:`hiad_pl.engine.launchers`; ``ray`` takes :class:`~hiad_pl.config.RayOptions`).
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
        self.folder.prepare_fit(self.tasks, self.fit_settings(train_samples, val_config, settings), resume, refit)
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
        data = self._data_module(task, detector, train_samples, val_config)
        size = self._input_size(task)
        margin = 0 if task.is_thumbnail else self.context_margin
        return self.task_trainer.fit(
            task,
            detector,
            data,
            val_config,
            device,
            self.detectors.branch(task.is_thumbnail).trainer,
            RunInfo(class_path(self.detector_class), task, size, margin),
            self.folder.epoch_dir(task),
            self.checkpoint_path(task),
            progress,
        )

    def _data_module(
        self, task: Task, detector: HRDetector, train_samples: list[HRSample], val_config: ValidationConfig | None
    ) -> HighResDataModule:
        """The task's training (and validation) patches: its own positions, or those routed to it."""
        fit_samples, val_samples = self._split(train_samples, val_config)
        indexes, train_items, val_items = list(task.indexes), None, None
        if task.centers is not None:
            indexes, train_items = self.routed_items(detector, task, fit_samples)
            if val_samples:
                val_items = self.routed_items(detector, task, val_samples, validation=True)[1]
        data = HighResDataModule(
            fit_samples,
            indexes=indexes,
            train_items=train_items,
            val_items=val_items,
            thumbnail_size=task.thumbnail_size,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=not detector.fits_in_one_pass,
            val_samples=val_samples,
            val_synthesizer=None if val_config is None else val_config.anomaly_syn_fn,
            max_val_patches=None if val_config is None else val_config.max_patch_number,
            seed=self.seed,
            train_synthesizer=detector.training_synthesizer(),
            context_margin=0 if task.is_thumbnail else self.context_margin,
        )
        if data.has_validation and not task.is_thumbnail and data.num_val_patches < MIN_RELIABLE_VALIDATION_PATCHES:
            log.warning(
                "%s: only %d validation patches: its normalisation statistics (the top of normal scores, the "
                "largest anomalous score) rest on few samples and may not match the other tasks'; hold out "
                "more images (val_sample_ratio) or use fewer tasks",
                task.name,
                data.num_val_patches,
            )
        return data

    def _split(self, samples: list[HRSample], val_config: ValidationConfig | None) -> tuple[list[HRSample], list[HRSample]]:
        """Fitting and validation images (no validation images without a validation config)."""
        if val_config is None:
            return samples, []
        return split_validation(samples, val_config.val_sample_ratio, self.seed)

    def routed_items(
        self, detector: HRDetector | None, task: Task, samples: Sequence[HRSample], validation: bool = False
    ) -> tuple[list[MultiResolutionIndex], list[int]]:
        """The grid and the items of ``samples`` routed to the retrieval task ``task`` (see :class:`RetrievalRouting`)."""
        patch_tasks = [t for t in self.tasks if not t.is_thumbnail]
        return self.routing.items(detector, task, patch_tasks, samples, validation)

    def _route_retrieval_once(self, tasks: list[Task], samples: list[HRSample], val_config: ValidationConfig | None) -> None:
        """Route the patches of retrieval tasks before fitting them, so that worker processes share one routing."""
        task = next((t for t in tasks if t.centers is not None), None)
        if task is None:
            return
        detector = self.build_detector(task)
        fit_samples, val_samples = self._split(samples, val_config)
        self.routed_items(detector, task, fit_samples)
        if val_samples:
            self.routed_items(detector, task, val_samples, validation=True)

    # -------------------------------------------------------------- inference
    def load(self, device: str = "cpu") -> None:
        """Load tasks and every task's detector onto ``device``; frozen backbones are shared.

        :attr:`tasks` become the folder's and :attr:`context_margin` the one the patch
        tasks were fitted with (0 for checkpoints written before the option existed).

        Raises:
            ValueError: when the patch tasks were fitted with different context margins.
        """
        self.models.load(device)
        self.tasks = list(self.models.tasks)
        self.context_margin = self.models.context_margin

    @property
    def normalized(self) -> bool:
        """Whether every task has validation statistics, so scores lie in [0, 1]."""
        return self.models.normalized

    def detector(self, task_name: str) -> HRDetector:
        """The loaded detector of the task named ``task_name`` (see :meth:`load`)."""
        return self.models.detector(task_name)

    def normalization(self, task_name: str) -> dict | None:
        """Validation statistics ``{low, high, ...}`` scores of ``task_name`` are normalised with (``None``: raw scores)."""
        return self.models.normalization(task_name)

    def pipeline(self, device: str = "cpu", prefetch: int | None = None, images_per_step: int | None = None) -> InferencePipeline:
        """The inference pipeline over the loaded detectors (loads them first if needed; ``prefetch`` and
        ``images_per_step``: see :class:`InferencePipeline`)."""
        if not self.models.loaded:
            self.load(device)
        return self.models.pipeline(self.batch_size, device, prefetch=prefetch, images_per_step=images_per_step)

    def detached(self) -> TaskOrchestrator:
        """A copy without loaded detectors, cheap to send to another process."""
        clone = copy.copy(self)
        clone.models = FittedModels(self.folder, self.detector_class)
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
