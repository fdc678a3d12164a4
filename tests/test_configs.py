"""Every file in configs/ is read both ways: with the CLI and with the tutorial's EasyDict recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from easydict import EasyDict

from hiad_pl.cli import main
from hiad_pl.config import DetectorConfig, RunConfig, detector_class_of, instantiate
from hiad_pl.detectors import HRFastFlow, HRPaDiM, HRPatchCore
from hiad_pl.detectors.base import HRDetector
from hiad_pl.trainer import HRTrainer

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TUTORIAL_FILES = {"patchcore": HRPatchCore, "padim": HRPaDiM, "fastflow_patch": HRFastFlow, "fastflow_thumbnail": HRFastFlow}


def by_name(name: str) -> Path:
    return next(p for p in CONFIGS if p.stem == name)


def print_config(capsys: pytest.CaptureFixture, *args: str) -> dict:
    with pytest.raises(SystemExit) as stop:
        main(["fit", *args, "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def tutorial_load(path: Path) -> EasyDict:
    with open(path) as f:
        return EasyDict(yaml.load(f, Loader=yaml.FullLoader))


def test_configs_are_found() -> None:
    names = {p.stem for p in CONFIGS}
    assert set(TUTORIAL_FILES) | {"patchcore_quickstart", "padim_quickstart", "fastflow_quickstart"} <= names
    assert "quickstart" not in names  # one naming: <detector>_quickstart


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_reads_the_same_with_the_cli_and_the_tutorial_recipe(path: Path, capsys: pytest.CaptureFixture) -> None:
    cli = RunConfig.from_dict(print_config(capsys, "--config", str(path), "--data.root", "/any/data"))
    assert issubclass(cli.detectors.detector_class, HRDetector)
    instantiate(cli.tasks, "tasks")  # generators only store their arguments: cheap to build

    raw = tutorial_load(path)
    named = raw.get("class_path") or raw["detector"]["class_path"]
    trainer = HRTrainer(detector_class=detector_class_of(named), config=EasyDict(patch=raw))
    tutorial = trainer.orchestrator().detectors
    assert tutorial.detector_class is cli.detectors.detector_class
    # the file's options, whichever way it is read, reach the detector with the same values
    assert tutorial.patch.options.items() <= cli.detectors.patch.options.items()
    assert tutorial.patch.trainer.items() <= cli.trainer.items()


@pytest.mark.parametrize("name", sorted(TUTORIAL_FILES))
def test_tutorial_files_keep_hiads_option_names_and_values(name: str) -> None:
    original = yaml.safe_load(by_name(name).read_text())
    cls = TUTORIAL_FILES[name]
    assert detector_class_of(original.pop("class_path")) is cls
    assert original["layers_to_extract_from"] == ["layer2", "layer3"]
    detectors = DetectorConfig.from_tutorial(cls, {"patch": original})
    assert detectors.patch.options["layers_to_extract_from"] == ["layer2", "layer3"]
    if cls is HRPatchCore:
        assert original == {"backbone_name": "wideresnet50", "layers_to_extract_from": ["layer2", "layer3"], "merge_size": 3,
                            "percentage": 0.1, "pretrain_embed_dimension": 1024, "target_embed_dimension": 1024}
    if cls is HRPaDiM:
        assert original["embed_dimension"] == 550 and detectors.patch.options["d_reduced"] == 550
    if cls is HRFastFlow:
        assert original["flow_step"] == 8 and detectors.patch.options["flow_steps"] == 8
        assert detectors.patch.options["epochs"] == original["num_epochs"] == (300 if name == "fastflow_patch" else 500)
        assert detectors.patch.options["lr"] == pytest.approx(1e-3)  # PyYAML reads 1e-3 as a string; typed to float
        assert detectors.patch.trainer == {"val_check_interval": 100, "check_val_every_n_epoch": None, "log_every_n_steps": 10}


def test_tutorial_thumbnail_recipe_adds_the_low_resolution_task() -> None:
    patch_config = tutorial_load(by_name("fastflow_patch"))
    thumbnail_config = tutorial_load(by_name("fastflow_thumbnail"))
    thumbnail_config.thumbnail_size = 256
    config = EasyDict(patch=patch_config, thumbnail=thumbnail_config)
    orchestrator = HRTrainer(detector_class=HRFastFlow, config=config).orchestrator()
    assert [t.thumbnail_size for t in orchestrator.tasks if t.is_thumbnail] == [(256, 256)]
    assert orchestrator.detectors.patch.options["epochs"] == 300
    assert orchestrator.detectors.thumbnail.options["epochs"] == 500


def test_cli_reads_the_thumbnail_file_as_the_thumbnail_branch(capsys: pytest.CaptureFixture) -> None:
    config = print_config(
        capsys, "--config", str(by_name("fastflow_patch")), "--thumbnail.thumbnail_size", "256",
        "--thumbnail.init_args", str(by_name("fastflow_thumbnail")),
    )
    detectors = RunConfig.from_dict(config).detectors
    assert config["detector"]["init_args"]["flow_steps"] == 8 and config["trainer"]["val_check_interval"] == 100
    assert detectors.patch.options["epochs"] == 300 and detectors.thumbnail.options["epochs"] == 500
    assert detectors.thumbnail.size == 256


def test_a_misspelt_argument_is_named_with_its_section() -> None:
    spec = {"class_path": "hiad_pl.tasks.RetrieveTaskGenerator", "init_args": {"cluster_number": 4, "train_topk": 2}}
    with pytest.raises(ValueError, match=r"tasks: bad init_args for RetrieveTaskGenerator .*'train_topk'.*train_top_k"):
        instantiate(spec, "tasks", detector_class="patchcore")


def test_a_misspelt_tutorial_option_names_the_valid_ones() -> None:
    expected = r"config\['patch'\]: HRPatchCore has no option 'percentag' \(did you mean 'percentage'\?\); valid options: "
    with pytest.raises(ValueError, match=expected + ".*merge_size"):
        HRTrainer(detector_class=HRPatchCore, config={"patch": {"percentag": 0.1, "patch_size": 256}}).orchestrator()


def test_makefile_readme_and_benchmarks_name_configs_that_exist() -> None:
    import re

    project = CONFIGS[0].parents[1]
    named = set()
    docs = ["Makefile", "README.md", "benchmarks/demo_results.py", *(str(p.relative_to(project)) for p in (project / "docs").glob("*.md"))]
    for doc in docs:
        named |= set(re.findall(r"configs/([\w.]+\.yaml)", (project / doc).read_text()))
    assert "patchcore_quickstart.yaml" in named
    assert named <= {p.name for p in CONFIGS}
