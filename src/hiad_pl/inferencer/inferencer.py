"""HRInferencer: load a model folder once, score samples in process or serve them over HTTP."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hiad_pl.calibration import model_thresholds
from hiad_pl.config import DetectorConfig
from hiad_pl.data.sample import HRSample
from hiad_pl.decisions import Decision
from hiad_pl.orchestrator import TaskOrchestrator, resolve_devices
from hiad_pl.serve import RunScorer, ServeConfig, Service, create_app

log = logging.getLogger("hiad_pl")


class HRInferencer:
    """The tutorial's online inferencer over a model folder written by ``HRTrainer`` (or a run's category folder).

    Args:
        detector_class: the detector class the folder was fitted with (its checkpoints name it too).
        config: ``{'patch': {...}, 'thumbnail': {...}}`` as given to ``HRTrainer``; without a
            ``thumbnail`` section a fitted thumbnail task is left out, as in the original.
        checkpoint_root: the model folder (``tasks.json``, ``checkpoints/``).
        gpu_ids: GPU ids; ``[]`` scores on the CPU. Every model is loaded on the first device.
        models_per_gpu: most models per GPU in the original (``-1``: all). Here every
            model stays loaded on its device, so any valid value loads all of them.
        image_size: resolution received images are resized to (``None``: as received,
            the original's behaviour; the client then sizes them).
        batch_size: patches per detector forward pass.
    """

    def __init__(
        self,
        detector_class: type | str,
        config: dict[str, Any],
        checkpoint_root: str | Path,
        gpu_ids: Sequence[int | str] | None = None,
        models_per_gpu: int = -1,
        image_size: int | tuple[int, int] | None = None,
        batch_size: int = 8,
    ) -> None:
        from hiad_pl.data.tiling import as_pair

        if not (models_per_gpu == -1 or models_per_gpu > 0):
            raise ValueError(f"models_per_gpu must be positive or -1 (all models), got {models_per_gpu}")
        detectors = DetectorConfig.from_tutorial(detector_class, config)
        devices = resolve_devices(gpu_ids)
        if len(devices) > 1:
            log.warning("HRInferencer loads every model on %s; the other devices %s stay unused", devices[0], devices[1:])
        orchestrator = TaskOrchestrator(
            detectors.detector_class, {}, [], checkpoint_root, detectors=detectors, batch_size=batch_size
        )
        orchestrator.load(devices[0])
        if detectors.thumbnail is None and any(t.is_thumbnail for t in orchestrator.tasks):
            orchestrator.tasks = [t for t in orchestrator.tasks if not t.is_thumbnail]
        self.models_per_gpu = models_per_gpu
        #: the folder's image and pixel thresholds (``None``: fitted without them, no decisions)
        self.thresholds = model_thresholds(orchestrator)
        self.scorer = RunScorer(orchestrator, devices[0], None if image_size is None else as_pair(image_size), None, self.thresholds)
        self.service: Service | None = None

    def inference(self, test_samples: Sequence[HRSample]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores ``[N]`` and anomaly maps (one ``[H, W]`` array per sample)."""
        predictions = self.scorer.score(list(test_samples))
        return np.array([p.score for p in predictions]), [p.anomaly_map.numpy() for p in predictions]

    def decisions(
        self, test_samples: Sequence[HRSample], masks: bool = False
    ) -> list[tuple[Decision | None, np.ndarray | None]]:
        """Per sample its decision (label OK/NG, score, image threshold) and, with ``masks``, the predicted
        defect mask (0/255 uint8); ``(None, None)`` for a folder without thresholds."""
        predictions = self.scorer.score(list(test_samples))
        if self.thresholds is None:
            return [(None, None) for _ in predictions]
        return [
            (self.thresholds.decide(p.score), self.thresholds.mask(p.anomaly_map.numpy()) if masks else None)
            for p in predictions
        ]

    def client_inference(
        self, ip: str = "127.0.0.1", port: int | str = 1473, block: bool = True, config: ServeConfig | None = None
    ) -> Service:
        """Serve on ``ip:port`` for :func:`~hiad_pl.inferencer.client.client_detection`.

        Blocks until interrupted, as the original; ``block=False`` returns the
        running :class:`~hiad_pl.serve.Service` (stop it with :meth:`close`).
        """
        self.service = Service(create_app(self.scorer, config), ip, int(port))
        print(f"HiAD Service Listening on {self.service.url} ...", flush=True)
        if block:
            self.service.run()
        else:
            self.service.start()
        return self.service

    def close(self) -> None:
        """Stop a service started with ``block=False``."""
        if self.service is not None:
            self.service.stop()
            self.service = None
