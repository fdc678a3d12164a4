"""The inference pipeline: one backbone pass per patch gives the maps per-task scoring gives."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiad_pl import inference
from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.datamodule import patch_to_batch
from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionHRImageSpliter, stitch
from hiad_pl.detectors import HRPatchCore
from hiad_pl.detectors.backbones import TimmFeatureExtractor
from hiad_pl.detectors.features import clear_shared_extractors
from hiad_pl.inference import InferencePipeline, share_frozen_backbones
from hiad_pl.orchestrator import TaskOrchestrator
from hiad_pl.postprocess import gaussian_blur, normalize_scores, upsample
from hiad_pl.tasks import A2OTaskGenerator, O2OTaskGenerator
from hiad_pl.tasks.base import Task, thumbnail_task
from hiad_pl.tasks.embedding import pool_features
from hiad_pl.tasks.retrieval import route_by_retrieval

IMAGE, PATCH, THUMBNAIL = 128, 64, (64, 64)
STATS = {"low": 0.5, "high": 3.0}


def quadrant_images(folder: Path, count: int, seed: int) -> list[HRSample]:
    """Noisy images whose quadrants have their own tint, so retrieval has something to route by."""
    rng = np.random.default_rng(seed)
    tints = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200], [200, 200, 60]], dtype=np.float64)
    samples = []
    for k in range(count):
        image = rng.normal(0, 25, (IMAGE, IMAGE, 3))
        half = IMAGE // 2
        for q, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            image[row * half : (row + 1) * half, col * half : (col + 1) * half] += tints[q]
        path = folder / f"image{seed}_{k}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        samples.append(HRSample(path))
    return samples


def detector_for(task: Task, fusion: list[float] | None) -> HRPatchCore:
    size = task.thumbnail_size if task.is_thumbnail else (PATCH, PATCH)
    detector = HRPatchCore(
        weights="none", input_size=size, percentage=0.5, fusion_weights=None if task.is_thumbnail else fusion
    )
    return detector.eval()


def fit(detector: HRPatchCore, task: Task, samples: list[HRSample]) -> None:
    for sample in samples:
        with sample:
            if task.is_thumbnail:
                items = [patch_to_batch(sample.down_sampling_to_LR(task.thumbnail_size))]
            else:
                items = [patch_to_batch(sample[i]) for i in task.indexes]
        detector.accumulate(PatchBatch.collate(items))
    detector.finalize()


def per_task_scoring(
    tasks: list[Task], detectors: dict, samples: list[HRSample], stats: dict | None, batch_size: int
) -> list[tuple[torch.Tensor, float]]:
    """The reference: each task's detector embeds and scores its own patches, one task at a time."""
    patch_tasks = [t for t in tasks if not t.is_thumbnail]
    results = []
    for sample in samples:
        with sample:
            if any(t.centers for t in patch_tasks):
                routes = route_by_retrieval(detectors[patch_tasks[0].name], sample, patch_tasks, batch_size)
            else:
                routes = [(t, list(t.indexes)) for t in patch_tasks]
            maps, mains = [], []
            for task, indexes in routes:
                if not indexes:
                    continue
                batch = PatchBatch.collate([patch_to_batch(sample[i]) for i in indexes])
                task_maps = torch.cat(
                    [detectors[task.name].predict_step(batch_slice, 0) for batch_slice in chunks(batch, batch_size)]
                )
                maps.append(task_maps if stats is None else normalize_scores(task_maps, **stats))
                mains.extend(i.main_index for i in indexes)
            full = stitch(torch.cat(maps), mains, sample.image_size).float()
            for task in (t for t in tasks if t.is_thumbnail):
                thumb = detectors[task.name].predict_step(patch_to_batch(sample.down_sampling_to_LR(task.thumbnail_size)), 0)
                thumb = thumb if stats is None else normalize_scores(thumb, **stats)
                full = torch.maximum(full, upsample(thumb[0], sample.image_size))
        full = gaussian_blur(full)
        results.append((full, float(detectors[patch_tasks[0].name].image_score(full))))  # the detector's rule
    return results


def chunks(batch: PatchBatch, size: int) -> list[PatchBatch]:
    from hiad_pl.inference import select_rows

    return [select_rows(batch, range(s, min(s + size, len(batch)))) for s in range(0, len(batch), size)]


