"""Tiling: the tutorial's printed indexes, edge cases, and split/stitch as exact inverses."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hiad_pl.data.tiling import (
    HRImageIndex,
    MultiResolutionIndex,
    coverage,
    low_resolution_window,
    split,
    stitch,
    tile_starts,
)
from hiad_pl.utils.split_and_gather import MultiResolutionHRImageSpliter

TUTORIAL_PLAIN_FIRST = '{"main_index": {"x": 0, "y": 0, "width": 512, "height": 512}, "low_resolution_indexes": null}'
# the tutorial's print-out, byte for byte
TUTORIAL_FUSED = [
    '{"main_index": {"x": 0, "y": 0, "width": 512, "height": 512}, "low_resolution_indexes": [{"x": 0, "y": 0, "width": 1024, "height": 1024}]}',  # noqa: E501
    '{"main_index": {"x": 512, "y": 0, "width": 512, "height": 512}, "low_resolution_indexes": [{"x": 0, "y": 0, "width": 1024, "height": 1024}]}',  # noqa: E501
    '{"main_index": {"x": 1024, "y": 0, "width": 512, "height": 512}, "low_resolution_indexes": [{"x": 1024, "y": 0, "width": 1024, "height": 1024}]}',  # noqa: E501
    '{"main_index": {"x": 1536, "y": 0, "width": 512, "height": 512}, "low_resolution_indexes": [{"x": 1024, "y": 0, "width": 1024, "height": 1024}]}',  # noqa: E501
    '{"main_index": {"x": 0, "y": 512, "width": 512, "height": 512}, "low_resolution_indexes": [{"x": 0, "y": 0, "width": 1024, "height": 1024}]}',  # noqa: E501
]


def test_tutorial_indexes_byte_for_byte():
    indexes = MultiResolutionHRImageSpliter(image_size=2048, patch_size=512)
    assert len(indexes) == 16
    assert str(indexes[0]) == TUTORIAL_PLAIN_FIRST
    assert [(i.main_index.x, i.main_index.y) for i in indexes[:5]] == [(0, 0), (512, 0), (1024, 0), (1536, 0), (0, 512)]
    fused = MultiResolutionHRImageSpliter(image_size=2048, patch_size=512, ds_factors=[0, 1])
    assert [str(i) for i in fused[:5]] == TUTORIAL_FUSED
    assert str(fused[-1]).endswith('"low_resolution_indexes": [{"x": 1024, "y": 1024, "width": 1024, "height": 1024}]}')


def test_int_and_tuple_arguments_are_equivalent_and_non_square_works():
    a = MultiResolutionHRImageSpliter(image_size=2048, patch_size=512)
    b = MultiResolutionHRImageSpliter(image_size=(2048, 2048), patch_size=(512, 512))
    assert [str(i) for i in a] == [str(i) for i in b]
    c = MultiResolutionHRImageSpliter(image_size=(2048, 1024), patch_size=(512, 256))
    assert len(c) == 16
    assert {i.main_index.width for i in c} == {512} and {i.main_index.height for i in c} == {256}
    assert max(i.main_index.y + i.main_index.height for i in c) == 1024


def test_uneven_sizes_shift_last_patch_back_inside():
    assert tile_starts(1000, 512, 512) == [0, 488]
    assert tile_starts(300, 512, 512) == [0]
    assert tile_starts(1024, 512, 384) == [0, 384, 512]
    indexes = MultiResolutionHRImageSpliter(image_size=(1000, 700), patch_size=512, stride=300)
    for index in indexes:
        m = index.main_index
        assert 0 <= m.x and m.x + m.width <= 1000 and 0 <= m.y and m.y + m.height <= 700


def test_index_json_round_trip():
    index = MultiResolutionHRImageSpliter(2048, 512, ds_factors=[0, 1, 2])[5]
    assert MultiResolutionIndex.from_str(str(index)) == index
    assert len(index.low_resolution_indexes) == 2
    assert HRImageIndex.from_str(str(index.main_index)) == index.main_index


def test_low_resolution_window_arithmetic_non_square_odd():
    main = HRImageIndex(x=300, y=120, width=100, height=60)
    low = HRImageIndex(x=200, y=60, width=200, height=120)
    # the low region resized to the patch size (100x60) halves both axes
    assert low_resolution_window(main, low, (100, 60)) == HRImageIndex(50, 30, 50, 30)
    # odd stride grid: every main index lies inside its low index and its window inside the crop
    for index in MultiResolutionHRImageSpliter((1500, 900), (300, 180), stride=(150, 90), ds_factors=[0, 1]):
        (lowi,) = index.low_resolution_indexes
        window = low_resolution_window(index.main_index, lowi, (300, 180))
        assert lowi.contains(index.main_index)
        assert 0 <= window.x and window.x + window.width <= 300
        assert 0 <= window.y and window.y + window.height <= 180


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="patch_size"):
        MultiResolutionHRImageSpliter(2048, 0)
    with pytest.raises(ValueError, match="image_size"):
        MultiResolutionHRImageSpliter((2048, 10, 3), 512)


def test_stitch_rejects_uncovered_image():
    with pytest.raises(ValueError, match="cover"):
        stitch(torch.zeros(1, 4, 4), [HRImageIndex(0, 0, 4, 4)], (8, 4))


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(8, 120),
    height=st.integers(8, 120),
    patch_w=st.integers(4, 64),
    patch_h=st.integers(4, 64),
    stride_frac=st.floats(0.25, 1.0),
    seed=st.integers(0, 2**16),
)
def test_split_then_stitch_is_identity(width, height, patch_w, patch_h, stride_frac, seed):
    patch_w, patch_h = min(patch_w, width), min(patch_h, height)
    stride = (max(1, int(patch_w * stride_frac)), max(1, int(patch_h * stride_frac)))
    indexes = [i.main_index for i in MultiResolutionHRImageSpliter((width, height), (patch_w, patch_h), stride)]
    image = torch.from_numpy(np.random.default_rng(seed).random((height, width)))
    patches = split(image, indexes)
    assert patches.shape == (len(indexes), patch_h, patch_w)
    restored = stitch(patches, indexes, (width, height))
    torch.testing.assert_close(restored, image, rtol=0, atol=1e-12)


def test_stitch_averages_overlaps():
    indexes = [HRImageIndex(0, 0, 4, 2), HRImageIndex(2, 0, 4, 2)]
    patches = torch.stack([torch.zeros(2, 4), torch.ones(2, 4)])
    out = stitch(patches, indexes, (6, 2))
    assert out[0].tolist() == [0, 0, 0.5, 0.5, 1, 1]


def test_stitch_rejects_a_patch_off_the_image():
    with pytest.raises(ValueError, match="runs off the 6 x 4 image"):
        stitch(torch.zeros(2, 4, 4), [HRImageIndex(0, 0, 4, 4), HRImageIndex(3, 0, 4, 4)], (6, 4))


def test_coverage_counts_on_the_grid_of_edges():
    indexes = [HRImageIndex(0, 0, 4, 2), HRImageIndex(2, 0, 4, 2), HRImageIndex(0, 2, 6, 1)]
    counts, rows, cols = coverage(indexes, (6, 3))
    assert counts.tolist() == [[1, 2, 1], [1, 1, 1]]
    assert rows.tolist() == [2, 1] and cols.tolist() == [2, 2, 2]
    counts, _, _ = coverage(indexes[:2], (6, 3))
    assert counts.min() == 0  # the bottom row is uncovered


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_stitch_equals_a_pixel_by_pixel_average(dtype):
    rng = np.random.default_rng(3)
    indexes = [HRImageIndex(x, y, 5, 4) for y in (0, 3, 6) for x in (0, 4, 7)]
    patches = torch.from_numpy(rng.integers(0, 100, (len(indexes), 4, 5))).to(dtype)
    total, count = np.zeros((10, 12)), np.zeros((10, 12))
    for patch, index in zip(patches.double().numpy(), indexes):
        total[index.slices] += patch
        count[index.slices] += 1
    out = stitch(patches, indexes, (12, 10))
    assert out.dtype == (dtype if dtype.is_floating_point else torch.float64)
    np.testing.assert_allclose(out.double().numpy(), total / count, rtol=1e-6)
