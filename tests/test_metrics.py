"""Evaluators against scikit-learn and a NumPy PRO reference; reports and evaluator specs."""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

import hiad_pl.metrics as hm
from hiad_pl.metrics import (
    UndefinedMetricError,
    UndefinedMetricWarning,
    binning,
    default_evaluators,
    evaluate,
    evaluators,
    format_table,
    image_metrics,
    inputs,
    pixel,
    pixel_metrics,
    pro_metric,
    resolve_evaluator,
    save_report,
)
from hiad_pl.metrics import gpu as twins
from hiad_pl.utils import metrics, metrics_gpu

Maps = list[np.ndarray]
Masks = list[np.ndarray | None]


# ------------------------------------------------------------------- data sets


def _random_set(seed: int = 0, count: int = 6, shape: tuple[int, int] = (40, 56)) -> tuple[Maps, Masks]:
    """Noise maps; odd images carry a few defects that score a little higher."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for index in range(count):
        score = rng.random(shape).astype(np.float32)
        if index % 2:
            mask = np.zeros(shape, np.uint8)
            mask[1:3, 5:7] = 1
            mask[4, 8] = mask[5, 9] = 1  # diagonal neighbours: one 8-connected region
            mask[0:2, 2:4] = 1
            score[mask > 0] += 0.4 * rng.random(int(mask.sum()), dtype=np.float32)
            masks.append(mask)
        else:
            masks.append(None)
        maps.append(score)
    return maps, masks


def _tied_set() -> tuple[Maps, Masks]:
    """Scores on five levels, outside [0, 1], with all-zero and missing masks."""
    maps, masks = _random_set(seed=1)
    tied = [np.round(score * 4).astype(np.float32) * 3 - 5 for score in maps]
    masks[0] = np.zeros_like(maps[0], dtype=np.uint8)  # an empty mask, not None
    return tied, masks


def _single_pixel_set() -> tuple[Maps, Masks]:
    """One defective pixel in the whole set."""
    maps, _ = _random_set(seed=2, count=3)
    mask = np.zeros_like(maps[1], dtype=np.uint8)
    mask[7, 9] = 1
    return maps, [None, mask, None]


def _heavy_tailed_set() -> tuple[Maps, Masks]:
    """Log-normal scores with one extreme hot pixel: an even grid alone would fail."""
    rng = np.random.default_rng(3)
    maps, masks = _random_set(seed=3, count=8, shape=(64, 64))
    tailed = [np.exp(3 * rng.standard_normal(score.shape)).astype(np.float32) * (1 + score) for score in maps]
    tailed[0][0, 0] = 1e9
    return tailed, masks


DATA_SETS = {
    "random": _random_set,
    "ties": _tied_set,
    "single_pixel": _single_pixel_set,
    "heavy_tailed": _heavy_tailed_set,
}


def _flat(maps: Maps, masks: Masks) -> tuple[np.ndarray, np.ndarray]:
    """All pixels' scores and 0/1 labels."""
    labels = [np.zeros(m.size, bool) if g is None else (g > 0).ravel() for m, g in zip(maps, masks)]
    return np.concatenate([m.ravel() for m in maps]).astype(np.float64), np.concatenate(labels)


def _sklearn_pixel(maps: Maps, masks: Masks) -> dict[str, float]:
    """Pixel metrics from scikit-learn."""
    scores, labels = _flat(maps, masks)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    best = int(np.argmax(f1))
    return {
        "pixel_auroc": roc_auc_score(labels, scores),
        "pixel_ap": average_precision_score(labels, scores),
        "pixel_f1": f1[best],
        "seg_threshold": thresholds[best],
    }


def _f1_at(maps: Maps, masks: Masks, threshold: float) -> float:
    """F1 of the segmentation ``score >= threshold``."""
    scores, labels = _flat(maps, masks)
    predicted = scores >= threshold
    true_positive = np.sum(predicted & labels)
    return 2 * true_positive / (predicted.sum() + labels.sum())


