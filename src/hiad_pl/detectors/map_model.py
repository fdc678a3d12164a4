"""A method's scoring as a plain ``nn.Module``, held by the LightningModule that fits it.

A detector (a LightningModule, :class:`~hiad_pl.detectors.base.HRDetector`)
computes the patches' fused backbone maps and says how the method learns; the
method itself (a memory bank, Gaussian statistics, flows, a decoder) lives in a
:class:`PatchMapModel` that the detector owns as ``model`` and to which it
delegates its anomaly map. Such a model needs neither Lightning nor the
backbone: construct it, load its state dict, call it on per-layer maps. The
ONNX export traces it (:mod:`hiad_pl.deploy.export`).

A method whose scoring also reads the patch pixels (DeSTSeg's student) does not
fit this contract: its plain model is an ordinary ``nn.Module`` taking the
patches as well, and the export traces the detector's ``anomaly_map``.

Checkpoints written before a method moved into its model keep their keys at
the detector's top level (``memory_bank``) or under the submodule that held
them (``destseg.``, ``realnet.``); :class:`MoveKeysUnder` renames them on load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class PatchMapModel(nn.Module, ABC):
    """A method's inference: per-layer backbone maps of a batch of patches to their anomaly maps ``[B, H, W]``.

    Everything scoring needs is a parameter or a buffer, so a state dict
    restores a constructed model. Buffers whose size is only known once fitted
    are named in :attr:`resizable_buffers`: loading a state dict resizes them.
    """

    #: Buffers whose size is only known after fitting; loading a state dict resizes them.
    resizable_buffers: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def forward(self, features: Sequence[Tensor], output_size: Sequence[int]) -> Tensor:
        """Anomaly maps ``[B, H, W]`` (higher is more anomalous) of the maps ``[B, C_l, h_l, w_l]`` of each layer.

        Args:
            features: the (fused) backbone maps of the patches, one per layer, shallow to deep.
            output_size: ``(H, W)`` of the patches, the size of the returned maps.
        """

    @contextmanager
    def traceable(self) -> Iterator[None]:
        """Within the block, score with operations a traced graph (ONNX) can hold; the same ones by default.

        A model whose scoring uses something a tracer cannot follow (a search
        index, a pooling ONNX lacks) overrides this to switch to an equivalent
        computation for the block's duration.
        """
        yield

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in self.resizable_buffers:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is not None and incoming.shape != current.shape:
                setattr(self, name, torch.empty(incoming.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class MoveKeysUnder:
    """A load-state-dict pre-hook that moves entries of older checkpoints under the submodule now holding them.

    ``MoveKeysUnder(("memory_bank",), "model")`` reads ``memory_bank`` as
    ``model.memory_bank`` (and ``flows.0.norm.weight`` as ``model.flows.0.norm.weight``
    for ``("flows",)``); with ``old_owner="destseg"``, ``destseg.student.*`` is read as
    ``model.student.*`` (a method whose parts sat in a differently named submodule).
    Keys already in the new layout are left alone. Register it with
    ``module.register_load_state_dict_pre_hook``.

    Args:
        names: the entries' old names (a buffer, or a submodule's prefix) under ``old_owner``.
        owner: the submodule that now holds them.
        old_owner: the submodule that held them before; empty for the top level.
    """

    def __init__(self, names: Sequence[str], owner: str = "model", old_owner: str = "") -> None:
        self.names = tuple(names)
        self.owner = owner
        self.old_owner = old_owner

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Rename the old keys of ``state_dict`` in place."""
        base = f"{prefix}{self.old_owner}." if self.old_owner else prefix
        old = tuple(base + name for name in self.names)
        for key in [k for k in state_dict if k in old or k.startswith(tuple(f"{o}." for o in old))]:
            new = f"{prefix}{self.owner}.{key[len(base):]}"
            if new not in state_dict:
                state_dict[new] = state_dict.pop(key)
