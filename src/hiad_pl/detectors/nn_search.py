"""Euclidean k-nearest-neighbour search over a fixed set of vectors: exact or approximate.

Search kinds (``kind``):

``exact``
    every vector is compared (chunked matrix products; faiss ``IndexFlatL2`` on a GPU).
``ivf``
    inverted file (:class:`CellIndex`): the vectors are split into ``sqrt(M)``
    k-means cells and a query scans the ``nprobe`` cells with the nearest
    centres. The scan is a matrix product per cell (every query that probes the
    cell against all its vectors), so it runs at BLAS speed on the CPU and on a
    GPU alike; the distances returned are recomputed exactly for the chosen
    neighbours. On a CPU that multiplies bfloat16 natively (AVX512-BF16, AMX),
    the k = 1 scoring path scans in bfloat16 (``scan_dtype``, see
    :class:`CellIndex`).
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
    the CPU with faiss installed: HNSW and the IVF cells' probes through faiss
    (:class:`CellIndex` ``faiss_probe``); exact search by chunked
    matrix products in torch, which ran 1.4-2.2x faster than faiss's
    ``IndexFlatL2`` on 32,768 queries against 2,000-196,800 vectors (2 threads).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

try:
    import faiss
except ImportError:  # faiss is optional: torch does the search without it
    faiss = None  # type: ignore[assignment]  # the optional module's stand-in

#: Distance-matrix entries per chunk of the torch backend (64M floats = 256 MB).
TORCH_CHUNK_ELEMENTS = 1 << 26
#: Search kinds; ``auto`` chooses between the first two by bank size.
SEARCH_KINDS = ("auto", "exact", "ivf", "hnsw")
#: Most vectors an IVF index trains its k-means cells on, per cell.
IVF_TRAINING_ROWS_PER_CELL = 64
#: Fewest vectors per IVF cell, and the k-means iterations that place the cells.
IVF_MIN_ROWS_PER_CELL, IVF_KMEANS_ITERATIONS = 39, 20
#: Points per cluster the k-means++ seeding draws from.
KMEANS_SEEDING_ROWS_PER_CLUSTER = 8
#: Links per vector of an HNSW graph and its search breadth.
HNSW_LINKS, HNSW_EF_SEARCH, HNSW_EF_CONSTRUCTION = 32, 64, 80
#: Queries of the first search compared with exact search to measure recall@1.
RECALL_SAMPLE = 256
#: Precisions of the k = 1 cell scan; ``auto`` is bfloat16 on a CPU that multiplies it natively.
SCAN_DTYPES = ("auto", "float32", "bfloat16")
#: Smallest padding of the rows (queries) and columns (cell vectors) of a bfloat16 product.
BF16_QUERY_BLOCK, BF16_CELL_BLOCK = 64, 32
#: Padded sizes per doubling of a bfloat16 product's rows or columns (at most 1/8 of them padding).
#: oneDNN builds and caches a kernel per matrix shape: unpadded shapes (a new one per cell and
#: call) made the scan slower than float32, and multiples of 64 still left thousands of shapes
#: whose cached kernels held 1.3 GB more resident memory at 4096 px.
BF16_SIZES_PER_DOUBLING = 8
#: Value of the padding columns of a bfloat16 cell (finite in bfloat16, above any squared distance).
BF16_PAD_VALUE = 1e30

log = logging.getLogger(__name__)


def choose_search_kind(size: int, requested: str = "auto", exact_max: int = 10_000) -> str:
    """The search kind for a bank of ``size`` vectors: ``requested``, or for ``auto`` exact up to ``exact_max``."""
    if requested not in SEARCH_KINDS:
        raise ValueError(f"search kind must be one of {SEARCH_KINDS}, got {requested!r}")
    if requested != "auto":
        return requested
    return "exact" if size <= exact_max else "ivf"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag on Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", text) is not None


def choose_scan_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The dtype of :class:`CellIndex`'s k = 1 scan: ``requested``, or for ``auto`` bfloat16 on a CPU with native bfloat16.

    Measured on a 2-core AVX512-BF16 CPU (196,800 vectors of 152 values, 443 cells, nprobe 8): 0.67 s
    per 65,536 queries against 1.00 s in float32 (docs/results.md). GPUs keep float32 (not measured
    there), and so do CPUs without native bfloat16, where its products are emulated.
    """
    if requested not in SCAN_DTYPES:
        raise ValueError(f"scan dtype must be one of {SCAN_DTYPES}, got {requested!r}")
    if requested == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bfloat16() else torch.float32
    return getattr(torch, requested)


