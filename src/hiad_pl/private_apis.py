"""The one place hiad-pl reaches into dependencies' private attributes, each behind a check.

Every function here names what it uses and what happens when a release no longer
has it: the caller gets ``None`` (or ``False``) and takes its ordinary path, so a
newer dependency costs speed or a nicer message, never a wrong result.
``tests/test_private_apis.py`` fails if a private attribute of torch, timm or
jsonargparse is used anywhere else in the package.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def tensor_version(tensor: Tensor) -> int | None:
    """torch's in-place modification counter of ``tensor`` (``Tensor._version``), or ``None`` without it."""
    return getattr(tensor, "_version", None)


def fused_convolution_available() -> bool:
    """Whether oneDNN's convolution with a fused activation (``torch.ops.mkldnn._convolution_pointwise``) exists."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def convolution_pointwise(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int], stride: list[int], dilation: list[int],
    groups: int, operation: str, scalars: list[float],
) -> Tensor:
    """oneDNN's convolution followed by ``operation`` in one call (check :func:`fused_convolution_available` first)."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, padding, stride, dilation, groups, operation, scalars, ""
    )


def parser_destinations(parser: Any) -> list[str]:
    """Every option key of a jsonargparse parser and of its subcommands' parsers (argparse's ``_actions``)."""
    keys = [action.dest for action in getattr(parser, "_actions", [])]
    subcommands = getattr(parser, "_subcommands_action", None)
    for sub in getattr(subcommands, "_name_parser_map", {}).values():
        keys.extend(parser_destinations(sub))
    return keys
