"""HRTrainer: the tutorial's Python API, a thin face over :class:`TaskOrchestrator`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hiad_pl.calibration import (
    calibrate,
    model_thresholds,
    prepare_holdout,
    threshold_rule,
)
from hiad_pl.config import DEFAULT_CONTEXT_MARGIN, DetectorConfig, RayOptions, ThresholdSection
from hiad_pl.data.sample import HRSample
from hiad_pl.engine.launchers import make_launcher
from hiad_pl.errors import ConfigError, DatasetError
from hiad_pl.orchestrator import TaskOrchestrator, ValidationConfig, resolve_devices
from hiad_pl.outputs import (
    evaluate_predictions,
    run_inference,
    score_range,
    write_visualizations,
)
from hiad_pl.tasks.base import Task
from hiad_pl.utils.array_store import ArrayStore

log = logging.getLogger("hiad_pl")


class HRTrainer:
    """Train and apply one detector per task, as in the HiAD tutorial.

    ``HRTrainer(batch_size, tasks, detector_class, config, checkpoint_root,
    log_root, vis_root)`` then ``.train(train_samples, gpu_ids)`` and
    ``.inference(test_samples, gpu_ids, evaluators=...)``. ``gpu_ids=[]`` or
    ``None`` runs on the CPU.

    ``config`` is ``{'patch': ..., 'thumbnail': ...}``, each section a detector file of
    ``configs/`` as loaded by ``yaml.load`` (HiAD's option names; ``thumbnail_size`` set on
    the thumbnail section), read by :class:`~hiad_pl.config.DetectorConfig`. Without
    ``detector_class`` the files' ``class_path`` names the detector. ``vis_root=None``
    writes no visualisations. ``trainer_kwargs`` may hold ``logger`` and ``callbacks``
    as ``{class_path, init_args}`` specs, built fresh for every task. ``launcher="ray"``
    fits each task as a Ray task and scores test images in shards (``ray_options``:
    :class:`~hiad_pl.config.RayOptions`). ``threshold`` chooses the image and pixel
    thresholds after training (:class:`~hiad_pl.config.ThresholdSection`; by default F1-adaptive
    on the validation set when ``train`` gets one, else a 1 % false-alarm budget on 10 % of
    the training images, held out of fitting). ``context_margin``: pixels of image context read
    around every patch and cropped from its map before stitching (0: bare patches).
    """

    def __init__(
        self,
        batch_size: int = 8,
        tasks: Sequence[Task] | None = None,
        detector_class: type | str | None = None,
        config: dict[str, Any] | None = None,
        checkpoint_root: str | Path = "saved_models",
        log_root: str | Path = "logs",
        vis_root: str | Path | None = "vis",
        seed: int = 0,
        fusion_weights: Sequence[float] | None = None,
        early_stop_epochs: int = -1,
        trainer_kwargs: dict[str, Any] | None = None,
        num_workers: int = 0,
        launcher: str = "local",
        ray_options: RayOptions | dict | None = None,
        threshold: ThresholdSection | dict | None = None,
        context_margin: int = DEFAULT_CONTEXT_MARGIN,
    ) -> None:
        self.batch_size = batch_size
        self.tasks = list(tasks or [])
        self.detector_class = detector_class
        self.config = config
        self.checkpoint_root = Path(checkpoint_root)
        self.log_root = Path(log_root)
        self.vis_root = None if vis_root is None else Path(vis_root)
        self.seed = seed
        self.fusion_weights = fusion_weights
        self.early_stop_epochs = early_stop_epochs
        self.trainer_kwargs = trainer_kwargs
        self.num_workers = num_workers
        self.launcher = launcher
        self.ray_options = RayOptions(**ray_options) if isinstance(ray_options, dict) else ray_options
        self.threshold = threshold if isinstance(threshold, ThresholdSection) else ThresholdSection(**(threshold or {}))
        self.context_margin = context_margin
        self._orchestrator: TaskOrchestrator | None = None

    def orchestrator(self) -> TaskOrchestrator:
        """The orchestrator behind this trainer (built on first use)."""
        if self._orchestrator is None:
            if not self.config:
                raise ConfigError("HRTrainer needs config={'patch': {...detector options, 'patch_size': ...}}")
            detectors = DetectorConfig.from_tutorial(self.detector_class, self.config)
            self._orchestrator = TaskOrchestrator(
                detectors.detector_class,
                {},
                self.tasks,
                self.checkpoint_root,
                detectors=detectors,
                batch_size=self.batch_size,
                seed=self.seed,
                fusion_weights=self.fusion_weights,
                trainer_kwargs=self.trainer_kwargs,
                num_workers=self.num_workers,
                early_stop_epochs=self.early_stop_epochs,
                log_root=self.log_root,
                context_margin=self.context_margin,
            )
        return self._orchestrator

    def train(
        self,
        train_samples: Sequence[HRSample],
        gpu_ids: Sequence[int | str] | None = None,
        val_config: ValidationConfig | dict | None = None,
    ) -> list[Path]:
        """Fit a detector per task and choose the thresholds; tasks already fitted in ``checkpoint_root`` are skipped."""
        orchestrator = self.orchestrator()
        devices = resolve_devices(gpu_ids)
        if not orchestrator.tasks:
            raise ConfigError("HRTrainer has no tasks: create them with a task generator (e.g. A2OTaskGenerator)")
        print(f"Start training, devices: {devices}")
        print(f"Tasks config is saved as: {orchestrator.tasks_path}")
        val_config = ValidationConfig.from_any(val_config)
        rule = threshold_rule(self.threshold, val_config is not None, len(train_samples), self.checkpoint_root.name)
        fit_samples, held_out = prepare_holdout(self.checkpoint_root, list(train_samples), self.threshold, rule or "", self.seed)
        paths = orchestrator.fit(fit_samples, devices, val_config, launcher=self.launcher, ray=self.ray_options)
        if rule is not None:
            calibrate(orchestrator, self.threshold, rule, devices[0], fit_samples, held_out, val_config, self.seed)
        print(f"The training progress can be monitored in: {self.log_root}")
        return paths

    def inference(
        self,
        test_samples: Sequence[HRSample],
        gpu_ids: Sequence[int | str] | None = None,
        return_results_only: bool = False,
        evaluators: Sequence[Callable[..., dict]] | None = None,
        vis_size: int = 1024,
    ) -> tuple[np.ndarray, ArrayStore] | dict[str, dict]:
        """Score ``test_samples``.

        With ``return_results_only`` returns ``(image_scores, anomaly_maps)``: the maps
        (float16, one per image) in an :class:`~hiad_pl.utils.array_store.ArrayStore`,
        a sequence that holds up to 1 GB in memory and the rest on disk.
        Otherwise writes visualisations to ``vis_root`` (unless it is ``None``), evaluates with
        ``evaluators`` (when given), prints the per-class table and returns it.
        """
        if not test_samples:
            raise DatasetError("no test samples")
        orchestrator = self.orchestrator()
        devices = resolve_devices(gpu_ids)
        device = devices[0]
        orchestrator.load(device)
        scores, maps = run_inference(orchestrator, test_samples, device, make_launcher(self.launcher, devices, self.ray_options))
        if return_results_only:
            return scores, maps
        if self.vis_root is not None:
            thresholds = model_thresholds(orchestrator)
            display = score_range(maps, orchestrator.normalized, thresholds)
            write_visualizations(test_samples, maps, self.vis_root, vis_size, display, scores.tolist(), thresholds)
        if not evaluators:
            return {}
        from hiad_pl.metrics import format_table, save_report

        results = evaluate_predictions(test_samples, scores, maps, list(evaluators))
        print(format_table(results))
        save_report(results, self.log_root)
        return results
