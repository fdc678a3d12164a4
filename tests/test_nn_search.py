"""The inverted-file search (CellIndex) and its k-means cells."""

import pytest
import torch

from hiad_pl.detectors.nn_search import CellIndex, NearestNeighbourIndex, ivf_cells, kmeans


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


def test_ivf_k1_search_takes_the_distances_only_path() -> None:
    _, vectors = blobs(10)
    queries = vectors[::4] + 0.2
    index = NearestNeighbourIndex(vectors, backend="torch", kind="ivf", nprobe=3)
    calls = []
    original = index._cells.nearest_distances
    index._cells.nearest_distances = lambda q: calls.append(len(q)) or original(q)
    distances = index.search(queries, 1)
    assert calls == [len(queries)] and distances.shape == (len(queries), 1)
    # float32 rounding of ||q||^2 (about 600 here), as in exact search by matrix products
    tolerance = 1e-5 * float(queries.square().sum(1).max())
    assert torch.allclose(distances[:, 0] ** 2, index._cells.search(queries, 1)[0][:, 0], atol=tolerance)
