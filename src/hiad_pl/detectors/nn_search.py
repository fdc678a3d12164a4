"""Euclidean k-nearest-neighbour search over a fixed set of vectors: exact or approximate.

Search kinds (``kind``):

``exact``
    every vector is compared (``IndexFlatL2`` or chunked matrix products).
``ivf``
    faiss ``IndexIVFFlat``: the vectors are split into ``4 * sqrt(M)`` k-means
    cells and a query scans the ``nprobe`` nearest cells.
``hnsw``
    faiss ``IndexHNSWFlat`` (32 links per vector), CPU only.

:func:`choose_search_kind` picks ``exact`` up to a bank size and ``ivf`` above
it. An approximate index measures its recall@1 against exact search on a
sample of its first queries and logs it (:attr:`NearestNeighbourIndex.recall_at_1`).

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

import logging
import math

import numpy as np
import torch
from torch import Tensor

try:
    import faiss
except ImportError:  # faiss is optional: torch does the search without it
    faiss = None

#: Distance-matrix entries per chunk of the torch backend (64M floats = 256 MB).
TORCH_CHUNK_ELEMENTS = 1 << 26
#: Search kinds; ``auto`` chooses between the first two by bank size.
SEARCH_KINDS = ("auto", "exact", "ivf", "hnsw")
#: Most vectors an IVF index trains its k-means cells on (faiss wants >= 39 per cell).
IVF_TRAINING_ROWS_PER_CELL = 64
#: Links per vector of an HNSW graph and its search breadth.
HNSW_LINKS, HNSW_EF_SEARCH, HNSW_EF_CONSTRUCTION = 32, 64, 80
#: Queries of the first search compared with exact search to measure recall@1.
RECALL_SAMPLE = 256

log = logging.getLogger(__name__)


def choose_search_kind(size: int, requested: str = "auto", exact_max: int = 10_000) -> str:
    """The search kind for a bank of ``size`` vectors: ``requested``, or for ``auto`` exact up to ``exact_max``."""
    if requested not in SEARCH_KINDS:
        raise ValueError(f"search kind must be one of {SEARCH_KINDS}, got {requested!r}")
    if requested != "auto":
        return requested
    return "exact" if size <= exact_max else "ivf"


def ivf_cells(size: int) -> int:
    """Number of IVF cells for ``size`` vectors: ``4 sqrt(size)``, at least 39 vectors per cell."""
    return max(1, min(int(4 * math.sqrt(size)), size // 39))


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
    """Euclidean k-NN search against a fixed ``[M, D]`` set of vectors.

    Args:
        vectors: ``[M, D]`` the searchable set (e.g. a PatchCore memory bank).
        backend: ``faiss-gpu``, ``faiss-cpu`` or ``torch``; chosen from
            ``vectors.device`` when ``None``.
        kind: ``exact``, ``ivf`` or ``hnsw`` (see the module docs). Approximate
            kinds need faiss; the ``torch`` backend searches exactly, and
            ``hnsw`` on ``faiss-gpu`` runs on the CPU.
        nprobe: IVF cells a query scans.
        seed: seed of the vectors an IVF index trains its cells on.
        recall_sample: queries of the first search on which an approximate
            index measures its recall@1 against exact search (0: never).
    """

    def __init__(
        self,
        vectors: Tensor,
        backend: str | None = None,
        kind: str = "exact",
        nprobe: int = 8,
        seed: int = 0,
        recall_sample: int = RECALL_SAMPLE,
    ) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"NearestNeighbourIndex needs a non-empty [M, D] tensor, got {tuple(vectors.shape)}")
        self.backend = backend or choose_backend(vectors.device)
        if self.backend not in ("faiss-gpu", "faiss-cpu", "torch"):
            raise ValueError(f"unknown nearest-neighbour backend {self.backend!r}")
        if self.backend.startswith("faiss") and faiss is None:
            raise RuntimeError(f"backend {self.backend!r} needs faiss (pip install faiss-cpu)")
        if kind not in SEARCH_KINDS[1:]:
            raise ValueError(f"search kind must be one of {SEARCH_KINDS[1:]}, got {kind!r}")
        if kind != "exact" and self.backend == "torch":
            log.info("nearest-neighbour search: the torch backend searches exactly (%s needs faiss)", kind)
            kind = "exact"
        self.kind = kind
        self.size, self.dim = int(vectors.shape[0]), int(vectors.shape[1])
        self.nprobe = int(nprobe)
        self.recall_sample = int(recall_sample)
        #: Share of sampled queries whose approximate nearest neighbour is the exact one (``None``: not measured).
        self.recall_at_1: float | None = 1.0 if kind == "exact" else None
        self._vectors = vectors.detach().float()
        self._index = self._build_faiss(vectors, seed) if self.backend.startswith("faiss") else None

    def _build_faiss(self, vectors: Tensor, seed: int) -> "faiss.Index":
        """A faiss index of ``vectors`` of this index's kind (moved to their GPU for ``faiss-gpu``)."""
        faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
        data = _as_float32_numpy(vectors)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, HNSW_LINKS)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = HNSW_EF_SEARCH
            index.add(data)
            return index  # faiss has no GPU HNSW
        if self.kind == "ivf":
            cells = ivf_cells(self.size)
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim), self.dim, cells)
            rows = min(self.size, cells * IVF_TRAINING_ROWS_PER_CELL)
            sample = np.random.default_rng(seed).choice(self.size, rows, replace=False) if rows < self.size else None
            index.train(data if sample is None else data[np.sort(sample)])
            index.add(data)
            index.nprobe = min(self.nprobe, cells)
        else:
            index = faiss.IndexFlatL2(self.dim)
            index.add(data)
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
            if self.recall_at_1 is None and self.recall_sample > 0:
                self.measure_recall(queries)
        return squared.clamp_min(0).sqrt()

    def measure_recall(self, queries: Tensor, sample: int | None = None) -> float:
        """Recall@1 of this index against exact search on up to ``sample`` of ``queries`` (logged and kept)."""
        sample = self.recall_sample if sample is None else int(sample)
        chosen = queries[torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))[: max(1, sample)]]
        data = _as_float32_numpy(chosen)
        if self._index is None:
            self.recall_at_1 = 1.0
            return 1.0
        _, approximate = self._index.search(data, 1)
        exact_ids = self._torch_search(chosen.to(self._vectors.device), 1, ids=True).cpu().numpy()
        self.recall_at_1 = float((approximate[:, 0] == exact_ids[:, 0]).mean())
        log.info(
            "nearest-neighbour search (%s, %d vectors): recall@1 %.3f against exact search on %d queries",
            self.kind, self.size, self.recall_at_1, len(chosen),
        )
        return self.recall_at_1

    def _torch_search(self, queries: Tensor, k: int, ids: bool = False) -> Tensor:
        """Squared distances (or with ``ids``, positions) of the ``k`` nearest vectors, by chunks of queries."""
        vectors = self._vectors.to(queries.device)
        vector_norms = vectors.square().sum(1)
        chunk = max(1, TORCH_CHUNK_ELEMENTS // self.size)
        results = []
        for part in queries.float().split(chunk):
            squared = torch.addmm(vector_norms, part, vectors.T, alpha=-2).add_(part.square().sum(1, keepdim=True))
            nearest = squared.topk(k, dim=1, largest=False)
            results.append(nearest.indices if ids else nearest.values)
        return torch.cat(results)
