"""Evaluators from config values: a callable, an import path, or a ``function`` / ``class_path`` dict.

The tutorial's names resolve through their import paths
(``hiad_pl.utils.metrics.compute_pro``, ``hiad_pl.metrics.compute_pixelwise_metrics``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from hiad_pl.errors import ConfigTypeError
from hiad_pl.metrics.inputs import Evaluator

_TARGET_KEYS = ("class_path", "function")
_ARGUMENT_KEYS = ("init_args", "kwargs")


def resolve_evaluator(spec: Evaluator | str | Mapping[str, Any]) -> Evaluator:
    """An evaluator from a callable, an import path or a ``class_path``/``function`` dict.

    ``"pkg.module.fn"`` (or ``"pkg.module:fn"``) names a function;
    ``{"function": "pkg.module.fn", "kwargs": {...}}`` binds keyword arguments
    with :func:`functools.partial`; ``{"class_path": ..., "init_args": {...}}``
    naming a class instantiates it (the instance must be callable).
    """
    if isinstance(spec, str):
        evaluator = _import_object(spec)
    elif isinstance(spec, Mapping):
        evaluator = _from_mapping(spec)
    elif callable(spec):
        evaluator = spec
    else:
        raise ConfigTypeError(f"an evaluator must be a callable, an import path or a dict, got {spec!r}")
    if not callable(evaluator):
        raise ConfigTypeError(f"evaluator {spec!r} resolves to {evaluator!r}, which is not callable")
    _check_signature(evaluator, spec)
    return evaluator


def _import_object(path: str) -> Any:
    """The object at ``pkg.module.name`` or ``pkg.module:name``."""
    module_name, _, name = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"unknown evaluator {path!r}: expected an import path like 'pkg.module.function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"unknown evaluator {path!r}: cannot import module {module_name!r} ({error})"
        ) from error
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"unknown evaluator {path!r}: module {module_name!r} has no {name!r}") from None


def _from_mapping(spec: Mapping[str, Any]) -> Evaluator:
    """An evaluator from ``{"class_path"|"function": path, "init_args"|"kwargs": {...}}``."""
    unknown = set(spec) - set(_TARGET_KEYS) - set(_ARGUMENT_KEYS)
    targets = [key for key in _TARGET_KEYS if key in spec]
    arguments = [key for key in _ARGUMENT_KEYS if key in spec]
    if unknown or len(targets) != 1 or len(arguments) > 1:
        raise ValueError(
            f"evaluator spec {dict(spec)!r} must have exactly one of {_TARGET_KEYS} "
            f"and at most one of {_ARGUMENT_KEYS}, nothing else"
        )
    target = _import_object(spec[targets[0]])
    kwargs = dict(spec[arguments[0]] or {}) if arguments else {}
    if inspect.isclass(target):
        instance: Any = target(**kwargs)  # resolve_evaluator checks that it is callable
        return instance
    return functools.partial(target, **kwargs) if kwargs else target


def _check_signature(evaluator: Evaluator, spec: object) -> None:
    """Fail early unless ``evaluator`` takes the four evaluator arguments and ``device``."""
    try:
        signature = inspect.signature(evaluator)
    except (TypeError, ValueError):  # some builtins expose no signature
        return
    try:
        signature.bind(None, None, None, None, device=None)
    except TypeError as error:
        raise ConfigTypeError(
            f"evaluator {spec!r} cannot be called as fn(prediction_scores, gt_labels, "
            f"prediction_masks, gt_masks, device=...): {error}"
        ) from None


def evaluator_name(evaluator: Evaluator) -> str:
    """A readable name for messages, with bound keyword arguments."""
    if isinstance(evaluator, functools.partial):
        bound = ", ".join(f"{key}={value!r}" for key, value in evaluator.keywords.items())
        return f"{evaluator_name(evaluator.func)}({bound})"
    return getattr(evaluator, "__qualname__", type(evaluator).__name__)

