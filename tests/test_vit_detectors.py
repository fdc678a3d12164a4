"""HRVitAD, HRDinomaly, HRINPFormer as detectors: any patch shape, checkpoints, resume, learning on the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pytest
import torch
import yaml

from conftest import batch_of, fit_and_score, loader, tensorboard_scalars, texture_split
from hiad_pl.detectors import DETECTORS, HRDinomaly, HRINPFormer, HRVitAD
from hiad_pl.detectors.vit_parts import StableAdamW

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: The offline encoder of the quickstarts.
PYRAMID = "lite0_token_pyramid"
#: A two-block random-init ViT, 32 channels wide: cheap enough to fit in tests.
TINY_ENCODER: dict[str, Any] = {
    "backbone_name": "vit_tiny_patch16_224",
    "weights": "none",
    "backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
    "layers_to_extract_from": ["blocks.0", "blocks.1"],
    "decoder_depth": 2,
}
TINY: dict[type, dict[str, Any]] = {
    HRVitAD: {**TINY_ENCODER, "decoder_taps": [2], "epochs": 2},
    HRDinomaly: {**TINY_ENCODER, "groups": [[0], [1]], "total_steps": 6, "warmup_steps": 2, "eval_every": 3},
    HRINPFormer: {**TINY_ENCODER, "groups": [[0], [1]], "num_prototypes": 2, "total_steps": 6, "warmup_steps": 2, "eval_every": 3},
}
DETECTOR_CLASSES = list(TINY)


def test_registered_under_their_short_names() -> None:
    assert (DETECTORS["vitad"], DETECTORS["dinomaly"], DETECTORS["inpformer"]) == (HRVitAD, HRDinomaly, HRINPFormer)


@pytest.mark.parametrize("detector_class", DETECTOR_CLASSES, ids=lambda c: c.__name__)
def test_non_square_non_multiple_patches_train_and_round_trip_checkpoints(detector_class: type, tmp_path: Path) -> None:
    torch.manual_seed(0)
    detector = detector_class(input_size=(72, 40), **TINY[detector_class])  # neither side a multiple of 16
    assert detector.token_grid_size() == (2, 4)  # 40 x 72 px -> rounded to 32 x 64 px of tokens
    trainer = lightning.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **{**detector.trainer_defaults(), "max_epochs": 1, "max_steps": 2},
    )
    trainer.fit(detector, loader(torch.randn(4, 3, 40, 72, generator=torch.Generator().manual_seed(1)), batch_size=2))
    assert trainer.global_step == 2
    assert all(not p.requires_grad for p in detector.backbone.parameters())
    batch = batch_of(torch.randn(2, 3, 40, 72))
    maps = detector.eval().predict_step(batch, 0)  # eval: no bottleneck dropout
    assert maps.shape == (2, 40, 72) and bool(torch.isfinite(maps).all()) and float(maps.min()) >= -1e-6
    path = tmp_path / "task_0.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and not any(key.startswith("backbone.") for key in state)  # the frozen encoder is rebuilt
    restored = detector_class.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(restored.eval().predict_step(batch, 0), maps)


def test_step_trained_detectors_schedule_by_step_and_clip_by_default() -> None:
    detector = HRDinomaly(input_size=32, **TINY[HRDinomaly])
    defaults = detector.trainer_defaults()
    assert defaults["max_steps"] == 6 and defaults["val_check_interval"] == 3 and defaults["check_val_every_n_epoch"] is None
    assert defaults["gradient_clip_val"] == pytest.approx(0.1)
    optimizers = detector.configure_optimizers()
    assert isinstance(optimizers["optimizer"], StableAdamW) and optimizers["lr_scheduler"]["interval"] == "step"
    vitad = HRVitAD(input_size=32, **TINY[HRVitAD])
    schedule = vitad.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(schedule, torch.optim.lr_scheduler.StepLR) and schedule.step_size == 1 and schedule.gamma == 0.1
    with pytest.raises(ValueError, match="vision transformer"):
        HRDinomaly(backbone_name="resnet18", layers_to_extract_from=["layer1"], weights="none", feature_kind="cnn")
    with pytest.raises(ValueError, match="num_neck_layers"):
        HRVitAD(input_size=32, **{**TINY[HRVitAD], "decoder_taps": [1, 2]})


@pytest.mark.parametrize("detector_class", DETECTOR_CLASSES, ids=lambda c: c.__name__)
def test_interrupted_fit_resumes_with_its_optimiser_and_scheduler_state(
    detector_class: type, small_demo: Path, tmp_path: Path
) -> None:
    from hiad_pl.orchestrator import TaskOrchestrator

    split, tasks = texture_split(small_demo)

    def fit(epochs: int) -> TaskOrchestrator:
        # 2 images = 8 patches = 1 batch (one optimiser step) per epoch
        kwargs = {"max_epochs": epochs}
        orchestrator = TaskOrchestrator(detector_class, TINY[detector_class], tasks, tmp_path, batch_size=8, trainer_kwargs=kwargs)
        orchestrator.fit(split.train[:2], [])
        return orchestrator

    final = fit(2).checkpoint_path(tasks[0])
    final.unlink()  # as if the run had stopped before the task finished: only the epoch checkpoint is left
    last = tmp_path / "checkpoints" / "task_0" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2
    # Marks that only a restored optimiser and scheduler can carry forward.
    checkpoint["lr_schedulers"][0]["base_lrs"] = [0.0123]
    moments = checkpoint["optimizer_states"][0]["state"][0]
    moments["exp_avg_sq"] = torch.full_like(moments["exp_avg_sq"], 7.0)
    torch.save(checkpoint, last)
    fit(3)
    resumed = torch.load(final, weights_only=True)
    assert resumed["global_step"] == 3  # one more step
    assert resumed["lr_schedulers"][0]["base_lrs"] == [0.0123]
    state = resumed["optimizer_states"][0]["state"][0]
    assert float(state["step"]) == 3
    second_moment = state["max_exp_avg_sq"] if "max_exp_avg_sq" in state else state["exp_avg_sq"]
    assert float(second_moment.min()) > 6.0  # 7 decayed by one step of beta2 = 0.999, not rebuilt from 0


def quickstart_config(name: str) -> tuple[type, dict[str, Any], dict[str, Any]]:
    """The detector class, init_args and data section of ``configs/<name>_quickstart.yaml``."""
    config = yaml.safe_load((CONFIGS / f"{name}_quickstart.yaml").read_text())
    detector_class = DETECTORS[name]
    assert config["detector"]["class_path"].endswith(detector_class.__name__)
    return detector_class, config["detector"]["init_args"], config["data"]


QUICKSTARTS = ["vitad", "dinomaly", "inpformer"]


@pytest.mark.parametrize("name", QUICKSTARTS)
def test_quickstarts_rebuild_16_px_tokens_of_the_offline_token_pyramid(name: str) -> None:
    detector_class, init_args, data = quickstart_config(name)
    # nothing to download: pretrained EfficientNet-Lite0 blocks as tokens, their weights ship offline
    assert (init_args["backbone_name"], init_args["weights"]) == (PYRAMID, "offline")
    assert "TOKEN PYRAMID" in (CONFIGS / f"{name}_quickstart.yaml").read_text()
    assert (data["image_size"], data["patch_size"]) == (1024, 256)
    detector = detector_class(input_size=data["patch_size"], **init_args)
    assert detector.token_grid_size() == (16, 16)  # 256-px patches, one token per 16 x 16 px
    assert all(not p.requires_grad for p in detector.backbone.parameters())
    maps = detector.eval().predict_step(batch_of(torch.randn(1, 3, 256, 256)), 0)
    assert maps.shape == (1, 256, 256) and bool(torch.isfinite(maps).all())


@pytest.mark.slow  # minutes per detector; the fit test above runs the same training and scoring code
@pytest.mark.parametrize("name", QUICKSTARTS)
def test_quickstart_learns_on_the_demo_texture(name: str, demo_1024: Path, tmp_path: Path) -> None:
    detector_class, init_args, data = quickstart_config(name)
    assert (init_args["backbone_name"], init_args["weights"]) == (PYRAMID, "offline")
    image_auroc = fit_and_score(
        demo_1024, tmp_path, detector_class, init_args, batch_size=data["batch_size"], image_size=data["image_size"]
    )
    assert image_auroc >= 0.8
    losses = tensorboard_scalars(tmp_path / "logs", "train/loss")
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
