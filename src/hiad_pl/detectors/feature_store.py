"""Training features streamed to a file instead of held in memory.

A one-pass detector sees every training location once; at 2K-4K the rows
(``N`` locations x ``D`` channels) reach millions. :class:`FeatureStore` appends
each batch's rows to a raw file in a temporary folder (float16 by default: half
of float32's bytes, and PatchCore's distances need no more precision) and reads
them back memory-mapped, so resident memory stays at one chunk while the
operating system pages the rest.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

#: Storage types a store accepts, by name.
STORE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}


class FeatureStore:
    """Rows ``[N, D]`` appended batch by batch to a file; read back as float32 chunks.

    Args:
        dtype: ``float16`` (the default, half the bytes) or ``float32`` (exact copies).
        directory: where the temporary folder is made (the system's temp dir by default).

    The file is deleted by :meth:`close` (also on garbage collection). Memory:
    nothing beyond the rows being appended or read; disk: ``N x D x 2`` bytes
    for float16.
    """

    def __init__(self, dtype: str = "float16", directory: str | Path | None = None) -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"feature store dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
        self.dtype = STORE_DTYPES[dtype]
        self._folder = Path(tempfile.mkdtemp(prefix="hiad_features_", dir=directory))
        self.path = self._folder / "features.bin"
        self._file = open(self.path, "wb")
        self.rows = 0
        self.dim: int | None = None
        self._mapped: np.ndarray | None = None

    def __len__(self) -> int:
        return self.rows

    def append(self, rows: Tensor) -> None:
        """Append ``[n, D]`` rows (any float dtype, any device)."""
        if rows.ndim != 2:
            raise ValueError(f"feature rows must be [n, D], got {tuple(rows.shape)}")
        if self.dim is None:
            self.dim = int(rows.shape[1])
        elif rows.shape[1] != self.dim:
            raise ValueError(f"feature rows have {rows.shape[1]} channels, the store holds {self.dim}")
        if self._file is None:
            raise RuntimeError("this feature store is closed or already being read")
        self._file.write(rows.detach().to("cpu", self.dtype).contiguous().numpy().tobytes())
        self.rows += int(rows.shape[0])

    def mapped(self) -> np.ndarray:
        """The rows as a read-only memory-mapped ``[N, D]`` array (ends appending)."""
        if self._mapped is None:
            if self.dim is None or self.rows == 0:
                raise RuntimeError("the feature store is empty")
            self._file.close()
            self._file = None
            numpy_dtype = np.float16 if self.dtype == torch.float16 else np.float32
            self._mapped = np.memmap(self.path, dtype=numpy_dtype, mode="r", shape=(self.rows, self.dim))
        return self._mapped

    def take(self, indices: Tensor | np.ndarray) -> Tensor:
        """float32 rows at ``indices`` (read in ascending order, returned in the order asked)."""
        order = np.asarray(indices, dtype=np.int64)
        ascending = np.argsort(order, kind="stable")
        rows = np.empty((len(order), self.dim or 0), dtype=np.float32)
        rows[ascending] = self.mapped()[order[ascending]]
        return torch.from_numpy(rows)

    def chunks(self, size: int) -> Iterator[Tensor]:
        """float32 chunks of at most ``size`` consecutive rows, in order."""
        data = self.mapped()
        for start in range(0, self.rows, size):
            yield torch.from_numpy(np.asarray(data[start : start + size], dtype=np.float32))

    def close(self) -> None:
        """Delete the file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mapped = None
        shutil.rmtree(self._folder, ignore_errors=True)

    def __del__(self) -> None:
        self.close()
