"""Thresholds from each rule on scores built here, decisions, the fixed-scale overlay and the panel."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiad_pl import fit_settings
from hiad_pl.calibration import (
    calibrate,
    model_thresholds,
    plan_holdout,
    prepare_holdout,
    split_holdout,
    threshold_rule,
)
from hiad_pl.config import ThresholdSection
from hiad_pl.data.sample import HRSample
from hiad_pl.decisions import (
    THRESHOLDS_FILE,
    Thresholds,
    confusion,
    display_range,
    f1_adaptive_threshold,
    quantile_threshold,
)
from hiad_pl.deploy.files import (
    DECISION_COLOURS,
    PREDICTED_COLOUR,
    TRUTH_COLOUR,
    colour_levels,
    decision_panel,
    outline_width,
    overlay,
)
from hiad_pl.errors import InputError
from hiad_pl.inference import Prediction
from hiad_pl.orchestrator import ValidationConfig
from hiad_pl.syn import RandomBoxSynthesizer
from hiad_pl.tasks.base import Task
from hiad_pl.visualize import JET_COLOURS


def test_quantile_threshold_is_the_known_quantile() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(100, dtype=np.float64))  # 0..99
    assert quantile_threshold(scores, 0.01) == pytest.approx(98.01)  # 0.99 * 99 between 98 and 99
    assert quantile_threshold(scores, 0.1) == pytest.approx(89.1)
    assert quantile_threshold(scores, 0.0) == 99.0
    assert (scores > quantile_threshold(scores, 0.05)).mean() <= 0.05
    with pytest.raises(ValueError, match="normal_fpr"):
        quantile_threshold(scores, 1.0)


def test_f1_adaptive_threshold_on_a_known_score_set() -> None:
    # ranked: 0.8+ 0.7+ 0.6- 0.35+ 0.2- 0.1-; the best cut flags the top four: P 3/4, R 1, F1 6/7
    scores = np.array([0.1, 0.6, 0.35, 0.8, 0.7, 0.2])
    labels = np.array([0, 0, 1, 1, 1, 0])
    best = f1_adaptive_threshold(scores, labels)
    assert best["threshold"] == pytest.approx(0.275)  # the middle of the gap 0.2 .. 0.35
    assert best["f1"] == pytest.approx(6 / 7) and best["precision"] == pytest.approx(0.75) and best["recall"] == 1.0
    counts = confusion(scores, labels, best["threshold"])
    assert (counts["tp"], counts["fp"], counts["tn"], counts["fn"]) == (3, 1, 2, 0)
    assert counts["f1"] == pytest.approx(6 / 7)
    # ties: a cut never splits equal scores
    tied = f1_adaptive_threshold(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0]))
    assert tied["threshold"] == pytest.approx(0.3) and tied["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="both normal and anomalous"):
        f1_adaptive_threshold(scores, np.zeros(6))


def test_confusion_undefined_ratios_are_none() -> None:
    counts = confusion([0.1, 0.2], [0, 0], 0.5)
    assert (counts["tn"], counts["precision"], counts["recall"], counts["f1"]) == (2, None, None, None)


def test_thresholds_round_trip_decide_and_mask(tmp_path: Path) -> None:
    thresholds = Thresholds(0.5, 0.3, "given", "normalised", (0.0, 0.6), {"note": "x"})
    assert thresholds.decide(0.5).label == "OK" and thresholds.decide(0.51).label == "NG"
    assert thresholds.decide(0.7).todict() == {"label": "NG", "score": 0.7, "threshold": 0.5}
    mask = thresholds.mask(np.array([[0.3, 0.31], [0.0, 1.0]], np.float32))
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 255], [0, 255]]
    path = thresholds.save(tmp_path)
    assert path.name == THRESHOLDS_FILE and Thresholds.load(tmp_path) == thresholds
    assert Thresholds.load(tmp_path / "none") is None
    path.write_text(json.dumps({"image": 1.0}))
    with pytest.raises(InputError, match=f"{THRESHOLDS_FILE}: not valid thresholds"):
        Thresholds.load(tmp_path)
    path.write_text("{truncated")  # a bad file is the user's to mend (exit 2), named with the way out
    with pytest.raises(InputError, match=f"{THRESHOLDS_FILE}: not valid JSON .*rerun fit"):
        Thresholds.load(tmp_path)
    settings = tmp_path / "fit_settings.json"
    settings.write_text("{truncated")
    with pytest.raises(InputError, match="fit_settings.json: not valid JSON .*--refit true"):
        fit_settings.load(settings)


# ------------------------------------------------------------ rules through calibrate, on a stub model


@dataclass
class StubPipeline:
    """Scores each image as its file says: maps are the pixel values / 100 (+1 where the mask marks a defect)."""

    calls: list

    def predict(self, samples):
        for k, sample in enumerate(samples):
            self.calls.append(sample.get_image_path())
            with sample:
                values = sample.image.open()[..., 0].astype(np.float32) / 100
                if sample.mask is not None:
                    values = values + (sample.mask.open() > 0)
            yield Prediction(k, torch.from_numpy(values), float(values.max()))


class StubOrchestrator:
    """What :func:`calibrate` uses of a model folder: root, tasks, checkpoints, normalisation and a pipeline."""

    def __init__(self, root: Path, normalized: bool = False) -> None:
        self.root = root
        self.tasks = [Task("task_0")]
        self.normalized = normalized
        self.calls: list[str] = []
        self.checkpoint_path(self.tasks[0]).parent.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path(self.tasks[0]).write_bytes(b"weights")

    def checkpoint_path(self, task: Task) -> Path:
        return self.root / "checkpoints" / f"{task.name}.ckpt"

    def load(self, device: str = "cpu") -> None:
        pass

    def pipeline(self, device: str = "cpu") -> StubPipeline:
        return StubPipeline(self.calls)


def flat_images(folder: Path, values: list[int], size: int = 16) -> list[HRSample]:
    """Grey images of one value each (plus a brighter pixel), as samples."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for k, value in enumerate(values):
        array = np.full((size, size, 3), value, np.uint8)
        array[0, 0] = value + 1
        Image.fromarray(array).save(folder / f"{k:03d}.png")
        samples.append(HRSample(folder / f"{k:03d}.png", image_size=size))
    return samples


