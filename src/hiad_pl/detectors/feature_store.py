"""Training features streamed to a file instead of held in memory.

A one-pass detector sees every training location once; at 2K-4K the rows
(``N`` locations x ``D`` channels) reach millions. :class:`FeatureStore` appends
each batch's rows to a raw file in a temporary folder (float16 by default: half
of float32's bytes, and PatchCore's distances need no more precision) and reads
them back block by block, so resident memory stays at one block.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: Storage types a store accepts, by name.
STORE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}


class FeatureStore:
    """Rows ``[N, D]`` appended batch by batch to a file; read back as float32 blocks.

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
        self._file: Any = open(self.path, "wb")
        self.rows = 0
        self.dim: int | None = None

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

    def read(self, start: int, stop: int) -> Tensor:
        """float32 rows ``start:stop``, read from the file (ends appending).

        A plain read, not a memory map: pages of the file already read do not
        count towards the process's resident memory.
        """
        if self._file is not None:
            self._file.close()
            self._file = None
        stop = min(stop, self.rows)
        if self.dim is None or start >= stop:
            return torch.empty(0, self.dim or 0)
        numpy_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        itemsize = np.dtype(numpy_dtype).itemsize
        values = np.fromfile(self.path, dtype=numpy_dtype, count=(stop - start) * self.dim, offset=start * self.dim * itemsize)
        return torch.from_numpy(values.reshape(stop - start, self.dim)).float()

    def close(self) -> None:
        """Delete the file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self._folder, ignore_errors=True)

    def __del__(self) -> None:
        self.close()
