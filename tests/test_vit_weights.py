"""DINO / DINOv2 / DINOv3 ViT weights from local files and the Hugging Face cache, without network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from conftest import loader
from hiad_pl.detectors import HRDinomaly
from hiad_pl.detectors.features import (
    FeatureSettings,
    ViTTokenExtractor,
    create_extractor,
)

SRC = Path(__file__).resolve().parents[1] / "src"
#: Two-block versions of the published small models (the layouts are the full models'; two blocks keep files small).
SMALL = {"depth": 2}
DINOV2 = "vit_small_patch14_dinov2"
DINOV3 = "vit_small_patch16_dinov3"
DINO = "vit_small_patch16_224"


def random_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A random-init timm model's state dict (distinct per seed, also in LayerNorms and layer scales)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **SMALL)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    return {key: value.contiguous() for key, value in model.state_dict().items()}


def loaded_state(name: str, weights: str) -> dict[str, torch.Tensor]:
    extractor = create_extractor(FeatureSettings.of(name, ["blocks.1"], weights, model_kwargs=SMALL))
    assert isinstance(extractor, ViTTokenExtractor)
    return extractor.model.state_dict()


def assert_same(loaded: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)


@pytest.mark.parametrize("name", [DINOV2, DINOV3, DINO])
def test_published_file_layouts_load_exactly(name: str, tmp_path: Path) -> None:
    saved = random_state(name, seed=1)
    # timm's model.safetensors as published on the hub, and the same tensors as pytorch_model.bin / a .pth.
    save_file(saved, str(tmp_path / "model.safetensors"))
    torch.save(saved, tmp_path / "pytorch_model.bin")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in saved.items()}}, tmp_path / "trained.pth")
    for file in ("model.safetensors", "pytorch_model.bin", "trained.pth"):
        assert_same(loaded_state(name, str(tmp_path / file)), saved)
    # A folder holding the file (a downloaded snapshot) names it too.
    assert_same(loaded_state(name, str(tmp_path)), saved)


def test_meta_original_checkpoints_are_converted(tmp_path: Path) -> None:
    # Meta's DINOv2 release: timm's keys plus the pretraining mask token.
    dinov2 = random_state(DINOV2, seed=2)
    torch.save({**dinov2, "mask_token": torch.zeros(1, 384)}, tmp_path / "dinov2_vits14_pretrain.pth")
    assert_same(loaded_state(DINOV2, str(tmp_path / "dinov2_vits14_pretrain.pth")), dinov2)
    # Meta's DINOv3 release: storage tokens, ls1/ls2 layer scales, a (zero) qkv bias and rope periods.
    dinov3 = random_state(DINOV3, seed=3)
    meta = {"mask_token": torch.zeros(1, 384), "rope_embed.periods": torch.ones(16)}
    for key, value in dinov3.items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        meta[key] = value
        if key.endswith("attn.qkv.weight"):
            meta[key.replace("weight", "bias")] = torch.zeros(3 * 384)
            meta[key.replace("weight", "bias_mask")] = torch.ones(3 * 384)
    torch.save(meta, tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth")
    assert_same(loaded_state(DINOV3, str(tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth")), dinov3)


def cached_repository(cache: Path, repository: str, state: dict[str, torch.Tensor]) -> Path:
    """``state`` placed as the Hugging Face cache holds a download of ``repository``."""
    folder = cache / ("models--" + repository.replace("/", "--"))
    snapshot = folder / "snapshots" / "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(snapshot.name)
    return folder


def test_cache_layout_with_hub_offline_and_as_a_path(tmp_path: Path) -> None:
    dinov2, dinov3 = random_state(DINOV2, seed=4), random_state(DINOV3, seed=5)
    home = tmp_path / "hf_home"
    cached_repository(home / "hub", f"timm/{DINOV2}.lvd142m", dinov2)
    other_cache = tmp_path / "hub_cache"
    repository = cached_repository(other_cache, f"timm/{DINOV3}.lvd1689m", dinov3)
    # The cached repository's folder works as a path anywhere, without any setting.
    assert_same(loaded_state(DINOV3, str(repository)), dinov3)
    # weights: hub with HF_HUB_OFFLINE=1 reads the cache: HF_HOME's, or HF_HUB_CACHE when set; what is not
    # there fails with an error naming where it was looked for. A fresh process: the hub reads these at import.
    script = f"""
