"""The engine's public names where they have always been imported from (``from hiad_pl.orchestrator import ...``).

The engine itself is the package :mod:`hiad_pl.engine`; :class:`TaskOrchestrator` composes it.
"""

from hiad_pl.engine.launchers import resolve_devices
from hiad_pl.engine.orchestrator import TaskOrchestrator, collect
from hiad_pl.engine.run_folder import DISCARDED_PREFIX
from hiad_pl.engine.task_trainer import (
    PER_TASK_TRAINER_KEYS,
    QUIET_WARNINGS,
    RUN_INFO_KEY,
    RunInfo,
    atomic_save_checkpoint,
    lightning_device,
    quiet_lightning_tips,
)
from hiad_pl.engine.validation import ValidationConfig, default_validation
from hiad_pl.inference import Prediction

__all__ = [
    "DISCARDED_PREFIX",
    "PER_TASK_TRAINER_KEYS",
    "QUIET_WARNINGS",
    "RUN_INFO_KEY",
    "Prediction",
    "RunInfo",
    "TaskOrchestrator",
    "ValidationConfig",
    "atomic_save_checkpoint",
    "collect",
    "default_validation",
    "lightning_device",
    "quiet_lightning_tips",
    "resolve_devices",
]
