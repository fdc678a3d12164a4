"""Anomaly detectors: the shared :class:`HRDetector` interface and the methods built on it.

Detectors register themselves when their class is defined: ``DETECTORS`` (the
registry) maps each short name used in configs to its class, and
:func:`get_detector` resolves a short name, a class name or an import path
(importing a user's module registers its detectors too).
"""

from __future__ import annotations

from typing import cast

from hiad_pl import registry
from hiad_pl.detectors.base import DETECTOR_REGISTRY, HRDetector, OnePassDetector, register_detector
from hiad_pl.detectors.destseg import HRDesTSeg
from hiad_pl.detectors.dinomaly import HRDinomaly
from hiad_pl.detectors.fastflow import HRFastFlow
from hiad_pl.detectors.inpformer import HRINPFormer
from hiad_pl.detectors.padim import HRPaDiM
from hiad_pl.detectors.patchcore import HRPatchCore
from hiad_pl.detectors.rdpp import HRRDPP
from hiad_pl.detectors.realnet import HRRealNet
from hiad_pl.detectors.vitad import HRVitAD

#: Short names of the detectors and their classes: the live registry.
DETECTORS: dict[str, type[HRDetector]] = DETECTOR_REGISTRY


def get_detector(name_or_class_path: str | type[HRDetector]) -> type[HRDetector]:
    """The detector class for a short name (``patchcore``), a class name (``HRPatchCore``) or an import path.

    Raises:
        ValueError: when the name is unknown or the path does not lead to an :class:`HRDetector`.
    """
    # the registry checks that the class derives from HRDetector, its declared base
    return cast("type[HRDetector]", registry.get_detector(name_or_class_path))


def describe_detectors() -> list[str]:
    """One line per registered detector: short name, import path, first docstring line."""
    lines = []
    for name, cls in sorted(DETECTORS.items()):
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        path = f"{cls.__module__}.{cls.__qualname__}"
        lines.append(f"{name:<12} {path:<42} {summary}")
    return lines


__all__ = [
    "DETECTORS",
    "HRDesTSeg",
    "HRDetector",
    "HRDinomaly",
    "HRFastFlow",
    "HRINPFormer",
    "HRPaDiM",
    "HRPatchCore",
    "HRRDPP",
    "HRRealNet",
    "HRVitAD",
    "OnePassDetector",
    "describe_detectors",
    "get_detector",
    "register_detector",
]