def layout(name: str, indexes: list, detector: HRPatchCore | None = None, train: list | None = None) -> list[Task]:
    if name in ("a2o", "thumbnail"):
        tasks = [Task("task_0", list(indexes))]
        return tasks + [thumbnail_task(THUMBNAIL)] if name == "thumbnail" else tasks
    if name in ("o2o", "fusion"):
        return [Task(f"task_{k}", [index]) for k, index in enumerate(indexes)]
    # retrieval: centres are the embeddings of two training patches of different looks
    with train[0] as sample, torch.inference_mode():
        batch = PatchBatch.collate([patch_to_batch(sample[i]) for i in indexes])
        embeddings = pool_features(detector.fused_embedding(batch), (1, 1))
    return [
        Task("task_0", list(indexes[:2]), [embeddings[0].tolist()], train_top_k=1),
        Task("task_1", list(indexes[2:]), [embeddings[3].tolist()], train_top_k=1),
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[HRSample]]:
    folder = tmp_path_factory.mktemp("inference")
    return {"train": quadrant_images(folder, 2, seed=0), "test": quadrant_images(folder, 3, seed=1)}


@pytest.mark.parametrize(
    "name, images_per_step, prefetch",
    [("a2o", 1, 2), ("o2o", 2, 0), ("o2o", None, 0), ("retrieval", 1, 1), ("thumbnail", 2, 2), ("fusion", 1, 2)],
)
def test_shared_backbone_pipeline_equals_per_task_scoring(images, name: str, images_per_step: int, prefetch: int) -> None:
    fusion = [0.5, 0.5] if name == "fusion" else None
    indexes = MultiResolutionHRImageSpliter(IMAGE, PATCH, ds_factors=[0, 1] if fusion else None)
    probe = HRPatchCore(weights="none", input_size=PATCH).eval()
    tasks = layout(name, indexes, probe, images["train"])
    detectors = {t.name: detector_for(t, fusion) for t in tasks}
    for task in tasks:
        fit(detectors[task.name], task, images["train"])
    stats = STATS if name == "thumbnail" else None
    with torch.inference_mode():
        expected = per_task_scoring(tasks, detectors, images["test"], stats, batch_size=3)

    shared = share_frozen_backbones(detectors.values())
    assert len(shared) == 1 and len({id(d.backbone) for d in detectors.values()}) == 1
    normalization = {t.name: stats for t in tasks}
    pipeline = InferencePipeline(tasks, detectors, normalization, batch_size=3, prefetch=prefetch, images_per_step=images_per_step)
    assert pipeline.shares_features
    if images_per_step is None:  # one task per patch position: batch_size (3) images' patches per head call
        assert pipeline.images_per_step == 3
    calls = count_backbone_calls(next(iter(shared.values())))
    predictions = list(pipeline.predict(images["test"]))
    assert [p.sample_id for p in predictions] == [0, 1, 2]
    for prediction, (full, score) in zip(predictions, expected):
        assert prediction.anomaly_map.shape == (IMAGE, IMAGE)
        torch.testing.assert_close(prediction.anomaly_map, full, rtol=1e-4, atol=1e-5)
        assert prediction.score == pytest.approx(score, rel=1e-4, abs=1e-6)
    # One backbone pass per patch (plus its low-resolution views) and one per thumbnail, whatever the layout.
    views = 2 if fusion else 1
    thumbnails = sum(t.is_thumbnail for t in tasks)
    assert calls["images"] == len(images["test"]) * (len(indexes) * views + thumbnails)
    assert pipeline.times.images == 3 and pipeline.times.backbone > 0


def count_backbone_calls(backbone: torch.nn.Module) -> dict[str, int]:
    """Counts the images the backbone embeds (a forward hook)."""
    calls = {"images": 0}

    def hook(module, inputs, output) -> None:
        calls["images"] += int(inputs[0].shape[0])

    backbone.register_forward_hook(hook)
    return calls


def test_one_backbone_instance_per_loaded_run(images, tmp_path: Path) -> None:
    indexes = MultiResolutionHRImageSpliter(IMAGE, PATCH)
    tasks = [Task(f"task_{k}", [index]) for k, index in enumerate(indexes)]
    config = {"weights": "none", "percentage": 0.5}
    TaskOrchestrator(HRPatchCore, config, tasks, tmp_path / "run", batch_size=4).fit(images["train"], [])
    clear_shared_extractors()  # the fit's extractor: not part of the loaded run
    gc.collect()
    before = sum(type(o) is TimmFeatureExtractor for o in gc.get_objects())
    loaded = TaskOrchestrator(HRPatchCore, config, [], tmp_path / "run", batch_size=4)
    loaded.load("cpu")
    gc.collect()
    after = sum(type(o) is TimmFeatureExtractor for o in gc.get_objects())
    assert len(loaded.models.detectors) == 4
    assert len({id(d.backbone) for d in loaded.models.detectors.values()}) == 1
    assert after - before == 1  # the copies built while loading are gone
    predictions = list(loaded.predict(images["test"]))
    assert len(predictions) == 3 and predictions[0].anomaly_map.shape == (IMAGE, IMAGE)


