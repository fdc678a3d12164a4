"""Outputs shared by the CLI and HRTrainer: evaluate a model folder, write visualisations and predictions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hiad_pl.data.sample import HRSample
from hiad_pl.decisions import NO_THRESHOLDS, Thresholds, confusion, counts_to_metrics
from hiad_pl.deploy.files import map_range, unique_stems, write_prediction_files, write_scores_csv  # noqa: F401 (re-exported)
from hiad_pl.engine.launchers import Launcher
from hiad_pl.errors import DatasetError
from hiad_pl.metrics.inputs import Evaluator
from hiad_pl.orchestrator import Prediction, TaskOrchestrator, collect
from hiad_pl.utils.array_store import ArrayStore
from hiad_pl.visualize import JET_COLOURS, render_panel, save_png

log = logging.getLogger("hiad_pl")

#: Bytes of ground-truth masks :func:`evaluate_predictions` keeps in memory (the rest wait on disk).
MASKS_MEMORY_LIMIT = 256 << 20


def score_range(maps: Sequence[np.ndarray], normalized: bool, thresholds: Thresholds | None = None) -> tuple[float, float]:
    """Colour-map range: the thresholds' fixed display range; without thresholds [0, 1] for
    normalised scores, else the maps' global min and max."""
    if thresholds is not None:
        return thresholds.display
    if normalized:
        return 0.0, 1.0
    lo = min(float(m.min()) for m in maps)
    hi = max(float(m.max()) for m in maps)
    return lo, hi


def visual_name(sample: HRSample) -> str:
    """A file stem unique within a class: ``<defect kind>_<image stem>``."""
    kind = sample.label_name or ("defect" if sample.label == 1 else "image")
    return f"{kind}_{Path(sample.get_image_path()).stem}"


def write_visualizations(
    samples: Sequence[HRSample],
    maps: Sequence[np.ndarray],
    folder: str | Path,
    vis_size: int,
    display: tuple[float, float],
    scores: Sequence[float],
    thresholds: Thresholds | None = None,
) -> list[Path]:
    """One panel per image under ``folder/<class>/``: image | overlay on the fixed ``display`` range with the
    predicted (white) and ground-truth (magenta) outlines, the score and the decision written above."""
    written = []
    for sample, anomaly_map, score in zip(samples, maps, scores):
        with sample:
            truth = sample.full_mask() if sample.mask is not None else None
            kind = sample.label_name or ("defect" if sample.resolved_label() == 1 else "good")
            panel = render_panel(sample.image.open(), anomaly_map.astype(np.float32), truth, vis_size, display,
                                 float(score), thresholds, title=f"truth: {kind}")
        path = Path(folder) / (sample.clsname or "unknown") / f"{visual_name(sample)}.png"
        save_png(panel, path)
        written.append(path)
    return written


def evaluate_predictions(
    samples: Sequence[HRSample],
    scores: np.ndarray,
    maps: Sequence[np.ndarray],
    evaluators: Sequence[Evaluator],
) -> dict[str, dict]:
    """Per-class metrics (plus a ``mean`` row) of predictions against the samples' labels and masks.

    Defective samples without a mask count in the image metrics only (see :func:`hiad_pl.metrics.evaluate`).
    """
    from hiad_pl.metrics import evaluate

    labels = np.array([s.resolved_label() for s in samples])
    if (labels < 0).any():
        unknown = [s.get_image_path() for s, label in zip(samples, labels) if label < 0][:3]
        raise DatasetError(f"evaluation needs a label or mask for every test image; unknown for e.g. {unknown}")
    # decoded once; past a smaller budget than the maps' on disk (a mask reads back cheaply)
    masks = ArrayStore(len(samples), memory_limit=MASKS_MEMORY_LIMIT)
    for index, sample in enumerate(samples):
        if sample.mask is not None:  # the mask alone: the image is not decoded
            was_open = sample.mask.image is not None
            masks[index] = sample.mask.open()
            if not was_open:
                sample.mask.close()
    clsnames = [s.clsname or "unknown" for s in samples]
    try:
        has_mask = [s.mask is not None for s in samples]
        return evaluate(evaluators, scores, labels, maps, _MaskSlots(masks), clsnames, has_mask=has_mask)
    finally:
        masks.close()


class _MaskSlots(Sequence):
    """The masks of an :class:`ArrayStore`, ``None`` for the images without one."""

    def __init__(self, store: ArrayStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> np.ndarray | None:  # type: ignore[override]
        return self.store[index] if self.store.is_filled(index) else None


def run_inference(
    orchestrator: TaskOrchestrator,
    samples: Sequence[HRSample],
    device: str,
    launcher: Launcher | None = None,
    store: ArrayStore | None = None,
    offset: int = 0,
) -> tuple[np.ndarray, ArrayStore]:
    """Image scores and float16 anomaly maps of ``samples`` (on ``device``, or spread by ``launcher``).

    The maps fill ``store`` from slot ``offset`` (default: a new store of
    ``len(samples)``), in memory up to its budget and on disk beyond it.
    """
    predictions = orchestrator.predict(samples, device) if launcher is None else launcher.predict(orchestrator, samples)
    return collect(predictions, len(samples), store, offset)


def write_prediction(
    prediction: Prediction, sample: HRSample, folder: Path, normalized: bool, stem: str, thresholds: Thresholds | None
) -> dict:
    """Write one image's map, overlay, predicted mask and panel; returns its CSV row (see :mod:`hiad_pl.deploy.files`)."""
    anomaly_map = prediction.anomaly_map.numpy().astype(np.float32)
    with sample:
        return write_prediction_files(
            folder, stem, sample.get_image_path(), sample.image.open(), anomaly_map, prediction.score, normalized,
            JET_COLOURS, thresholds,
        )


def decision_report(
    samples: Sequence[HRSample], scores: Sequence[float], maps: Sequence[np.ndarray], thresholds: Thresholds | None
) -> dict:
    """Decisions of one category at its thresholds: image TP/FP/TN/FN with precision, recall and F1, and
    the same over pixels at the pixel threshold (images with masks); a note instead without thresholds."""
    if thresholds is None:
        return {"note": NO_THRESHOLDS}
    labels = [s.resolved_label() for s in samples]
    report: dict = {"rule": thresholds.rule, "scale": thresholds.scale,
                    "image_threshold": thresholds.image, "pixel_threshold": thresholds.pixel}
    report.update(confusion(scores, labels, thresholds.image))
    counts = np.zeros(4, dtype=np.int64)  # tp, fp, tn, fn
    with_masks = 0
    for sample, anomaly_map, label in zip(samples, maps, labels):
        if sample.mask is None and label != 0:
            continue  # a defective image without a mask says nothing about its pixels
        was_open = sample.mask is not None and sample.mask.image is not None
        truth = sample.full_mask() > 0
        if sample.mask is not None and not was_open:
            sample.mask.close()
        flagged = np.asarray(anomaly_map, dtype=np.float32) > thresholds.pixel
        hits = int(np.count_nonzero(flagged & truth))
        alarms = int(np.count_nonzero(flagged)) - hits
        misses = int(np.count_nonzero(truth)) - hits
        counts += [hits, alarms, truth.size - hits - alarms - misses, misses]
        with_masks += 1
    if with_masks:
        report.update({f"pixel_{k}": v for k, v in counts_to_metrics(*(int(c) for c in counts)).items()})
    return report
