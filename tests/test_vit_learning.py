"""ViTAD, Dinomaly and INP-Former on the offline token pyramid learn: each beats its untrained control.

The data are the demo texture at its smallest size (256 px, one patch per image)
with defects of 0.1-2 % of the image: the control (the same detector, trainable
parts at their initialisation) is far from perfect there, so a trained model
that only matched it would fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from conftest import auroc, batch_of, loader
from hiad_pl.detectors import HRDinomaly, HRINPFormer, HRVitAD
from hiad_pl.detectors.backbones import IMAGENET_MEAN, IMAGENET_STD

SIZE = 256
STEPS = 20
#: The pyramid at a width the test can train in seconds.
ENCODER: dict[str, Any] = {"backbone_name": "lite0_token_pyramid", "weights": "offline", "backbone_kwargs": {"embed_dim": 64}}
TAPS = [f"blocks.{i}" for i in range(3, 11)]
SETTINGS: dict[type, dict[str, Any]] = {
    HRVitAD: {"layers_to_extract_from": ["blocks.4", "blocks.7", "blocks.10", "blocks.15"], "decoder_depth": 3,
              "decoder_taps": [1, 2, 3], "lr": 1e-3, "epochs": STEPS},
    HRDinomaly: {"layers_to_extract_from": TAPS, "total_steps": STEPS, "warmup_steps": 2,
                 "hard_mining_ramp_steps": STEPS // 2, "eval_every": STEPS},
    HRINPFormer: {"layers_to_extract_from": TAPS, "num_prototypes": 6, "total_steps": STEPS, "warmup_steps": 2,
                  "eval_every": STEPS},
}


def _images(paths: list[Path]) -> Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = [torch.tensor(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255 for p in paths]
    return (torch.stack(pixels) - mean) / std


@pytest.fixture(scope="module")
def subtle_texture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Training images, good and defective test images, and the defects' masks of the 256-px demo texture."""
    from hiad_pl.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo_256")
    make_demo_dataset(root, categories=["texture"], image_size=SIZE, num_train=8, num_test_good=6, num_test_defect=8, seed=0)
    texture = root / "texture"
    defects = sorted(p for d in (texture / "test").iterdir() if d.name != "good" for p in d.glob("*.png"))
    masks = [np.asarray(Image.open(texture / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")) > 0 for p in defects]
    assert all(0.0005 < m.mean() < 0.03 for m in masks)  # subtle: 0.05-3 % of the image
    return {
        "train": _images(sorted((texture / "train" / "good").glob("*.png"))),
        "good": _images(sorted((texture / "test" / "good").glob("*.png"))),
        "defect": _images(defects),
        "masks": masks,
    }


def scores(detector: Any, data: dict[str, Any]) -> tuple[float, float]:
    """Image AUROC (map maximum) over good and defective images, pixel AUROC over the defective ones."""
    detector.eval()
    good = detector.predict_step(batch_of(data["good"]), 0)
    defect = detector.predict_step(batch_of(data["defect"]), 0)
    image = auroc(np.array([float(m.max()) for m in (*good, *defect)]), np.array([0] * len(good) + [1] * len(defect)))
    pixel = auroc(defect.numpy().ravel(), np.concatenate([m.ravel() for m in data["masks"]]).astype(int))
    return image, pixel


@pytest.mark.parametrize("detector_class", list(SETTINGS), ids=lambda c: c.__name__)
def test_trained_on_the_pyramid_beats_its_untrained_control(detector_class: type, subtle_texture: dict[str, Any]) -> None:
    def build() -> Any:
        torch.manual_seed(0)  # the control is the trained model's own initialisation
        return detector_class(input_size=SIZE, **ENCODER, **SETTINGS[detector_class])

    control_image, control_pixel = scores(build(), subtle_texture)
    detector = build()
    trainer = lightning.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
        **{**detector.trainer_defaults(), "max_steps": STEPS, "max_epochs": STEPS},
    )
    trainer.fit(detector, loader(subtle_texture["train"], batch_size=4))
    assert trainer.global_step == STEPS
    image, pixel = scores(detector, subtle_texture)
    assert control_pixel < 0.9 and control_image < 0.95  # the control is not already good
    assert pixel > max(0.9, control_pixel + 0.1)
    assert image >= max(0.9, control_image)
