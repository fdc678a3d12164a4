"""The inverted-file search (CellIndex) and its k-means cells."""

import pytest
import torch

import hiad_pl.detectors.nn_search as nn_search
from hiad_pl.detectors.nn_search import CellIndex, NearestNeighbourIndex, choose_scan_dtype, ivf_cells, kmeans


def blobs(seed: int, centres: int = 32, per: int = 60, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    middle = torch.randn(centres, dim, generator=generator) * 6
    return middle, middle.repeat_interleave(per, 0) + torch.randn(centres * per, dim, generator=generator)


def test_kmeans_finds_separated_clusters() -> None:
    middle, points = blobs(0)
    centres = kmeans(points, 32, seed=1)
    assert centres.shape == (32, 16)
    distance = torch.cdist(middle, centres).min(dim=1).values
    assert float((distance < 1.0).float().mean()) >= 0.9  # almost every true centre has a k-means centre on it


def test_kmeans_restarts_emptied_clusters() -> None:
    points = torch.cat([torch.zeros(50, 4), torch.ones(50, 4)])  # two distinct points, asked for four clusters
    centres = kmeans(points, 4, seed=0)
    assert torch.isfinite(centres).all()
    assert {tuple(c.tolist()) for c in centres} >= {(0.0,) * 4, (1.0,) * 4}


@pytest.mark.parametrize("k", [1, 3])
def test_cell_index_scanning_every_cell_is_exact(k: int) -> None:
    _, vectors = blobs(2)
    queries = torch.randn(200, 16, generator=torch.Generator().manual_seed(3)) * 6
    index = CellIndex(vectors, cells=24, nprobe=24)
    squared, found = index.search(queries, k)
    exact = torch.cdist(queries, vectors).topk(k, largest=False)
    assert torch.allclose(squared.sqrt(), exact.values, atol=1e-4)
    assert torch.equal(found, exact.indices)


@pytest.mark.parametrize("k", [1, 3])
def test_cell_index_distances_are_exact_for_the_neighbours_it_finds(k: int) -> None:
    _, vectors = blobs(4)
    queries = vectors[::7] + 0.3 * torch.randn(len(vectors[::7]), 16, generator=torch.Generator().manual_seed(5))
    index = CellIndex(vectors, cells=ivf_cells(len(vectors)), nprobe=2)
    squared, found = index.search(queries, k)
    assert (squared[:, 1:] >= squared[:, :-1]).all()  # ascending
    assert torch.allclose(squared, (queries[:, None] - vectors[found]).square().sum(-1), atol=1e-4)
    exact = torch.cdist(queries, vectors).topk(k, largest=False).values
    assert (squared.sqrt() >= exact - 1e-3).all()  # never closer than the true neighbours
    assert float((found[:, 0] == torch.cdist(queries, vectors).argmin(1)).float().mean()) >= 0.9


def test_ivf_needs_no_faiss_and_measures_its_recall() -> None:
    _, vectors = blobs(6)
    queries = vectors[::5] + 0.3 * torch.randn(len(vectors[::5]), 16, generator=torch.Generator().manual_seed(7))
    index = NearestNeighbourIndex(vectors, backend="torch", kind="ivf", nprobe=4)
    assert index.kind == "ivf" and index.recall_at_1 is None
    distances = index.search(queries, 2)
    assert distances.shape == (len(queries), 2)
    assert index.recall_at_1 is not None and index.recall_at_1 >= 0.9
    assert ivf_cells(196_608) == 443 and ivf_cells(100) == 2 and ivf_cells(10) == 1


@pytest.mark.parametrize("nprobe", [2, 24])
def test_nearest_distances_are_the_searched_neighbours_distances(nprobe: int) -> None:
    _, vectors = blobs(8)
    queries = vectors[::3] + 0.5 * torch.randn(len(vectors[::3]), 16, generator=torch.Generator().manual_seed(9))
    index = CellIndex(vectors, cells=24, nprobe=nprobe)
    nearest = index.nearest_distances(queries)
    squared, _ = index.search(queries, 1)
    assert nearest.shape == (len(queries),)
    assert torch.allclose(nearest, squared[:, 0], atol=1e-5 * float(queries.square().sum(1).max()))
    if nprobe == 24:  # every cell scanned: the true nearest distances
        assert torch.allclose(nearest.sqrt(), torch.cdist(queries, vectors).min(1).values, atol=1e-3)


def _pairs_by_query_and_cell(index: CellIndex, queries: torch.Tensor) -> dict[tuple[int, int], float]:
    """``(query, probed cell) -> ||q - c||^2`` of every pair ``index`` scans."""
    _, query_of_pair, per_cell, to_centre = index._pairs(queries)
    cells = [cell for cell, count in enumerate(per_cell) for _ in range(count)]
    return dict(zip(zip(query_of_pair.tolist(), cells), to_centre.tolist()))


@pytest.mark.skipif(nn_search.faiss is None, reason="faiss not installed")
@pytest.mark.parametrize("scan_dtype", [torch.float32, torch.bfloat16])
def test_faiss_probe_finds_the_cells_torch_finds(scan_dtype: torch.dtype) -> None:
    _, vectors = blobs(12)
    queries = vectors[::3] + 0.5 * torch.randn(len(vectors[::3]), 16, generator=torch.Generator().manual_seed(11))
    with_faiss = CellIndex(vectors, cells=24, nprobe=5, scan_dtype=scan_dtype, faiss_probe=True)
    with_torch = CellIndex(vectors, cells=24, nprobe=5, scan_dtype=scan_dtype, faiss_probe=False)
    assert with_faiss._probe_index is not None and with_torch._probe_index is None
    assert torch.equal(with_faiss.centres, with_torch.centres)
    mine, theirs = _pairs_by_query_and_cell(with_faiss, queries), _pairs_by_query_and_cell(with_torch, queries)
    assert len(mine) == len(queries) * 5 and mine.keys() == theirs.keys()  # the same (query, cell) pairs
    tolerance = 1e-5 * float(queries.square().sum(1).max())  # float32 rounding of ||q||^2
    assert max(abs(mine[pair] - theirs[pair]) for pair in mine) <= tolerance
    true = torch.cdist(queries, with_faiss.centres).square()
    assert max(abs(mine[query, cell] - float(true[query, cell])) for query, cell in mine) <= tolerance
    torch.testing.assert_close(with_faiss.nearest_distances(queries), with_torch.nearest_distances(queries),
                               rtol=0, atol=tolerance)


def test_faiss_probe_default_and_its_absence(monkeypatch: pytest.MonkeyPatch) -> None:
    _, vectors = blobs(13)
    assert (CellIndex(vectors, cells=8)._probe_index is not None) == (nn_search.faiss is not None)
    assert NearestNeighbourIndex(vectors, backend="torch", kind="ivf")._cells._probe_index is None
    monkeypatch.setattr(nn_search, "faiss", None)
    assert CellIndex(vectors, cells=8)._probe_index is None
    with pytest.raises(ValueError, match="faiss_probe needs faiss"):
        CellIndex(vectors, cells=8, faiss_probe=True)


def test_ivf_k1_search_takes_the_distances_only_path() -> None:
    _, vectors = blobs(10)
    queries = vectors[::4] + 0.2
    index = NearestNeighbourIndex(vectors, backend="torch", kind="ivf", nprobe=3, scan_dtype="float32")
    calls = []
    original = index._cells.nearest_distances
    index._cells.nearest_distances = lambda q: calls.append(len(q)) or original(q)
    distances = index.search(queries, 1)
    assert calls == [len(queries)] and distances.shape == (len(queries), 1)
    # float32 rounding of ||q||^2 (about 600 here), as in exact search by matrix products
    tolerance = 1e-5 * float(queries.square().sum(1).max())
    assert torch.allclose(distances[:, 0] ** 2, index._cells.search(queries, 1)[0][:, 0], atol=tolerance)


@pytest.mark.parametrize("nprobe", [3, 24])
def test_bfloat16_scan_finds_the_float32_distances_to_within_its_rounding(nprobe: int) -> None:
    # Far from the origin (values around 40, clusters of spread 0.25, queries 0.2 off per value):
    # squared norms ~ 38,000 against squared distances of a few units, so a bfloat16 product of the
    # raw vectors (8-bit mantissa) would be off by far more than the distances themselves; the scan
    # must work relative to the cells' centres.
    _, vectors = blobs(11, centres=40, per=50, dim=24)
    vectors = vectors * 0.25 + 40
    queries = vectors[::3] + 0.2 * torch.randn(len(vectors[::3]), 24, generator=torch.Generator().manual_seed(12))
    index32 = CellIndex(vectors, cells=40, nprobe=nprobe)
    index16 = CellIndex(vectors, cells=40, nprobe=nprobe, scan_dtype=torch.bfloat16)
    assert len(index16.blocks) == 40 and all(len(b) % nn_search.BF16_CELL_BLOCK == 0 for b in index16.blocks)
    float32 = index32.nearest_distances(queries).sqrt()
    bfloat16 = index16.nearest_distances(queries).sqrt()
    relative = (bfloat16 - float32).abs() / float32
    assert float(relative.mean()) < 0.01 and float(relative.max()) < 0.05
    if nprobe == 24:  # (almost) every cell: close to the true nearest distances
        exact = torch.cdist(queries, vectors).min(1).values
        assert float(((bfloat16 - exact).abs() / exact).mean()) < 0.01


def test_bfloat16_scan_pads_to_blocks_and_ignores_the_padding() -> None:
    # Three rings of 16 vectors at distance 1 around their centres, queried at the centres: a padding
    # row that could win would give distance 0 (the centre itself); 5 queries a cell, padded to 64.
    dim = 8
    offsets = torch.cat([torch.eye(dim), -torch.eye(dim)])
    centres = torch.tensor([0.0, 10.0, 20.0])[:, None].expand(3, dim)
    vectors = (centres[:, None] + offsets[None]).reshape(-1, dim)
    index = CellIndex(vectors, cells=3, nprobe=1, scan_dtype=torch.bfloat16)
    assert [len(b) for b in index.blocks] == [32, 32, 32]
    for size in (1, 63, 65, 700, 1025, 5000):  # multiples of the smallest block, at most 1/8 padding above 8 blocks
        padded = nn_search.padded_size(size, 64)
        assert padded >= size and padded % 64 == 0 and (size < 512 or padded <= size * 9 / 8)
    queries = centres.repeat_interleave(5, 0)
    nearest = index.nearest_distances(queries).sqrt()
    assert torch.allclose(nearest, torch.ones(15), rtol=0.02)


def test_scan_dtype_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nn_search, "cpu_has_native_bfloat16", lambda: True)
    assert choose_scan_dtype(torch.device("cpu")) == torch.bfloat16
    assert choose_scan_dtype(torch.device("cuda")) == torch.float32  # GPUs keep float32
    assert choose_scan_dtype(torch.device("cpu"), "float32") == torch.float32
    monkeypatch.setattr(nn_search, "cpu_has_native_bfloat16", lambda: False)
    assert choose_scan_dtype(torch.device("cpu")) == torch.float32
    assert choose_scan_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="scan dtype"):
        choose_scan_dtype(torch.device("cpu"), "float16")
    _, vectors = blobs(13)
    index = NearestNeighbourIndex(vectors, kind="ivf", scan_dtype="bfloat16")
    assert index._cells.scan_dtype == torch.bfloat16 and index._cells.blocks
    assert not NearestNeighbourIndex(vectors, kind="ivf", scan_dtype="float32")._cells.blocks