def test_pipeline_builds_search_indexes_before_the_first_image(images) -> None:
    indexes = MultiResolutionHRImageSpliter(IMAGE, PATCH)
    tasks = layout("o2o", indexes)
    detectors = {t.name: detector_for(t, None) for t in tasks}
    for task in tasks:
        fit(detectors[task.name], task, images["train"])
    assert all(d.model._search is None for d in detectors.values())  # built lazily without a pipeline
    pipeline = InferencePipeline(tasks, detectors, batch_size=3, prefetch=0)
    built = {name: d.model._search[1] for name, d in detectors.items()}
    assert all(index is not None for index in built.values()) and pipeline.times.setup > 0
    list(pipeline.predict(images["test"][:1]))
    assert all(detectors[name].model._search[1] is index for name, index in built.items())  # not rebuilt
    assert "setup" not in pipeline.times.per_image()


def test_decoding_runs_inline_on_the_cpu_and_ahead_on_an_accelerator() -> None:
    from hiad_pl.inference import GPU_PREFETCH

    assert InferencePipeline([], {}, device="cpu").prefetch == 0
    assert InferencePipeline([], {}, device="cuda").prefetch == GPU_PREFETCH > 0  # nothing is placed on it
    assert InferencePipeline([], {}, device="cpu", prefetch=3).prefetch == 3


def test_images_per_step_is_chosen_from_the_layout() -> None:
    indexes = MultiResolutionHRImageSpliter(IMAGE, PATCH)
    probe = HRPatchCore(weights="none", input_size=PATCH).eval()
    # 4 patches an image: one task for all needs 2 images for a batch of 8, 1 for a batch of 4;
    # one task per position needs batch_size images, up to AUTO_STEP_PATCHES patches a step.
    cases = ((A2OTaskGenerator(), 8, 2), (A2OTaskGenerator(), 4, 1), (O2OTaskGenerator(), 8, 8), (O2OTaskGenerator(), 2, 2),
             (O2OTaskGenerator(), 64, inference.AUTO_STEP_PATCHES // len(indexes)))
    for generator, batch_size, expected in cases:
        tasks = generator.create_tasks([], indexes)
        detectors = {t.name: probe for t in tasks}
        assert InferencePipeline(tasks, detectors, batch_size=batch_size).images_per_step == expected
    assert InferencePipeline(tasks, detectors, batch_size=8, images_per_step=5).images_per_step == 5


def test_images_decoded_before_an_unreadable_one_are_still_scored(images, tmp_path: Path) -> None:
    from hiad_pl.errors import InputError

    indexes = MultiResolutionHRImageSpliter(IMAGE, PATCH)
    tasks = A2OTaskGenerator().create_tasks(images["train"], indexes)
    detector = detector_for(tasks[0], None)
    fit(detector, tasks[0], images["train"])
    cut = tmp_path / "cut.png"
    cut.write_bytes(Path(images["test"][1].image.image_path).read_bytes()[:300])
    samples = [images["test"][0], HRSample(cut), images["test"][2]]
    pipeline = InferencePipeline(tasks, {tasks[0].name: detector}, images_per_step=3)
    scored = []
    with pytest.raises(InputError, match="cut.png"):
        for prediction in pipeline.predict(samples):
            scored.append(prediction.sample_id)
    assert scored == [0]  # the step of three was cut short: the first image is not lost


def test_take_rows_slices_evenly_spaced_rows_and_gathers_others() -> None:
    values = torch.arange(40.0).reshape(10, 4)
    for rows in ([2, 3, 4], [1, 4, 7], [5], list(range(10))):
        taken = inference.take_rows(values, rows)
        assert torch.equal(taken, values[rows]) and taken.data_ptr() == values[rows[0]].data_ptr()  # a view
    for rows in ([3, 1], [0, 1, 3], [2, 2]):
        taken = inference.take_rows(values, rows)
        assert torch.equal(taken, values[rows]) and taken.data_ptr() != values.data_ptr()


def test_decoding_for_scoring_reads_the_image_alone(images, tmp_path: Path) -> None:
    """The mask is ground truth for evaluation: scoring neither reads it nor needs it to be readable."""
    source = images["test"][0].get_image_path()
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((IMAGE, IMAGE), np.uint8)).save(mask)
    sample = HRSample(source, mask)
    mask.write_bytes(b"not a png any more")
    tasks = [Task("task_0", list(MultiResolutionHRImageSpliter(IMAGE, PATCH)))]
    detectors = {"task_0": detector_for(tasks[0], None)}
    fit(detectors["task_0"], tasks[0], images["train"])
    pipeline = InferencePipeline(tasks, detectors, batch_size=4)
    decoded = pipeline.decode(sample, 0)
    assert len(decoded.patches) == 4 and sample.image.image is None  # the pixels are released
    (prediction,) = pipeline.predict([sample])
    assert prediction.anomaly_map.shape == (IMAGE, IMAGE)