def _reference_pro(maps: Maps, masks: Masks, limit: float = 0.3) -> float:
    """Straightforward AUPRO: every region's overlap at every distinct score."""
    scores, labels = _flat(maps, masks)
    regions = []
    for index, mask in enumerate(masks):
        if mask is not None:
            labelled, count = ndimage.label(mask > 0, structure=np.ones((3, 3)))
            regions += [(index, labelled == region) for region in range(1, count + 1)]
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])

    def share_above(values: np.ndarray) -> np.ndarray:
        """Share of ``values`` at or above each threshold."""
        return 1 - np.searchsorted(np.sort(values), thresholds) / values.size

    overlaps = np.mean([share_above(maps[index][region]) for index, region in regions], axis=0)
    points = list(zip(share_above(scores[~labels]), overlaps))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                cut = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + cut) / 2
            break
    return area / limit


# ----------------------------------------------------------------- image metrics


@pytest.mark.parametrize("tied", [False, True])
def test_image_metrics_match_sklearn(tied: bool) -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 40)
    scores = rng.random(40) + 0.5 * labels
    if tied:
        scores = np.round(scores * 3) * 7  # few levels, far outside [0, 1]
    result = metrics.compute_imagewise_metrics(scores, labels, None, None)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert result["image_threshold"] == pytest.approx(thresholds[1 + np.argmax((tpr - fpr)[1:])], abs=1e-6)
    assert all(type(value) is float for value in result.values())


def test_image_metrics_undefined_and_invalid() -> None:
    with pytest.raises(UndefinedMetricError, match="no anomalous image") as caught:
        image_metrics([0.1, 0.2], [0, 0])
    assert caught.value.metrics == ("image_auroc", "image_threshold")
    with pytest.raises(UndefinedMetricError, match="no normal image"):
        image_metrics([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        image_metrics([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="3 values but gt_labels has 2"):
        image_metrics([0.1, 0.2, 0.3], [0, 1])


# ----------------------------------------------------------------- pixel metrics


@pytest.mark.parametrize("name", list(DATA_SETS))
def test_pixel_metrics_exact_match_sklearn(name: str) -> None:
    maps, masks = DATA_SETS[name]()
    result = pixel_metrics(maps, masks, mode="exact")
    expected = _sklearn_pixel(maps, masks)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6, rel=1e-6), key
    assert _f1_at(maps, masks, result["seg_threshold"]) == pytest.approx(result["pixel_f1"], abs=1e-6)


@pytest.mark.parametrize("name", list(DATA_SETS))
def test_pixel_metrics_binned_close_to_exact(name: str) -> None:
    maps, masks = DATA_SETS[name]()
    exact = pixel_metrics(maps, masks, mode="exact")
    binned = pixel_metrics(maps, masks, mode="binned")
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1"):
        assert binned[key] == pytest.approx(exact[key], abs=1e-3), key


def test_binned_equals_exact_when_every_score_is_a_threshold() -> None:
    maps, masks = _tied_set()
    exact = pixel_metrics(maps, masks, mode="exact")
    binned = pixel_metrics(maps, masks, mode="binned")
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1"):
        assert binned[key] == pytest.approx(exact[key], abs=1e-6), key
    # a binned threshold may sit below the score it stands for, with the same F1
    assert _f1_at(maps, masks, binned["seg_threshold"]) == pytest.approx(exact["pixel_f1"], abs=1e-6)


def test_auto_mode_switches_to_binned_above_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    maps, masks = _random_set()
    exact, binned = pixel_metrics(maps, masks, mode="exact"), pixel_metrics(maps, masks, mode="binned")
    assert exact["pixel_auroc"] != binned["pixel_auroc"]
    assert pixel_metrics(maps, masks) == exact
    monkeypatch.setattr(inputs, "EXACT_MAX_PIXELS", maps[0].size)
    assert pixel_metrics(maps, masks) == binned


def test_binned_state_does_not_grow_with_pixels() -> None:
    maps, masks = _random_set()
    curve = pixel._PixelCurve(binning.Binner(torch.linspace(0, 1, 50), 0.0, 1.0))
    for image in inputs.prepared_images(list(zip(maps, masks)), torch.device("cpu")):
        curve.update(image.scores, image.defect_index)
    state = curve.state()
    assert isinstance(state, torch.Tensor) and state.shape == (50, 2, 2)
    assert int(state.sum()) == sum(score.size for score in maps) * 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, -3.0, 1000.0])
