"""A detector written outside the package runs end to end, from Python and from a YAML config."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from hiad_pl.cli import main
from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.discovery import discover
from hiad_pl.detectors import OnePassDetector, get_detector
from hiad_pl.task import O2OTaskGenerator
from hiad_pl.trainer import HRTrainer
from hiad_pl.utils.split_and_gather import MultiResolutionHRImageSpliter


class MeanFeatureDistance(OnePassDetector):
    """Distance of each position's features to the mean training features at that position."""

    resizable_buffers = ("mean_features",)

    def __init__(
        self,
        backbone_name: str = "efficientnet_lite0",
        layers_to_extract_from: Sequence[str] = ("blocks.2",),
        weights: str = "hub",
        input_size: int | tuple[int, int] = 512,
        fusion_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(backbone_name, layers_to_extract_from, weights, input_size, fusion_weights)
        self.register_buffer("mean_features", torch.empty(0))
        self._sum: Tensor | None = None
        self._count = 0

    def accumulate(self, batch: PatchBatch) -> None:
        features = self.fused_embedding(batch)[0].sum(0)
        self._sum = features if self._sum is None else self._sum + features
        self._count += len(batch)

    def has_pending_fit(self) -> bool:
        return self._count > 0

    def finalize(self) -> None:
        self.mean_features = self._sum / self._count
        self._sum, self._count = None, 0

    def anomaly_map(self, batch: PatchBatch) -> Tensor:
        distance = (self.fused_embedding(batch)[0] - self.mean_features).norm(dim=1, keepdim=True)
        return F.interpolate(distance, size=batch.image.shape[-2:], mode="bilinear")[:, 0]


def test_custom_detector_through_hrtrainer(small_demo: Path, tmp_path: Path) -> None:
    (split,) = discover(small_demo, categories=["texture"], image_size=512)
    tasks = O2OTaskGenerator().create_tasks(split.train, MultiResolutionHRImageSpliter(image_size=512, patch_size=256))
    trainer = HRTrainer(
        batch_size=4,
        tasks=tasks,
        detector_class=MeanFeatureDistance,
        config={"patch": {"weights": "offline", "patch_size": 256}},
        checkpoint_root=tmp_path / "models",
        log_root=tmp_path / "logs",
        vis_root=tmp_path / "vis",
    )
    checkpoints = trainer.train(train_samples=split.train, gpu_ids=[])
    assert len(checkpoints) == 4 and all(path.is_file() for path in checkpoints)
    state = torch.load(checkpoints[0], weights_only=True)["state_dict"]
    # blocks.2: 40 channels at stride 8 of the 256-px patch widened by the default 16-px context margin
    assert state["mean_features"].shape == (40, 36, 36)

    scores, maps = trainer.inference(test_samples=split.test, return_results_only=True, gpu_ids=[])
    labels = np.array([s.label for s in split.test])
    assert scores.shape == (len(split.test),) and [m.shape for m in maps] == [(512, 512)] * len(split.test)
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


def test_custom_detector_from_yaml(small_demo: Path, tmp_path: Path) -> None:
    class_path = f"{__name__}.MeanFeatureDistance"
    assert get_detector(class_path) is MeanFeatureDistance
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {"root": str(small_demo), "categories": ["texture"], "image_size": 512, "patch_size": 256, "batch_size": 4},
        "detector": {"class_path": class_path, "init_args": {"weights": "offline", "layers_to_extract_from": ["blocks.2"]}},
        "tasks": {"class_path": "hiad_pl.tasks.NeighborhoodTaskGenerator", "init_args": {"num_groups_width": 1, "num_groups_height": 1}},
        "evaluation": {"vis_size": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    assert main(["test", "--config", str(path)]) == 0
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["metrics"]["texture"]["image_auroc"] >= 0.9
