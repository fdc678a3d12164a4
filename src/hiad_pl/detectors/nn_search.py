"""Exact Euclidean k-nearest-neighbour search over a fixed set of vectors.

Three backends, chosen from where the vectors live:

``faiss-gpu``
    faiss ``IndexFlatL2`` on the vectors' GPU, when faiss was built with GPU support.
``torch``
    chunked matrix products in torch; used on a GPU without faiss-gpu (faster
    than a round trip to the CPU) or when faiss is not installed.
``faiss-cpu``
    faiss ``IndexFlatL2`` on the CPU, using as many threads as torch does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:
    import faiss
except ImportError:  # faiss is optional: torch does the search without it
    faiss = None

#: Distance-matrix entries per chunk of the torch backend (64M floats = 256 MB).
TORCH_CHUNK_ELEMENTS = 1 << 26


def faiss_has_gpu() -> bool:
    """Whether the installed faiss can build GPU indexes on a visible GPU."""
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_backend(device: torch.device) -> str:
    """The search backend for vectors held on ``device``."""
    if device.type == "cuda":
        return "faiss-gpu" if faiss_has_gpu() else "torch"
    return "faiss-cpu" if faiss is not None else "torch"


def _as_float32_numpy(tensor: Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy copy (or view) of ``tensor`` for faiss."""
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())


class NearestNeighbourIndex:
    """Exact Euclidean k-NN search against a fixed ``[M, D]`` set of vectors.

    Args:
        vectors: ``[M, D]`` the searchable set (e.g. a PatchCore memory bank).
        backend: ``faiss-gpu``, ``faiss-cpu`` or ``torch``; chosen from
            ``vectors.device`` when ``None``.
    """

    def __init__(self, vectors: Tensor, backend: str | None = None) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"NearestNeighbourIndex needs a non-empty [M, D] tensor, got {tuple(vectors.shape)}")
        self.backend = backend or choose_backend(vectors.device)
        if self.backend not in ("faiss-gpu", "faiss-cpu", "torch"):
            raise ValueError(f"unknown nearest-neighbour backend {self.backend!r}")
        if self.backend.startswith("faiss") and faiss is None:
            raise RuntimeError(f"backend {self.backend!r} needs faiss (pip install faiss-cpu)")
        self.size, self.dim = int(vectors.shape[0]), int(vectors.shape[1])
        self._vectors = vectors.detach().float()
        self._index = self._build_faiss(vectors) if self.backend.startswith("faiss") else None

    def _build_faiss(self, vectors: Tensor) -> "faiss.Index":
        """A flat L2 faiss index of ``vectors`` (moved to their GPU for ``faiss-gpu``)."""
        index = faiss.IndexFlatL2(self.dim)
        index.add(_as_float32_numpy(vectors))
        if self.backend == "faiss-gpu":
            self._gpu_resources = faiss.StandardGpuResources()
            device = vectors.device.index if vectors.device.index is not None else torch.cuda.current_device()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, device, index)
        return index

    def search(self, queries: Tensor, k: int = 1) -> Tensor:
        """Euclidean distances ``[N, k]`` (ascending) from each query to its ``k`` nearest vectors."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {tuple(queries.shape)}")
        k = max(1, min(int(k), self.size))
        if self._index is None:
            squared = self._torch_search(queries, k)
        else:
            faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
            squared_np, _ = self._index.search(_as_float32_numpy(queries), k)
            squared = torch.from_numpy(squared_np).to(queries.device)
        return squared.clamp_min(0).sqrt()

    def _torch_search(self, queries: Tensor, k: int) -> Tensor:
        """Squared distances to the ``k`` nearest vectors, by chunks of queries."""
        vectors = self._vectors.to(queries.device)
        vector_norms = vectors.square().sum(1)
        chunk = max(1, TORCH_CHUNK_ELEMENTS // self.size)
        results = []
        for part in queries.float().split(chunk):
            squared = torch.addmm(vector_norms, part, vectors.T, alpha=-2).add_(part.square().sum(1, keepdim=True))
            results.append(squared.topk(k, dim=1, largest=False).values)
        return torch.cat(results)