def test_normal_fpr_thresholds_are_the_quantiles_of_held_out_normal_images(tmp_path: Path) -> None:
    held = flat_images(tmp_path / "held", [10, 20, 30, 40])  # image scores 0.11 .. 0.41 (the bright pixel)
    model = StubOrchestrator(tmp_path / "model")
    section = ThresholdSection(rule="normal_fpr", normal_fpr=0.25, pixel_fpr=0.5)
    thresholds = calibrate(model, section, "normal_fpr", "cpu", [], held, None)
    assert thresholds.rule == "normal_fpr" and thresholds.scale == "raw"
    assert thresholds.image == pytest.approx(np.quantile([0.11, 0.21, 0.31, 0.41], 0.75))  # 0.335
    pixels = np.concatenate([np.r_[v + 1, [v] * 255] / 100 for v in (10, 20, 30, 40)])
    assert thresholds.pixel == pytest.approx(np.quantile(pixels, 0.5))  # 0.25
    assert thresholds.display == pytest.approx(display_range(pixels, thresholds.pixel))
    assert json.loads((model.root / THRESHOLDS_FILE).read_text())["image"] == pytest.approx(thresholds.image)
    # the same settings and checkpoints: kept, nothing scored again; another budget: chosen again
    scored = len(model.calls)
    assert calibrate(model, section, "normal_fpr", "cpu", [], held, None) == thresholds and len(model.calls) == scored
    stricter = calibrate(model, ThresholdSection(rule="normal_fpr", normal_fpr=0.0), "normal_fpr", "cpu", [], held, None)
    assert stricter.image == pytest.approx(0.41) and len(model.calls) > scored
    assert model_thresholds(model) == stricter
    model.checkpoint_path(model.tasks[0]).write_bytes(b"refitted weights")  # a refit makes them stale
    assert model_thresholds(model) is None


