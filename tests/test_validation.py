"""Validation set: normalised scores, statistics from validation patches only, checkpoint selection, early stopping."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PATCHCORE_TEST_CONFIG, patch_trainer
from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.datamodule import PatchDataset, capped_items, patch_loader, split_validation
from hiad_pl.data.discovery import discover
from hiad_pl.data.tiling import inner_maps
from hiad_pl.detectors import HRDetector, HRPatchCore
from hiad_pl.engine.callbacks import ValidationSelector, normalization_statistics
from hiad_pl.orchestrator import RUN_INFO_KEY, TaskOrchestrator, ValidationConfig
from hiad_pl.syn import RandomeBoxSynthesizer
from hiad_pl.task import A2OTaskGenerator, O2OTaskGenerator
from hiad_pl.utils import metrics
from hiad_pl.utils.split_and_gather import MultiResolutionHRImageSpliter


@pytest.fixture(scope="module")
def texture(small_demo: Path):
    (split,) = discover(small_demo, categories=["texture"], image_size=512)
    return split


def test_normalised_scores_in_unit_range_and_statistics_from_validation_only(texture, tmp_path: Path) -> None:
    indexes = MultiResolutionHRImageSpliter(512, 256)
    tasks = A2OTaskGenerator().create_tasks(texture.train, indexes)
    trainer = patch_trainer(tmp_path, tasks, HRPatchCore, PATCHCORE_TEST_CONFIG, batch_size=4)
    synthesizer = RandomeBoxSynthesizer(p=0.5, seed=0)
    val_config = {
        "anomaly_syn_fn": synthesizer,
        "val_sample_ratio": 0.25,
        "max_patch_number": 8,
        "evaluators": [metrics.compute_imagewise_metrics],
    }
    trainer.train(texture.train, gpu_ids=[], val_config=val_config)
    checkpoint_path = tmp_path / "models" / "checkpoints" / "task_0.ckpt"
    stats = torch.load(checkpoint_path, weights_only=True)[RUN_INFO_KEY]["normalization"]
    assert stats is not None and stats["high"] > stats["low"]

    # the statistics are exactly those of the held-out validation patches
    # patches read with the trainer's context margin, scored on the patch alone (ValidationSelector)
    margin = trainer.context_margin
    assert margin > 0
    _, val_samples = split_validation(texture.train, 0.25, seed=0)
    items = capped_items(len(val_samples), len(indexes), 8, seed=0)
    dataset = PatchDataset(val_samples, tasks[0].indexes, synthesizer, seed=0, items=items, context_margin=margin)
    detector = HRPatchCore.load_from_checkpoint(checkpoint_path, weights_only=True).eval()
    batches = list(patch_loader(dataset, 4))
    maps = inner_maps(torch.cat([detector.predict_step(b, 0) for b in batches]), margin)
    masks = torch.cat([b.mask for b in batches])
    in_patch = inner_maps(masks, margin).flatten(1).any(1)
    labels = torch.cat([b.label for b in batches])
    labels[masks.flatten(1).any(1) & ~in_patch] = 0  # a box wholly in the context leaves the patch normal
    assert 0 < int(labels.sum()) < len(labels)
    recomputed = normalization_statistics(maps, labels)
    numbers = ("low", "high", "normal_count")
    assert {k: recomputed[k] for k in numbers} == pytest.approx({k: stats[k] for k in numbers}, rel=1e-5)
    assert recomputed["normal_sketch"] == pytest.approx(stats["normal_sketch"], rel=1e-5) and stats["scope"] == "task"

    scores, anomaly_maps = trainer.inference(texture.test, gpu_ids=[], return_results_only=True)
    assert 0.0 <= scores.min() and scores.max() <= 1.0
    assert all(0.0 <= float(m.min()) and float(m.max()) <= 1.0 for m in anomaly_maps)
    labels = np.array([s.label for s in texture.test])
    assert scores[labels == 1].mean() > scores[labels == 0].mean()

    # a different test set changes nothing that was stored
    trainer.inference(texture.test[:2], gpu_ids=[], return_results_only=True)
    assert torch.load(checkpoint_path, weights_only=True)[RUN_INFO_KEY]["normalization"] == stats


def standout_boxes() -> RandomeBoxSynthesizer:
    """Boxes far from the texture's grey levels (mean difference >= 80), so :class:`FlippingDetector`'s map finds them.

    With the original's 20-60 levels a flat grey box can sit nearer the patch mean than the
    texture around it, and the toy's good epoch then scores no better than its bad ones.
    """
    return RandomeBoxSynthesizer(p=0.5, diff_threshold=(80, 255), seed=0)


class FlippingDetector(HRDetector):
    """A toy detector whose quality is scheduled: good at epoch ``good_epoch`` only.

    Its map is the colour deviation from the patch mean (synthetic boxes stand
    out), multiplied by a sign that training sets per epoch.
    """

    def __init__(self, good_epoch: int = 1, **kwargs) -> None:
        super().__init__(backbone_name="resnet18", layers_to_extract_from=["layer1"], weights="none", **kwargs)
        self.sign = torch.nn.Parameter(torch.tensor(-1.0))

    def anomaly_map(self, batch: PatchBatch) -> torch.Tensor:
        image = batch.image
        return self.sign * (image - image.mean(dim=(-2, -1), keepdim=True)).abs().mean(dim=1)

    def training_step(self, batch: PatchBatch, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            self.sign.fill_(1.0 if self.current_epoch == self.hparams.good_epoch else -1.0)
        return self.sign * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_best_checkpoint_is_kept_and_early_stopping_ends_on_time(texture, tmp_path: Path) -> None:
    indexes = MultiResolutionHRImageSpliter(512, 256)
    tasks = A2OTaskGenerator().create_tasks(texture.train, indexes)
    orchestrator = TaskOrchestrator(
        FlippingDetector,
        {"good_epoch": 1},
        tasks,
        tmp_path / "models",
        batch_size=8,
        trainer_kwargs={"max_epochs": 10},
        early_stop_epochs=2,
    )
    val_config = {"anomaly_syn_fn": standout_boxes(), "val_sample_ratio": 0.25}
    orchestrator.fit(texture.train, [], val_config)
    checkpoint = torch.load(orchestrator.checkpoint_path(tasks[0]), weights_only=True)
    assert checkpoint["state_dict"]["sign"].item() == 1.0  # the weights of the good epoch
    # best at epoch 1, then two validations without improvement: stopped after epoch 3
    assert checkpoint["epoch"] == 4
    selector = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ValidationSelector"))
    assert selector["best_epoch"] == 2  # counted in epochs trained: the weights after the second epoch
    events = list((tmp_path / "models" / "tensorboard" / "task_0").glob("events.*"))
    assert events, "validation metrics go to the task's TensorBoard run"


class WarmingUpDetector(FlippingDetector):
    """A :class:`FlippingDetector` good at epochs ``good_epochs`` whose validations select nothing before ``warmup_epochs``.

    The epoch that produced the weights is kept in a buffer, so the kept checkpoint tells which epoch it is.
    """

    def __init__(self, good_epochs: tuple[int, ...] = (0, 3), warmup_epochs: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("trained_epoch", torch.tensor(-1))

    def training_step(self, batch: PatchBatch, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            self.sign.fill_(1.0 if self.current_epoch in self.hparams.good_epochs else -1.0)
            self.trained_epoch.fill_(self.current_epoch)
        return self.sign * 0.0

    def ready_for_selection(self) -> bool:
        return self.current_epoch >= self.hparams.warmup_epochs


def test_validations_before_the_detector_is_ready_neither_select_nor_stop(texture, tmp_path: Path) -> None:
    tasks = A2OTaskGenerator().create_tasks(texture.train, MultiResolutionHRImageSpliter(512, 256))
    orchestrator = TaskOrchestrator(
        WarmingUpDetector, {}, tasks, tmp_path / "models", batch_size=8, trainer_kwargs={"max_epochs": 10}, early_stop_epochs=1
    )
    val_config = {"anomaly_syn_fn": standout_boxes(), "val_sample_ratio": 0.25}
    orchestrator.fit(texture.train, [], val_config)
    checkpoint = torch.load(orchestrator.checkpoint_path(tasks[0]), weights_only=True)
    # epoch 0 is good but not ready: the weights kept are those of epoch 3, the good one after warm-up
    assert checkpoint["state_dict"]["trained_epoch"].item() == 3 and checkpoint["state_dict"]["sign"].item() == 1.0
    selector = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ValidationSelector"))
    assert selector["best_epoch"] == 4  # in epochs trained
    # the bad epoch 1 did not count for early stopping (patience 1): it stopped after the bad epoch 4
    assert checkpoint["epoch"] == 5


def test_normalisation_puts_normal_variation_at_zero() -> None:
    normal = torch.rand(6, 8, 8)
    anomalous = torch.rand(2, 8, 8)
    anomalous[:, 2, 2] = 9.0
    stats = normalization_statistics(torch.cat([normal, anomalous]), torch.tensor([0] * 6 + [1] * 2))
    assert stats["low"] == pytest.approx(float(torch.quantile(normal.flatten(), 0.99)))
    assert stats["high"] == 9.0


def test_pooled_statistics_are_those_of_all_normal_pixels_together() -> None:
    from hiad_pl.engine.callbacks import pooled_statistics

    generator = torch.Generator().manual_seed(0)
    quiet = torch.rand(40, 16, 16, generator=generator)  # a task whose normal scores sit in [0, 1]
    busy = 5 + 3 * torch.rand(10, 16, 16, generator=generator)  # another in [5, 8], a quarter of the pixels
    labels = torch.zeros(40, dtype=torch.long), torch.zeros(10, dtype=torch.long)
    first, second = normalization_statistics(quiet, labels[0], "shared"), normalization_statistics(busy, labels[1], "shared")
    pooled = pooled_statistics([first, second])
    together = float(torch.quantile(torch.cat([quiet.flatten(), busy.flatten()]), 0.99))
    assert pooled["low"] == pytest.approx(together, abs=0.02)
    assert pooled["high"] == max(first["high"], second["high"])
    with pytest.raises(ValueError, match="normalization must be one of"):
        normalization_statistics(quiet, labels[0], "global")
    with pytest.raises(ValueError, match="val_config normalization must be one of"):
        ValidationConfig.from_any({"anomaly_syn_fn": RandomeBoxSynthesizer(p=0.5), "normalization": "global"})


def test_normalised_scores_keep_their_order_and_stay_in_the_unit_range() -> None:
    from hiad_pl.postprocess import NORMALIZATION_TAIL, normalize_scores

    raw = torch.cat([torch.tensor([-1e4, -50.0, 2.0, 3.0, 5.0, 7.0, 400.0]), torch.linspace(-10, 20, 3001)])
    out = normalize_scores(raw, 3.0, 7.0)
    ordered = out[raw.argsort()]
    assert bool((ordered[1:] > ordered[:-1]).all())  # strictly increasing: no two scores tied, unlike clipping
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    edges = normalize_scores(torch.tensor([3.0, 5.0, 7.0]), 3.0, 7.0).tolist()
    assert edges == pytest.approx([NORMALIZATION_TAIL, 0.5, 1 - NORMALIZATION_TAIL])
    assert float(normalize_scores(torch.tensor([2.0]), 3.0, 7.0)) < NORMALIZATION_TAIL  # below normal: near 0


def test_few_validation_patches_are_reported(texture, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    indexes = MultiResolutionHRImageSpliter(512, 256)
    tasks = O2OTaskGenerator().create_tasks(texture.train, indexes)[:1]  # one position: one patch per image
    orchestrator = TaskOrchestrator(HRPatchCore, PATCHCORE_TEST_CONFIG, tasks, tmp_path / "models", batch_size=8)
    with caplog.at_level(logging.WARNING, logger="hiad_pl"):
        orchestrator.fit(texture.train, [], {"anomaly_syn_fn": RandomeBoxSynthesizer(p=0.5, seed=0), "val_sample_ratio": 0.25})
    assert "task_0: only 1 validation patches" in caplog.text


def test_selector_prefers_image_auroc_then_other_metrics() -> None:
    from hiad_pl.engine.callbacks import selection_score

    assert selection_score({"image_auroc": 0.9, "pixel_auroc": 0.1}) > selection_score({"image_auroc": 0.8, "pixel_auroc": 1.0})
    assert selection_score({"image_auroc": 0.9, "pixel_auroc": 0.9}) > selection_score({"image_auroc": 0.9, "pixel_auroc": 0.5})
    selector = ValidationSelector([metrics.compute_imagewise_metrics])
    maps = torch.zeros(4, 8, 8)
    maps[2:, 3, 3] = 5.0
    values = selector.evaluate(maps, torch.zeros(4, 8, 8), torch.tensor([0, 0, 1, 1]))
    assert values["image_auroc"] == 1.0


def test_selector_tolerates_a_validation_set_without_anomalies() -> None:
    selector = ValidationSelector([metrics.compute_imagewise_metrics, metrics.compute_pixelwise_metrics])
    values = selector.evaluate(torch.rand(3, 8, 8), torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long))
    assert values == {}
