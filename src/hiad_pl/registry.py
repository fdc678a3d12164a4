"""The detector registry: every detector class by its short name.

It lives at the bottom of the package so that the configuration resolves detector
names without importing any detector: detector classes register themselves here when
they are defined (:class:`~hiad_pl.detectors.base.HRDetector` does it for every concrete
subclass), and the first look-up loads the built-in detectors by their package's name,
as it would load any import path a config names. Nothing keeps a hand-written list.
"""

from __future__ import annotations

import importlib

#: The package whose import defines (and so registers) the built-in detectors.
BUILTIN_DETECTORS = "hiad_pl.detectors"
#: Every concrete detector class by its short name (filled as classes are defined).
DETECTOR_REGISTRY: dict[str, type] = {}
#: The detector base class(es); a class given by import path must derive from one.
DETECTOR_BASES: list[type] = []


def declare_detector_base(cls: type) -> type:
    """Declare ``cls`` the base class every detector derives from (done once, by the base's module)."""
    if cls not in DETECTOR_BASES:
        DETECTOR_BASES.append(cls)
    return cls


def get_detector(name_or_class_path: str | type) -> type:
    """The detector class for a short name (``patchcore``), a class name (``HRPatchCore``) or an import path.

    Raises:
        ValueError: when the name is unknown or the path does not lead to a detector class.
    """
    importlib.import_module(BUILTIN_DETECTORS)  # registers the built-in detectors (a no-op once imported)
    if isinstance(name_or_class_path, type):
        return _checked(name_or_class_path, name_or_class_path.__qualname__)
    name = str(name_or_class_path).strip()
    by_class_name = {cls.__name__.lower(): cls for cls in DETECTOR_REGISTRY.values()}
    found = DETECTOR_REGISTRY.get(name.lower()) or by_class_name.get(name.lower())
    if found is not None:
        return found
    if "." in name:
        module_name, _, attribute = name.rpartition(".")
        try:
            candidate = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"detector {name!r} could not be imported: {err}") from err
        return _checked(candidate, name)
    raise ValueError(
        f"unknown detector {name!r}; known names: {', '.join(sorted(DETECTOR_REGISTRY))} "
        "(or give an import path such as 'my_package.module.MyDetector')"
    )


def _checked(candidate: object, name: str) -> type:
    """``candidate`` if it derives from a declared detector base, else a ``ValueError`` naming ``name``."""
    if not (isinstance(candidate, type) and issubclass(candidate, tuple(DETECTOR_BASES))):
        raise ValueError(f"detector {name!r} is not a subclass of hiad_pl.detectors.HRDetector")
    return candidate