def test_pixel_sampling_of_large_maps_is_announced_with_its_numbers(tmp_path: Path, monkeypatch, caplog) -> None:
    from hiad_pl import calibration

    monkeypatch.setattr(calibration, "PIXELS_PER_IMAGE", 64)  # the 16 x 16 stub maps hold 256 pixels
    held = flat_images(tmp_path / "held", [10, 20, 30, 40])
    with caplog.at_level("WARNING", logger="hiad_pl"):
        calibrate(StubOrchestrator(tmp_path / "model"), ThresholdSection(rule="normal_fpr"), "normal_fpr", "cpu", [], held, None)
    assert "sample of 64 of the 256 pixels of each map (25.0%)" in caplog.text


def test_f1_adaptive_thresholds_on_synthetic_defects_of_the_validation_images(tmp_path: Path) -> None:
    train = flat_images(tmp_path / "train", [10, 12, 14, 16, 18, 20, 22, 24, 26, 28], size=32)
    model = StubOrchestrator(tmp_path / "model", normalized=True)
    val = ValidationConfig(RandomBoxSynthesizer(p=1.0, seed=0), val_sample_ratio=0.3)
    thresholds = calibrate(model, ThresholdSection(), "f1_adaptive", "cpu", train, [], val)
    # clean images score at most 0.29, synthetic defects add 1 to their pixels: every cut in the gap is perfect
    assert thresholds.rule == "f1_adaptive" and thresholds.scale == "normalised"
    assert thresholds.details["validation_images"] == 3 and thresholds.details["synthetic_defective_images"] == 3
    assert thresholds.details["image_f1"] == 1.0 and thresholds.details["pixel_f1"] == 1.0
    assert 0.29 < thresholds.image < 1.1 and 0.29 < thresholds.pixel < 1.1
    assert len(model.calls) == 6  # three clean validation images and their three synthetic copies
    with pytest.raises(ValueError, match="needs a validation set"):
        calibrate(StubOrchestrator(tmp_path / "other"), ThresholdSection(), "f1_adaptive", "cpu", train, [], None)


def test_given_thresholds_are_kept_as_given(tmp_path: Path) -> None:
    section = ThresholdSection(image=0.7, pixel=0.4)
    assert section.resolved(has_validation=True) == "given"
    thresholds = calibrate(StubOrchestrator(tmp_path), section, "given", "cpu", [], [], None)
    assert (thresholds.image, thresholds.pixel, thresholds.rule) == (0.7, 0.4, "given")
    assert thresholds.display[0] < 0.4 < thresholds.display[1]


def test_threshold_section_rules_and_bad_values() -> None:
    assert ThresholdSection().resolved(has_validation=False) == "normal_fpr"
    assert ThresholdSection().resolved(has_validation=True) == "f1_adaptive"
    assert ThresholdSection(rule="normal_fpr").resolved(has_validation=True) == "normal_fpr"
    assert threshold_rule(ThresholdSection(rule="none"), False, 10, "x") is None
    assert threshold_rule(ThresholdSection(), False, 1, "x") is None  # the default with one image: no thresholds
    with pytest.raises(ValueError, match="only 1"):
        split_holdout([object()], 0.1, 0)  # type: ignore[list-item]
    for bad, words in (({"image": 0.5}, "both threshold.image and threshold.pixel"),
                       ({"rule": "given"}, "needs threshold.image"),
                       ({"normal_fpr": 1.5}, "must lie in"),
                       ({"holdout": 0.0}, "holdout must lie"),
                       ({"rule": "normal_fpr", "image": 1.0, "pixel": 1.0}, "rule 'given'")):
        with pytest.raises(ValueError, match=words):
            ThresholdSection(**bad)


