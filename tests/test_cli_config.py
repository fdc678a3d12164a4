"""The typed CLI as a new user meets it: overrides, typos, help, one-value lists, loggers and callbacks."""

from __future__ import annotations

import inspect
from pathlib import Path

import docstring_parser
import lightning as L
import numpy as np
import pytest
import yaml

from conftest import PATCHCORE_TEST_CONFIG
from hiad_pl.cli import main
from hiad_pl.config import RunConfig
from hiad_pl.detectors import HRPatchCore
from hiad_pl.trainer import HRTrainer
from hiad_pl.utils import metrics

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "patchcore_quickstart.yaml")


def parse_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    assert stop.value.code == 2
    return capsys.readouterr().err


def printed(capsys: pytest.CaptureFixture, *args: str) -> dict:
    with pytest.raises(SystemExit) as stop:
        main([*args, "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_an_override_of_a_detector_option_reaches_the_detector(capsys: pytest.CaptureFixture) -> None:
    config = printed(capsys, "fit", "--config", QUICKSTART, "--detector.init_args.percentage", "0.05")
    assert config["detector"]["init_args"]["percentage"] == 0.05
    assert "percentage" not in config
    short = printed(capsys, "fit", "--config", QUICKSTART, "--detector.percentage", "0.07")
    assert short["detector"]["init_args"]["percentage"] == 0.07


@pytest.mark.parametrize(
    "args, valid",
    [
        (["--detector.init_args.percentag", "0.05"], "did you mean 'percentage'?"),
        (["--tasks.init_args.num_group_width", "2"], "did you mean 'num_groups_width'?"),
        (["--trainer", "{max_epoch: 2}"], "did you mean 'max_epochs'?"),
        (["--trainer.max_epoch", "2"], "did you mean 'max_epochs'?"),
        (["--data.batchsize", "2"], "did you mean 'batch_size'?"),
        (["--validation.val_sample_ration", "0.2"], "did you mean 'val_sample_ratio'?"),
    ],
    ids=["detector", "tasks", "trainer-dict", "trainer-flag", "data", "validation"],
)
def test_a_misspelt_option_stops_the_parse_naming_the_valid_ones(capsys, args: list[str], valid: str) -> None:
    err = parse_error(capsys, "fit", "--config", QUICKSTART, "--data.root", "/no/such/data", *args)
    assert valid in err and "valid options" in err
    assert "/no/such/data" not in err  # refused before any data is looked at


def test_a_misspelt_thumbnail_option_fails_before_any_data_is_read(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code = main(["fit", "--config", QUICKSTART, "--data.root", "/no/such/data", "--run_dir", str(tmp_path / "run"),
                 "--thumbnail.thumbnail_size", "256", "--thumbnail.init_args", "{percentag: 0.2}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "thumbnail.init_args: HRPatchCore has no option 'percentag' (did you mean 'percentage'?)" in err
    assert "/no/such/data" not in err and not (tmp_path / "run").exists()


def test_fit_help_documents_detector_tasks_and_trainer_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for option in ("--detector.help", "--tasks.help", "--data.patch_size", "--thumbnail.thumbnail_size",
                   "--validation.anomaly_syn_fn", "--trainer.max_epochs", "--trainer.logger", "--trainer.callbacks"):
        assert option in out
    assert "hiad_pl.detectors.HRPaDiM" in out  # the known detectors are listed
    from hiad_pl.cli import build_parser

    fit = build_parser()._subcommands_action._name_parser_map["fit"]
    undocumented = [a.dest for a in fit._actions if a.help in (None, "") and a.dest not in ("help", "config")]
    assert undocumented == []


def test_detector_help_lists_every_option_with_its_docstring(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--detector.help", "HRPatchCore"])
    out = " ".join(capsys.readouterr().out.split())
    documented = {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse(HRPatchCore.__doc__).params}
    for name in inspect.signature(HRPatchCore).parameters:
        assert f"--detector.{name} " in out
        assert documented[name][:30] in out


def test_list_options_accept_one_value(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    config = printed(capsys, "fit", "--config", QUICKSTART, "--data.categories", "texture", "--devices", "cpu")
    assert config["data"]["categories"] == "texture" and config["devices"] == "cpu"
    run = RunConfig.from_dict(config)
    assert run.data.categories == ["texture"] and run.devices == ["cpu"]
    assert main(["demo-data", "--root", str(tmp_path), "--categories", "texture", "--image_size", "256"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["texture"]


def test_hrtrainer_takes_vis_root_none(small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hiad_pl.trainer as trainer_module
    from hiad_pl.data.discovery import discover

    (split,) = discover(small_demo, categories=["texture"], image_size=512)
    trainer = HRTrainer(detector_class=HRPatchCore, config={"patch": {**PATCHCORE_TEST_CONFIG, "patch_size": 256}},
                        checkpoint_root=tmp_path / "models", log_root=tmp_path / "logs", vis_root=None)
    labels = np.array([s.label for s in split.test], dtype=float)
    maps = [np.full((512, 512), label, dtype=np.float32) for label in labels]
    monkeypatch.setattr(type(trainer.orchestrator()), "load", lambda self, device="cpu": None)
    monkeypatch.setattr(trainer_module, "run_inference", lambda orchestrator, samples, device, launcher=None: (labels, maps))
    results = trainer.inference(split.test, evaluators=[metrics.compute_imagewise_metrics])
    assert results["texture"]["image_auroc"] == 1.0
    assert not any(p.suffix == ".png" for p in tmp_path.rglob("*"))  # no visualisation written


def test_tutorial_evaluators_take_the_masks_alone_and_report_hiads_keys() -> None:
    rng = np.random.default_rng(0)
    gt = [np.zeros((32, 32), dtype=np.uint8) for _ in range(3)]
    gt[1][4:12, 4:12] = 1
    gt[2][20:28, 10:20] = 1
    maps = [g + 0.1 * rng.random(g.shape) for g in gt]
    pixel = metrics.compute_pixelwise_metrics(prediction_masks=maps, gt_masks=gt)
    assert pixel["pixel_auroc"] == pytest.approx(1.0)
    pro = metrics.compute_pro(prediction_masks=maps, gt_masks=gt)
    assert pro["pixel_pro"] == pro["pro"] == pytest.approx(1.0, abs=1e-3)
    image = metrics.compute_imagewise_metrics(prediction_scores=[0.1, 0.9, 0.8], gt_labels=[0, 1, 1])
    assert image["image_auroc"] == 1.0


class CountFits(L.Callback):
    """A user callback that writes one line per fit it sees into ``folder``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.fits = 0

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fits += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{id(self)}.txt").write_text(f"{self.fits} {trainer.logger.name}\n")


def test_mlflow_file_store_and_user_callbacks_from_yaml_get_one_run_per_task(
    small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # recent MLflow asks for it to use a local mlruns/ folder
    store = f"file:{tmp_path / 'mlruns'}"
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {"root": str(small_demo), "categories": "texture", "image_size": 512, "patch_size": 256, "batch_size": 4},
        "detector": {"class_path": "hiad_pl.detectors.HRPatchCore", "init_args": dict(PATCHCORE_TEST_CONFIG)},
        "tasks": {"class_path": "hiad_pl.tasks.NeighborhoodTaskGenerator", "init_args": {"num_groups_width": 2, "num_groups_height": 1}},
        "validation": {"anomaly_syn_fn": {"class_path": "hiad_pl.syn.RandomBoxSynthesizer", "init_args": {"p": 1.0}},
                       "val_sample_ratio": 0.25},
        "trainer": {
            "logger": [{"class_path": "lightning.pytorch.loggers.MLFlowLogger",
                        "init_args": {"experiment_name": "hiad", "tracking_uri": store}},
                       {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}}],
            "callbacks": [{"class_path": "test_cli_config.CountFits", "init_args": {"folder": str(tmp_path / "fits")}}],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("hiad").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["task_0", "task_1"]
    for run in runs:
        assert 0.5 < run.data.metrics["val/pixel_auroc"] <= 1.0  # per-task validation metrics reach the store
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["task_0", "task_1"]
    assert (tmp_path / "csv" / "task_0" / "metrics.csv").is_file()
    assert not (tmp_path / "run" / "texture" / "tensorboard").exists()  # the configured loggers replace the default
    counts = sorted(p.read_text().split()[0] for p in (tmp_path / "fits").iterdir())
    assert counts == ["1", "1"]  # a fresh callback for every task, appended to hiad-pl's own


def test_loggers_are_fresh_per_task_with_the_task_as_their_run(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from hiad_pl.config import task_loggers

    (default,) = task_loggers(None, "task_3", tmp_path, tmp_path / "tensorboard")
    assert isinstance(default, TensorBoardLogger) and Path(default.log_dir) == tmp_path / "tensorboard" / "task_3"
    spec = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}}
    first, second = (task_loggers(spec, name, tmp_path, tmp_path / "tb")[0] for name in ("task_0", "task_1"))
    assert isinstance(first, CSVLogger) and first is not second
    assert [Path(lg.log_dir) for lg in (first, second)] == [tmp_path / "csv" / "task_0", tmp_path / "csv" / "task_1"]
    assert task_loggers(False, "task_0", tmp_path, tmp_path / "tb") is False
    with pytest.raises(ValueError, match="one is built for every task"):
        task_loggers(CSVLogger(str(tmp_path)), "task_0", tmp_path, tmp_path / "tb")
