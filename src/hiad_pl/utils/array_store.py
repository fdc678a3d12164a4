"""A sequence of arrays held in memory up to a budget and on disk beyond it.

Scoring a test set keeps one full-resolution map per image for the metrics and
the visualisations: 32 MB of float16 at 4096 x 4096, so 100 images would hold
3.2 GB (and their masks 1.6 GB more). :class:`ArrayStore` keeps arrays in
memory until ``memory_limit`` bytes are held, then writes each further array
to a ``.npy`` file in a private temporary folder (under ``$TMPDIR``) and hands
it back as a read-only memory map. The metrics read maps one at a time, so the
resident memory of an evaluation stays flat however many images it scores.
The folder is removed when the store is closed or garbage-collected.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np

#: Bytes of arrays an :class:`ArrayStore` holds in memory before it writes to disk.
DEFAULT_MEMORY_LIMIT = 1 << 30


class ArrayStore(Sequence[np.ndarray]):
    """``count`` slots of arrays, filled in any order with ``store[i] = array``.

    The first ``memory_limit`` bytes (default :data:`DEFAULT_MEMORY_LIMIT`) stay in memory; later arrays go to disk
    (``folder``, default a new temporary folder) and are read back as
    read-only memory maps. Reading an unfilled slot is an error.
    """

    def __init__(self, count: int, memory_limit: int | None = None, folder: str | Path | None = None) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        memory_limit = DEFAULT_MEMORY_LIMIT if memory_limit is None else memory_limit
        if memory_limit < 0:
            raise ValueError(f"memory_limit must be >= 0 bytes, got {memory_limit}")
        self.memory_limit = memory_limit
        self._parent = None if folder is None else Path(folder)
        self._folder: Path | None = None
        self._cleanup: weakref.finalize | None = None
        self._slots: list[np.ndarray | Path | None] = [None] * count
        self.bytes_in_memory = 0

    # ------------------------------------------------------------------ writing

    def __setitem__(self, index: int, array: np.ndarray) -> None:
        index = self._index(index)
        self._release(index)
        array = np.asarray(array)
        if self.bytes_in_memory + array.nbytes <= self.memory_limit:
            self._slots[index] = array
            self.bytes_in_memory += array.nbytes
            return
        path = self._spill_folder() / f"{index:07d}.npy"
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        self._slots[index] = path

    def _spill_folder(self) -> Path:
        if self._folder is None:
            if self._parent is not None:
                self._parent.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="hiad-pl-maps-", dir=self._parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)
        return self._folder

    def _release(self, index: int) -> None:
        slot = self._slots[index]
        if isinstance(slot, np.ndarray):
            self.bytes_in_memory -= slot.nbytes
        elif isinstance(slot, Path):
            slot.unlink(missing_ok=True)
        self._slots[index] = None

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._slots)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        slot = self._slots[self._index(index)]
        if slot is None:
            raise IndexError(f"array {index} of the store was never written")
        if isinstance(slot, Path):
            return np.load(slot, mmap_mode="r", allow_pickle=False)
        return slot

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a store of {len(self)} arrays")
        return index % len(self)

    def is_filled(self, index: int) -> bool:
        """Whether slot ``index`` holds an array."""
        return self._slots[self._index(index)] is not None

    @property
    def num_on_disk(self) -> int:
        """How many arrays were written to disk."""
        return sum(isinstance(slot, Path) for slot in self._slots)

    def close(self) -> None:
        """Drop every array and remove the folder on disk (the store is empty afterwards)."""
        self._slots = [None] * len(self._slots)
        self.bytes_in_memory = 0
        if self._cleanup is not None:
            self._cleanup()

    def __repr__(self) -> str:
        return (
            f"ArrayStore({len(self)} arrays, {self.bytes_in_memory / 1e6:.0f} MB in memory, "
            f"{self.num_on_disk} on disk)"
        )


class Picked(Sequence):
    """The items ``indexes`` of ``items``, read on access (nothing is copied)."""

    def __init__(self, items: Sequence, indexes: Sequence[int]) -> None:
        self.items = items
        self.indexes = list(indexes)

    def __len__(self) -> int:
        return len(self.indexes)

    def __getitem__(self, index: int):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.items[self.indexes[index]]