import sys, torch
from safetensors.torch import load_file
from hiad_pl.detectors.features import FeatureSettings, create_extractor
name, expected = sys.argv[1], load_file(sys.argv[2])
state = create_extractor(FeatureSettings.of(name, ["blocks.1"], "hub", model_kwargs={SMALL!r})).model.state_dict()
assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
try:
    create_extractor(FeatureSettings.of("{DINO}", ["blocks.1"], "hub", model_kwargs={SMALL!r}))
except Exception as err:
    print(type(err).__name__, err)
"""
    runs = {
        DINOV2: ({"HF_HOME": str(home)}, next((home / "hub").rglob("model.safetensors")), home / "hub"),
        DINOV3: ({"HF_HOME": str(home), "HF_HUB_CACHE": str(other_cache)}, next(repository.rglob("model.safetensors")), other_cache),
    }
    for name, (settings, file, cache) in runs.items():
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env = {**inherited, **settings, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
        done = subprocess.run(
            [sys.executable, "-c", script, name, str(file)], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        message = done.stdout
        assert message.startswith("WeightsUnavailableError"), message
        assert str(cache / f"models--timm--{DINO}.augreg_in21k_ft_in1k" / "snapshots") in message
        assert "HF_HUB_OFFLINE" in message and "weights: /path/to/model.safetensors" in message


def test_missing_or_mismatched_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent/model.safetensors"):
        loaded_state(DINOV2, str(tmp_path / "absent" / "model.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*holds none of model.safetensors, pytorch_model.bin"):
        loaded_state(DINOV2, str(tmp_path / "empty"))
    save_file(random_state(DINOV3, seed=6), str(tmp_path / "dinov3.safetensors"))
    with pytest.raises(ValueError, match=r"dinov3\.safetensors.*do not match backbone 'vit_small_patch14_dinov2'"):
        loaded_state(DINOV2, str(tmp_path / "dinov3.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors.*could not be read"):
        loaded_state(DINOV2, str(tmp_path / "broken.safetensors"))
    save_file(random_state(DINOV2, seed=7), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="wide.safetensors.*shape mismatch"):
        wide = {**SMALL, "embed_dim": 192, "num_heads": 3}
        create_extractor(FeatureSettings.of(DINOV2, ["blocks.1"], str(tmp_path / "wide.safetensors"), model_kwargs=wide))


def test_a_dinomaly_fit_runs_on_a_local_dinov2_file(tmp_path: Path) -> None:
    saved = random_state(DINOV2, seed=8)
    save_file(saved, str(tmp_path / "model.safetensors"))
    detector = HRDinomaly(
        backbone_name=DINOV2, weights=str(tmp_path / "model.safetensors"), backbone_kwargs=SMALL,
        layers_to_extract_from=["blocks.0", "blocks.1"], groups=[[0], [1]], decoder_depth=2,
        input_size=56, total_steps=2, warmup_steps=1, eval_every=2,
    )
    assert_same(detector.backbone.model.state_dict(), load_file(str(tmp_path / "model.safetensors")))
    assert detector.token_grid_size() == (4, 4)  # 14-px tokens
    trainer = lightning.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **{**detector.trainer_defaults(), "max_epochs": 1},
    )
    before = [p.detach().clone() for p in detector.reconstructor.parameters()]
    trainer.fit(detector, loader(torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(0)), batch_size=2))
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, detector.reconstructor.parameters()))
