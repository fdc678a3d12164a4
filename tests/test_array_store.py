"""ArrayStore: maps in memory up to a budget, on disk beyond it; evaluation reads them one at a time."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from hiad_pl.metrics import compute_imagewise_metrics, evaluate
from hiad_pl.utils.array_store import ArrayStore, Picked


def _maps(count: int, size: int = 64, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray | None], np.ndarray]:
    """Random float16 maps whose defect squares score higher; half the images have a defect."""
    rng = np.random.default_rng(seed)
    maps, masks, labels = [], [], []
    for index in range(count):
        anomaly_map = rng.random((size, size)).astype(np.float16)
        mask = None
        if index % 2:
            mask = np.zeros((size, size), dtype=np.uint8)
            top = int(rng.integers(0, size - 12))
            mask[top : top + 10, top : top + 10] = 255
            anomaly_map[mask > 0] += np.float16(0.6)
        maps.append(anomaly_map)
        masks.append(mask)
        labels.append(int(mask is not None))
    return maps, masks, np.array(labels)


def test_arrays_past_the_budget_go_to_disk_and_read_back_equal(tmp_path):
    maps, _, _ = _maps(6)
    store = ArrayStore(len(maps), memory_limit=2 * maps[0].nbytes, folder=tmp_path)
    for index in reversed(range(len(maps))):  # filled in any order
        store[index] = maps[index]
    assert store.bytes_in_memory == 2 * maps[0].nbytes
    assert store.num_on_disk == 4
    assert len(list(tmp_path.glob("hiad-pl-maps-*/*.npy"))) == 4
    for index, read in enumerate(store):
        np.testing.assert_array_equal(read, maps[index])
        assert read.dtype == np.float16
    on_disk = [read for read in store if isinstance(read, np.memmap)]
    assert len(on_disk) == 4 and not on_disk[0].flags.writeable
    assert len(store[1:4]) == 3


def test_overwriting_a_slot_frees_its_place_and_close_removes_the_folder(tmp_path):
    first, second = np.ones((8, 8), np.float32), np.zeros((8, 8), np.float32)
    store = ArrayStore(2, memory_limit=first.nbytes, folder=tmp_path)
    store[0] = first
    store[1] = second  # over the budget: on disk
    assert store.num_on_disk == 1
    store[0] = second  # replaces the slot in memory
    assert store.bytes_in_memory == second.nbytes
    np.testing.assert_array_equal(store[0], second)
    folders = list(tmp_path.glob("hiad-pl-maps-*"))
    assert len(folders) == 1
    store.close()
    assert not folders[0].exists()
    with pytest.raises(IndexError, match="never written"):
        store[0]


def test_the_folder_goes_with_the_store(tmp_path):
    store = ArrayStore(1, memory_limit=0, folder=tmp_path)
    store[0] = np.ones(4)
    (folder,) = tmp_path.glob("hiad-pl-maps-*")
    del store
    gc.collect()
    assert not folder.exists()


def test_bad_slots_and_budgets_are_refused():
    store = ArrayStore(2)
    with pytest.raises(IndexError, match="out of range"):
        store[2] = np.ones(3)
    with pytest.raises(IndexError, match="never written"):
        store[1]
    assert not store.is_filled(1)
    store[1] = np.ones(3)
    assert store.is_filled(-1)
    with pytest.raises(IndexError, match="out of range"):
        store.is_filled(5)
    with pytest.raises(ValueError, match="memory_limit"):
        ArrayStore(2, memory_limit=-1)


def test_picked_reads_the_chosen_items_on_access():
    items = list(range(10))
    picked = Picked(items, [7, 2, 5])
    assert len(picked) == 3 and list(picked) == [7, 2, 5] and picked[-1] == 5 and picked[0:2] == [7, 2]


class _CountingMaps:
    """A sequence that makes a fresh copy of a map on every read and counts how many are alive at once."""

    def __init__(self, maps: list[np.ndarray]) -> None:
        self.maps = maps
        self.alive: list[weakref.ref] = []
        self.most_alive = 0

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self.maps):
            raise IndexError(index)
        gc.collect()
        self.alive = [ref for ref in self.alive if ref() is not None]
        copy = self.maps[index].copy()
        self.alive.append(weakref.ref(copy))
        self.most_alive = max(self.most_alive, len(self.alive))
        return copy


@pytest.mark.parametrize("mode", ["binned", "exact"])
def test_evaluation_of_a_spilled_store_equals_evaluation_of_a_list(tmp_path, mode):
    maps, masks, labels = _maps(8)
    scores = np.array([float(m.max()) for m in maps])
    store = ArrayStore(len(maps), memory_limit=0, folder=tmp_path)
    for index, anomaly_map in enumerate(maps):
        store[index] = anomaly_map
    assert store.num_on_disk == len(maps)
    evaluators = [
        compute_imagewise_metrics,
        {"function": "hiad_pl.metrics.compute_pixelwise_metrics", "kwargs": {"mode": mode}},
        {"function": "hiad_pl.metrics.compute_pro", "kwargs": {"mode": mode}},
    ]
    names = ["a", "a", "b", "b"] * 2
    from_list = evaluate(evaluators, scores, labels, maps, masks, names)
    from_store = evaluate(evaluators, scores, labels, store, masks, names)
    assert from_store == from_list
    assert from_list["mean"]["pixel_auroc"] > 0.9


def test_binned_metrics_hold_one_map_at_a_time():
    maps, masks, labels = _maps(10)
    scores = np.array([float(m.max()) for m in maps])
    counting = _CountingMaps(maps)
    evaluators = [
        compute_imagewise_metrics,
        {"function": "hiad_pl.metrics.compute_pixelwise_metrics", "kwargs": {"mode": "binned"}},
        {"function": "hiad_pl.metrics.compute_pro", "kwargs": {"mode": "binned"}},
    ]
    report = evaluate(evaluators, scores, labels, counting, masks, ["x"] * len(maps))
    assert report["x"]["pixel_auroc"] > 0.9 and report["x"]["pro"] > 0.5
    assert counting.most_alive <= 2  # the map being read and at most the previous one not yet collected


def test_evaluate_predictions_with_every_map_and_mask_on_disk(monkeypatch, small_demo):
    from hiad_pl import outputs
    from hiad_pl.data.discovery import discover
    from hiad_pl.outputs import evaluate_predictions
    from hiad_pl.utils import array_store

    (split,) = discover(small_demo, categories=["texture"], image_size=512)
    rng = np.random.default_rng(1)
    maps, scores = [], []
    for sample in split.test:
        with sample:
            mask = sample.full_mask()
        anomaly_map = (rng.random(mask.shape) * 0.5 + (mask > 0) * 0.7).astype(np.float16)
        maps.append(anomaly_map)
        scores.append(float(anomaly_map.max()))
    evaluators = [compute_imagewise_metrics, "hiad_pl.metrics.compute_pixelwise_metrics", "hiad_pl.metrics.compute_pro"]
    in_memory = evaluate_predictions(split.test, np.array(scores), maps, evaluators)
    monkeypatch.setattr(array_store, "DEFAULT_MEMORY_LIMIT", 0)
    monkeypatch.setattr(outputs, "MASKS_MEMORY_LIMIT", 0)  # the masks on disk too
    store = ArrayStore(len(maps))
    for index, anomaly_map in enumerate(maps):
        store[index] = anomaly_map
    assert store.num_on_disk == len(maps)
    assert evaluate_predictions(split.test, np.array(scores), store, evaluators) == in_memory
    assert in_memory["mean"]["pixel_auroc"] > 0.9
