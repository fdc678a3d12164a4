"""The GPU twins of the evaluators: the same arguments and code, computed on ``device`` (default cuda:0).

Without CUDA a twin computes on the CPU and warns once per process.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from hiad_pl.metrics.evaluators import (
    CPU,
    TARGET,
    compute_imagewise_metrics,
    compute_pixelwise_metrics,
    compute_pixelwise_metrics_resize,
    compute_pro,
    compute_pro_resize,
)
from hiad_pl.metrics.inputs import Device, Evaluator


@functools.cache
def _warn_cuda_absent() -> None:
    """Warn, once per process, that the GPU evaluators fall back to the CPU."""
    warnings.warn(
        "CUDA is not available: the GPU evaluators compute on the CPU", RuntimeWarning, stacklevel=4
    )


def _gpu(device: Device) -> torch.device:
    """``device`` (default cuda:0), or the CPU with a warning when CUDA is absent."""
    wanted = torch.device("cuda:0" if device is None else device)
    if wanted.type == "cuda" and not torch.cuda.is_available():
        _warn_cuda_absent()
        return CPU
    return wanted


def on_accelerator(evaluator: Evaluator, name: str, note: str = "") -> Evaluator:
    """The GPU twin of a CPU evaluator: the same arguments, computed on ``device``.

    ``device`` defaults to cuda:0; without CUDA the twin computes on the CPU
    and warns once.
    """
    signature = inspect.signature(evaluator)

    @functools.wraps(evaluator)
    def twin(*args: Any, **kwargs: Any) -> Mapping[str, float]:
        token = TARGET.set(_gpu(signature.bind(*args, **kwargs).arguments.get("device")))
        try:
            return evaluator(*args, **kwargs)
        finally:
            TARGET.reset(token)

    twin.__name__ = twin.__qualname__ = name
    twin.__doc__ = f":func:`{evaluator.__name__}` on ``device`` (default cuda:0, else the CPU){note}."
    return twin


compute_imagewise_metrics_gpu = on_accelerator(compute_imagewise_metrics, "compute_imagewise_metrics_gpu")
compute_pixelwise_metrics_gpu = on_accelerator(compute_pixelwise_metrics, "compute_pixelwise_metrics_gpu")
compute_pixelwise_metrics_gpu_resize = on_accelerator(
    compute_pixelwise_metrics_resize, "compute_pixelwise_metrics_gpu_resize"
)
compute_pro_gpu = on_accelerator(compute_pro, "compute_pro_gpu", "; regions are labelled on the CPU")
compute_pro_gpu_resize = on_accelerator(compute_pro_resize, "compute_pro_gpu_resize")

