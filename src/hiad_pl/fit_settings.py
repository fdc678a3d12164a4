"""The settings a model folder was fitted with: a rerun with other settings is refused, never reused.

Every model folder keeps ``fit_settings.json``: the settings that decide what its
models are, written before the first task is fitted. A rerun compares its own
settings with them: the same settings resume (fitted tasks are skipped,
interrupted ones continue); different ones are refused with the differences
listed (``key: old -> new``), unless the rerun asks to refit
(``hiad-pl fit --refit true``, ``TaskOrchestrator.fit(refit=True)``), which
discards the folder's models and results and fits again.

The compared settings (keys of ``fit_settings.json``):

- ``detector.class_path``, ``detector.init_args.*``, ``detector.patch_size`` and
  the Trainer options a detector file implies (``detector.trainer``); the same
  under ``thumbnail.*`` for the thumbnail branch;
- ``trainer.*``: the Trainer options given, less :data:`NON_MODEL_TRAINER_KEYS`;
- ``batch_size``, ``seed``, ``fusion_weights``, ``early_stop_epochs``;
- ``validation.*``: the synthesiser and its settings, ``val_sample_ratio``,
  ``max_patch_number``, ``normalization`` and the evaluators (they select the
  kept epoch and give the normalisation statistics);
- ``training_images``: how many and which (their paths relative to their common
  folder, so a data set moved elsewhere still resumes);
- from ``hiad-pl fit`` also ``data.image_size``, ``data.patch_size``,
  ``data.stride``, ``data.ds_factors`` and ``tasks.*`` (the task generator and its
  options); the task list itself is compared through ``tasks.json``.

Not compared, because they change where or how visibly a fit runs, not its
models, or only how long an interrupted task goes on training (the Trainer's
``max_epochs`` / ``max_steps`` and their kin: a resume continues to the new
length; finished tasks are kept): devices, launcher and Ray options, data loader workers, loggers,
progress bars, the data set's location, the test set and the evaluation section.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hiad_pl.errors import ConfigError
from hiad_pl.run_folder import read_json

SETTINGS_NAME = "fit_settings.json"
#: The training images a model folder holds out of fitting for its thresholds: kept through a refit
#: (the refit writes its own before the old models are discarded).
HOLDOUT_NAME = "holdout.json"
#: Trainer options that do not change the fitted models: how a fit reports, not what it learns.
NON_MODEL_TRAINER_KEYS = (
    "logger",
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
    "profiler",
    "num_sanity_val_steps",
    # The training length: a rerun with a longer (or shorter) schedule continues an interrupted task
    # from its last epoch checkpoint, as Lightning resumes; tasks already finished are kept as they are.
    "max_epochs",
    "max_steps",
    "min_epochs",
    "min_steps",
    "max_time",
)
#: Task generator options linked from other settings (compared there) or naming where it runs.
LINKED_TASK_OPTIONS = ("device", "batch_size", "fusion_weights", "detector_class", "detector_config")


class SettingsChangedError(ConfigError):
    """A model folder was fitted with other settings than those of this run."""


def plain(value: Any) -> Any:
    """``value`` as JSON values (tuples as lists, objects by class), comparable with what a file holds."""
    return json.loads(json.dumps(value, sort_keys=True, default=_object_name))


def _object_name(value: Any) -> str:
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def flatten(prefix: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``{prefix.key: value}`` for each option (one level: nested values are compared whole)."""
    return {f"{prefix}.{key}": value for key, value in options.items()}


def public_state(obj: Any) -> dict[str, Any]:
    """The public attributes of ``obj`` that are plain values (a synthesiser's probability, seed, sizes)."""
    scalars = (int, float, str, bool, type(None))

    def is_plain(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(is_plain(v) for v in value)
        return isinstance(value, scalars)

    return {k: v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and is_plain(v)} if hasattr(obj, "__dict__") else {}


def training_images(paths: Iterable[str | Path]) -> str:
    """``"<count> images, digest <hex>"`` of the training images, by their paths below their common folder."""
    absolute = [os.path.abspath(str(p)) for p in paths]
    if not absolute:
        return "0 images"
    base = os.path.commonpath(absolute) if len(absolute) > 1 else os.path.dirname(absolute[0])
    relative = sorted(os.path.relpath(p, base) for p in absolute)
    digest = hashlib.sha256("\n".join(relative).encode("utf-8")).hexdigest()[:12]
    return f"{len(relative)} images, digest {digest}"


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (``unset`` where one side lacks it)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = plain(old.get(key, "unset")), plain(new.get(key, "unset"))
        if before != after:
            lines.append(f"{key}: {_shown(before)} -> {_shown(after)}")
    return lines


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def load(path: Path) -> dict[str, Any] | None:
    """The settings saved in ``path`` (``None`` when there is no file)."""
    saved = read_json(path, "rerun with --refit true to fit again")
    if saved is None:
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise ConfigError(f"{path}: not a fit settings file; rerun with --refit true to fit again")
    return saved["settings"]


def dumps(settings: Mapping[str, Any]) -> str:
    """The text of ``fit_settings.json``."""
    return json.dumps({"settings": plain(dict(settings))}, indent=2, sort_keys=True) + "\n"
