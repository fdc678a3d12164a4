"""Post-processing: the separable blur against a plain 2-D convolution."""

import pytest
import torch
import torch.nn.functional as F

from hiad_pl.postprocess import gaussian_blur


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