def test_binner_equals_bucketize(dtype: torch.dtype, offset: float) -> None:
    generator = torch.Generator().manual_seed(0)
    scores = (offset + torch.randn(20000, generator=generator, dtype=torch.float64) ** 3).to(dtype)
    low, high = float(scores.min()), float(scores.max())
    random = torch.sort(scores[torch.randint(0, scores.numel(), (300,), generator=generator)]).values
    # thresholds on scores, on the lookup cells' edges and just beside them
    cells = binning.Binner.cells
    edges = low + torch.arange(0, cells, 997, dtype=torch.float64) * (high - low) / cells
    next_up = torch.nextafter(edges.to(dtype), torch.tensor(np.inf, dtype=dtype))
    beside = torch.cat([edges, next_up.double()])
    thresholds = torch.unique(torch.cat([random, beside.to(dtype), torch.tensor([low, high], dtype=dtype)]))
    scores = torch.cat([scores, thresholds, beside.to(dtype).clamp(low, high)])
    expected = torch.bucketize(scores, thresholds, right=True, out_int32=True)
    assert torch.equal(binning.Binner(thresholds, low, high)(scores), expected)
    constant = torch.full((10,), 2.0, dtype=dtype)
    expected = torch.bucketize(constant, thresholds[:3], right=True, out_int32=True)
    assert torch.equal(binning.Binner(thresholds[:3], 2.0, 2.0)(constant), expected)


def test_all_normal_pixels_are_undefined() -> None:
    maps, _ = _random_set(count=3)
    for masks in (None, [None, np.zeros_like(maps[0]), None]):
        with pytest.raises(UndefinedMetricError, match="no anomalous pixel"):
            pixel_metrics(maps, masks)
        with pytest.raises(UndefinedMetricError, match="no anomalous pixel"):
            pro_metric(maps, masks)
    with pytest.raises(UndefinedMetricError, match="no normal pixel"):
        pixel_metrics(maps, [np.ones_like(score) for score in maps])


def test_invalid_maps_and_masks_name_the_image() -> None:
    maps, masks = _random_set(count=3)
    with pytest.raises(ValueError, match=r"gt_masks\[1\] has shape \(3, 3\)"):
        pixel_metrics(maps, [None, np.zeros((3, 3)), None])
    bad = [score.copy() for score in maps]
    bad[2][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"prediction_masks\[2\] contains NaN"):
        pro_metric(bad, masks)
    with pytest.raises(ValueError, match=r"prediction_masks\[0\] has shape \(1, 40, 56\)"):
        pixel_metrics([maps[0][None]], None)
    with pytest.raises(ValueError, match="3 maps but gt_masks has 2"):
        pixel_metrics(maps, masks[:2])
    with pytest.raises(ValueError, match="mode must be"):
        pixel_metrics(maps, masks, mode="fast")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- PRO


