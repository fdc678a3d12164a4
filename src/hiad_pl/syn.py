"""Anomaly synthesisers under the names of the original project's tutorial.

``from hiad_pl.syn import RandomeBoxSynthesizer`` gives the classes defined in
:mod:`hiad_pl.data.synthesis`.
"""

from hiad_pl.data.synthesis import (
    AnomalySynthesizer,
    ColorShiftSynthesizer,
    CutPasteAnomalySynthesizer,
    ImageBlendingSynthesizer,
    RandomBoxSynthesizer,
    RandomeBoxSynthesizer,
    SimplexNoiseSynthesizer,
    build_synthesizer,
)

__all__ = [
    "AnomalySynthesizer",
    "ImageBlendingSynthesizer",
    "RandomeBoxSynthesizer",
    "RandomBoxSynthesizer",
    "CutPasteAnomalySynthesizer",
    "ColorShiftSynthesizer",
    "SimplexNoiseSynthesizer",
    "build_synthesizer",
]
