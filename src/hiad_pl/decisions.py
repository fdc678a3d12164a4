"""Thresholds and OK/NG decisions (numpy only: the torch-free predictor of an export uses them too).

A category model holds an image threshold and a pixel threshold, chosen by one rule:

- ``f1_adaptive``: the thresholds that maximise image F1 and pixel F1 on the synthetic
  validation set (held-out training images with synthetic defects). Only meaningful when
  that set holds anomalies: on normal images alone every threshold above the largest
  score has F1 0 and the "best" one is arbitrary.
- ``normal_fpr``: a false-alarm budget on normal images held out of training: the
  ``1 - fpr`` quantiles of their image scores and of their pixel scores.
- ``given``: the user's two numbers.

Thresholds apply to the scores as the model outputs them (normalised to [0, 1] when the
run has validation statistics, raw otherwise; :attr:`Thresholds.scale` records which).
An image is NG when its score is strictly above the image threshold, a pixel is a
predicted defect when its score is strictly above the pixel threshold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hiad_pl.errors import InputError
from hiad_pl.run_folder import atomic_write, read_json

#: The thresholds of a category model, in its folder next to ``checkpoints/``.
THRESHOLDS_FILE = "thresholds.json"
RULES = ("f1_adaptive", "normal_fpr", "given")
SCALES = ("normalised", "raw")
OK, NG = "OK", "NG"
#: Where the pixel threshold sits on an overlay's colour scale (0: bottom colour, 1: top).
THRESHOLD_POSITION = 0.5
#: Share of normal pixels below the bottom colour of an overlay (the calm level).
DISPLAY_LOW_QUANTILE = 0.5
#: The message for a model without thresholds (a run fitted before they existed).
NO_THRESHOLDS = (
    "no thresholds in this model (fitted before thresholds were stored): no OK/NG decision and no "
    "predicted mask; add them with `hiad-pl fit` on the same config and run folder "
    "(--threshold.image X --threshold.pixel Y, or the validation set's F1 rule)"
)


@dataclass
class Thresholds:
    """An image and a pixel threshold, the rule that chose them and the overlay's colour range.

    Args:
        image: image scores strictly above it are NG.
        pixel: pixel scores strictly above it are predicted defect pixels.
        rule: one of :data:`RULES`.
        scale: ``"normalised"`` or ``"raw"``: the scores the thresholds apply to.
        display: ``(low, high)`` score range of the overlay colours, the same for every image.
        details: what the rule rested on (its settings, image counts, the F1 it reached, ...).
    """

    image: float
    pixel: float
    rule: str
    scale: str
    display: tuple[float, float]
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"threshold rule must be one of {RULES}, got {self.rule!r}")
        if self.scale not in SCALES:
            raise ValueError(f"threshold scale must be one of {SCALES}, got {self.scale!r}")
        if not (math.isfinite(self.image) and math.isfinite(self.pixel)):
            raise ValueError(f"thresholds must be finite numbers, got image {self.image} and pixel {self.pixel}")
        self.image, self.pixel = float(self.image), float(self.pixel)
        low, high = (float(v) for v in self.display)
        self.display = (low, high if high > low else low + 1e-6)

    def decide(self, score: float) -> Decision:
        """The decision on an image score."""
        return Decision(NG if float(score) > self.image else OK, float(score), self.image)

    def mask(self, anomaly_map: np.ndarray) -> np.ndarray:
        """The predicted defect mask of a map: 255 where the score is above the pixel threshold, else 0 (uint8)."""
        return np.where(np.asarray(anomaly_map) > self.pixel, np.uint8(255), np.uint8(0))

    def describe(self) -> str:
        """One line: the two thresholds, their scale and rule."""
        basis = ", ".join(
            f"{k} {v}" for k, v in self.details.items()
            if isinstance(v, (int, float, str)) and k not in ("settings_key", "checkpoints")
        )
        return f"image {self.image:.6g}, pixel {self.pixel:.6g} on {self.scale} scores ({self.rule}{'; ' + basis if basis else ''})"

    def todict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        out["display"] = list(self.display)
        return out

    @staticmethod
    def fromdict(data: dict[str, Any], source: str = "thresholds") -> Thresholds:
        """Read :meth:`todict`'s dict; a missing or bad field is named with ``source``."""
        try:
            return Thresholds(
                float(data["image"]), float(data["pixel"]), str(data["rule"]), str(data["scale"]),
                tuple(data["display"]), dict(data.get("details") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"{source}: not valid thresholds ({type(error).__name__}: {error})") from error

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/thresholds.json`` atomically."""
        path = Path(folder) / THRESHOLDS_FILE
        atomic_write(path, json.dumps(self.todict(), indent=1) + "\n")
        return path

    @staticmethod
    def load(folder: str | Path) -> Thresholds | None:
        """The thresholds stored in ``folder`` (``None`` when it holds none)."""
        path = Path(folder) / THRESHOLDS_FILE
        data = read_json(path, "delete it and rerun fit to choose the thresholds again")
        return None if data is None else Thresholds.fromdict(data, str(path))


@dataclass
class Decision:
    """An image's decision: ``label`` (OK/NG), its score and the image threshold it was compared with."""

    label: str
    score: float
    threshold: float

    def todict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def quantile_threshold(values: np.ndarray, fpr: float) -> float:
    """The ``1 - fpr`` quantile of ``values`` (linear interpolation): at most ``fpr`` of them lie above it."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"normal_fpr must lie in [0, 1), got {fpr}")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no normal scores to take a quantile of")
    return float(np.quantile(values, 1.0 - fpr))


def f1_adaptive_threshold(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The threshold with the best F1 of ``score > threshold`` against ``labels`` (1: defect).

    Every candidate cut lies between two consecutive distinct scores; the chosen
    threshold is the midpoint of the best cut's gap, so ``>`` and ``>=`` agree on
    these scores. Returns ``threshold``, ``f1``, ``precision`` and ``recall``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.size != labels.size:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        raise ValueError("F1-adaptive thresholds need both normal and anomalous samples")
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], labels[order]
    true_pos = np.cumsum(hits)
    flagged = np.arange(1, ranked.size + 1)
    # a cut can only fall after the last of equal scores
    last = np.r_[ranked[1:] != ranked[:-1], True]
    precision = true_pos[last] / flagged[last]
    recall = true_pos[last] / positives
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    best = int(np.argmax(f1))
    position = np.flatnonzero(last)[best]
    below = ranked[position + 1] if position + 1 < ranked.size else ranked[position] - 1.0
    return {
        "threshold": float((ranked[position] + below) / 2),
        "f1": float(f1[best]),
        "precision": float(precision[best]),
        "recall": float(recall[best]),
    }


def confusion(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """TP/FP/TN/FN of ``score > threshold`` against ``labels`` (1: defect), with precision, recall and F1.

    A ratio whose denominator is 0 is ``None``.
    """
    flagged = np.asarray(scores, dtype=np.float64).reshape(-1) > threshold
    truth = np.asarray(labels).reshape(-1).astype(bool)
    return counts_to_metrics(int((flagged & truth).sum()), int((flagged & ~truth).sum()),
                             int((~flagged & ~truth).sum()), int((~flagged & truth).sum()))


def counts_to_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float | int | None]:
    """Precision, recall and F1 of confusion counts (``None`` where undefined)."""
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def display_range(normal_pixels: np.ndarray, pixel_threshold: float) -> tuple[float, float]:
    """The overlay colour range of a model: calm (bottom colour) at the median normal pixel,
    the pixel threshold at :data:`THRESHOLD_POSITION` of the scale, the top well above it."""
    values = np.asarray(normal_pixels, dtype=np.float64).reshape(-1)
    low = float(np.quantile(values, DISPLAY_LOW_QUANTILE)) if values.size else 0.0
    low = min(low, pixel_threshold - 1e-6)
    return low, low + (pixel_threshold - low) / THRESHOLD_POSITION


def given_display_range(pixel_threshold: float) -> tuple[float, float]:
    """The colour range for given thresholds (no normal scores known): from 0 (or below the threshold), threshold mid-scale."""
    low = 0.0 if pixel_threshold > 0 else pixel_threshold - 1.0
    return low, low + (pixel_threshold - low) / THRESHOLD_POSITION