@pytest.mark.parametrize("name", ["random", "ties", "single_pixel"])
def test_pro_exact_matches_reference(name: str) -> None:
    maps, masks = DATA_SETS[name]()
    expected = _reference_pro(maps, masks)
    assert pro_metric(maps, masks, mode="exact")["pro"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", list(DATA_SETS))
def test_pro_binned_close_to_exact(name: str) -> None:
    maps, masks = DATA_SETS[name]()
    exact = pro_metric(maps, masks, mode="exact")["pro"]
    assert pro_metric(maps, masks, mode="binned")["pro"] == pytest.approx(exact, abs=1e-3)


def test_pro_with_many_regions_and_other_limits() -> None:
    rng = np.random.default_rng(5)
    mask = np.zeros((64, 64), np.uint8)
    mask[::2, ::2] = 1  # 1024 isolated pixels, not even diagonal neighbours
    mask[0:9, 0:9] = 1  # and one larger region in their place
    score = np.round(rng.random((64, 64)) * 20).astype(np.float32) + 3 * mask
    maps, masks = [score, rng.random((64, 64)).astype(np.float32)], [mask, None]
    for limit in (0.3, 0.05, 1.0):
        expected = _reference_pro(maps, masks, limit)
        exact = pro_metric(maps, masks, mode="exact", fpr_limit=limit)["pro"]
        binned = pro_metric(maps, masks, mode="binned", fpr_limit=limit)["pro"]
        assert exact == pytest.approx(expected, abs=1e-6)
        assert binned == pytest.approx(expected, abs=1e-3)


def test_perfect_and_inverted_maps() -> None:
    maps, masks = _random_set()
    perfect = [np.zeros_like(score) if g is None else g.astype(np.float32) for score, g in zip(maps, masks)]
    for mode in ("exact", "binned"):
        assert pro_metric(perfect, masks, mode=mode)["pro"] == pytest.approx(1.0)
        assert pixel_metrics(perfect, masks, mode=mode)["pixel_auroc"] == pytest.approx(1.0)
        assert pro_metric([-score for score in perfect], masks, mode=mode)["pro"] == pytest.approx(0.0)


# ----------------------------------------------------------------------- resizing


def test_resize_of_block_constant_maps_keeps_the_metrics() -> None:
    maps, masks = _random_set(count=4, shape=(6, 10))
    # 4x4 blocks: bilinear and nearest downsampling by 4 return the blocks exactly
    big_maps = [np.kron(score, np.ones((4, 4), np.float32)) for score in maps]
    big_masks = [None if mask is None else np.kron(mask, np.ones((4, 4), np.uint8)) for mask in masks]
    for mode in ("exact", "binned"):
        small = pixel_metrics(maps, masks, mode=mode)
        options = {"resize": (10, 6), "mode": mode}
        resized = metrics.compute_pixelwise_metrics_resize(None, None, big_maps, big_masks, **options)
        assert resized == pytest.approx(small, abs=1e-6)
        pro = metrics.compute_pro_resize(None, None, big_maps, big_masks, **options)
        expected = pro_metric(maps, masks, mode=mode)
        assert pro == pytest.approx({**expected, "pixel_pro": expected["pro"]}, abs=1e-6)  # HiAD's name too


def test_resize_int_is_square_and_validated() -> None:
    maps, masks = _random_set(count=2)
    resized_maps, resized_masks = hm.resize_maps(maps, masks, 16)
    assert [tuple(score.shape) for score in resized_maps] == [(16, 16)] * 2
    assert resized_masks[0] is None and resized_masks[1].shape == (16, 16) and resized_masks[1].dtype == bool
    with pytest.raises(ValueError, match="resize must be positive"):
        hm.resize_maps(maps, masks, 0)


# ------------------------------------------------------------------- GPU faces


def test_gpu_module_falls_back_to_cpu_once_with_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    twins._warn_cuda_absent.cache_clear()
    maps, masks = _random_set()
    scores, labels = [float(score.max()) for score in maps], [0, 1] * 3
    pairs = [
        (metrics.compute_imagewise_metrics, metrics_gpu.compute_imagewise_metrics_gpu, {}),
        (metrics.compute_pixelwise_metrics, metrics_gpu.compute_pixelwise_metrics_gpu, {}),
        (metrics.compute_pro, metrics_gpu.compute_pro_gpu, {}),
        (
            metrics.compute_pixelwise_metrics_resize,
            metrics_gpu.compute_pixelwise_metrics_gpu_resize,
            {"resize": 24},
        ),
        (metrics.compute_pro_resize, metrics_gpu.compute_pro_gpu_resize, {"resize": (30, 20)}),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cpu, gpu, kwargs in pairs:
            assert gpu(scores, labels, maps, masks, **kwargs) == cpu(scores, labels, maps, masks, **kwargs)
    fallback = [w for w in caught if "CUDA is not available" in str(w.message)]
    assert len(fallback) == 1 and fallback[0].category is RuntimeWarning


def test_gpu_twins_compute_where_they_are_told_and_cpu_evaluators_stay_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[torch.device] = []

    def recording(maps, masks, device=None, **kwargs):
        seen.append(device)
        return {"pro": 0.5}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # so _gpu keeps the requested device
    monkeypatch.setattr(evaluators, "pro_metric", recording)
    maps, masks = _random_set(count=2)
    metrics_gpu.compute_pro_gpu(None, None, maps, masks, torch.device("cuda", 3))  # device given by position
    metrics_gpu.compute_pro_gpu(None, None, maps, masks)
    metrics.compute_pro(None, None, maps, masks, device="cuda:3")
    assert seen == [torch.device("cuda", 3), torch.device("cuda", 0), torch.device("cpu")]
    assert metrics_gpu.compute_pro_gpu.__name__ == "compute_pro_gpu" and "cuda:0" in metrics_gpu.compute_pro_gpu.__doc__


def test_cpu_module_offers_the_tutorials_gpu_names() -> None:
    assert metrics.compute_imagewise_metrics_gpu is metrics.compute_imagewise_metrics
    assert metrics.compute_pixelwise_metrics_gpu_resize is metrics.compute_pixelwise_metrics_resize
    assert metrics.compute_pro_gpu_resize is metrics.compute_pro_resize
    maps, masks = _random_set(count=2)
    # the CPU module ignores the device it is given
    result = metrics.compute_pro_gpu(None, None, maps, masks, device="cuda:7")
    assert result["pro"] == result["pixel_pro"] == pro_metric(maps, masks)["pro"]


# ------------------------------------------------------------------------ reports


def _two_classes() -> tuple[list[float], list[int], Maps, Masks, list[str]]:
    """Class 'bottle' with defects; class 'cable' with normal images only."""
    maps, masks = _random_set(count=6)
    more, _ = _random_set(seed=9, count=2)
    scores = [float(score.max()) for score in maps + more]
    return scores, [0, 1] * 3 + [0, 0], maps + more, masks + [None, None], ["bottle"] * 6 + ["cable"] * 2


def test_evaluate_per_class_with_undefined_class() -> None:
    scores, labels, maps, masks, names = _two_classes()
    with pytest.warns(UndefinedMetricWarning) as caught:
        report = evaluate(default_evaluators(), scores, labels, maps, masks, names)
    messages = [str(w.message) for w in caught]
    for key in ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1", "pro"):
        assert any("'cable'" in message and key in message for message in messages), key
    assert list(report) == ["bottle", "cable", "mean"]
    assert report["bottle"]["pixel_auroc"] == pytest.approx(pixel_metrics(maps[:6], masks[:6])["pixel_auroc"])
    expected = image_metrics(scores[:6], labels[:6])["image_auroc"]
    assert report["bottle"]["image_auroc"] == pytest.approx(expected)
    assert report["cable"]["pro"] is None and "no anomalous pixel" in report.notes["cable"]["pro"]
    assert report["mean"]["pro"] == report["bottle"]["pro"]
    assert "undefined for: cable" in report.notes["mean"]["pro"]
    assert "image_threshold" not in report["mean"]


def test_format_table_matches_the_tutorial() -> None:
    values = {"image_auroc": 1.0, "pixel_auroc": 0.9910331, "pixel_ap": 0.5191224, "pixel_f1": 0.5433031}
    table = format_table({"unknown": {**values, "seg_threshold": 0.3}, "mean": values})
    assert table == (
        "|  clsname  |  image_auroc  |  pixel_auroc  |  pixel_ap  |  pixel_f1  |\n"
        "|:---------:|:-------------:|:-------------:|:----------:|:----------:|\n"
        "|  unknown  |       1       |   0.991033    |  0.519122  |  0.543303  |\n"
        "|   mean    |       1       |   0.991033    |  0.519122  |  0.543303  |"
    )


def test_save_report_writes_json_and_markdown(tmp_path: Path) -> None:
    scores, labels, maps, masks, names = _two_classes()
    with pytest.warns(UndefinedMetricWarning):
        chosen = [metrics.compute_imagewise_metrics, metrics.compute_pixelwise_metrics]
        report = evaluate(chosen, scores, labels, maps, masks, names)
    json_path, table_path = save_report(report, tmp_path / "run")
    saved = json.loads(json_path.read_text())
    assert saved["metrics"]["cable"]["pixel_auroc"] is None
    assert saved["metrics"]["bottle"]["seg_threshold"] == report["bottle"]["seg_threshold"]
    assert "no anomalous image" in saved["notes"]["cable"]["image_auroc"]
    text = table_path.read_text()
    assert "n/a" in text and "nan" not in text.lower() and "threshold" not in text
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["metrics.json", "metrics.md"]


def test_evaluate_rejects_bad_inputs() -> None:
    scores, labels, maps, masks, names = _two_classes()
    with pytest.raises(ValueError, match="clsnames has 3 entries but maps has 8"):
        evaluate(default_evaluators(), scores, labels, maps, masks, names[:3])
    with pytest.raises(ValueError, match="reserved"):
        evaluate(default_evaluators(), scores, labels, maps, masks, ["mean"] * 8)
    with pytest.raises(ValueError, match="produced twice"):
        evaluate([metrics.compute_pro, metrics.compute_pro], scores, labels, maps, masks, names)


# --------------------------------------------------------- custom evaluators


def mean_score(
    prediction_scores: Any,
    gt_labels: Any,
    prediction_masks: Any,
    gt_masks: Any,
    device: Any = None,
    **kwargs: Any,
) -> dict[str, float]:
    """A custom evaluator for the tests: mean image score, optionally scaled."""
    return {"mean_score": float(np.mean(prediction_scores)) * kwargs.get("scale", 1.0)}


class ScoreCount:
    """A callable evaluator class configured by ``init_args``."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(
        self, prediction_scores: Any, gt_labels: Any, prediction_masks: Any, gt_masks: Any, device: Any = None
    ) -> dict[str, float]:
        """Image count plus the offset, and a NaN metric."""
        return {"count": float(len(prediction_scores) + self.offset), "nan_metric": float("nan")}


def test_resolve_evaluator_specs() -> None:
    assert resolve_evaluator("hiad_pl.utils.metrics.compute_pro") is metrics.compute_pro
    assert resolve_evaluator("hiad_pl.metrics:compute_pro") is hm.compute_pro
    spec = {"function": "hiad_pl.utils.metrics.compute_pro_resize", "kwargs": {"resize": 8}}
    bound = resolve_evaluator(spec)
    assert isinstance(bound, functools.partial) and bound.keywords == {"resize": 8}
    scaled = resolve_evaluator({"class_path": f"{__name__}.mean_score", "init_args": {"scale": 2.0}})
    assert scaled([1.0, 3.0], None, None, None) == {"mean_score": 4.0}
    instance = resolve_evaluator({"class_path": f"{__name__}.ScoreCount", "init_args": {"offset": 1}})
    assert isinstance(instance, ScoreCount) and instance.offset == 1


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("hiad_pl.no_such_module.fn", ValueError, "cannot import module 'hiad_pl.no_such_module'"),
        ("hiad_pl.metrics.no_such_fn", ValueError, "has no 'no_such_fn'"),
        ("compute_pro", ValueError, "expected an import path"),
        ({"function": "hiad_pl.metrics.compute_pro", "class_path": "x.y"}, ValueError, "exactly one of"),
        ({"function": "hiad_pl.metrics.compute_pro", "args": {}}, ValueError, "exactly one of"),
        ("hiad_pl.metrics.compute_pro_resize", TypeError, "resize"),
        ("hiad_pl.metrics.EXACT_MAX_PIXELS", TypeError, "not callable"),
        (42, TypeError, "must be a callable"),
    ],
)
def test_resolve_evaluator_errors(spec: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        resolve_evaluator(spec)


def test_custom_evaluators_in_evaluate() -> None:
    scores, labels, maps, masks, names = _two_classes()
    specs: list[Callable[..., Any] | str | dict[str, Any]] = [
        functools.partial(mean_score, scale=10.0),
        {"class_path": f"{__name__}.ScoreCount", "init_args": {"offset": 0}},
    ]
    with pytest.warns(UndefinedMetricWarning, match="nan_metric"):
        report = evaluate(specs, scores, labels, maps, masks, names)
    assert report["cable"]["count"] == 2.0 and report["bottle"]["count"] == 6.0
    assert report["mean"]["count"] == 4.0
    assert report["bottle"]["mean_score"] == pytest.approx(10 * np.mean(scores[:6]))
    assert report["bottle"]["nan_metric"] is None and "returned nan" in report.notes["bottle"]["nan_metric"]
    assert "mean_score" in format_table(report) and "count" in format_table(report)


# ------------------------------------------------------------- image labels only


def test_defective_images_without_masks_count_in_image_metrics_only(caplog) -> None:
    maps, masks = _random_set(count=8)
    scores = [float(score.max()) for score in maps]
    labels = [0, 1] * 4
    partial = list(masks)
    partial[1] = partial[3] = None  # two of the four defective images are known by their label only
    with caplog.at_level("INFO", logger="hiad_pl"):
        report = evaluate(default_evaluators(), scores, labels, maps, partial, ["bottle"] * 8)
    known = [0, 2, 4, 5, 6, 7]
    expected = pixel_metrics([maps[k] for k in known], [masks[k] for k in known])
    assert report["bottle"]["pixel_auroc"] == pytest.approx(expected["pixel_auroc"])
    assert report["bottle"]["pro"] == pytest.approx(pro_metric([maps[k] for k in known], [masks[k] for k in known])["pro"])
    assert report["bottle"]["image_auroc"] == pytest.approx(image_metrics(scores, labels)["image_auroc"])  # all 8 images
    line = "pixel metrics over the 6 test images with pixel ground truth: 2 of 4 defective test images have no mask (image labels only)"
    assert [r.getMessage() for r in caplog.records] == [f"bottle: {line}"]
    assert report.notes["bottle"]["pixel_auroc"] == line and "image_auroc" not in report.notes.get("bottle", {})

    caplog.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndefinedMetricWarning)  # skipped by design: no warning per metric
        with caplog.at_level("INFO", logger="hiad_pl"):
            report = evaluate(default_evaluators(), scores, labels, maps, [None] * 8, ["bottle"] * 8)
    skipped = "pixel metrics skipped: 4 of 4 defective test images have no mask (image labels only)"
    assert [r.getMessage() for r in caplog.records] == [f"bottle: {skipped}"]
    assert report["bottle"]["image_auroc"] == pytest.approx(image_metrics(scores, labels)["image_auroc"])
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1", "seg_threshold", "pro"):
        assert report["bottle"][key] is None and report.notes["bottle"][key] == skipped
    assert report.pixel_ground_truth["bottle"] == {
        "defective_images": 4, "defective_without_mask": 4, "pixel_metrics": "skipped"
    }
