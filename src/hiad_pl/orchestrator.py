"""TaskOrchestrator: fits one detector per task across devices, then scores whole images.

A model folder holds everything inference needs::

    <root>/tasks.json                 the tasks (patch indexes, retrieval centres, thumbnail)
    <root>/checkpoints/<task>.ckpt    one Lightning checkpoint per task, written atomically
    <root>/checkpoints/<task>/        per-epoch checkpoints of gradient-trained detectors (resume)
    <root>/tensorboard/<task>/        one TensorBoard run per task (or <log_root>/<task>/)

A rerun skips tasks whose final checkpoint exists and resumes interrupted ones.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.datamodule import (
    MIN_RELIABLE_VALIDATION_PATCHES,
    HighResDataModule,
    patch_to_batch,
    split_validation,
)
from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import as_pair, stitch
from hiad_pl.postprocess import gaussian_blur, image_score, normalize_scores, upsample
from hiad_pl.tasks.base import Task, load_tasks, save_tasks, thumbnail_task

log = logging.getLogger("hiad_pl")

SIZE_KEYS = ("patch_size", "thumbnail_size")
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
RESERVED_TRAINER_KEYS = ("accelerator", "devices", "strategy", "logger", "default_root_dir")


def class_path(cls: type) -> str:
    """``module.Name`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str) -> type:
    """Import ``module.Name``."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import {path!r}: {error}") from error


def detector_class_of(detector_class: type | str) -> type:
    """A detector class from itself, its registered short name, class name or import path."""
    from hiad_pl.detectors import get_detector  # the registry imports every built-in detector

    if isinstance(detector_class, type):
        return detector_class
    try:
        return get_detector(detector_class)
    except ValueError:
        return import_class(detector_class)  # a base class such as HRDetector itself (inference only)


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
                raise ValueError(f"GPU id {device} requested but CUDA is not available; use gpu_ids=[] for CPU")
            if int(device) >= torch.cuda.device_count():
                raise ValueError(f"GPU id {device} requested but only {torch.cuda.device_count()} GPU(s) are visible")
            resolved.append(f"cuda:{int(device)}")
        elif str(device) == "cpu" or str(device).startswith("cuda"):
            resolved.append(str(device))
        else:
            raise ValueError(f"unknown device {device!r}: use GPU ids (0, 1, ...) or 'cpu'")
    return resolved


def lightning_device(device: str) -> dict[str, Any]:
    """Trainer ``accelerator``/``devices`` for a torch device string."""
    if device.startswith("cuda"):
        return {"accelerator": "gpu", "devices": [int(device.split(":")[1]) if ":" in device else 0]}
    return {"accelerator": "cpu", "devices": 1}


def atomic_save_checkpoint(trainer: L.Trainer, path: Path) -> None:
    """Save the trainer's checkpoint so that ``path`` is either absent or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)  # keep callback entries (run info)
    os.replace(tmp, path)


class RunInfo(Callback):
    """Writes what inference needs besides the weights into every checkpoint."""

    def __init__(self, detector_class: str, task: Task, input_size: tuple[int, int]) -> None:
        self.info = {"detector_class": detector_class, "task": task.name, "input_size": list(input_size)}

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
            raise ValueError(f"val_config normalization must be one of {NORMALIZATION_SCOPES}, got {self.normalization!r}")

    @staticmethod
    def from_any(value: "ValidationConfig | dict | None") -> "ValidationConfig | None":
        """Accept the tutorial's dict or an instance."""
        if value is None or isinstance(value, ValidationConfig):
            return value
        unknown = set(value) - {"anomaly_syn_fn", "val_sample_ratio", "max_patch_number", "evaluators", "normalization"}
        if unknown:
            raise ValueError(f"val_config has unknown keys {sorted(unknown)}")
        if "anomaly_syn_fn" not in value:
            raise ValueError("val_config needs 'anomaly_syn_fn' (a synthesiser from hiad_pl.syn)")
        return ValidationConfig(**value)


def default_validation() -> ValidationConfig:
    """Validation set used when one is needed (thumbnail branch) but none was configured."""
    from hiad_pl.syn import RandomBoxSynthesizer

    return ValidationConfig(RandomBoxSynthesizer(p=0.5, seed=0), val_sample_ratio=0.2, max_patch_number=200)


@dataclass
class Prediction:
    """The result for one image."""

    sample_id: int
    anomaly_map: torch.Tensor  # [H, W] float32, blurred
    score: float


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
        num_workers: data loader workers per task.
        early_stop_epochs: stop a gradient-trained detector after this many validations without improvement (-1: never).
        log_root: TensorBoard folder (default ``<root>/tensorboard``); each task logs to ``<log_root>/<task>``.
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
    ) -> None:
        self.detector_class = detector_class_of(detector_class)
        self.patch_config = dict(patch_config)
        self.thumbnail_config = None if thumbnail_config is None else dict(thumbnail_config)
        self.root = Path(root)
        self.log_root = self.root / "tensorboard" if log_root is None else Path(log_root)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.fusion_weights = None if fusion_weights is None else [float(w) for w in fusion_weights]
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.num_workers = int(num_workers)
        self.early_stop_epochs = int(early_stop_epochs)
        clash = sorted(set(self.trainer_kwargs) & set(RESERVED_TRAINER_KEYS))
        if clash:
            raise ValueError(f"trainer options {clash} are set by hiad-pl per task; choose devices with gpu_ids/devices")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tasks = list(tasks)
        if self.thumbnail_config is not None and not any(t.is_thumbnail for t in self.tasks):
            if "thumbnail_size" not in self.thumbnail_config:
                raise ValueError("the thumbnail config needs 'thumbnail_size'")
            self.tasks.append(thumbnail_task(self.thumbnail_config["thumbnail_size"]))
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
        config = self.thumbnail_config if task.is_thumbnail else self.patch_config
        if config is None:
            raise ValueError(f"task {task.name!r} is a thumbnail task but no thumbnail config was given")
        if task.is_thumbnail:
            size = task.thumbnail_size
        elif task.indexes:
            main = task.indexes[0].main_index
            size = (main.width, main.height)
        else:
            size = as_pair(config.get("patch_size", 512), "patch_size")
        kwargs = {k: v for k, v in config.items() if k not in SIZE_KEYS}
        return kwargs, size

    def build_detector(self, task: Task) -> L.LightningModule:
        """A fresh detector for ``task`` (validates the config: backbone, weights, layers)."""
        kwargs, size = self._config_for(task)
        fusion = None if task.is_thumbnail else self.fusion_weights
        if fusion is not None:
            kwargs["fusion_weights"] = fusion
        try:
            return self.detector_class(input_size=size, **kwargs)
        except TypeError as error:
            raise ValueError(f"{self.detector_class.__name__}: bad config for task {task.name!r}: {error}") from error

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

    def fit(
        self,
        train_samples: Sequence[HRSample],
        devices: Sequence[int | str] | None = None,
        val_config: ValidationConfig | dict | None = None,
        resume: bool = True,
    ) -> list[Path]:
        """Fit every pending task; returns the final checkpoints of all tasks.

        With ``resume`` (the default) fitted tasks are skipped and interrupted
        gradient-trained tasks continue from their last epoch; without it, a
        model folder that already holds checkpoints is an error, never overwritten.
        """
        if not train_samples:
            raise ValueError("no training samples")
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
        if not resume and any((self.root / "checkpoints").glob("**/*.ckpt")):
            raise ValueError(f"{self.root} already holds checkpoints: resume, or choose another run folder")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.tasks_path.is_file():
            saved = [t.todict() for t in load_tasks(self.tasks_path)]
            if saved != [t.todict() for t in self.tasks]:
                raise ValueError(
                    f"{self.tasks_path}: this model folder was fitted with other tasks; "
                    "use a new run folder or delete the old one"
                )
        save_tasks(self.tasks, self.tasks_path)
        pending = self.pending_tasks()
        done = len(self.tasks) - len(pending)
        if done:
            log.info("%d task(s) already fitted in %s, skipped", done, self.root)
        if len(devices) == 1 or len(pending) <= 1:
            for task in pending:
                self.fit_task(task, list(train_samples), devices[0], val_config, progress=True)
        else:
            self._fit_parallel(pending, list(train_samples), devices, val_config)
        return [self.checkpoint_path(t) for t in self.tasks]

    def _fit_parallel(
        self, tasks: list[Task], samples: list[HRSample], devices: list[str], val_config: ValidationConfig | None
    ) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        queue = ctx.Manager().Queue()
        for device in devices:
            queue.put(device)
        threads = max(1, (os.cpu_count() or 1) // len(devices))
        with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_claim_device, initargs=(queue, threads)) as pool:
            futures = [pool.submit(_fit_in_worker, self, task, samples, val_config) for task in tasks]
            for future in futures:
                future.result()

    def fit_task(
        self,
        task: Task,
        train_samples: list[HRSample],
        device: str,
        val_config: ValidationConfig | None = None,
        progress: bool = False,
    ) -> Path:
        """Fit one task and write its final checkpoint atomically."""
        L.seed_everything(self.seed, workers=True, verbose=False)
        detector = self.build_detector(task)
        fit_samples, val_samples = train_samples, []
        if val_config is not None:
            fit_samples, val_samples = split_validation(train_samples, val_config.val_sample_ratio, self.seed)
        gradient = not getattr(detector, "fits_in_one_pass", False)
        indexes, train_items, val_items = list(task.indexes), None, None
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
        callbacks: list[Callback] = [RunInfo(class_path(self.detector_class), task, size)]
        epoch_dir = self.root / "checkpoints" / task.name
        if gradient:
            callbacks.append(ModelCheckpoint(dirpath=epoch_dir, filename="epoch{epoch:03d}", save_last=True, save_top_k=1))
        callbacks.extend(self._validation_callbacks(detector, data, val_config))
        options: dict[str, Any] = {
            "enable_progress_bar": progress,
            "enable_model_summary": False,
            "enable_checkpointing": gradient,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
        }
        options.update(detector.trainer_defaults())
        options.update(self.trainer_kwargs)
        trainer = L.Trainer(
            **options,
            **lightning_device(device),
            callbacks=callbacks,
            logger=TensorBoardLogger(save_dir=str(self.log_root), name="", version=task.name),
            default_root_dir=str(self.root),
        )
        last = epoch_dir / "last.ckpt"
        resume = str(last) if gradient and last.is_file() else None
        if resume:
            log.info("%s: resuming from %s", task.name, last)
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            if gradient:
                trainer.fit(detector, datamodule=data, ckpt_path=resume)
            else:
                # one pass: the memory bank is built at the end of the epoch, so validate after fitting
                trainer.fit(detector, train_dataloaders=data.train_dataloader())
                if data.has_validation:
                    trainer.validate(detector, dataloaders=data.val_dataloader(), verbose=False)
        self._finish_fit(trainer, detector, data)
        path = self.checkpoint_path(task)
        atomic_save_checkpoint(trainer, path)
        return path

    def _retrieval_items(
        self, detector: L.LightningModule, task: Task, samples: list[HRSample], validation: bool = False
    ) -> tuple[list, list[int]]:
        """The grid and the items of ``samples`` routed to a retrieval task (computed once per process).

        Patches are routed with the rule inference uses, by a fresh detector:
        its frozen backbone embeds exactly as the fitted one will. Training
        patches go to their ``train_top_k`` nearest tasks; validation patches
        only to the nearest, where inference would send them, so each task is
        validated and normalised on the patches it will score. A task that no
        validation patch is routed to is validated at its own positions.
        """
        from hiad_pl.tasks.retrieval import retrieval_train_items

        paths = tuple(s.get_image_path() for s in samples)
        if validation not in self._retrieval_cache or self._retrieval_cache[validation][0] != paths:
            patch_tasks = [t for t in self.tasks if not t.is_thumbnail]
            top_k = 1 if validation else None
            routed = retrieval_train_items(detector, samples, patch_tasks, self.batch_size, top_k)
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
        for callback in trainer.callbacks:
            restore = getattr(callback, "restore_best", None)
            if callable(restore):
                restore(trainer, detector)

    # -------------------------------------------------------------- inference
    def load(self, device: str = "cpu") -> None:
        """Load tasks and every task's detector onto ``device``."""
        self.tasks = load_tasks(self.tasks_path)
        missing = [t.name for t in self.tasks if not self.checkpoint_path(t).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.root}: tasks {missing} have no checkpoint; run fit first")
        for task in self.tasks:
            path = self.checkpoint_path(task)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            info = checkpoint.get(RUN_INFO_KEY, {})
            cls = import_class(info["detector_class"]) if "detector_class" in info else self.detector_class
            detector = cls.load_from_checkpoint(path, map_location=device, weights_only=True)
            detector.eval().to(device)
            self._detectors[task.name] = detector
            self._normalization[task.name] = info.get("normalization")
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

    def _score_batches(self, task: Task, batches: list[PatchBatch], device: str) -> torch.Tensor:
        detector = self._detectors[task.name]
        merged = PatchBatch.collate(batches)
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(merged), self.batch_size):
                chunk = _slice_batch(merged, start, start + self.batch_size).to(device)
                outputs.append(detector.predict_step(chunk, 0).float().cpu())
        maps = torch.cat(outputs)
        stats = self._normalization.get(task.name) if self.normalized else None
        return maps if stats is None else normalize_scores(maps, stats["low"], stats["high"])

    def route(self, sample: HRSample, patch_tasks: list[Task]) -> list[tuple[Task, list]]:
        """Which indexes of ``sample`` each task scores (by position, or by retrieval)."""
        if any(t.centers is not None for t in patch_tasks):
            from hiad_pl.tasks.retrieval import route_by_retrieval

            return route_by_retrieval(self, sample, patch_tasks)
        return [(t, list(t.indexes)) for t in patch_tasks]

    def predict_sample(self, sample: HRSample, sample_id: int, device: str) -> Prediction:
        """Score one image: patch maps stitched, thumbnail merged, blurred, scored."""
        patch_tasks = [t for t in self.tasks if not t.is_thumbnail]
        with sample:
            width, height = sample.image_size
            maps, mains = [], []
            for task, indexes in self.route(sample, patch_tasks):
                if not indexes:
                    continue
                batches = [patch_to_batch(sample[i], sample_id) for i in indexes]
                maps.append(self._score_batches(task, batches, device))
                mains.extend(i.main_index for i in indexes)
            if mains and max(m.x + m.width for m in mains) > width or mains and max(m.y + m.height for m in mains) > height:
                raise ValueError(f"{sample.get_image_path()}: image size {width}x{height} is smaller than the task indexes")
            full = stitch(torch.cat(maps), mains, (width, height)).float() if maps else torch.zeros(height, width)
            for task in (t for t in self.tasks if t.is_thumbnail):
                thumb = self._score_batches(task, [patch_to_batch(sample.down_sampling_to_LR(task.thumbnail_size))], device)
                full = torch.maximum(full, upsample(thumb[0], (width, height))) if maps else upsample(thumb[0], (width, height))
        full = gaussian_blur(full)
        return Prediction(sample_id, full, float(image_score(full)))

    def predict(self, samples: Sequence[HRSample], device: str = "cpu") -> Iterator[Prediction]:
        """Predictions for each sample, one at a time (maps are not accumulated)."""
        if not self._detectors:
            self.load(device)
        for sample_id, sample in enumerate(samples):
            yield self.predict_sample(sample, sample_id, device)


def _slice_batch(batch: PatchBatch, start: int, stop: int) -> PatchBatch:
    values = {}
    for name, value in vars(batch).items():
        values[name] = value[start:stop] if value is not None else None
    return PatchBatch(**values)


_WORKER_DEVICE = "cpu"


def _claim_device(queue: Any, threads: int) -> None:
    global _WORKER_DEVICE
    _WORKER_DEVICE = queue.get()
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)


def _fit_in_worker(
    orchestrator: TaskOrchestrator, task: Task, samples: list[HRSample], val_config: ValidationConfig | None
) -> str:
    return str(orchestrator.fit_task(task, samples, _WORKER_DEVICE, val_config, progress=False))


def collect(predictions: Iterator[Prediction], count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image scores and float16 maps of all predictions (float16 halves memory at 4K)."""
    scores = np.zeros(count, dtype=np.float64)
    maps: list[np.ndarray] = [np.empty(0)] * count
    for prediction in predictions:
        scores[prediction.sample_id] = prediction.score
        maps[prediction.sample_id] = prediction.anomaly_map.numpy().astype(np.float16)
    return scores, maps