def test_holdout_is_seeded_recorded_and_never_changed_under_fitted_models(tmp_path: Path) -> None:
    samples = flat_images(tmp_path / "train", list(range(10, 30)))
    fit, held = split_holdout(samples, 0.1, seed=0)
    assert len(held) == 2 and len(fit) == 18 and not {s.get_image_path() for s in held} & {s.get_image_path() for s in fit}
    names = {s.get_image_path() for s in held}
    assert {s.get_image_path() for s in split_holdout(samples[::-1], 0.1, seed=0)[1]} == names  # by name, not order
    assert split_holdout(samples, 0.1, seed=1)[1] != held
    folder = tmp_path / "model"
    section = ThresholdSection(rule="normal_fpr")
    _, held2 = prepare_holdout(folder, samples, section, "normal_fpr", seed=0)
    assert [s.get_image_path() for s in held2] == json.loads((folder / "holdout.json").read_text())["images"]
    assert {s.get_image_path() for s in held2} == {s.get_image_path() for s in held}
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "task_0.ckpt").write_bytes(b"fitted")
    with pytest.raises(ValueError, match="fitted with other images held out"):
        prepare_holdout(folder, samples, ThresholdSection(rule="normal_fpr", holdout=0.3), "normal_fpr", seed=0)
    # another rule keeps the fitted folder's holdout out of fitting
    assert len(prepare_holdout(folder, samples, section, "given", seed=0)[0]) == 18
    (folder / "holdout.json").unlink()
    with pytest.raises(ValueError, match="fitted on all its training images"):
        prepare_holdout(folder, samples, section, "normal_fpr", seed=0)
    with pytest.raises(ValueError, match="only 1"):
        split_holdout(samples[:1], 0.1, seed=0)
    # a refit discards the models: a new holdout is chosen and recorded, and the refit keeps it
    fit3, held3 = prepare_holdout(folder, samples, ThresholdSection(rule="normal_fpr", holdout=0.3), "normal_fpr",
                                  seed=0, refit=True)
    assert len(held3) == 6 and json.loads((folder / "holdout.json").read_text())["share"] == 0.3
    with pytest.raises(ValueError, match="fitted with other images held out"):  # the old share, without a refit
        plan_holdout(folder, samples, section, "normal_fpr", seed=0)
    prepare_holdout(folder, samples, section, "given", seed=0, refit=True)
    assert not (folder / "holdout.json").exists()  # a refit without holdout fits on every image


def test_refit_keeps_the_new_holdout_and_a_changed_holdout_is_a_changed_setting(tmp_path: Path) -> None:
    from hiad_pl.orchestrator import TaskOrchestrator

    samples = flat_images(tmp_path / "train", list(range(10, 20)))
    folder = tmp_path / "model"
    orchestrator = TaskOrchestrator("hiad_pl.detectors.HRPatchCore", {}, [], folder)
    folder.mkdir()
    prepare_holdout(folder, samples, ThresholdSection(rule="normal_fpr", holdout=0.2), "normal_fpr", seed=0, refit=True)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "task_0.ckpt").write_bytes(b"old")
    orchestrator.discard_fitted()
    assert (folder / "holdout.json").is_file() and not (folder / "checkpoints").exists()
    fit_a, _ = split_holdout(samples, 0.2, seed=0)
    fit_b, _ = split_holdout(samples, 0.3, seed=0)
    a = orchestrator.fit_settings(fit_a, None)
    b = orchestrator.fit_settings(fit_b, None)
    assert a != b  # the images fitted on are compared, so another holdout is refused without --refit


# ------------------------------------------------------------ overlays and panels


