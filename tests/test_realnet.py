"""RealNet: AFS selection, RRS top-k, reconstruction UNet shapes, losses against hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import DEMO_1024_TWO_TRAIN, batch_of, fit_and_score, tensorboard_scalars, texture_split
from hiad_pl.detectors import DETECTORS, HRRealNet
from hiad_pl.detectors.realnet import (
    AttentionBlock,
    FeatureSelection,
    RealNetModel,
    ReconstructionUNet,
    ResBlock,
    ResidualDiscriminator,
    afs_channel_scores,
    feature_mse,
    segmentation_cross_entropy,
    select_residual_channels,
    top_channels,
)
from hiad_pl.orchestrator import TaskOrchestrator


def planted_batch(seed: int, signal_channels: tuple[int, ...], channels: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean features, corrupted features whose ``signal_channels`` change inside the mask, and the mask."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(4, channels, 8, 8, generator=generator)
    mask = torch.zeros(4, 16, 16)
    mask[:, 4:10, 2:12] = 1
    inside = torch.nn.functional.interpolate(mask[:, None], size=(8, 8), mode="nearest")
    corrupted = clean + 0.3 * torch.randn(clean.shape, generator=generator)  # change everywhere in every channel
    for c in signal_channels:
        corrupted[:, c : c + 1] += 3.0 * inside  # and a strong change inside the anomaly
    return corrupted, clean, mask


def test_afs_scores_match_a_hand_computed_case() -> None:
    clean = torch.zeros(1, 2, 1, 2)
    corrupted = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # channel 0 changes where the mask is, channel 1 elsewhere
    mask = torch.tensor([[[1.0, 0.0]]])
    scores = afs_channel_scores(corrupted, clean, mask)
    # min-max over positions: channel 0 -> [4 / (4 + eps), 0], channel 1 -> [0, 1 / (1 + eps)]
    first, second = 4.0 / (4.0 + 1e-4), 1.0 / (1.0 + 1e-4)
    assert scores.tolist() == pytest.approx([(first - 1) ** 2 / 2, (1 + second**2) / 2])


def test_afs_picks_the_channels_that_carry_the_planted_signal() -> None:
    afs = FeatureSelection([8, 6], kept=[2, 1], init_batches=3)
    assert not afs.decided and [i.tolist() for i in afs.indices()] == [[0, 1], [0]]
    for seed in range(3):
        corrupted, clean, mask = planted_batch(seed, (5, 2))
        corrupted6, clean6, _ = planted_batch(seed + 10, (4,), channels=6)
        afs.accumulate([corrupted, corrupted6], [clean, clean6], mask)
    assert afs.decided and int(afs.batches_seen) == 3
    assert [i.tolist() for i in afs.indices()] == [[2, 5], [4]]
    # decided means frozen: later batches change nothing
    corrupted, clean, mask = planted_batch(7, (0, 1))
    afs.accumulate([corrupted, corrupted[:, :6]], [clean, clean[:, :6]], mask)
    assert [i.tolist() for i in afs.indices()] == [[2, 5], [4]]
    selected = afs([corrupted, corrupted[:, :6]])
    assert torch.equal(selected[0], corrupted[:, [2, 5]]) and selected[1].shape == (4, 1, 8, 8)


def test_afs_skips_patches_without_anomaly_and_state_travels_in_the_state_dict() -> None:
    afs = FeatureSelection([8], kept=[2], init_batches=2)
    corrupted, clean, mask = planted_batch(0, (3, 6))
    afs.accumulate([corrupted], [clean], torch.zeros_like(mask))
    assert int(afs.batches_seen) == 0
    afs.accumulate([corrupted], [clean], mask)
    restored = FeatureSelection([8], kept=[2], init_batches=2)
    restored.load_state_dict(afs.state_dict())
    restored.accumulate([corrupted], [clean], mask)
    assert restored.decided and restored.indices()[0].tolist() == [3, 6]
    with pytest.raises(ValueError, match="cannot keep 9 of 8"):
        FeatureSelection([8], kept=[9], init_batches=1)


def test_rrs_keeps_the_requested_channel_counts_by_max_and_by_mean() -> None:
    residual = torch.zeros(2, 5, 3, 3)
    residual[0, 1, 0, 0] = 9.0  # a single peak: best by max, small mean
    residual[0, 3] = 2.0  # uniform: best by mean
    residual[1, 4] = 1.0
    residual[1, 0, 1, 1] = 5.0
    assert top_channels(residual, 1, "max").tolist() == [[1], [0]]
    assert top_channels(residual, 1, "mean").tolist() == [[3], [4]]
    chosen = select_residual_channels(residual, residual, ["max", "mean"], [2, 1])
    assert chosen.shape == (2, 3, 3, 3)
    assert torch.equal(chosen[0, 0], residual[0, 1]) and torch.equal(chosen[0, 2], residual[0, 3])
    with pytest.raises(ValueError, match="mode"):
        top_channels(residual, 1, "median")


def test_discriminator_outputs_two_class_logits_at_the_patch_size() -> None:
    discriminator = ResidualDiscriminator(12, counts=(4, 3), residual_layers=1)
    logits = discriminator([torch.rand(2, 4, 8, 8), torch.rand(2, 8, 4, 4)], size=(32, 32))
    assert logits.shape == (2, 2, 32, 32)
    assert discriminator.decoder[0].body[1].in_channels == 7  # 4 by max + 3 by mean
    with pytest.raises(ValueError, match="cannot keep 13 of 12"):
        ResidualDiscriminator(12, counts=(13, 1))


def test_discriminator_decodes_raw_or_normalised_residuals_chosen_on_the_normalised_ones() -> None:
    torch.manual_seed(0)
    residuals = [torch.rand(2, 4, 8, 8), torch.rand(2, 8, 8, 8) * 50]
    stacked = torch.cat(residuals, dim=1)
    normalised = torch.nn.functional.batch_norm(stacked, None, None, training=True, eps=1e-5)
    for normalised_input, source in ((False, stacked), (True, normalised)):
        discriminator = ResidualDiscriminator(12, counts=(4, 3), residual_layers=1, normalised_input=normalised_input).train()
        seen: list[torch.Tensor] = []
        discriminator.decoder.register_forward_hook(lambda module, inputs, output, seen=seen: seen.append(inputs[0]))
        with torch.no_grad():
            discriminator(residuals, size=(16, 16))
        expected = select_residual_channels(source, normalised, ["max", "mean"], [4, 3])
        assert torch.allclose(seen[0], expected, atol=1e-5)


def test_resblocks_resample_and_attention_starts_as_identity() -> None:
    x = torch.randn(2, 8, 4, 4)
    assert ResBlock(8, 16)(x).shape == (2, 16, 4, 4)
    assert ResBlock(8, resample="down")(x).shape == (2, 8, 2, 2)
    assert ResBlock(8, resample="up")(x).shape == (2, 8, 8, 8)
    attention = AttentionBlock(128)
    assert attention.heads == 2 and AttentionBlock(48).heads == 1
    y = torch.randn(1, 128, 3, 3)
    assert torch.equal(attention(y), y)


def test_reconstruction_unet_keeps_the_feature_shape_and_starts_at_zero() -> None:
    unet = ReconstructionUNet(16, width_ratio=0.5, channel_mult=(1, 2, 4), res_blocks=1, attention_at=(2, 4))
    attentions = [m for m in unet.modules() if isinstance(m, AttentionBlock)]
    assert len(attentions) == 1 + 2 + 2 + 2  # middle, down at x2 and x4, up (res_blocks + 1) at x2 and x4
    for grid in ((8, 8), (6, 10)):  # 6 and 10 are not multiples of 4: resized onto the skips
        x = torch.randn(2, 16, *grid)
        with torch.no_grad():
            out = unet(x)
        assert out.shape == x.shape and float(out.abs().max()) == 0.0


def test_losses_match_hand_computed_values() -> None:
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 0] = math.log(3.0)  # p(anomalous) = 3/4 at the anomalous pixel
    mask = torch.tensor([[[1.0, 0.0]]])
    expected = (-math.log(0.75) + math.log(2.0)) / 2
    assert float(segmentation_cross_entropy(logits, mask)) == pytest.approx(expected, rel=1e-6)
    targets = [torch.ones(1, 2, 1, 1), torch.zeros(1, 1, 2, 2)]
    predictions = [torch.zeros(1, 2, 1, 1), torch.full((1, 1, 2, 2), 2.0)]
    assert float(feature_mse(targets, predictions)) == pytest.approx(1.0 + 4.0)


def test_model_trains_end_to_end_on_tiny_features() -> None:
    torch.manual_seed(0)
    model = RealNetModel(
        [8, 16], afs_channels=[4, 8], init_bsn=1, width_ratio=1.0, channel_mult=(1, 2), res_blocks=1,
        attention_at=(2,), rrs_counts=(4, 4), rrs_residual_layers=1,
    )
    clean = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    corrupted = [c + 0.5 for c in clean]
    mask = torch.zeros(2, 32, 32)
    mask[:, :8, :8] = 1
    model.afs.accumulate(corrupted, clean, mask)
    losses = model.losses(corrupted, clean, mask)
    assert set(losses) == {"loss", "segmentation_loss", "feature_loss"}
    assert float(losses["loss"]) == pytest.approx(float(losses["segmentation_loss"] + losses["feature_loss"]))
    losses["loss"].backward()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"reconstruction", "discriminator"}  # AFS holds no parameters
    probability = model(corrupted, (32, 32))
    assert probability.shape == (2, 32, 32) and bool(((probability >= 0) & (probability <= 1)).all())
    assert torch.equal(probability, torch.softmax(model.outputs(corrupted, (32, 32)).logits, dim=1)[:, 1])


# ---------------------------------------------------------------- the detector

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: A backbone and networks small enough for fits of a few steps.
TINY = {
    "backbone_name": "resnet18",
    "weights": "none",
    "layers_to_extract_from": ["layer1", "layer2"],
    "afs_channels": [16, 32],
    "init_bsn": 2,
    "res_blocks": 1,
    "channel_mult": [1, 2],
    "attention_at": [2],
    "rrs_counts": [8, 8],
    "rrs_residual_layers": 1,
}


def quickstart_options() -> dict:
    """The detector options of configs/realnet_quickstart.yaml."""
    return dict(yaml.safe_load((CONFIGS / "realnet_quickstart.yaml").read_text())["detector"]["init_args"])


def test_afs_is_decided_before_training_and_a_resumed_fit_keeps_it(small_demo: Path, tmp_path: Path) -> None:
    split, tasks = texture_split(small_demo)

    def fit(epochs: int) -> TaskOrchestrator:
        orchestrator = TaskOrchestrator(HRRealNet, TINY, tasks, tmp_path, batch_size=8, trainer_kwargs={"max_epochs": epochs})
        orchestrator.fit(split.train[:2], [])
        return orchestrator

    final = fit(1).checkpoint_path(tasks[0])
    first = torch.load(final, weights_only=True)
    state = first["state_dict"]
    assert int(state["model.afs.batches_seen"]) == 2
    assert [len(state[f"model.afs.indices_{i}"]) for i in range(2)] == [16, 32]
    assert state["model.afs.indices_0"].tolist() != list(range(16))  # chosen by the scores, not the default
    final.unlink()  # as if the run had stopped before the task finished: only the epoch checkpoint is left
    fit(2)
    resumed = torch.load(final, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 2 * first["global_step"]
    assert torch.equal(resumed["state_dict"]["model.afs.indices_1"], state["model.afs.indices_1"])
    assert int(resumed["state_dict"]["model.afs.batches_seen"]) == 2  # not decided again
    assert resumed["optimizer_states"][0]["state"]
    assert not any(key.startswith("backbone.") for key in resumed["state_dict"])
    assert DETECTORS["realnet"] is HRRealNet


def test_default_afs_keeps_half_of_each_layer_and_maps_have_the_patch_size() -> None:
    options = {k: v for k, v in TINY.items() if k not in ("afs_channels", "rrs_counts")}
    detector = HRRealNet(**options, rrs_counts=[16, 16], input_size=64).eval()
    assert detector.model.afs.kept == [32, 64]  # resnet18 layer1 / layer2: 64 / 128 channels
    maps = detector.predict_step(batch_of(torch.randn(2, 3, 64, 64)), 0)
    assert maps.shape == (2, 64, 64) and bool(((maps >= 0) & (maps <= 1)).all())
    with pytest.raises(ValueError, match="afs_channels"):
        HRRealNet(**{**TINY, "afs_channels": [16]}, input_size=64)


@pytest.mark.slow  # minutes on one core; the fit, phase and resume tests above cover the training code
def test_realnet_quickstart_learns_the_demo_texture(demo_1024_two_train: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((CONFIGS / "realnet_quickstart.yaml").read_text())
    options, data = quickstart_options(), config["data"]
    assert (data["image_size"], data["patch_size"]) == (1024, 256)  # the quickstart's own sizes
    batch_size = data["batch_size"]
    image_auroc = fit_and_score(demo_1024_two_train, tmp_path, HRRealNet, options, batch_size=batch_size, image_size=1024)
    losses = tensorboard_scalars(tmp_path / "logs", "train/loss")
    segmentation = tensorboard_scalars(tmp_path / "logs", "train/segmentation_loss")
    features = tensorboard_scalars(tmp_path / "logs", "train/feature_loss")
    patches = DEMO_1024_TWO_TRAIN["num_train"] * (1024 // 256) ** 2  # 32 per epoch
    assert len(losses) == len(segmentation) == len(features) == patches // batch_size * options["epochs"]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    assert np.mean(segmentation[-4:]) < 0.5 * np.mean(segmentation[:4])
    assert image_auroc >= 0.9
