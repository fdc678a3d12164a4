"""RD++: shapes mirrored from the encoder, the paper's loss terms, learning on the demo texture, resume."""

from __future__ import annotations

from pathlib import Path

import geomloss
import numpy as np
import pytest
import timm
import torch
import yaml

from conftest import auroc, tensorboard_scalars
from hiad_pl.data.discovery import discover
from hiad_pl.demo import make_demo_dataset
from hiad_pl.detectors import DETECTORS, HRRDPP
from hiad_pl.detectors.rdpp import (
    SINKHORN_OPTIONS,
    OneClassBottleneck,
    ResidualBottleneck,
    ReverseDecoder,
    optimal_transport_loss,
    sinkhorn_loss,
)
from hiad_pl.orchestrator import TaskOrchestrator
from hiad_pl.syn import SimplexNoiseSynthesizer
from hiad_pl.tasks import A2OTaskGenerator
from hiad_pl.utils.split_and_gather import MultiResolutionHRImageSpliter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LITE0 = {"backbone_name": "efficientnet_lite0", "weights": "offline", "layers_to_extract_from": ["blocks.2", "blocks.4"]}


def quickstart_options() -> dict:
    """The detector options of configs/rdpp_quickstart.yaml."""
    return dict(yaml.safe_load((CONFIGS / "rdpp_quickstart.yaml").read_text())["detector"]["init_args"])


@pytest.mark.parametrize("layers", [["layer1", "layer2", "layer3"], ["layer3"], ["layer2", "layer3"]])
def test_decoder_mirrors_wideresnet50_shapes(layers: list[str]) -> None:
    # shapes only: the random-init encoder, bottleneck and decoder are built on the meta device
    with torch.device("meta"):
        indices = [["layer1", "layer2", "layer3"].index(name) + 1 for name in layers]
        encoder = timm.create_model("wide_resnet50_2", features_only=True, out_indices=indices)
        channels, reductions = encoder.feature_info.channels(), encoder.feature_info.reduction()
        bottleneck = OneClassBottleneck(channels, reductions)
        decoder = ReverseDecoder(channels, reductions, bottleneck.out_channels)
        features = encoder(torch.empty(2, 3, 256, 256))
        rebuilt = decoder(bottleneck(features), [f.shape[-2:] for f in features])
    assert bottleneck.out_channels == 2048
    assert [f.shape for f in rebuilt] == [f.shape for f in features]
    assert [tuple(f.shape[1:]) for f in features][-1] == (1024, 16, 16)


#: Parameters of the official RD++ / RD4AD decoder (de_wide_resnet50_2) per stage, deepest first:
#: 3 bottlenecks 2048 -> 1024, 4 bottlenecks 1024 -> 512, 6 bottlenecks 512 -> 256.
OFFICIAL_STAGE_PARAMETERS = [17_840_128, 5_317_632, 1_759_744]


