"""What a task is validated on: held-out training images with synthetic anomalies (the tutorial's ``val_config``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hiad_pl.data.synthesis import RandomBoxSynthesizer
from hiad_pl.errors import ConfigError

#: "task": each task normalised with its own validation statistics; "shared": the patch
#: tasks share statistics pooled over all their validation patches (the thumbnail keeps its own).
NORMALIZATION_SCOPES = ("task", "shared")


@dataclass
class ValidationConfig:
    """The tutorial's ``val_config``: a validation set of training images with synthetic anomalies."""

    anomaly_syn_fn: Callable[..., Any]
    val_sample_ratio: float = 0.2
    max_patch_number: int | None = None
    evaluators: list[Callable[..., dict]] = field(default_factory=list)
    #: one of :data:`NORMALIZATION_SCOPES`
    normalization: str = "task"

    def __post_init__(self) -> None:
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


def callable_name(function: Any) -> str:
    """``module.name`` of an evaluator (a partial with its bound keywords), stable across processes."""
    if isinstance(function, functools.partial):
        bound = ", ".join(f"{k}={v!r}" for k, v in sorted(function.keywords.items()))
        return f"{callable_name(function.func)}({bound})"
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{getattr(function, '__module__', type(function).__module__)}.{name}"


def default_validation() -> ValidationConfig:
    """Validation set used when one is needed (thumbnail branch) but none was configured."""
    # the original run scripts' validation set: grey boxes on half of the patches, mean difference 20-50 levels
    synthesizer = RandomBoxSynthesizer(p=0.5, diff_threshold=(20, 50), seed=0)
    return ValidationConfig(synthesizer, val_sample_ratio=0.2, max_patch_number=200)