def heat_levels(anomaly_map: np.ndarray, display: tuple[float, float]) -> np.ndarray:
    """The colour levels an overlay shows, read back from the overlay over a black image (nearest JET entry)."""
    blended = overlay(np.zeros((*anomaly_map.shape, 3), np.uint8), anomaly_map, JET_COLOURS, *display, alpha=1.0)
    distances = np.abs(blended[..., None, :].astype(int) - JET_COLOURS[None, None].astype(int)).sum(-1)
    return distances.argmin(-1)


def test_a_good_image_overlay_stays_below_the_threshold_colour_on_the_run_scale() -> None:
    rng = np.random.default_rng(0)
    normal = rng.normal(1.0, 0.1, (200, 200)).astype(np.float32)
    pixel_threshold = quantile_threshold(normal, 0.0) + 1e-3  # every normal pixel below it
    display = display_range(normal, pixel_threshold)
    threshold_level = int(colour_levels(np.array([pixel_threshold], np.float32), *display)[0])
    assert threshold_level == 128
    assert heat_levels(normal, display).max() < threshold_level
    # a per-image min-max scale would paint the good image's hottest pixel at the top colour
    assert heat_levels(normal, (float(normal.min()), float(normal.max()))).max() == 255
    defect = normal.copy()
    defect[90:110, 90:110] = pixel_threshold + 0.5
    levels = heat_levels(defect, display)
    assert (levels[90:110, 90:110] >= threshold_level).all() and (np.delete(levels, slice(90, 110), 0) < threshold_level).all()


def test_panel_shows_both_outlines_and_the_decision_and_reads_at_2048_px() -> None:
    size = 2048
    image = np.full((size, size, 3), 128, np.uint8)
    anomaly_map = np.zeros((size, size), np.float32)
    anomaly_map[800:1200, 800:1200] = 1.0
    truth = np.zeros((size, size), np.uint8)
    truth[820:1180, 700:1100] = 1
    thresholds = Thresholds(0.5, 0.5, "given", "normalised", (0.0, 1.0))
    panel = decision_panel(image, anomaly_map, JET_COLOURS, thresholds.display, 0.9, thresholds, truth, side=size)
    body = panel[-size:]
    right = body[:, -size:]
    assert panel.shape[1] > 2 * size and panel.shape[0] > size  # image | overlay, caption above
    width = outline_width(size)
    assert width >= 5
    white = np.all(right == PREDICTED_COLOUR, axis=-1)
    magenta = np.all(right == TRUTH_COLOUR, axis=-1)
    # outlines: the inner width-px rings of the predicted square and of the truth rectangle (drawn last, on top)
    def ring(rows: slice, cols: slice) -> np.ndarray:
        region = np.zeros((size, size), bool)
        region[rows, cols] = True
        inner = np.zeros((size, size), bool)
        inner[rows.start + width : rows.stop - width, cols.start + width : cols.stop - width] = True
        return region & ~inner

    truth_ring = ring(slice(820, 1180), slice(700, 1100))
    np.testing.assert_array_equal(magenta, truth_ring)
    np.testing.assert_array_equal(white, ring(slice(800, 1200), slice(800, 1200)) & ~truth_ring)
    assert not np.all(body[:, :size] == PREDICTED_COLOUR, axis=-1).any()  # the image half stays untouched
    caption = panel[: panel.shape[0] - size]
    assert np.all(caption == DECISION_COLOURS["NG"], axis=-1).sum() > 100  # "NG ..." written in red
    calm = decision_panel(image, np.zeros((size, size), np.float32), JET_COLOURS, (0.0, 1.0), 0.1, thresholds)
    assert np.all(calm[: calm.shape[0] - size] == DECISION_COLOURS["OK"], axis=-1).sum() > 100
    assert not np.all(calm[-size:] == PREDICTED_COLOUR, axis=-1).any()  # a good part: no outline
    without = decision_panel(image, anomaly_map, JET_COLOURS, (0.0, 1.0), 0.9, None, side=512)
    assert not np.all(without == DECISION_COLOURS["NG"], axis=-1).any()  # no fake decision
