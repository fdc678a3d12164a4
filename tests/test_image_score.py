"""Per-method image scores: the rules, each detector's default, config overrides, validation, export parity."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.trainer.states import TrainerFn

from conftest import PATCHCORE_TEST_CONFIG
from deploy_runs import IMAGE_SIZE, PATCH_SIZE
from hiad_pl.config import validate_options
from hiad_pl.deploy import predictor
from hiad_pl.detectors import DETECTOR_REGISTRY, HRFastFlow, HRPatchCore
from hiad_pl.engine.callbacks import ValidationSelector
from hiad_pl.postprocess import IMAGE_SCORE_RULES, ImageScore, image_score, topk_mean_score
from hiad_pl.utils import metrics

#: The methods HiAD scores by the mean of their 100 largest pixels; every other one by the 16-px window mean.
TOPK_METHODS = {"destseg", "dinomaly", "inpformer"}


def built_map() -> torch.Tensor:
    """64 x 64 zeros with a 4 x 4 block of ones at (10, 10) and one pixel of 10 at (60, 60), far from the block."""
    values = torch.zeros(64, 64)
    values[10:14, 10:14] = 1.0
    values[60, 60] = 10.0
    return values


@pytest.mark.parametrize(
    "rule, expected",
    [
        (ImageScore("max"), 10.0),
        (ImageScore("window_max", window=16), 16 / 256),  # the block's windows beat the lone pixel's 10/256
        (ImageScore("window_max", window=4), 1.0),  # the block fills a window; the pixel's windows hold 10/16
        (ImageScore("window_max", window=100), 26 / 4096),  # a window larger than the map is the whole map
        (ImageScore("topk_mean", k=100), 26 / 100),  # 10, sixteen ones and 83 zeros
        (ImageScore("topk_mean", k=17), 26 / 17),
        (ImageScore("topk_mean", k=1), 10.0),
        (ImageScore("topk_mean", k=10_000), 26 / 4096),  # more pixels asked than the map has: all of them
    ],
)
def test_each_rule_gives_the_known_score_of_a_built_map(rule: ImageScore, expected: float) -> None:
    values = built_map()
    assert float(rule(values)) == pytest.approx(expected, rel=1e-6)
    assert predictor.score_image(values.numpy(), rule.todict()) == pytest.approx(expected, rel=1e-6)
    batch = torch.stack([values, torch.zeros(64, 64), 2 * values])
    torch.testing.assert_close(rule(batch), torch.tensor([expected, 0.0, 2 * expected]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(37, 53), (8, 5), (1, 1)])
@pytest.mark.parametrize("rule", [ImageScore("window_max"), ImageScore("topk_mean", k=100), ImageScore("max")])
def test_torch_rules_and_their_numpy_twins_agree(shape: tuple[int, int], rule: ImageScore) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    values = torch.rand(shape, generator=generator) * 20 - 5
    assert predictor.score_image(values.numpy(), rule.todict()) == pytest.approx(float(rule(values)), rel=1e-6, abs=1e-6)


def test_the_rules_are_the_same_in_the_predictor() -> None:
    assert predictor.IMAGE_SCORE_RULES == IMAGE_SCORE_RULES


def test_topk_mean_is_the_mean_of_a_full_sort() -> None:
    values = torch.rand(3, 40, 30, generator=torch.Generator().manual_seed(0))
    expected = values.flatten(1).sort(dim=1, descending=True).values[:, :100].mean(1)
    torch.testing.assert_close(topk_mean_score(values, 100), expected)
    torch.testing.assert_close(ImageScore("window_max", window=7)(values), image_score(values, 7))


def test_bad_image_score_settings_are_named() -> None:
    with pytest.raises(ValueError, match="did you mean 'topk_mean'"):
        ImageScore("topk")
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        ImageScore("topk_mean", k=0)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        ImageScore(window=0)
    with pytest.raises(ValueError, match="no setting 'windw' \\(did you mean 'window'\\?\\)"):
        ImageScore.of({"windw": 8})
    assert ImageScore.of({"k": 7}, ImageScore("topk_mean")) == ImageScore("topk_mean", k=7)
    assert ImageScore.of(None, ImageScore("max")) == ImageScore("max")


def test_each_detector_defaults_to_its_methods_rule() -> None:
    for name, cls in DETECTOR_REGISTRY.items():
        expected = ImageScore("topk_mean", k=100) if name in TOPK_METHODS else ImageScore("window_max", window=16)
        if name == "patchcore":  # chosen on the real benchmark (docs/results.md), not HiAD's 16
            expected = ImageScore("window_max", window=32)
        assert cls.default_image_score == expected, name
    assert TOPK_METHODS <= set(DETECTOR_REGISTRY)


def test_a_detector_takes_an_override_and_keeps_it_as_plain_values(tmp_path: Path) -> None:
    options = dict(PATCHCORE_TEST_CONFIG, weights="none")
    default = HRPatchCore(**options)
    assert default.image_score == ImageScore("window_max", window=32)
    override = HRPatchCore(**options, image_score={"rule": "topk_mean", "k": 50})
    assert override.image_score == ImageScore("topk_mean", window=32, k=50)
    typed = HRPatchCore(**options, image_score=ImageScore("max"))
    # checkpoints keep the rule as plain values, so weights_only loading and load_from_checkpoint rebuild it
    assert typed.hparams["image_score"] == {"rule": "max", "window": 16, "k": 100}
    torch.save({"hyper_parameters": dict(typed.hparams)}, tmp_path / "hparams.pt")
    stored = torch.load(tmp_path / "hparams.pt", weights_only=True)["hyper_parameters"]["image_score"]
    assert HRPatchCore(**options, image_score=stored).image_score == ImageScore("max")


def test_config_settings_of_the_image_score_are_checked_with_the_closest_name() -> None:
    given = validate_options(HRPatchCore, {"image_score": {"rule": "topk_mean", "k": 100}}, "detector")
    assert given == {"image_score": {"rule": "topk_mean", "k": 100}}
    with pytest.raises(ValueError, match="no option 'image_scor' \\(did you mean 'image_score'\\?\\)"):
        validate_options(HRPatchCore, {"image_scor": {"rule": "max"}}, "detector")
    with pytest.raises(ValueError, match="option 'image_score' has no setting 'rul' \\(did you mean 'rule'\\?\\)"):
        validate_options(HRPatchCore, {"image_score": {"rul": "max"}}, "detector")
    with pytest.raises(ValueError, match="option 'image_score': unknown image-score rule 'topk' \\(did you mean 'topk_mean'\\?\\)"):
        validate_options(HRPatchCore, {"image_score": {"rule": "topk"}}, "detector")


def rule_ranked_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """Normal patches with one hot pixel, anomalous ones with a broad warm area: the window mean ranks
    the anomalies first, the maximum ranks the normal patches first."""
    maps = torch.zeros(4, 32, 32)
    maps[:2, 5, 5] = 10.0
    maps[2:, 8:24, 8:24] = 1.0
    return maps, torch.tensor([0, 0, 1, 1])


def test_validation_scores_patches_by_the_detectors_rule() -> None:
    maps, labels = rule_ranked_maps()
    masks = torch.zeros(4, 32, 32)
    selector = ValidationSelector([metrics.compute_imagewise_metrics])
    assert selector.evaluate(maps, masks, labels)["image_auroc"] == 1.0
    assert selector.evaluate(maps, masks, labels, ImageScore("max"))["image_auroc"] == 0.0

    logged: dict[str, float] = {}
    for rule, auroc in ((ImageScore("window_max"), 1.0), (ImageScore("max"), 0.0)):
        # a real detector: the selector reads its typed rule (a module without one validates by the default)
        module = HRFastFlow(backbone_name="resnet18", layers_to_extract_from=["layer1"], weights="none", input_size=32,
                            flow_steps=1, image_score=rule)
        module.log = lambda name, value, **_: logged.__setitem__(name, value)
        trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, state=SimpleNamespace(fn=TrainerFn.VALIDATING))
        selector.on_validation_epoch_start(trainer, module)
        selector.on_validation_batch_end(trainer, module, maps, SimpleNamespace(mask=masks, label=labels), 0)
        selector.on_validation_epoch_end(trainer, module)
        assert logged["val/image_auroc"] == auroc, rule


def scores_of(folder: Path) -> dict[str, tuple[float, str]]:
    """``image -> (score, map file)`` of a ``scores.csv``."""
    lines = (folder / "scores.csv").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("image,"))
    return {row["image"]: (float(row["score"]), row["map"]) for row in csv.DictReader(lines[start:])}


def test_a_config_override_reaches_the_pipeline_the_export_and_the_predictor(small_demo: Path, tmp_path: Path) -> None:
    from hiad_pl.cli import main
    from hiad_pl.engine.runs import load_run

    run_dir = tmp_path / "run"
    options = dict(PATCHCORE_TEST_CONFIG, image_score={"rule": "topk_mean", "k": 50})
    config = {
        "run_dir": str(run_dir),
        "data": {"root": str(small_demo), "categories": ["texture"], "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "batch_size": 8},
        "detector": {"class_path": "hiad_pl.detectors.HRPatchCore", "init_args": options},
        "tasks": {"class_path": "hiad_pl.tasks.A2OTaskGenerator"},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "run.yaml")]) == 0
    rule = ImageScore("topk_mean", k=50)
    assert load_run(run_dir, None, ["cpu"]).orchestrator.pipeline("cpu").image_score == rule

    images = [str(small_demo / "texture" / "test" / name) for name in ("good/000.png", "scratch/000.png")]
    assert main(["predict", "--run_dir", str(run_dir), "--input", *images, "--output", str(tmp_path / "from_run")]) == 0
    from_run = scores_of(tmp_path / "from_run")
    for score, map_file in from_run.values():
        anomaly_map = np.load(tmp_path / "from_run" / map_file.replace("_map.png", "_map.npy"))
        assert score == pytest.approx(float(rule(torch.from_numpy(anomaly_map))), rel=1e-5)
        # the default rule would give another score: the override is what scored the image
        assert score != pytest.approx(float(image_score(torch.from_numpy(anomaly_map))), rel=1e-3)

    export = tmp_path / "export"
    assert main(["export", "--run_dir", str(run_dir), "--format", "onnx", "--output", str(export)]) == 0
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["postprocess"]["image_score"] == rule.todict()
    assert main(["predict", "--export", str(export), "--input", *images, "--output", str(tmp_path / "from_export")]) == 0
    from_export = scores_of(tmp_path / "from_export")
    assert from_export.keys() == from_run.keys()
    for name, (score, _) in from_export.items():
        assert score == pytest.approx(from_run[name][0], rel=1e-5, abs=1e-4), name


def test_the_predictor_reads_version_1_exports_as_the_window_mean_and_names_bad_rules() -> None:
    assert predictor.image_score_settings({"score_window": 16}, 1) == {"rule": "window_max", "window": 16}
    assert predictor.image_score_settings({"image_score": {"rule": "max"}}, 2) == {"rule": "max"}
    with pytest.raises(ValueError, match="unknown image-score rule 'median'"):
        predictor.image_score_settings({"image_score": {"rule": "median"}}, 2)
    with pytest.raises(ValueError, match="topk_mean needs an integer k >= 1"):
        predictor.image_score_settings({"image_score": {"rule": "topk_mean"}}, 2)