def test_decoder_stages_are_the_official_de_resnet_stages() -> None:
    with torch.device("meta"):
        decoder = ReverseDecoder([256, 512, 1024], [4, 8, 16], in_channels=2048)
    assert [len(stage) for stage in decoder.stages] == [3, 4, 6]
    for stage, (c_in, c_out) in zip(decoder.stages, [(2048, 1024), (1024, 512), (512, 256)]):
        assert all(isinstance(block, ResidualBottleneck) for block in stage)  # no plain layer before the blocks
        first, *rest = stage
        transposed = [m for m in first.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
        # the first block upsamples in its body (width -> width) and in its shortcut (c_in -> c_out), 2x2 stride 2
        assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in transposed] == [
            (c_out // 2, c_out // 2, (2, 2), (2, 2)), (c_in, c_out, (2, 2), (2, 2))
        ]
        assert not any(isinstance(m, torch.nn.ConvTranspose2d) for block in rest for m in block.modules())
    assert [sum(p.numel() for p in stage.parameters()) for stage in decoder.stages] == OFFICIAL_STAGE_PARAMETERS


def test_decoder_blocks_default_to_the_official_counts_for_fewer_layers() -> None:
    with torch.device("meta"):
        deepest = ReverseDecoder([1024], [16], in_channels=2048)  # HiAD's patch branch: layer3 only
        two = ReverseDecoder([512, 1024], [8, 16], in_channels=2048)  # its thumbnail branch: layer2 + layer3
        uniform = ReverseDecoder([512, 1024], [8, 16], in_channels=2048, blocks=1)
    assert [len(s) for s in deepest.stages] == [3] and [len(s) for s in two.stages] == [3, 4]
    assert sum(p.numel() for p in deepest.parameters()) == OFFICIAL_STAGE_PARAMETERS[0]
    assert [len(s) for s in uniform.stages] == [1, 1]
    small = ReverseDecoder([8, 16], [8, 16], in_channels=32, blocks=1)
    rebuilt = small(torch.randn(1, 32, 2, 2), [(8, 8), (4, 4)])
    assert [tuple(r.shape) for r in rebuilt] == [(1, 8, 8, 8), (1, 16, 4, 4)]


def test_decoder_mirrors_lite0_shapes_on_any_patch_size() -> None:
    detector = HRRDPP(**LITE0, input_size=96, ocbe_blocks=1, decoder_blocks=1)
    for side in (96, 120):  # 120: strided convolutions round up, the decoder still meets the encoder
        features = detector.embedding(torch.randn(2, 3, side, side))
        rebuilt = detector.model.rebuild(detector.model.project(features))
        assert [f.shape for f in rebuilt] == [f.shape for f in features]
    assert detector.predict_step(_batch(torch.randn(2, 3, 96, 96)), 0).shape == (2, 96, 96)


def test_layers_must_go_from_shallow_to_deep() -> None:
    with pytest.raises(ValueError, match="shallow to deep"):
        HRRDPP(backbone_name="resnet18", weights="none", layers_to_extract_from=["layer3", "layer2"])


def test_ot_term_equals_a_direct_geomloss_call() -> None:
    generator = torch.Generator().manual_seed(0)
    projected = [torch.randn(4, 8, 3, 3, generator=generator), torch.randn(4, 16, 2, 2, generator=generator)]
    permutation = torch.tensor([2, 0, 3, 1])
    ours = optimal_transport_loss(projected, permutation, sinkhorn_loss())
    direct = geomloss.SamplesLoss(loss="sinkhorn", p=2, blur=0.05, scaling=0.95, diameter=1e7, truncate=10)
    expected = sum(
        direct(torch.softmax(f.flatten(1), -1), torch.softmax(f[permutation].flatten(1), -1)) for f in projected
    )
    assert SINKHORN_OPTIONS["blur"] == 0.05 and SINKHORN_OPTIONS["scaling"] == 0.95
    torch.testing.assert_close(ours, expected)
    # between two different batches the divergence is positive
    other = [torch.randn(4, 8, 3, 3, generator=generator) * 5, torch.randn(4, 16, 2, 2, generator=generator) * 5]
    sinkhorn = sinkhorn_loss()
    assert float(sinkhorn(torch.softmax(projected[0].flatten(1), -1), torch.softmax(other[0].flatten(1), -1))) > 0


def test_two_adams_with_the_papers_settings_and_every_loss_term() -> None:
    detector = HRRDPP(**LITE0, input_size=64, ocbe_blocks=1, decoder_blocks=1)
    projection, distillation = detector.configure_optimizers()
    assert projection.defaults["lr"] == 1e-3 and distillation.defaults["lr"] == 5e-3
    assert projection.defaults["betas"] == distillation.defaults["betas"] == (0.5, 0.999)
    proj_ids = {id(p) for group in projection.param_groups for p in group["params"]}
    distill_ids = {id(p) for group in distillation.param_groups for p in group["params"]}
    assert proj_ids == {id(p) for p in detector.model.projection.parameters()}
    assert distill_ids == {id(p) for m in (detector.model.bottleneck, detector.model.decoder) for p in m.parameters()}
    assert not proj_ids & {id(p) for p in detector.backbone.parameters()}
    assert isinstance(detector.training_synthesizer(), SimplexNoiseSynthesizer)
    batch = _batch(torch.randn(2, 3, 64, 64))
    batch.clean_image = batch.image
    batch.image = batch.image + 0.5 * torch.randn_like(batch.image)
    losses = detector.losses(batch)
    assert set(losses) == {"loss", "distillation_loss", "projection_loss", "ot_loss", "reconstruction_loss", "contrast_loss"}
    expected = losses["distillation_loss"] + 0.2 * (
        losses["ot_loss"] + 0.01 * losses["reconstruction_loss"] + 0.1 * losses["contrast_loss"]
    ) / 1.11
    torch.testing.assert_close(losses["loss"], expected)


@pytest.fixture(scope="module")
def texture_1024(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo texture at 1024 px: 16 patches of 256 px per image."""
    root = tmp_path_factory.mktemp("demo1024")
    make_demo_dataset(root, categories=["texture"], image_size=1024, num_train=2, num_test_good=4, num_test_defect=4)
    return root


@pytest.mark.slow  # about 3 min on 2 free cores; the resume test below covers the same fit path in the default run
def test_rdpp_learns_the_demo_texture(texture_1024: Path, tmp_path: Path) -> None:
    (split,) = discover(texture_1024, categories=["texture"], image_size=1024)
    tasks = A2OTaskGenerator().create_tasks(split.train, MultiResolutionHRImageSpliter(image_size=1024, patch_size=256))
    from hiad_pl.trainer import HRTrainer

    trainer = HRTrainer(
        batch_size=8,
        tasks=tasks,
        detector_class="rdpp",  # found in the registry by its short name
        config={"patch": {**quickstart_options(), "patch_size": 256}},
        checkpoint_root=tmp_path / "models",
        log_root=tmp_path / "logs",
        vis_root=tmp_path / "vis",
    )
    trainer.train(train_samples=split.train, gpu_ids=[])
    losses = tensorboard_scalars(tmp_path / "logs" / "task_0", "train/loss")
    assert len(losses) == quickstart_options()["epochs"]
    assert losses[-1] < 0.8 * losses[0]
    scores, maps = trainer.inference(test_samples=split.test, return_results_only=True, gpu_ids=[])
    assert maps[0].shape == (1024, 1024)
    assert auroc(np.asarray(scores), np.array([s.label for s in split.test])) >= 0.9


def test_interrupted_fit_resumes_with_both_optimizer_states(small_demo: Path, tmp_path: Path) -> None:
    from conftest import texture_split

    split, tasks = texture_split(small_demo)
    config = {**LITE0, "ocbe_blocks": 1, "decoder_blocks": 1, "accumulate_batches": 1}

    def fit(epochs: int) -> TaskOrchestrator:
        orchestrator = TaskOrchestrator(HRRDPP, config, tasks, tmp_path, batch_size=8, trainer_kwargs={"max_epochs": epochs})
        orchestrator.fit(split.train[:2], [])
        return orchestrator

    first = fit(1)
    final = first.checkpoint_path(tasks[0])
    after_one = torch.load(final, weights_only=True)
    final.unlink()  # as if the run had stopped before the task finished: only the epoch checkpoint is left
    fit(2)
    resumed = torch.load(final, weights_only=True)
    assert resumed["epoch"] == 2
    states = resumed["optimizer_states"]
    assert len(states) == 2 and [len(s["state"]) > 0 for s in states] == [True, True]
    steps = [next(iter(s["state"].values()))["step"] for s in states]
    first_steps = [next(iter(s["state"].values()))["step"] for s in after_one["optimizer_states"]]
    # both Adams continued from their saved moments: twice the steps of one epoch, not one epoch from scratch
    assert [float(s) for s in steps] == [2 * float(s) for s in first_steps]
    assert not any(key.startswith("backbone.") for key in resumed["state_dict"])
    assert DETECTORS["rdpp"] is HRRDPP


def _batch(images: torch.Tensor):
    from conftest import batch_of

    return batch_of(images)
