"""The plain models of PatchCore, PaDiM, FastFlow, RD++, RealNet and DeSTSeg give their detector's maps; old checkpoints load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from hiad_pl.data.batch import PatchBatch
from hiad_pl.detectors import HRRDPP, HRDesTSeg, HRFastFlow, HRPaDiM, HRPatchCore, HRRealNet
from hiad_pl.detectors.base import HRDetector
from hiad_pl.detectors.destseg import DeSTSegModel
from hiad_pl.detectors.fastflow import FastFlowModel
from hiad_pl.detectors.map_model import MoveKeysUnder, PatchMapModel
from hiad_pl.detectors.padim import PaDiMModel
from hiad_pl.detectors.patchcore import PatchCoreModel
from hiad_pl.detectors.rdpp import RDPPModel
from hiad_pl.detectors.realnet import RealNetModel

SIZE = 64
COMMON = {"backbone_name": "efficientnet_lite0", "weights": "none", "input_size": SIZE}
LITE0_LAYERS = ["blocks.2", "blocks.4"]

#: Detector options, and the plain model built alone from the same settings.
METHODS: dict[str, tuple[type[HRDetector], dict, Callable[[HRDetector], PatchMapModel]]] = {
    "patchcore": (
        HRPatchCore,
        {"pretrain_embed_dimension": 48, "target_embed_dimension": 96, "num_neighbors": 3, "percentage": 0.5},
        lambda d: PatchCoreModel(d.backbone.channels, pretrain_embed_dimension=48, target_embed_dimension=96, num_neighbors=3),
    ),
    "patchcore_ivf": (
        HRPatchCore,
        {"percentage": 1.0, "search": "ivf", "search_precision": "float32", "aggregation": "neighbourhood",
         "layer_weighting": "equal", "fusion_weights": [0.7, 0.3]},
        lambda d: PatchCoreModel(d.backbone.channels, search="ivf", search_precision="float32",
                                 aggregation="neighbourhood", layer_weighting="equal"),
    ),
    "padim": (HRPaDiM, {"d_reduced": 20, "seed": 3}, lambda d: PaDiMModel(sum(d.backbone.channels), 20, seed=3)),
    "fastflow": (
        HRFastFlow,
        {"flow_steps": 2},
        lambda d: FastFlowModel(d.backbone.channels, [(8, 8), (4, 4)], flow_steps=2),
    ),
    "rdpp": (
        HRRDPP,
        {"layers_to_extract_from": LITE0_LAYERS, "ocbe_blocks": 1, "decoder_blocks": 1, "accumulate_batches": 1},
        lambda d: RDPPModel(d.backbone.channels, d.backbone.reductions, ocbe_blocks=1, decoder_blocks=1),
    ),
    "realnet": (
        HRRealNet,
        {"layers_to_extract_from": LITE0_LAYERS, "afs_channels": [16, 32], "init_bsn": 1, "res_blocks": 1,
         "channel_mult": [1, 2], "attention_at": [2], "rrs_counts": [8, 8], "rrs_residual_layers": 1},
        lambda d: RealNetModel(d.backbone.channels, [16, 32], init_bsn=1, channel_mult=(1, 2), res_blocks=1,
                               attention_at=(2,), rrs_counts=(8, 8), rrs_residual_layers=1),
    ),
}
#: Methods whose plain model is no PatchMapModel: their scoring reads the patches' pixels too (DeSTSeg's student).
PIXEL_METHODS: dict[str, tuple[type[HRDetector], dict, Callable[[HRDetector], nn.Module]]] = {
    "destseg": (
        HRDesTSeg,
        {"layers_to_extract_from": LITE0_LAYERS, "student_encoder": "mobilenetv3_small_050", "decoder_blocks": 1,
         "segmentation_width": 16, "student_final_relu": False, "steps": 2, "de_st_steps": 1,
         "student_bn_recalibration": 1},
        lambda d: DeSTSegModel(d.backbone.channels, "mobilenetv3_small_050", decoder_blocks=1, segmentation_width=16,
                               student_final_relu=False),
    ),
}
ALL_METHODS = {**METHODS, **PIXEL_METHODS}
#: Where a method's state sat before it moved under ``model.`` (the detector's top level unless named here).
OLD_OWNERS = {"destseg": "destseg.", "realnet": "realnet."}
#: Detectors fitted on (clean, corrupted) pairs of synthetic anomalies.
SYNTHETIC = (HRRDPP, HRRealNet, HRDesTSeg)


def patch_batch(count: int, seed: int, fused: bool = False, corrupted: bool = False) -> PatchBatch:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(count, 3, SIZE, SIZE, generator=generator)
    batch = PatchBatch(image=image, mask=torch.zeros(count, SIZE, SIZE), label=torch.zeros(count, dtype=torch.long),
                       index=torch.zeros(count, 4, dtype=torch.long))
    if fused:
        batch.low_resolution_images = torch.randn(count, 1, 3, SIZE, SIZE, generator=generator)
        batch.low_resolution_windows = torch.tensor([[[0, 32, 32, 32]]] * count)
    if corrupted:  # RD++ learns from (clean, corrupted) pairs
        batch.clean_image = image
        batch.image = image + 0.5 * torch.randn(image.shape, generator=generator)
        batch.mask = (torch.rand(count, SIZE, SIZE, generator=generator) > 0.8).float()
    return batch


def fitted(name: str) -> HRDetector:
    """The detector after a tiny fit: one pass, or two optimiser steps under a Lightning Trainer."""
    cls, options, _ = ALL_METHODS[name]
    torch.manual_seed(0)
    detector = cls(**{**COMMON, **options})
    fused = "fusion_weights" in options
    if detector.fits_in_one_pass:
        detector.accumulate(patch_batch(4, seed=1, fused=fused))
        detector.finalize()
        return detector.eval()
    batch = patch_batch(4, seed=1, corrupted=cls in SYNTHETIC)
    single = [PatchBatch(image=batch.image[i : i + 1], mask=batch.mask[i : i + 1], label=batch.label[i : i + 1],
                         index=batch.index[i : i + 1],
                         clean_image=None if batch.clean_image is None else batch.clean_image[i : i + 1])
              for i in range(4)]
    trainer = lightning.Trainer(max_steps=2, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(detector, DataLoader(single, batch_size=2, collate_fn=PatchBatch.collate))
    return detector.eval()


@pytest.fixture(scope="module", params=list(ALL_METHODS))
def method(request: pytest.FixtureRequest) -> tuple[str, HRDetector]:
    return request.param, fitted(request.param)


def test_plain_model_alone_gives_the_detector_maps(method: tuple[str, HRDetector]) -> None:
    name, detector = method
    fused = "fusion_weights" in ALL_METHODS[name][1]
    batch = patch_batch(3, seed=2, fused=fused)
    with torch.inference_mode():
        expected = detector.predict_step(batch, 0)
        features = detector.fused_embedding(batch)
    # built from its settings alone (no Lightning, no backbone), then its state loaded: no tensor is shared
    model = ALL_METHODS[name][2](detector)
    assert isinstance(model, nn.Module) and not isinstance(model, lightning.LightningModule)
    # the export traces a PatchMapModel from backbone maps alone: a model reading pixels must not claim to be one
    assert isinstance(model, PatchMapModel) == (name in METHODS) and type(detector.model) is type(model)
    model.load_state_dict(detector.model.state_dict())
    model.eval()
    with torch.inference_mode():
        if isinstance(model, PatchMapModel):
            maps = model(features, (SIZE, SIZE))
        else:  # the student reads the patches themselves, the segmentation network their teacher maps too
            maps = model(batch.image, features, (SIZE, SIZE))
    assert maps.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-5)
    assert maps.std() > 0  # a real map, not a constant


def old_layout(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """``state`` with the keys detector ``name`` used before its method moved under ``model.``."""
    old_owner = OLD_OWNERS.get(name, "")
    return {old_owner + key.removeprefix("model.") if key.startswith("model.") else key: value
            for key, value in state.items()}


def test_state_in_the_old_key_layout_loads_with_equal_maps(method: tuple[str, HRDetector]) -> None:
    name, detector = method
    cls, options, _ = ALL_METHODS[name]
    state = old_layout(detector.state_dict(), name)
    assert not any(key.startswith("model.") for key in state) and any(key.startswith("backbone.") for key in state)
    if name in OLD_OWNERS:
        assert any(key.startswith(OLD_OWNERS[name]) for key in state)
    torch.manual_seed(7)  # other initial weights: only the loaded state can make the maps equal
    restored = cls(**{**COMMON, **options})
    restored.load_state_dict(state)  # strict: every old key finds its place
    restored.eval()
    batch = patch_batch(3, seed=2, fused="fusion_weights" in options)
    with torch.inference_mode():
        torch.testing.assert_close(restored.predict_step(batch, 0), detector.predict_step(batch, 0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["patchcore", "realnet", "destseg"])
def test_old_checkpoint_loads(name: str, tmp_path: Path) -> None:
    detector = fitted(name)
    # a checkpoint as Lightning writes one (frozen backbone left out), in the old key layout
    checkpoint = {"state_dict": detector.state_dict(), "hyper_parameters": dict(detector.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    detector.on_save_checkpoint(checkpoint)
    assert any(key.startswith("model.") for key in checkpoint["state_dict"])
    checkpoint["state_dict"] = old_layout(checkpoint["state_dict"], name)
    path = tmp_path / "task_0.ckpt"
    torch.save(checkpoint, path)
    restored = type(detector).load_from_checkpoint(path, weights_only=True).eval()
    expected_state, restored_state = detector.model.state_dict(), restored.model.state_dict()
    assert list(restored_state) == list(expected_state)
    assert all(torch.equal(restored_state[key], value) for key, value in expected_state.items())
    batch = patch_batch(2, seed=2)
    with torch.inference_mode():
        assert torch.equal(restored.predict_step(batch, 0), detector.predict_step(batch, 0))


def test_patchcore_traceable_form_scores_the_same_and_ends_with_the_block() -> None:
    detector = fitted("patchcore")
    batch = patch_batch(2, seed=2)
    features = detector.fused_embedding(batch)
    with torch.inference_mode():
        searched = detector.model(features, (SIZE, SIZE))
        with detector.model.traceable():
            traced_form = detector.model(features, (SIZE, SIZE))
        assert not detector.model._graph_ops
    torch.testing.assert_close(traced_form, searched, rtol=1e-4, atol=1e-4)


def test_unfitted_plain_models_refuse_to_score() -> None:
    features = [torch.randn(1, 40, 8, 8), torch.randn(1, 112, 4, 4)]
    with pytest.raises(RuntimeError, match="empty memory bank"):
        PatchCoreModel([40, 112])(features, (SIZE, SIZE))
    empty = PatchCoreModel([40, 112])
    with pytest.raises(RuntimeError, match="empty memory bank"), empty.traceable():
        empty(features, (SIZE, SIZE))
    with pytest.raises(RuntimeError, match="no statistics"):
        PaDiMModel(152, 20)(features, (SIZE, SIZE))


def test_move_keys_under_renames_only_the_old_keys() -> None:
    state = {"destseg.student.w": torch.zeros(1), "destseg.segmentation.b": torch.ones(1),
             "destseg.gamma_like": torch.ones(2), "model.student.v": torch.ones(3), "backbone.x": torch.ones(4)}
    MoveKeysUnder(("student", "segmentation"), old_owner="destseg")(nn.Module(), state, "")
    assert set(state) == {"model.student.w", "model.segmentation.b", "destseg.gamma_like", "model.student.v", "backbone.x"}
    nested = {"task.memory_bank": torch.zeros(1)}
    MoveKeysUnder(("memory_bank",))(nn.Module(), nested, "task.")
    assert set(nested) == {"task.model.memory_bank"}
