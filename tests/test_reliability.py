"""Runs that never lie: image-label-only test sets, refits with changed settings, signals, checkpoint names."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_config
from hiad_pl.cli import main, rerun_command


def label_only_copy(small_demo: Path, tmp_path: Path) -> Path:
    """The demo's texture category without any mask (defective test images known by their label only)."""
    root = tmp_path / "labels_only"
    shutil.copytree(small_demo / "texture", root / "texture")
    shutil.rmtree(root / "texture" / "ground_truth")
    return root


def test_a_label_only_set_fits_and_tests_with_pixel_metrics_skipped(small_demo: Path, tmp_path: Path, caplog, capsys) -> None:
    root = label_only_copy(small_demo, tmp_path)
    broken = root / "texture" / "test" / "spot" / "zz_unreadable.png"
    broken.write_bytes(b"not an image")  # fit never opens the test set
    config = write_config(tmp_path, root)
    assert main(["fit", "--config", str(config)]) == 0, capsys.readouterr().err
    broken.unlink()
    with caplog.at_level(logging.INFO, logger="hiad_pl"):
        assert main(["test", "--config", str(config)]) == 0, capsys.readouterr().err
    defects = len(list((root / "texture" / "test").glob("[!g]*/*.png")))
    line = f"texture: pixel metrics skipped: {defects} of {defects} defective test images have no mask (image labels only)"
    assert [r.getMessage() for r in caplog.records if "pixel metrics" in r.getMessage()] == [line]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["metrics"]["texture"]["image_auroc"] >= 0.9  # image metrics on every image
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1", "pro"):
        assert saved["metrics"]["texture"][key] is None  # no fake zeros
        assert saved["notes"]["texture"][key] == line.removeprefix("texture: ")
    assert saved["pixel_ground_truth"]["texture"]["pixel_metrics"] == "skipped"


