"""The configs shipped in configs/ parse, and every class_path section names arguments its class takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hiad_pl.cli import main
from hiad_pl.jobs import check_arguments, instantiate
from hiad_pl.orchestrator import import_class
from hiad_pl.tasks.base import FeatureTaskGenerator

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_found() -> None:
    assert {"quickstart.yaml", "padim.yaml", "fastflow_patch.yaml", "retrieval_quickstart.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_parses_and_its_classes_take_its_arguments(path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(path), "--print_config"])
    assert stop.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["patch_size"] <= config["data"]["image_size"]
    detector = import_class(config["detector"]["class_path"])
    check_arguments(detector, {"input_size": config["data"]["patch_size"], **config["detector"]["init_args"]}, "detector")
    generator = import_class(config["tasks"]["class_path"])
    filled = {"detector_class": detector, "detector_config": {}} if issubclass(generator, FeatureTaskGenerator) else {}
    instantiate(config["tasks"], "tasks", **filled)  # generators only store their arguments: cheap to build
    if config.get("validation"):
        instantiate(config["validation"]["anomaly_syn_fn"], "validation.anomaly_syn_fn")


def test_a_misspelt_argument_is_named_with_its_section() -> None:
    spec = {"class_path": "hiad_pl.tasks.RetrieveTaskGenerator", "init_args": {"cluster_number": 4, "train_topk": 2}}
    with pytest.raises(ValueError, match=r"tasks: bad init_args for RetrieveTaskGenerator .*'train_topk'.*train_top_k"):
        instantiate(spec, "tasks", detector_class="patchcore")
