"""Task generators that look at the images: spatial and threshold clustering, retrieval routing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiad_pl.data.sample import HRSample
from hiad_pl.data.tiling import MultiResolutionHRImageSpliter, MultiResolutionIndex
from hiad_pl.demo import OBJECT_PATCH_GROUPS, render_demo_sample
from hiad_pl.detectors import HRPatchCore
from hiad_pl.tasks import (
    RetrieveTaskGenerator,
    SpatialClusteringTaskGenerator,
    Task,
    ThresholdClusteringTaskGenerator,
    load_tasks,
    save_tasks,
    task_layout,
)
from hiad_pl.tasks.clustering import threshold_labels
from hiad_pl.tasks.embedding import index_embeddings, patch_batches, pool_features
from hiad_pl.tasks.retrieval import nearest_center, retrieval_train_items, route_by_retrieval, task_similarities

IMAGE = 256
PATCH = 64
GRID = IMAGE // PATCH
CONFIG = {
    "backbone_name": "efficientnet_lite0",
    "weights": "offline",
    "layers_to_extract_from": ["blocks.2", "blocks.4"],
    "patch_size": PATCH,  # the tutorial's patch section; generators drop it
}
QUADRANT_RGB = np.array([[200, 40, 40], [40, 180, 60], [50, 70, 200], [220, 200, 60]], dtype=np.float32)


def _save(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


def _quadrants(seed: int) -> np.ndarray:
    """Four flat colours with noise, one per quadrant: content that says where it came from."""
    half = IMAGE // 2
    colours = QUADRANT_RGB.reshape(2, 2, 1, 1, 3).repeat(half, 2).repeat(half, 3)
    image = colours.transpose(0, 2, 1, 3, 4).reshape(IMAGE, IMAGE, 3)
    noise = np.random.default_rng(seed).normal(0, 12, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _rotated_index(index: MultiResolutionIndex) -> tuple[int, int]:
    """``(x, y)`` of the patch that ``np.rot90`` (a quarter turn anticlockwise) moves ``index`` to."""
    main = index.main_index
    return main.y, IMAGE - main.x - main.width


def _groups(tasks: list[Task]) -> list[set[tuple[int, int]]]:
    return [{(i.main_index.x, i.main_index.y) for i in t.indexes} for t in tasks]


def _owner(routes: list[tuple[Task, list[MultiResolutionIndex]]]) -> dict[tuple[int, int], str]:
    return {(i.main_index.x, i.main_index.y): task.name for task, indexes in routes for i in indexes}


@pytest.fixture(scope="module")
def indexes() -> list[MultiResolutionIndex]:
    return MultiResolutionHRImageSpliter(IMAGE, PATCH)


@pytest.fixture(scope="module")
def object_samples(tmp_path_factory: pytest.TempPathFactory) -> list[HRSample]:
    folder = tmp_path_factory.mktemp("object")
    return [HRSample(_save(render_demo_sample("object", IMAGE, index=k).image, folder / f"{k}.png")) for k in range(3)]


@pytest.fixture(scope="module")
def quadrant_samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HRSample | list[HRSample]]:
    folder = tmp_path_factory.mktemp("quadrants")
    test = _quadrants(99)
    return {
        "train": [HRSample(_save(_quadrants(seed), folder / f"train{seed}.png")) for seed in range(2)],
        "test": HRSample(_save(test, folder / "test.png")),
        "rotated": HRSample(_save(np.ascontiguousarray(np.rot90(test)), folder / "rotated.png")),
    }


@pytest.fixture(scope="module")
def detector() -> HRPatchCore:
    kwargs = {k: v for k, v in CONFIG.items() if k != "patch_size"}
    return HRPatchCore(input_size=PATCH, **kwargs).eval()


@pytest.fixture(scope="module")
def retrieval_tasks(quadrant_samples: dict, indexes: list[MultiResolutionIndex]) -> list[Task]:
    generator = RetrieveTaskGenerator(
        cluster_number=4, detector_class=HRPatchCore, detector_config=CONFIG, batch_size=16
    )
    return generator.create_tasks(quadrant_samples["train"], indexes)


# ------------------------------------------------------------------ spatial clustering


def test_spatial_clustering_puts_same_looking_positions_together(
    object_samples: list[HRSample], indexes: list[MultiResolutionIndex]
) -> None:
    tasks = SpatialClusteringTaskGenerator(
        cluster_number=4, detector_class=HRPatchCore, detector_config={"patch": CONFIG}, batch_size=16
    ).create_tasks(object_samples, indexes)
    cells = [(x, y) for y in range(GRID) for x in range(GRID)]
    known = [{(x * PATCH, y * PATCH) for x, y in cells if OBJECT_PATCH_GROUPS[y][x] == g} for g in range(3)]
    found = _groups(tasks)
    assert [t.name for t in tasks] == ["task_0", "task_1", "task_2", "task_3"]
    assert sum(len(g) for g in found) == 16 and set().union(*found) == set().union(*known)
    # The four corners share a task, the centre four another; no task mixes demo groups
    # (the backbone tells horizontal edges from vertical ones, so the edges make two tasks).
    assert known[0] in found and known[2] in found
    assert all(any(task <= group for group in known) for task in found)
    # Numbered by first row-major position: the top-left corner is task_0, the top edge task_1.
    assert found[0] == known[0] and (PATCH, 0) in found[1]
    assert task_layout(tasks).splitlines()[0] == "Row: 4, Column: 4, Patch Number: 16, Task Number: 4"


def test_spatial_clustering_rejects_bad_arguments(
    object_samples: list[HRSample], indexes: list[MultiResolutionIndex]
) -> None:
    with pytest.raises(ValueError, match="cluster_number=17 exceeds the 16 patch indexes"):
        SpatialClusteringTaskGenerator(17, HRPatchCore, CONFIG).create_tasks(object_samples, indexes)
    with pytest.raises(ValueError, match="needs a detector_class"):
        SpatialClusteringTaskGenerator(2).create_tasks(object_samples, indexes)
    with pytest.raises(ValueError, match="cluster_number must be a positive int"):
        SpatialClusteringTaskGenerator(0, HRPatchCore, CONFIG)
    with pytest.raises(ValueError, match="unknown detector 'nosuch'"):
        SpatialClusteringTaskGenerator(2, "nosuch", CONFIG).create_tasks(object_samples, indexes)


def test_index_embeddings_fuse_low_resolution_views(object_samples: list[HRSample]) -> None:
    fused_indexes = MultiResolutionHRImageSpliter(IMAGE, PATCH, ds_factors=[0, 1])
    plain = SpatialClusteringTaskGenerator(2, HRPatchCore, CONFIG, feature_resolution=(2, 1))
    fused = SpatialClusteringTaskGenerator(2, HRPatchCore, CONFIG, feature_resolution=(2, 1), fusion_weights=[0.5, 0.5])
    a = index_embeddings(plain, object_samples[:1], fused_indexes)
    b = index_embeddings(fused, object_samples[:1], fused_indexes)
    assert a.shape == b.shape == (16, (40 + 112) * 2)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)  # the low-resolution view changed the features


# ------------------------------------------------------------------ threshold clustering


def test_threshold_clustering_never_gives_fewer_tasks_for_a_higher_threshold(
    object_samples: list[HRSample], indexes: list[MultiResolutionIndex]
) -> None:
    generator = ThresholdClusteringTaskGenerator(0.9, HRPatchCore, CONFIG, batch_size=16)
    embeddings = index_embeddings(generator, object_samples, indexes)
    thresholds = np.linspace(-1.0, 1.0, 81)
    counts = [len(set(threshold_labels(embeddings, t))) for t in thresholds]
    assert counts == sorted(counts)
    assert counts[0] == 1 and counts[-1] == 16
    similarity = embeddings @ embeddings.T
    for threshold in thresholds:
        labels = threshold_labels(embeddings, threshold)
        same = labels[:, None] == labels[None, :]
        assert similarity[same].min() >= threshold - 1e-6
    tasks = generator.create_tasks(object_samples, indexes)
    assert len(tasks) == len(set(threshold_labels(embeddings, 0.9)))
    assert sorted(i for t in tasks for i in (str(x) for x in t.indexes)) == sorted(str(i) for i in indexes)


def test_threshold_labels_on_random_points_are_nested() -> None:
    points = np.random.default_rng(0).normal(size=(40, 8))
    previous = None
    for threshold in np.linspace(-1.0, 1.0, 41):
        labels = threshold_labels(points, threshold)
        if previous is not None:
            # Every new cluster lies inside one old cluster: a refinement.
            assert all(len(set(previous[labels == k])) == 1 for k in set(labels))
        previous = labels
    with pytest.raises(ValueError, match=r"cluster_threshold must be in \[-1, 1\]"):
        ThresholdClusteringTaskGenerator(1.5)


# ------------------------------------------------------------------ retrieval


def test_nearest_center_is_by_cosine_not_distance() -> None:
    centers = torch.tensor([[10.0, 0.0], [0.6, 0.8]])
    embeddings = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    # Euclidean nearest of the first point is the short centre; cosine picks the long one.
    assert nearest_center(embeddings, centers).tolist() == [1, 1, 0]


def test_patches_go_to_the_nearest_constructed_centre(
    detector: HRPatchCore, quadrant_samples: dict, indexes: list[MultiResolutionIndex]
) -> None:
    sample = quadrant_samples["test"]
    with torch.inference_mode():
        batches = patch_batches([sample], indexes, 5)
        embeddings = torch.cat([pool_features(detector.fused_embedding(b), (1, 1)) for b in batches])
    stray = torch.randn(1, embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    centers = torch.cat([embeddings[[0, 3, 12]], stray])
    # Only the first task lists indexes: routing ignores where the others were trained.
    tasks = [Task(f"task_{k}", list(indexes) if k == 0 else [], [c.tolist()]) for k, c in enumerate(centers)]
    with sample:
        routes = route_by_retrieval(detector, sample, tasks, batch_size=3)
    unit = torch.nn.functional.normalize
    expected = (unit(embeddings, dim=1) @ unit(centers, dim=1).T).argmax(1)
    owner = _owner(routes)
    assert [owner[(i.main_index.x, i.main_index.y)] for i in indexes] == [f"task_{k}" for k in expected.tolist()]
    assert owner[(0, 0)] == "task_0" and owner[(3 * PATCH, 0)] == "task_1" and owner[(0, 3 * PATCH)] == "task_2"
    assert [t for t, _ in routes] == tasks


def test_retrieval_tasks_follow_content_on_rotated_images(
    retrieval_tasks: list[Task], detector: HRPatchCore, quadrant_samples: dict, indexes: list[MultiResolutionIndex]
) -> None:
    half = IMAGE // 2
    quadrant_of = {(x, y): (y // half) * 2 + x // half for x in range(0, IMAGE, PATCH) for y in range(0, IMAGE, PATCH)}
    found = _groups(retrieval_tasks)
    assert sorted(map(sorted, found)) == sorted(sorted(p for p in quadrant_of if quadrant_of[p] == q) for q in range(4))
    assert all(t.centers is not None and len(t.centers) == 1 and t.train_top_k == 1 for t in retrieval_tasks)
    assert (0, 0) in found[0]  # numbered by first row-major position

    with quadrant_samples["test"] as test, quadrant_samples["rotated"] as rotated:
        upright = _owner(route_by_retrieval(detector, test, retrieval_tasks))
        turned = _owner(route_by_retrieval(detector, rotated, retrieval_tasks))
    positional = {p: t.name for t, group in zip(retrieval_tasks, found) for p in group}
    assert upright == positional
    assert all(turned[_rotated_index(i)] == upright[(i.main_index.x, i.main_index.y)] for i in indexes)
    assert turned != positional  # content moved, and its task followed it


def test_retrieval_train_items_route_every_training_patch_once(
    retrieval_tasks: list[Task], detector: HRPatchCore, quadrant_samples: dict
) -> None:
    grid, items = retrieval_train_items(detector, quadrant_samples["train"], retrieval_tasks, batch_size=8)
    assert len(grid) == 16
    assert sorted(i for group in items.values() for i in group) == list(range(2 * 16))
    for task in retrieval_tasks:
        assert {str(grid[i % 16]) for i in items[task.name]} == {str(i) for i in task.indexes}


def test_train_top_k_adds_each_patch_to_its_next_nearest_tasks(
    retrieval_tasks: list[Task], detector: HRPatchCore, quadrant_samples: dict
) -> None:
    grid, nearest = retrieval_train_items(detector, quadrant_samples["train"], retrieval_tasks, batch_size=8)
    _, two = retrieval_train_items(detector, quadrant_samples["train"], retrieval_tasks, batch_size=8, top_k=2)
    similarity = task_similarities(detector, patch_batches(quadrant_samples["train"], grid, 8), retrieval_tasks)
    ranked = similarity.argsort(dim=1, descending=True)
    names = [t.name for t in retrieval_tasks]
    for item in range(2 * 16):
        holders = {name for name in names if item in two[name]}
        assert holders == {names[k] for k in ranked[item, :2].tolist()}  # the two nearest centres, no others
        assert item in nearest[names[ranked[item, 0]]] and item in two[names[ranked[item, 0]]]
    # The tasks remember the setting: the orchestrator's call without top_k uses it.
    marked = [dataclasses.replace(t, train_top_k=2) for t in retrieval_tasks]
    assert retrieval_train_items(detector, quadrant_samples["train"], marked, batch_size=8)[1] == two
    loaded = [Task.from_dict(t.todict()) for t in marked]
    assert [t.train_top_k for t in loaded] == [2] * 4
    with pytest.raises(ValueError, match="train_top_k=5 exceeds the 4 retrieval tasks"):
        retrieval_train_items(detector, quadrant_samples["train"], retrieval_tasks, top_k=5)
    with pytest.raises(ValueError, match="disagree on train_top_k"):
        retrieval_train_items(detector, quadrant_samples["train"], [marked[0], *retrieval_tasks[1:]])
    with pytest.raises(ValueError, match="train_top_k must be a positive int"):
        RetrieveTaskGenerator(2, HRPatchCore, CONFIG, train_top_k=0)


def test_tasks_json_keeps_centres(
    retrieval_tasks: list[Task], detector: HRPatchCore, quadrant_samples: dict, tmp_path: Path
) -> None:
    loaded = load_tasks(save_tasks(retrieval_tasks, tmp_path / "tasks.json"))
    assert [t.centers for t in loaded] == [t.centers for t in retrieval_tasks]
    assert [t.todict() for t in loaded] == [t.todict() for t in retrieval_tasks]
    with quadrant_samples["rotated"] as sample:
        before = _owner(route_by_retrieval(detector, sample, retrieval_tasks))
        after = _owner(route_by_retrieval(detector, sample, loaded))
    assert before == after


def test_retrieval_rejects_bad_inputs(
    retrieval_tasks: list[Task], detector: HRPatchCore, quadrant_samples: dict
) -> None:
    with pytest.raises(ValueError, match="feature_resolution must be square"):
        RetrieveTaskGenerator(2, HRPatchCore, CONFIG, feature_resolution=(2, 1))
    short = [Task(t.name, t.indexes, [c[:100] for c in t.centers]) for t in retrieval_tasks]
    with quadrant_samples["test"] as sample, pytest.raises(ValueError, match="another backbone or layers"):
        route_by_retrieval(detector, sample, short)
    mixed = [retrieval_tasks[0], Task("plain", retrieval_tasks[1].indexes)]
    with quadrant_samples["test"] as sample, pytest.raises(ValueError, match=r"\['plain'\] have none"):
        route_by_retrieval(detector, sample, mixed)


def test_retrieval_tasks_fit_validate_and_score_the_patches_routed_to_them(
    detector: HRPatchCore, indexes: list[MultiResolutionIndex], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hiad_pl.engine.orchestrator as orchestration
    from hiad_pl.syn import RandomBoxSynthesizer

    # Quadrant images turned by 0-3 quarter turns: content, not position, tells the tasks apart.
    samples = [
        HRSample(_save(np.ascontiguousarray(np.rot90(_quadrants(seed), seed % 4)), tmp_path / f"turned{seed}.png"))
        for seed in range(4)
    ]
    tasks = RetrieveTaskGenerator(4, HRPatchCore, CONFIG, batch_size=16).create_tasks(samples, indexes)
    modules: list = []

    class Recording(orchestration.HighResDataModule):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            modules.append(self)

    monkeypatch.setattr(orchestration, "HighResDataModule", Recording)
    kwargs = {k: v for k, v in CONFIG.items() if k != "patch_size"}
    orchestrator = orchestration.TaskOrchestrator(HRPatchCore, kwargs, tasks, tmp_path / "run", batch_size=16)
    val_config = {"anomaly_syn_fn": RandomBoxSynthesizer(p=0.5, seed=0), "val_sample_ratio": 0.25, "normalization": "shared"}
    orchestrator.fit(samples, [], val_config)
    assert len(modules) == 4

    # Each task validates on the held-out image's patches that inference routes to it, and only those.
    (val_sample,) = modules[0].val_samples
    with val_sample:
        routed = _owner(route_by_retrieval(detector, val_sample, tasks, batch_size=16))
    for task, module in zip(tasks, modules):
        grid = module.indexes
        validated = {(grid[i].main_index.x, grid[i].main_index.y) for i in module.val_items}
        assert validated == {p for p, name in routed.items() if name == task.name}
    assert sum(len(m.val_items) for m in modules) == 16

    # Scores are normalised per task and the stitched map covers the image.
    turned = HRSample(_save(np.ascontiguousarray(np.rot90(_quadrants(7))), tmp_path / "test.png"))
    (prediction,) = list(orchestrator.predict([turned]))
    assert orchestrator.normalized
    # normalization: shared gives every task the statistics of all validation patches together
    shared = {(stats["low"], stats["high"]) for stats in orchestrator.models.statistics.values()}
    own = [torch.load(orchestrator.checkpoint_path(t), weights_only=True)["hiad_pl"]["normalization"] for t in tasks]
    assert len(shared) == 1 and len({(s["low"], s["high"]) for s in own}) == 4
    assert shared.pop()[1] == max(s["high"] for s in own)
    assert prediction.anomaly_map.shape == (IMAGE, IMAGE)
    assert 0.0 <= float(prediction.anomaly_map.min()) and float(prediction.anomaly_map.max()) <= 1.0

    # A task that no validation patch reaches is validated at its own positions.
    stray = Task("task_4", [indexes[5]], [(-torch.tensor(tasks[0].centers[0])).tolist()])
    lonely = orchestration.TaskOrchestrator(HRPatchCore, kwargs, [*tasks, stray], tmp_path / "other", batch_size=16)
    grid, items = lonely.routed_items(detector, stray, [val_sample], validation=True)
    assert [str(grid[i]) for i in items] == [str(indexes[5])]