def test_a_refit_with_other_settings_is_refused_naming_them_unless_asked(small_demo: Path, tmp_path: Path, capsys) -> None:
    from conftest import PATCHCORE_TEST_CONFIG

    config = write_config(tmp_path, small_demo)
    run = tmp_path / "run"
    final = run / "texture" / "checkpoints" / "task_0.ckpt"
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["test", "--config", str(config)]) == 0
    fitted, saved_config = final.stat().st_mtime_ns, (run / "config.yaml").read_text()
    capsys.readouterr()

    changed = ["fit", "--config", str(config), "--detector.init_args.percentage", "0.2", "--tasks.init_args.num_groups_width", "1"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "was fitted with other settings" in err and "--refit true" in err
    assert "detector.init_args.percentage: 0.1 -> 0.2" in err and "tasks.init_args.num_groups_width: 2 -> 1" in err
    assert final.stat().st_mtime_ns == fitted and (run / "config.yaml").read_text() == saved_config

    # settings that do not change the models resume (nothing to fit: the final checkpoints are kept)
    same = ["fit", "--config", str(config), "--data.num_workers", "1", "--trainer.logger", "false", "--devices", "cpu"]
    assert main(same) == 0 and final.stat().st_mtime_ns == fitted

    assert main([*changed, "--refit", "true"]) == 0
    hparams = torch.load(final, weights_only=True)["hyper_parameters"]
    assert hparams["percentage"] == 0.2 and PATCHCORE_TEST_CONFIG["percentage"] == 0.1
    assert not (run / "metrics.json").exists() and not (run / "visualizations" / "texture").exists()  # old results gone
    assert not list((run / "texture").glob(".discarded-*"))
    assert "refit" not in yaml.safe_load((run / "config.yaml").read_text())
    assert main(changed) == 0  # the refitted folder now resumes with its new settings


def test_the_rerun_command_drops_refit_and_resume() -> None:
    assert rerun_command(["fit", "--config", "a b.yaml", "--refit", "true", "--resume=false", "--seed", "1"]) == (
        "hiad-pl fit --config 'a b.yaml' --seed 1"
    )
    assert rerun_command(["fit", "--config", "c.yaml"], refit_in_config=True) == "hiad-pl fit --config c.yaml --refit false"


FASTFLOW = {
    "class_path": "hiad_pl.detectors.HRFastFlow",
    "init_args": {"backbone_name": "resnet18", "layers_to_extract_from": ["layer1"], "weights": "none", "flow_steps": 1},
}
EPOCHS = 4


def slow_fastflow_config(tmp_path: Path, root: Path) -> Path:
    """FastFlow (random-init backbone) on the texture images at 256 px: one step an epoch, about a second."""
    data = {"root": str(root), "categories": ["texture"], "image_size": 256, "patch_size": 256, "batch_size": 4}
    return write_config(
        tmp_path, root, data=data, detector=FASTFLOW, tasks={"class_path": "hiad_pl.tasks.A2OTaskGenerator"},
        trainer={"max_epochs": EPOCHS},
    )


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_fit_with_its_status_and_the_rerun_resumes(
    small_demo: Path, tmp_path: Path, signum: int, status: int, caplog, monkeypatch
) -> None:
    import sys

    config = slow_fastflow_config(tmp_path, small_demo)
    epochs = tmp_path / "run" / "texture" / "checkpoints" / "task_0"
    args = ["--verbose", "true", "fit", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "import sys; from hiad_pl.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (epochs / "last.ckpt").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no epoch checkpoint within 300 s"
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == status, err
    stopped = [line for line in err.splitlines() if "stopped by" in line]
    assert stopped == [
        f"hiad-pl fit: stopped by {signal.Signals(signum).name}; the fitted tasks and the last epoch checkpoints "
        f"are kept; resume with: hiad-pl --verbose true fit --config {config}"
    ], err
    assert "💡" not in err and "litlogger" not in err  # Lightning's advertising tip is silenced
    kept = torch.load(epochs / "last.ckpt", weights_only=True)["epoch"]
    assert kept < EPOCHS - 1 and not (epochs.parent / "task_0.ckpt").exists()

    import lightning

    resumed_from: list[str | None] = []
    original = lightning.Trainer.fit

    def spy(self, *a, ckpt_path=None, **k):
        resumed_from.append(ckpt_path)
        return original(self, *a, ckpt_path=ckpt_path, **k)

    monkeypatch.setattr(lightning.Trainer, "fit", spy)
    with caplog.at_level(logging.INFO, logger="hiad_pl"):
        assert main(["fit", "--config", str(config)]) == 0
    assert resumed_from == [str(epochs / "last.ckpt")]  # continued, not restarted from epoch 0
    assert torch.load(epochs.parent / "task_0.ckpt", weights_only=True)["epoch"] == EPOCHS
    assert sorted(p.name for p in epochs.glob("*.ckpt")) == [f"epoch={EPOCHS - 1:03d}.ckpt", "last.ckpt"]


@pytest.mark.parametrize("command, signum, status", [("test", signal.SIGTERM, 143), ("predict", signal.SIGINT, 130)])
def test_test_and_predict_stopped_by_a_signal_exit_non_zero(
    tmp_path: Path, monkeypatch, capsys, command: str, signum: int, status: int
) -> None:
    from hiad_pl import commands

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler interrupts the sleep
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(commands, command, signalled)
    if command == "test":
        args = ["test", "--config", str(write_config(tmp_path, tmp_path))]
    else:
        args = ["predict", "--run_dir", str(tmp_path), "--input", str(tmp_path), "--output", str(tmp_path / "out")]
    previous = signal.getsignal(signum)
    assert main(args) == status
    assert signal.getsignal(signum) is previous  # the handlers are restored
    err = capsys.readouterr().err
    assert f"hiad-pl {command}: stopped by {signal.Signals(signum).name}; rerun with: hiad-pl {command} " in err


def test_epoch_checkpoints_are_named_epoch_nnn_and_old_named_folders_resume(small_demo: Path, tmp_path: Path, monkeypatch) -> None:
    import errno

    from lightning.pytorch.callbacks import ModelCheckpoint

    from hiad_pl.engine import task_trainer

    config = slow_fastflow_config(tmp_path, small_demo)
    config.write_text(config.read_text().replace(f"max_epochs: {EPOCHS}", "max_epochs: 3"))
    epochs = tmp_path / "run" / "texture" / "checkpoints" / "task_0"

    def old_naming(dirpath, validated):  # the previous release's callback
        return ModelCheckpoint(dirpath=dirpath, filename="epoch{epoch:03d}", save_last=True, save_top_k=1)

    monkeypatch.setattr(task_trainer, "epoch_checkpoint", old_naming)
    original, calls = torch.save, []

    def fail_in_epoch_two(obj, target, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_in_epoch_two)
    assert main(["fit", "--config", str(config)]) == 2
    assert sorted(p.name for p in epochs.glob("*.ckpt")) == ["epochepoch=000.ckpt", "last.ckpt"]
    monkeypatch.undo()
    assert main(["fit", "--config", str(config)]) == 0
    assert torch.load(epochs.parent / "task_0.ckpt", weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in epochs.glob("*.ckpt")) == ["epoch=002.ckpt", "last.ckpt"]  # the old name is gone


def test_lightning_tips_are_dropped_and_its_other_messages_kept() -> None:
    import lightning

    from hiad_pl.orchestrator import quiet_lightning_tips

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        quiet_lightning_tips()
        quiet_lightning_tips()  # once is enough; twice adds nothing
        lightning.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any("GPU available" in r for r in records)
    assert not any("Tip" in r for r in records), records
