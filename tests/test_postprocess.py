"""Post-processing: the separable blur against a plain 2-D convolution, the image score against an integral image."""

import pytest
import torch
import torch.nn.functional as F

from hiad_pl.postprocess import gaussian_blur, image_score


def reference_blur(anomaly_map: torch.Tensor, sigma: float) -> torch.Tensor:
    """The blur as one 2-D convolution with the outer product of the truncated kernels, reflect padding."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    height, width = anomaly_map.shape[-2:]
    pad_h, pad_w = min(radius, height - 1), min(radius, width - 1)
    rows, columns = kernel[radius - pad_h : radius + pad_h + 1], kernel[radius - pad_w : radius + pad_w + 1]
    maps = anomaly_map.double().reshape(-1, 1, height, width)
    maps = F.pad(maps, (pad_w, pad_w, pad_h, pad_h), mode="reflect" if pad_h and pad_w else "replicate")
    out = F.conv2d(maps, torch.outer(rows, columns)[None, None])
    return out.reshape(anomaly_map.shape).float()


@pytest.mark.parametrize("shape", [(64, 48), (3, 40, 7), (2, 300, 200), (9, 9)])
@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_blur_equals_a_two_dimensional_convolution(shape: tuple[int, ...], sigma: float) -> None:
    anomaly_map = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(anomaly_map, sigma)
    assert blurred.shape == anomaly_map.shape and blurred.dtype == torch.float32
    assert torch.allclose(blurred, reference_blur(anomaly_map, sigma), atol=1e-6)


def test_gaussian_blur_keeps_a_flat_map_and_spreads_a_point() -> None:
    flat = torch.full((50, 60), 0.25)
    assert torch.allclose(gaussian_blur(flat), flat, atol=1e-6)
    point = torch.zeros(65, 65)
    point[32, 32] = 1.0
    blurred = gaussian_blur(point, 4.0)
    assert abs(float(blurred.sum()) - 1.0) < 1e-5  # the mass stays (far from the borders)
    assert int(blurred.argmax()) == 32 * 65 + 32 and torch.allclose(blurred, blurred.T, atol=1e-7)
    assert gaussian_blur(point, 0.0) is point


def integral_image_score(anomaly_map: torch.Tensor, window: int = 16) -> torch.Tensor:
    """The reference image score: window means from a float64 integral image."""
    maps = anomaly_map.double().reshape(-1, *anomaly_map.shape[-2:])
    k_h, k_w = min(window, maps.shape[-2]), min(window, maps.shape[-1])
    integral = F.pad(maps.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    sums = integral[:, k_h:, k_w:] - integral[:, :-k_h, k_w:] - integral[:, k_h:, :-k_w] + integral[:, :-k_h, :-k_w]
    return (sums / (k_h * k_w)).amax(dim=(-2, -1)).reshape(anomaly_map.shape[:-2])


@pytest.mark.parametrize("shape", [(300, 200), (3, 100, 37), (5, 7), (1, 1), (2, 20, 3), (16, 16)])
@pytest.mark.parametrize("offset", [0.0, 40.0])
def test_image_score_is_the_largest_window_mean(shape: tuple[int, ...], offset: float) -> None:
    torch.manual_seed(0)
    maps = gaussian_blur(torch.rand(shape)) + offset
    hot = maps.clone()
    hot[..., : min(16, shape[-2]), : min(16, shape[-1])] += 5.0  # one window stands out: it must be found
    for values in (maps, hot):
        expected = integral_image_score(values)
        torch.testing.assert_close(image_score(values).double(), expected, rtol=1e-6, atol=1e-6)
    assert image_score(hot).shape == shape[:-2]
