"""Evaluation of a run's test images: every evaluator on each class's images, into a :class:`MetricReport`."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hiad_pl.errors import ConfigTypeError
from hiad_pl.metrics.evaluators import is_image_evaluator, skipped_keys
from hiad_pl.metrics.inputs import ArrayLike, Device, Evaluator, UndefinedMetricError, UndefinedMetricWarning
from hiad_pl.metrics.report import MEAN_ROW, MetricReport, MetricValues, add_mean
from hiad_pl.metrics.resolve import evaluator_name, resolve_evaluator
from hiad_pl.utils.array_store import Picked

log = logging.getLogger("hiad_pl")

@dataclass
class _PixelTruth:
    """Which of a class's images have pixel ground truth: normal images, and defective images with a mask."""

    known: list[int]
    defective: int
    unlabelled: int

    @property
    def complete(self) -> bool:
        return self.unlabelled == 0

    @property
    def skipped(self) -> bool:
        """No defective image has a mask: pixel metrics cannot be computed at all."""
        return 0 < self.unlabelled == self.defective

    def reason(self) -> str:
        """Why pixel metrics are skipped or partial, for notes and the log."""
        missing = f"{self.unlabelled} of {self.defective} defective test images have no mask (image labels only)"
        if self.skipped:
            return f"pixel metrics skipped: {missing}"
        return f"pixel metrics over the {len(self.known)} test images with pixel ground truth: {missing}"

    def summary(self) -> dict[str, Any]:
        """The ``metrics.json`` entry of this class."""
        return {
            "defective_images": self.defective,
            "defective_without_mask": self.unlabelled,
            "pixel_metrics": "skipped" if self.skipped else f"over {len(self.known)} images with pixel ground truth",
        }


def evaluate(
    evaluators: Sequence[Evaluator | str | Mapping[str, Any]],
    image_scores: ArrayLike | Sequence[float],
    labels: ArrayLike | Sequence[int],
    maps: Sequence[ArrayLike],
    masks: Sequence[ArrayLike | None] | None,
    clsnames: Sequence[str] | None = None,
    device: Device = None,
    has_mask: Sequence[bool] | None = None,
) -> MetricReport:
    """Run every evaluator on each class's images, then add the ``'mean'`` row.

    ``clsnames`` gives each image's class (default: all ``'unknown'``). A metric
    that a class's data cannot define (one image class only, no defect pixel)
    is recorded as ``None`` with its reason in ``notes``, and warned about.

    A defective image (label 1) without a mask has a known label but unknown
    defect pixels (``has_mask`` says which images have a mask; default: those
    whose entry in ``masks`` is not ``None``). The image evaluators
    (:func:`compute_imagewise_metrics` and its GPU twin) see every image; every
    other evaluator sees only the images with pixel ground truth (the normal
    images and the defective ones with a mask). When no defective image of a
    class has a mask, its pixel metrics are recorded as ``None`` ("skipped");
    either way one log line per class and ``notes`` say so.
    """
    resolved = [resolve_evaluator(spec) for spec in evaluators]
    count = len(maps)
    names = ["unknown"] * count if clsnames is None else [str(name) for name in clsnames]
    masks = [None] * count if masks is None else masks
    scores = np.asarray(image_scores, dtype=np.float64).reshape(-1)
    targets = np.asarray(labels).reshape(-1)
    if has_mask is None:
        has_mask = [masks[index] is not None for index in range(count)]
    sizes = {
        "image_scores": scores.size, "labels": targets.size, "masks": len(masks), "clsnames": len(names),
        "has_mask": len(has_mask),
    }
    for what, size in sizes.items():
        if size != count:
            raise ValueError(f"{what} has {size} entries but maps has {count}")
    if MEAN_ROW in names:
        raise ValueError(f"class name {MEAN_ROW!r} is reserved for the mean row")
    report = MetricReport()
    for clsname in sorted(set(names)):
        chosen = [index for index, name in enumerate(names) if name == clsname]
        defective = [index for index in chosen if targets[index] == 1]
        truth = _PixelTruth(
            known=[index for index in chosen if targets[index] != 1 or has_mask[index]],
            defective=len(defective),
            unlabelled=sum(1 for index in defective if not has_mask[index]),
        )
        if not truth.complete:
            log.info("%s: %s", clsname, truth.reason())
            report.pixel_ground_truth[clsname] = truth.summary()
        values, notes = _evaluate_class(
            resolved, clsname, (scores, targets, maps, masks), chosen, truth, device
        )
        report[clsname] = values
        if notes:
            report.notes[clsname] = notes
    add_mean(report)
    return report


def _evaluate_class(
    evaluators: Sequence[Evaluator],
    clsname: str,
    inputs: tuple[Any, Any, Any, Any],
    chosen: list[int],
    truth: _PixelTruth,
    device: Device,
) -> tuple[MetricValues, dict[str, str]]:
    """One class's metrics (the images ``chosen`` of ``inputs``) and the reasons for those left undefined."""
    values: MetricValues = {}
    notes: dict[str, str] = {}
    scores, targets, maps, masks = inputs

    def subset(indexes: list[int]) -> tuple[Any, Any, Any, Any]:
        return scores[indexes], targets[indexes], Picked(maps, indexes), Picked(masks, indexes)

    every_image = subset(chosen)
    pixel_images = every_image if truth.complete else subset(truth.known)

    def record(key: str, value: float | None, evaluator: str, reason: str | None = None, warn: bool = True) -> None:
        if key in values:
            raise ValueError(f"metric {key!r} of class {clsname!r} is produced twice (again by {evaluator})")
        values[key] = value
        if reason is not None:
            notes[key] = reason
            if warn:
                warnings.warn(
                    f"class {clsname!r}: {key} is undefined ({reason}); recorded as null",
                    UndefinedMetricWarning,
                    stacklevel=4,
                )

    for evaluator in evaluators:
        name = evaluator_name(evaluator)
        image_level = is_image_evaluator(evaluator)
        if truth.skipped and not image_level:
            # skipped by design, not undefined: the class's one log line said so (no warning per metric)
            for key in skipped_keys(evaluator, name):
                record(key, None, name, truth.reason(), warn=False)
            continue
        try:
            produced = evaluator(*(every_image if image_level else pixel_images), device=device)
        except UndefinedMetricError as error:
            for key in error.metrics or (name,):
                record(key, None, name, error.reason)
            continue
        if not isinstance(produced, Mapping):
            raise ConfigTypeError(f"evaluator {name} returned {type(produced).__name__}, expected a dict of floats")
        for key, value in produced.items():
            number = _as_float(value, key, name)
            if math.isfinite(number):
                record(key, number, name)
                if not image_level and not truth.complete:
                    notes[key] = truth.reason()
            else:
                record(key, None, name, f"{name} returned {number}")
    return values, notes


def _as_float(value: Any, key: str, evaluator: str) -> float:
    """``value`` as a Python float, or a TypeError naming the metric."""
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise ConfigTypeError(f"evaluator {evaluator} returned {value!r} for {key!r}, not a number") from error
