"""Metric reports: per-class values with a mean row, their Markdown tables, and ``metrics.json`` / ``metrics.md``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hiad_pl.run_folder import atomic_write

MetricValues = dict[str, float | None]
_TABLE_ORDER = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1", "pro")
MEAN_ROW = "mean"


class MetricReport(dict[str, MetricValues]):
    """Metrics per class name plus a ``'mean'`` row; ``None`` marks an undefined value.

    ``notes[clsname][metric]`` says why a value is ``None`` (or what a mean
    left out, or over which images a pixel metric was computed).
    ``pixel_ground_truth[clsname]`` describes, for the classes where some
    defective images have no mask, how the pixel metrics were computed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.notes: dict[str, dict[str, str]] = {}
        self.pixel_ground_truth: dict[str, dict[str, Any]] = {}


def is_threshold(key: str) -> bool:
    """Thresholds are saved but neither averaged nor tabulated."""
    return key.endswith("_threshold")


def metric_columns(results: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """Metric names to tabulate: the usual ones first, then others as they appear."""
    seen = dict.fromkeys(key for values in results.values() for key in values if not is_threshold(key))
    return [key for key in _TABLE_ORDER if key in seen] + [key for key in seen if key not in _TABLE_ORDER]


def add_mean(report: MetricReport) -> None:
    """Add the mean over classes of each metric, over the classes that define it."""
    classes = list(report)
    mean: MetricValues = {}
    for key in metric_columns(report):
        defined = [value for name in classes if (value := report[name].get(key)) is not None]
        missing = [name for name in classes if report[name].get(key) is None]
        mean[key] = float(np.mean(defined)) if defined else None
        if missing:
            reason = (
                f"mean over {len(defined)} of {len(classes)} classes; undefined for: {', '.join(missing)}"
                if defined
                else "undefined for every class"
            )
            report.notes.setdefault(MEAN_ROW, {})[key] = reason
    report[MEAN_ROW] = mean


def format_value(value: float | None) -> str:
    """Six significant digits like the tutorial's table; ``n/a`` when undefined."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:g}"


def format_table(results: Mapping[str, Mapping[str, float | None]]) -> str:
    """A centred Markdown table: ``clsname`` then each metric (thresholds left out)."""
    columns = metric_columns(results)
    header = ["clsname", *columns]
    rows = [[name, *(format_value(values.get(key)) for key in columns)] for name, values in results.items()]
    # two spaces of air around each header, as in the tutorial's output
    widths = [max([len(title) + 2] + [len(row[i]) for row in rows]) for i, title in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {cell:^{width}} " for cell, width in zip(cells, widths)) + "|"

    rule = "|" + "|".join(f":{'-' * width}:" for width in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


#: Columns of the decisions table: the image decision at the image threshold, then the pixels at the pixel threshold.
DECISION_COLUMNS = (
    "image_threshold", "tp", "fp", "tn", "fn", "precision", "recall", "f1",
    "pixel_threshold", "pixel_precision", "pixel_recall", "pixel_f1",
)


def format_decisions(decisions: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of each class's decisions at its thresholds (a class without thresholds shows its note)."""
    header = ["clsname", "rule", *DECISION_COLUMNS]
    rows = []
    for name, values in decisions.items():
        if "note" in values:
            rows.append([name, "none", *["-"] * len(DECISION_COLUMNS)])
            continue
        cells = [str(values[k]) if isinstance(values.get(k), int) else format_value(values.get(k)) for k in DECISION_COLUMNS]
        rows.append([name, str(values.get("rule")), *cells])
    widths = [max([len(title)] + [len(row[i]) for row in rows]) for i, title in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|"
    notes = [f"- {name}: {values['note']}" for name, values in decisions.items() if "note" in values]
    return "\n".join([line(header), rule, *(line(row) for row in rows), *([""] + notes if notes else [])])


def save_report(
    results: Mapping[str, Mapping[str, float | None]],
    run_dir: str | os.PathLike[str],
    decisions: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Write ``metrics.json`` (values, thresholds, notes, ``decisions`` at the run's thresholds when
    given and, where some defective images have no mask, ``pixel_ground_truth``) and ``metrics.md`` atomically.

    Returns both paths. Undefined or non-finite values are written as null.
    """
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {
        name: {key: _finite_or_none(value) for key, value in values.items()}
        for name, values in results.items()
    }
    payload: dict[str, Any] = {"metrics": metrics, "notes": getattr(results, "notes", {})}
    pixel_ground_truth = getattr(results, "pixel_ground_truth", {})
    if pixel_ground_truth:
        payload["pixel_ground_truth"] = pixel_ground_truth
    table = format_table(results) + "\n"
    if decisions is not None:
        payload["decisions"] = {
            name: {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in values.items()}
            for name, values in decisions.items()
        }
        table += "\nDecisions at the run's thresholds (NG: score above the threshold; pixel_*: pixels above the pixel threshold):\n\n"
        table += format_decisions(decisions) + "\n"
    json_path, table_path = folder / "metrics.json", folder / "metrics.md"
    atomic_write(json_path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write(table_path, table)
    return json_path, table_path


def _finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or None when undefined or not finite (JSON has no NaN)."""
    return None if value is None or not math.isfinite(value) else float(value)