def padded_size(size: int, smallest: int) -> int:
    """``size`` rounded up to a multiple of ``smallest``, and to one of :data:`BF16_SIZES_PER_DOUBLING` steps per doubling."""
    step = max(smallest, (1 << max(0, size.bit_length() - 1)) // BF16_SIZES_PER_DOUBLING)
    return -(-size // step) * step


def ivf_cells(size: int) -> int:
    """Number of IVF cells for ``size`` vectors: ``sqrt(size)``, at least 39 vectors per cell.

    ``sqrt(M)`` cells balance the two matrix products of a search: queries against
    the cell centres, and queries against the ``nprobe`` cells' vectors.
    """
    return max(1, min(int(math.sqrt(size)), size // IVF_MIN_ROWS_PER_CELL))


def kmeans(points: Tensor, clusters: int, iterations: int = IVF_KMEANS_ITERATIONS, seed: int = 0) -> Tensor:
    """``[clusters, D]`` centres of Lloyd's k-means on ``points``, started by k-means++ seeding.

    Args:
        points: ``[N, D]`` float vectors, ``N >= clusters``.
        clusters: number of centres.
        iterations: assignment / update rounds after the seeding.
        seed: seed of the seeding's draws (the same seed, the same centres).

    Greedy k-means++: each seed is the best (lowest total squared distance) of
    ``2 + ln(clusters)`` draws with probability proportional to the squared
    distance to the nearest seed so far, drawn from a random
    ``KMEANS_SEEDING_ROWS_PER_CLUSTER`` points per cluster (the seeding is
    sequential; the sample keeps it cheap). An emptied cluster restarts on the
    point farthest from its centre.

    Kept beside faiss's ``faiss.Kmeans`` on purpose: it runs in torch on the
    bank's own device (a CUDA bank is clustered on the GPU without faiss-gpu),
    and on the CPU faiss is not faster: 100,000 x 152 points into 316 cells, 20
    rounds, 2 threads, 19-20 s here against 19-23 s (16-18 s on a 256-per-cell
    sample), mean squared distance to the centres within 0.5% of each other.
    """
    generator = torch.Generator().manual_seed(seed)
    points = points.float()
    pool = points
    if len(points) > clusters * KMEANS_SEEDING_ROWS_PER_CLUSTER:
        chosen_rows = torch.randperm(len(points), generator=generator)[: clusters * KMEANS_SEEDING_ROWS_PER_CLUSTER]
        pool = points[chosen_rows.to(points.device)]
    pool_norms = pool.square().sum(1)
    trials = 2 + int(math.log(clusters))
    centres = points.new_empty(clusters, points.shape[1])
    first = int(torch.randint(len(pool), (1,), generator=generator))
    centres[0] = pool[first]
    nearest_squared = (pool - pool[first]).square().sum(1).cpu().double().clamp_min_(0)
    for chosen in range(1, clusters):
        cumulative = nearest_squared.cumsum(0)
        if cumulative[-1] <= 0:  # fewer distinct points than clusters: repeat one
            centres[chosen:] = centres[0]
            break
        draws = torch.rand(trials, generator=generator, dtype=torch.float64) * cumulative[-1]
        picks = torch.searchsorted(cumulative, draws).clamp_max_(len(pool) - 1)
        candidates = pool[picks.to(pool.device)]
        squared = torch.addmm(pool_norms, candidates, pool.T, alpha=-2).add_(pool_norms[picks.to(pool.device), None])
        squared = torch.minimum(nearest_squared, squared.cpu().double().clamp_min_(0))
        best = int(squared.sum(1).argmin())
        centres[chosen], nearest_squared = candidates[best], squared[best]
    for _ in range(iterations):
        nearest = torch.addmm(centres.square().sum(1), points, centres.T, alpha=-2).argmin(1)
        counts = torch.bincount(nearest, minlength=clusters)
        sums = torch.zeros_like(centres).index_add_(0, nearest, points)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
        empty = int((~filled).sum())
        if empty:
            far = (points - centres[nearest]).square().sum(1).argsort(descending=True)
            centres[~filled] = points[far[:empty]]
    return centres


class CellIndex:
    """Inverted-file k-NN: k-means cells, and one matrix product per probed cell.

    A search finds each query's ``nprobe`` nearest cell centres (one matrix
    product against all centres), groups the (query, cell) pairs by cell, and
    for each cell multiplies its queries by its vectors: the work runs in large
    BLAS calls instead of one query at a time. Each vector is stored as
    ``[-2 v, ||v||^2]`` and each query is extended by a 1, so one product gives
    ``||v||^2 - 2 q.v`` (the squared distance less ``||q||^2``) with no extra
    pass to add the norms. :meth:`search` re-measures the ``k`` best
    candidates of each query exactly (``||q - v||^2`` over the full vector);
    :meth:`nearest_distances` keeps only the distance to the nearest, the
    per-cell minimum without its position, which is all a k = 1 anomaly score
    needs.

    With ``scan_dtype`` bfloat16, :meth:`nearest_distances` scans in bfloat16
    (1.5x the float32 speed on a CPU with native bfloat16 products). Its
    products are kept small so that bfloat16's 8-bit mantissa costs little:
    each vector is stored relative to its cell's centre ``c`` as ``[-2 r,
    ||r||^2 + 2 (c - m).r]`` (``r = v - c``, ``m`` the vectors' mean) and each
    query as ``[q - m, 1]``, so a product gives ``||q - v||^2 - ||q - c||^2``,
    to which the query's float32 distance to the centre (from the probe
    search) is added. Measured on a 196,800-vector bank: mean relative
    distance error 0.0014 in absolute value against float32's scan (the same
    cells probed, the same neighbours' distances to within it).

    Args:
        vectors: ``[M, D]`` the searchable set.
        cells: number of k-means cells.
        nprobe: cells each query scans.
        seed: seed of the k-means training sample and start.
        scan_dtype: ``torch.float32`` or ``torch.bfloat16``, the precision of
            :meth:`nearest_distances`' scan (:meth:`search` scans in float32).
        faiss_probe: whether faiss's ``IndexFlatL2`` of the centres finds each
            query's ``nprobe`` nearest cells (its matrix product with a heap
            selection beat torch's product and ``topk``: 0.10 against 0.17-0.19 s
            for 65,536 queries and 443 centres on 2 cores) instead of torch.
            Default: when faiss is installed and the vectors are on the CPU.
    """

    def __init__(
        self,
        vectors: Tensor,
        cells: int,
        nprobe: int = 8,
        seed: int = 0,
        scan_dtype: torch.dtype = torch.float32,
        faiss_probe: bool | None = None,
    ) -> None:
        if scan_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"scan_dtype must be torch.float32 or torch.bfloat16, got {scan_dtype}")
        vectors = vectors.detach().float()
        size = len(vectors)
        self.dim = vectors.shape[1]
        self.cells = max(1, min(int(cells), size))
        self.nprobe = max(1, min(int(nprobe), self.cells))
        self.scan_dtype = scan_dtype
        generator = torch.Generator().manual_seed(seed)
        rows = min(size, self.cells * IVF_TRAINING_ROWS_PER_CELL)
        sample = vectors if rows == size else vectors[torch.randperm(size, generator=generator)[:rows].to(vectors.device)]
        self.centres = kmeans(sample, self.cells, seed=seed)
        self.centre_norms = self.centres.square().sum(1)
        #: faiss's flat index of the centres, which finds each query's nearest on the CPU (``None``: torch does).
        self._probe_index = None
        if faiss_probe is None:
            faiss_probe = faiss is not None and self.centres.device.type == "cpu"
        if faiss_probe:
            if faiss is None or self.centres.device.type != "cpu":
                raise ValueError("faiss_probe needs faiss and vectors on the CPU")
            self._probe_index = faiss.IndexFlatL2(self.dim)
            self._probe_index.add(_as_float32_numpy(self.centres))
        owner = torch.cat([
            torch.addmm(self.centre_norms, part, self.centres.T, alpha=-2).argmin(1)
            for part in vectors.split(max(1, TORCH_CHUNK_ELEMENTS // self.cells))
        ])
        #: Position in ``vectors`` of each row of :attr:`scan`.
        self.order = torch.argsort(owner, stable=True)
        grouped = vectors[self.order]
        #: The vectors grouped by cell as ``[-2 v, ||v||^2]`` (``-2 v`` is exact in floating point).
        self.scan = torch.cat([grouped * -2, grouped.square().sum(1, keepdim=True)], dim=1).contiguous()
        counts = torch.bincount(owner, minlength=self.cells)
        self.offsets = [0] + counts.cumsum(0).tolist()
        #: The vectors' mean (the origin of the bfloat16 queries).
        self.mean = vectors.mean(0)
        #: Per cell, its vectors for the bfloat16 scan, padded by :func:`padded_size` (empty without it).
        self.blocks: list[Tensor] = self._bfloat16_blocks(grouped, owner[self.order]) if scan_dtype == torch.bfloat16 else []
        del grouped

    def _bfloat16_blocks(self, grouped: Tensor, owner: Tensor) -> list[Tensor]:
        """Each cell's rows ``[-2 r, ||r||^2 + 2 (c - m).r]`` in bfloat16, padded with rows that never win."""
        blocks = []
        for cell in range(self.cells):
            low, high = self.offsets[cell], self.offsets[cell + 1]
            centre = self.centres[cell]
            residual = grouped[low:high] - centre
            column = residual.square().sum(1) + 2 * (residual @ (centre - self.mean))
            block = residual.new_zeros(padded_size(high - low, BF16_CELL_BLOCK), self.dim + 1)
            block[: high - low, : self.dim] = residual * -2
            block[: high - low, self.dim] = column
            block[high - low :, self.dim] = BF16_PAD_VALUE
            blocks.append(block.to(torch.bfloat16))
        return blocks

    def vectors(self, rows: Tensor) -> Tensor:
        """The original vectors at ``rows`` of :attr:`scan` (exactly: halving is exact)."""
        return self.scan[rows, : self.dim] * -0.5

    def _pairs(self, x: Tensor) -> tuple[Tensor, Tensor, list[int], Tensor]:
        """(query, probed cell) pairs grouped by cell.

        Returns the pair order, the query of each pair, the pairs per cell and
        ``||q - c||^2`` of each pair (the query's squared distance to the cell's centre).
        """
        if self._probe_index is not None:
            faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
            squared, cells = self._probe_index.search(_as_float32_numpy(x), self.nprobe)
            values, probes = torch.from_numpy(squared), torch.from_numpy(cells).flatten()
        else:
            nearest = torch.addmm(self.centre_norms, x, self.centres.T, alpha=-2).topk(
                self.nprobe, dim=1, largest=False, sorted=False
            )
            values, probes = nearest.values.add_(x.square().sum(1, keepdim=True)), nearest.indices.flatten()
        by_cell = torch.argsort(probes)
        query_of_pair = by_cell.div(self.nprobe, rounding_mode="floor")
        pairs_per_cell = torch.bincount(probes, minlength=self.cells).tolist()
        return by_cell, query_of_pair, pairs_per_cell, values.flatten()[by_cell]

    def _cell_scans(self, x: Tensor, query_of_pair: Tensor, pairs_per_cell: list[int]) -> Iterator[tuple[int, int, int, Tensor]]:
        """``(first pair, end of pairs, first row, ||v||^2 - 2 q.v)`` of each probed, non-empty cell."""
        extended = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        start = 0
        for cell, pairs in enumerate(pairs_per_cell):
            low, high = self.offsets[cell], self.offsets[cell + 1]
            stop = start + pairs
            if pairs and high > low:
                queries = extended.index_select(0, query_of_pair[start:stop])
                yield start, stop, low, torch.mm(queries, self.scan[low:high].T)
            start = stop

    def _bfloat16_minima(self, x: Tensor, query_of_pair: Tensor, pairs_per_cell: list[int]) -> Tensor:
        """Per pair, ``min ||q - v||^2 - ||q - c||^2`` over the cell's vectors, scanned in bfloat16 (inf: empty cell)."""
        extended = torch.cat([x - self.mean, x.new_ones(len(x), 1)], dim=1).to(torch.bfloat16)
        most = max(pairs_per_cell, default=0)
        buffer = extended.new_zeros(padded_size(most, BF16_QUERY_BLOCK), self.dim + 1)
        best = torch.full((len(query_of_pair),), math.inf, device=x.device)
        start = 0
        for cell, pairs in enumerate(pairs_per_cell):
            stop = start + pairs
            if pairs and self.offsets[cell + 1] > self.offsets[cell]:
                padded = padded_size(pairs, BF16_QUERY_BLOCK)
                torch.index_select(extended, 0, query_of_pair[start:stop], out=buffer[:pairs])
                best[start:stop] = torch.mm(buffer[:padded], self.blocks[cell].T)[:pairs].amin(1)
            start = stop
        return best

    def nearest_distances(self, queries: Tensor) -> Tensor:
        """Squared distance ``[N]`` of each query to the nearest vector found (k = 1, no positions).

        In float32, ``||q||^2 + min(||v||^2 - 2 q.v)``: the same neighbour as
        :meth:`search`, its distance to within float32 rounding of the norms. In
        bfloat16, the cells' minima of ``||q - v||^2 - ||q - c||^2`` plus the float32
        ``||q - c||^2`` (see the class notes). Clamped at 0.
        """
        x = queries.detach().float().to(self.scan.device)
        _, query_of_pair, pairs_per_cell, to_centre = self._pairs(x)
        if self.scan_dtype == torch.bfloat16:
            best = self._bfloat16_minima(x, query_of_pair, pairs_per_cell).add_(to_centre)
        else:
            best = torch.full((len(x) * self.nprobe,), math.inf, device=x.device)
            for start, stop, _, partial in self._cell_scans(x, query_of_pair, pairs_per_cell):
                best[start:stop] = partial.amin(1)
        nearest = torch.full((len(x),), math.inf, device=x.device).scatter_reduce_(0, query_of_pair, best, "amin")
        if self.scan_dtype != torch.bfloat16:  # the float32 minima lack ||q||^2; the bfloat16 ones are whole
            nearest.add_(x.square().sum(1))
        return nearest.clamp_min_(0)

    def search(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """Squared distances ``[N, k]`` (ascending) and positions ``[N, k]`` of each query's ``k`` nearest found.

        A query whose probed cells hold fewer than ``k`` vectors gets the nearest of
        those again in the missing places (never a made-up distance).
        """
        x = queries.detach().float().to(self.scan.device)
        count = len(x)
        by_cell, query_of_pair, pairs_per_cell, _ = self._pairs(x)
        best = torch.full((count * self.nprobe, k), math.inf, device=x.device)
        found = torch.zeros((count * self.nprobe, k), dtype=torch.long, device=x.device)
        for start, stop, low, partial in self._cell_scans(x, query_of_pair, pairs_per_cell):
            if k == 1:
                values, where = partial.min(1, keepdim=True)
            else:
                values, where = partial.topk(min(k, partial.shape[1]), dim=1, largest=False)
            best[start:stop, : values.shape[1]] = values
            found[start:stop, : values.shape[1]] = where + low
        pair_best, pair_found = torch.empty_like(best), torch.empty_like(found)
        pair_best[by_cell], pair_found[by_cell] = best, found
        chosen = pair_best.view(count, -1).topk(k, dim=1, largest=False)
        candidates = pair_found.view(count, -1).gather(1, chosen.indices)
        candidates = torch.where(chosen.values.isfinite(), candidates, candidates[:, :1])
        squared = (x[:, None, :] - self.vectors(candidates)).square().sum(-1)
        squared, rank = squared.sort(dim=1)
        return squared, self.order[candidates.gather(1, rank)]


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
        kind: ``exact``, ``ivf`` or ``hnsw`` (see the module docs). ``ivf`` runs
            on the vectors' device with any backend; ``hnsw`` needs faiss (the
            ``torch`` backend then searches exactly) and runs on the CPU.
        nprobe: IVF cells a query scans.
        seed: seed of the IVF cells' k-means.
        recall_sample: queries of the first search on which an approximate
            index measures its recall@1 against exact search (0: never). For
            ``ivf`` it measures the cells probed (the float32 scan's neighbour).
        scan_dtype: precision of the ``ivf`` k = 1 scan, one of
            :data:`SCAN_DTYPES` (:func:`choose_scan_dtype`).
    """

    def __init__(
        self,
        vectors: Tensor,
        backend: str | None = None,
        kind: str = "exact",
        nprobe: int = 8,
        seed: int = 0,
        recall_sample: int = RECALL_SAMPLE,
        scan_dtype: str = "auto",
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
        if kind == "hnsw" and self.backend == "torch":
            log.info("nearest-neighbour search: the torch backend searches exactly (hnsw needs faiss)")
            kind = "exact"
        self.kind = kind
        self.size, self.dim = int(vectors.shape[0]), int(vectors.shape[1])
        self.nprobe = int(nprobe)
        self.recall_sample = int(recall_sample)
        #: Share of sampled queries whose approximate nearest neighbour is the exact one (``None``: not measured).
        self.recall_at_1: float | None = 1.0 if kind == "exact" else None
        self._vectors = vectors.detach().float()
        self._vector_norms = self._vectors.square().sum(1)
        #: Precision of the IVF k = 1 scan.
        self.scan_dtype = choose_scan_dtype(vectors.device, scan_dtype)
        self._cells = (
            CellIndex(self._vectors, ivf_cells(self.size), nprobe, seed, self.scan_dtype,
                      self.backend == "faiss-cpu" and vectors.device.type == "cpu")
            if kind == "ivf"
            else None
        )
        uses_faiss = kind == "hnsw" or (kind == "exact" and self.backend == "faiss-gpu")
        self._index = self._build_faiss(vectors) if uses_faiss else None

    def _build_faiss(self, vectors: Tensor) -> faiss.Index:
        """A faiss index of ``vectors``: HNSW (CPU), or flat (moved to their GPU for ``faiss-gpu``)."""
        faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
        data = _as_float32_numpy(vectors)
        if self.kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, HNSW_LINKS)
            hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            hnsw.hnsw.efSearch = HNSW_EF_SEARCH
            hnsw.add(data)
            return hnsw  # faiss has no GPU HNSW
        index: faiss.Index = faiss.IndexFlatL2(self.dim)
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
        if self._cells is not None and k == 1:
            squared = self._cells.nearest_distances(queries).to(queries.device)[:, None]
        elif self._cells is not None:
            squared = self._cells.search(queries, k)[0].to(queries.device)
        elif self._index is None:
            squared = self._torch_search(queries, k)
        else:
            faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
            squared_np, _ = self._index.search(_as_float32_numpy(queries), k)
            squared = torch.from_numpy(squared_np).to(queries.device)
        if self.recall_at_1 is None and self.recall_sample > 0:
            self.measure_recall(queries)
        return squared.clamp_min(0).sqrt()

    def _approximate_ids(self, queries: Tensor) -> Tensor:
        """Position (CPU) of each query's nearest vector as this index finds it."""
        if self._cells is not None:
            return self._cells.search(queries, 1)[1][:, 0].cpu()
        if self._index is None:
            return self._torch_search(queries.to(self._vectors.device), 1, ids=True)[:, 0].cpu()
        return torch.from_numpy(self._index.search(_as_float32_numpy(queries), 1)[1][:, 0])

    def measure_recall(self, queries: Tensor, sample: int | None = None) -> float:
        """Recall@1 of this index against exact search on up to ``sample`` of ``queries`` (logged and kept)."""
        sample = self.recall_sample if sample is None else int(sample)
        if self.kind == "exact":
            self.recall_at_1 = 1.0
            return 1.0
        chosen = queries[torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))[: max(1, sample)]]
        exact_ids = self._torch_search(chosen.to(self._vectors.device), 1, ids=True)[:, 0].cpu()
        self.recall_at_1 = float((self._approximate_ids(chosen) == exact_ids).float().mean())
        log.info(
            "nearest-neighbour search (%s, %d vectors): recall@1 %.3f against exact search on %d queries",
            self.kind, self.size, self.recall_at_1, len(chosen),
        )
        return self.recall_at_1

    def _torch_search(self, queries: Tensor, k: int, ids: bool = False) -> Tensor:
        """Squared distances (or with ``ids``, positions) of the ``k`` nearest vectors, by chunks of queries."""
        vectors, vector_norms = self._vectors.to(queries.device), self._vector_norms.to(queries.device)
        chunk = max(1, TORCH_CHUNK_ELEMENTS // self.size)
        results = []
        for part in queries.float().split(chunk):
            squared = torch.addmm(vector_norms, part, vectors.T, alpha=-2).add_(part.square().sum(1, keepdim=True))
            nearest = squared.topk(k, dim=1, largest=False)
            results.append(nearest.indices if ids else nearest.values)
        return torch.cat(results)
