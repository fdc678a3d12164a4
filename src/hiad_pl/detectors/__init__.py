"""Anomaly detectors: the shared :class:`HRDetector` interface and the methods built on it.

``DETECTORS`` maps each short name used in configs to its class;
:func:`get_detector` resolves a short name, a class name or an import path.
"""

from __future__ import annotations

import importlib

from hiad_pl.detectors.base import HRDetector, OnePassDetector
from hiad_pl.detectors.fastflow import HRFastFlow
from hiad_pl.detectors.padim import HRPaDiM
from hiad_pl.detectors.patchcore import HRPatchCore

#: Short names of the detectors and their classes.
DETECTORS: dict[str, type[HRDetector]] = {
    "patchcore": HRPatchCore,
    "padim": HRPaDiM,
    "fastflow": HRFastFlow,
}


def get_detector(name_or_class_path: str | type[HRDetector]) -> type[HRDetector]:
    """The detector class for a short name (``patchcore``), a class name (``HRPatchCore``) or an import path.

    Raises:
        ValueError: when the name is unknown or the path does not lead to an :class:`HRDetector`.
    """
    if isinstance(name_or_class_path, type):
        return _checked(name_or_class_path, name_or_class_path.__qualname__)
    name = str(name_or_class_path).strip()
    by_class_name = {cls.__name__.lower(): cls for cls in DETECTORS.values()}
    found = DETECTORS.get(name.lower()) or by_class_name.get(name.lower())
    if found is not None:
        return found
    if "." in name:
        module_name, _, attribute = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"detector {name!r} could not be imported: {err}") from err
        return _checked(found, name)
    raise ValueError(
        f"unknown detector {name!r}; known names: {', '.join(sorted(DETECTORS))} "
        "(or give an import path such as 'my_package.module.MyDetector')"
    )


def _checked(candidate: object, name: str) -> type[HRDetector]:
    """``candidate`` if it is an :class:`HRDetector` subclass, else a ``ValueError`` naming ``name``."""
    if not (isinstance(candidate, type) and issubclass(candidate, HRDetector)):
        raise ValueError(f"detector {name!r} is not a subclass of hiad_pl.detectors.HRDetector")
    return candidate


__all__ = ["DETECTORS", "HRDetector", "HRFastFlow", "HRPaDiM", "HRPatchCore", "OnePassDetector", "get_detector"]
