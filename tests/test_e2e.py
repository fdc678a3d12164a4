"""End to end: the tutorial's HRTrainer flow, the CLI round trip, resume, and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PATCHCORE_TEST_CONFIG, auroc, write_config
from hiad_pl.cli import main
from hiad_pl.data.discovery import discover
from hiad_pl.detectors import HRPatchCore
from hiad_pl.task import O2OTaskGenerator
from hiad_pl.trainer import HRTrainer
from hiad_pl.utils import metrics
from hiad_pl.utils.split_and_gather import MultiResolutionHRImageSpliter


def test_hrtrainer_tutorial_flow_o2o_separates_defects(small_demo: Path, tmp_path: Path, capsys) -> None:
    (split,) = discover(small_demo, categories=["texture"], image_size=512)
    indexes = MultiResolutionHRImageSpliter(image_size=512, patch_size=256)
    tasks = O2OTaskGenerator().create_tasks(split.train, indexes)
    config = {"patch": {**PATCHCORE_TEST_CONFIG, "patch_size": 256}}
    trainer = HRTrainer(
        batch_size=4,
        tasks=tasks,
        detector_class=HRPatchCore,
        config=config,
        checkpoint_root=tmp_path / "saved_models",
        log_root=tmp_path / "logs",
        vis_root=tmp_path / "vis",
    )
    trainer.train(train_samples=split.train, gpu_ids=[])
    out = capsys.readouterr().out
    assert "Start training, devices: ['cpu']" in out and "tasks.json" in out
    assert len(list((tmp_path / "saved_models" / "checkpoints").glob("task_*.ckpt"))) == 4

    scores, maps = trainer.inference(test_samples=split.test, return_results_only=True, gpu_ids=[])
    labels = np.array([s.label for s in split.test])
    assert len(maps) == len(split.test) and maps[0].shape == (512, 512)
    assert auroc(scores, labels) >= 0.9

    evaluators = [metrics.compute_imagewise_metrics, partial(metrics.compute_pixelwise_metrics_resize, resize=256)]
    results = trainer.inference(test_samples=split.test, evaluators=evaluators, gpu_ids=[])
    assert results["texture"]["image_auroc"] >= 0.9
    assert results["texture"]["pixel_auroc"] >= 0.8
    assert "|  clsname  |" in capsys.readouterr().out
    assert len(list((tmp_path / "vis" / "texture").glob("*.png"))) == len(split.test)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hiad_pl.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_fit_then_test_and_predict_in_new_processes(small_demo: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, small_demo)
    fit = run_cli("fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr
    run = tmp_path / "run"
    assert f"run folder: {run}" in fit.stdout
    assert (run / "config.yaml").is_file() and (run / "texture" / "tasks.json").is_file()
    checkpoints = sorted((run / "texture" / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in checkpoints] == ["task_0.ckpt", "task_1.ckpt"]
    assert (run / "texture" / "tensorboard" / "task_0").is_dir()

    test = run_cli("test", "--config", str(config))
    assert test.returncode == 0, test.stderr
    assert "image_auroc" in test.stdout and "pixel_auroc" in test.stdout and "pro" in test.stdout
    report = json.loads((run / "metrics.json").read_text())
    assert report["metrics"]["texture"]["image_auroc"] >= 0.9
    decisions = report["decisions"]["texture"]
    assert decisions["rule"] == "normal_fpr" and sum(decisions[k] for k in ("tp", "fp", "tn", "fn")) == 7  # 3 good, 4 defective
    assert decisions["tp"] + decisions["fn"] == 4 and decisions["pixel_f1"] is not None
    assert "Decisions at the run's thresholds" in (run / "metrics.md").read_text()
    assert list((run / "visualizations" / "texture").glob("*.png"))

    out = tmp_path / "pred"
    predict = run_cli("predict", "--run_dir", str(run), "--input", str(small_demo / "texture" / "test" / "spot"), "--output", str(out))
    assert predict.returncode == 0, predict.stderr
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("# scores: raw") and len(rows) == 3 + 1  # two comments, header, one spot image
    assert rows[1].startswith("# thresholds: image") and "normal_fpr" in rows[1]
    assert len(list(out.glob("*_map.png"))) == 1 and len(list(out.glob("*_map.npy"))) == 1
    assert len(list(out.glob("*_overlay.png"))) == 1 and len(list(out.glob("*_panel.png"))) == 1
    (row,) = csv.DictReader(rows[2:])
    thresholds = json.loads((run / "texture" / "thresholds.json").read_text())
    assert row["label"] == ("NG" if float(row["score"]) > thresholds["image"] else "OK")
    assert float(row["image_threshold"]) == pytest.approx(thresholds["image"], rel=1e-5)
    mask = np.asarray(Image.open(out / row["mask"]))
    assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}
    above = np.load(out / row["map"].replace(".png", ".npy")) > thresholds["pixel"]
    assert int(row["defect_pixels"]) == int((mask == 255).sum()) == int(above.sum())

    # a run fitted before thresholds existed: scores and maps, no label, no mask, one clear line
    (run / "texture" / "thresholds.json").unlink()
    spot = str(small_demo / "texture" / "test" / "spot")
    assert main(["predict", "--run_dir", str(run), "--input", spot, "--output", str(tmp_path / "old")]) == 0
    lines = (tmp_path / "old" / "scores.csv").read_text().splitlines()
    assert lines[1].startswith("# thresholds: no thresholds in this model")
    (old_row,) = csv.DictReader(lines[2:])
    assert old_row["label"] == "" and old_row["mask"] == "" and not list((tmp_path / "old").glob("*_mask.png"))
    assert float(old_row["score"]) == pytest.approx(float(row["score"]), abs=1e-5)
    assert main(["test", "--config", str(config), "--evaluation.vis_size", "0"]) == 0
    assert "no thresholds" in json.loads((run / "metrics.json").read_text())["decisions"]["texture"]["note"]


def test_rerun_skips_fitted_tasks(small_demo: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, small_demo)
    assert main(["fit", "--config", str(config)]) == 0
    first = tmp_path / "run" / "texture" / "checkpoints" / "task_0.ckpt"
    stamp = first.stat().st_mtime_ns
    (tmp_path / "run" / "texture" / "checkpoints" / "task_1.ckpt").unlink()
    assert main(["fit", "--config", str(config)]) == 0
    assert first.stat().st_mtime_ns == stamp
    assert (tmp_path / "run" / "texture" / "checkpoints" / "task_1.ckpt").is_file()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"data": {"root": "/no/such/folder"}}, "/no/such/folder: data set path not found"),
        ({"detector": {"class_path": "hiad_pl.detectors.HRPatchCore", "init_args": {"backbone_name": "resnet5000"}}}, "backbone_name"),
        (
            {"detector": {"class_path": "hiad_pl.detectors.HRPatchCore", "init_args": {"weights": "offline", "backbone_name": "resnet18"}}},
            "offline",
        ),
    ],
)
def test_bad_config_fails_before_training(small_demo: Path, tmp_path: Path, capsys, override, message) -> None:
    key, value = next(iter(override.items()))
    if key == "data":
        value = {"root": value["root"], "image_size": 512, "patch_size": 256}
    config = write_config(tmp_path, small_demo, **{key: value})
    assert main(["fit", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_hub_weights_offline_names_the_alternatives(small_demo: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Network is unreachable")
        return original(*args, **kwargs)

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    detector = {
        "class_path": "hiad_pl.detectors.HRPatchCore",
        "init_args": {"backbone_name": "resnet18", "weights": "hub", "layers_to_extract_from": ["layer2", "layer3"]},
    }
    config = write_config(tmp_path, small_demo, detector=detector)
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "weights" in err and "offline" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_two_cpu_worker_processes_fit_the_same_models(small_demo: Path, tmp_path: Path) -> None:
    from hiad_pl.orchestrator import TaskOrchestrator

    (split,) = discover(small_demo, categories=["texture"], image_size=512)
    tasks = O2OTaskGenerator().create_tasks(split.train, MultiResolutionHRImageSpliter(512, 256))
    config = {**PATCHCORE_TEST_CONFIG, "patch_size": 256}
    parallel = TaskOrchestrator(HRPatchCore, config, tasks, tmp_path / "parallel", batch_size=4)
    parallel.fit(split.train, devices=["cpu", "cpu"])
    serial = TaskOrchestrator(HRPatchCore, config, tasks, tmp_path / "serial", batch_size=4)
    serial.fit(split.train, devices=[])
    sample = split.test[-1:]
    (a,), (b,) = list(parallel.predict(sample)), list(serial.predict(sample))
    assert [p.name for p in sorted((tmp_path / "parallel" / "checkpoints").glob("*.ckpt"))] == [f"task_{k}.ckpt" for k in range(4)]
    np.testing.assert_allclose(a.anomaly_map.numpy(), b.anomaly_map.numpy(), rtol=1e-5, atol=1e-5)
