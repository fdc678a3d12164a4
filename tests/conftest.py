"""Shared fixtures: a small demo data set generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader

from hiad_pl.data.batch import PatchBatch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SMALL_DEMO = {"image_size": 512, "num_train": 4, "num_test_good": 3, "num_test_defect": 4}
#: The demo texture at 1024 px with few images: 16 patches of 256 px per image, 32 to train on.
DEMO_1024_TWO_TRAIN = {"image_size": 1024, "num_train": 2, "num_test_good": 4, "num_test_defect": 4}


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Texture and object categories at 512 px (defects keep their pixel size)."""
    from hiad_pl.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, categories=["texture", "object"], seed=0, **SMALL_DEMO)
    return root


#: The quickstarts' demo texture: 1024-px images cut into 16 patches of 256 px.
DEMO_1024 = {"image_size": 1024, "num_train": 4, "num_test_good": 4, "num_test_defect": 4}


@pytest.fixture(scope="session")
def demo_1024(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The texture category at 1024 px, the quickstarts' image size, with few images."""
    from hiad_pl.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo_1024")
    make_demo_dataset(root, categories=["texture"], seed=0, **DEMO_1024)
    return root


@pytest.fixture(scope="session")
def demo_1024_two_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The texture category at 1024 px with two training images (:data:`DEMO_1024_TWO_TRAIN`).

    For the learning runs of DeSTSeg and RealNet.
    """
    from hiad_pl.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo1024_two_train")
    make_demo_dataset(root, categories=["texture"], seed=0, **DEMO_1024_TWO_TRAIN)
    return root


PATCHCORE_TEST_CONFIG = {
    "backbone_name": "efficientnet_lite0",
    "weights": "offline",
    "layers_to_extract_from": ["blocks.2", "blocks.4"],
    "merge_size": 3,
    "percentage": 0.1,
    "pretrain_embed_dimension": 128,
    "target_embed_dimension": 128,
}


def write_config(tmp_path: Path, root: Path, **overrides) -> Path:
    """A CLI config: PatchCore on the texture category, two neighbourhood tasks of 256-px patches; sections replaced by ``overrides``."""
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {"root": str(root), "categories": ["texture"], "image_size": 512, "patch_size": 256, "batch_size": 4},
        "detector": {"class_path": "hiad_pl.detectors.HRPatchCore", "init_args": dict(PATCHCORE_TEST_CONFIG)},
        "tasks": {"class_path": "hiad_pl.tasks.NeighborhoodTaskGenerator", "init_args": {"num_groups_width": 2, "num_groups_height": 1}},
        "evaluation": {"vis_size": 256},
    }
    for key, value in overrides.items():
        config[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def texture_split(root: Path, image_size: int = 512) -> Any:
    """The texture category of a demo and its A2O task over 256-px patches of the ``image_size`` images."""
    from hiad_pl.data.discovery import discover
    from hiad_pl.data.tiling import MultiResolutionHRImageSpliter
    from hiad_pl.tasks import A2OTaskGenerator

    (split,) = discover(root, categories=["texture"], image_size=image_size)
    tasks = A2OTaskGenerator().create_tasks(split.train, MultiResolutionHRImageSpliter(image_size=image_size, patch_size=256))
    return split, tasks


def patch_trainer(work: Path, tasks: list, detector_class: type, config: dict, batch_size: int) -> Any:
    """An HRTrainer on 256-px patches with its models, logs and visualisations under ``work``."""
    from hiad_pl.trainer import HRTrainer

    return HRTrainer(
        batch_size=batch_size,
        tasks=tasks,
        detector_class=detector_class,
        config={"patch": {**config, "patch_size": 256}},
        checkpoint_root=work / "models",
        log_root=work / "logs",
        vis_root=work / "vis",
    )


def fit_and_score(
    root: Path, work: Path, detector_class: type, config: dict, batch_size: int, image_size: int = 512
) -> float:
    """Fit ``detector_class`` with HRTrainer on a demo's texture (256-px patches); image AUROC on its test set."""
    split, tasks = texture_split(root, image_size)
    trainer = patch_trainer(work, tasks, detector_class, config, batch_size)
    trainer.train(train_samples=split.train, gpu_ids=[])
    scores, maps = trainer.inference(test_samples=split.test, return_results_only=True, gpu_ids=[])
    assert len(maps) == len(split.test) and maps[0].shape == (image_size, image_size)
    return auroc(np.asarray(scores), np.array([s.label for s in split.test]))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC by pair counting (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def batch_of(images: Tensor) -> PatchBatch:
    """A PatchBatch of plain images (no masks, unknown positions)."""
    size = images.shape[0]
    return PatchBatch(
        image=images,
        mask=torch.zeros(size, *images.shape[-2:]),
        label=torch.zeros(size, dtype=torch.long),
        index=torch.zeros(size, 4, dtype=torch.long),
    )


def loader(images: Tensor, batch_size: int = 4) -> DataLoader:
    """A loader of single-image PatchBatches collated into batches."""
    return DataLoader([batch_of(image[None]) for image in images], batch_size=batch_size, collate_fn=PatchBatch.collate)


def tensorboard_scalars(folder: Path, tag: str) -> list[float]:
    """Every value logged under ``tag`` in the TensorBoard runs below ``folder``, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: list[tuple[int, float]] = []
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return [v for _, v in sorted(values)]
