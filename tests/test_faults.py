"""Faults lose nothing: atomic writes, full disks, corrupt checkpoints, a locked run folder."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from hiad_pl.errors import WriteError
from hiad_pl.run_folder import atomic_write


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_every_run_file_gets_the_same_mode_from_the_umask(tmp_path: Path, umask_022) -> None:
    import numpy as np

    from hiad_pl.checkpoint_io import AtomicCheckpointIO
    from hiad_pl.metrics import save_report
    from hiad_pl.outputs import write_scores_csv
    from hiad_pl.tasks.base import Task, save_tasks
    from hiad_pl.visualize import save_png

    save_tasks([Task("task_0")], tmp_path / "tasks.json")
    save_report({"texture": {"image_auroc": 1.0}}, tmp_path)
    row = {"image": "a.png", "score": "0.5", "map": "a_map.png", "map_min": "0", "map_max": "1"}
    write_scores_csv([row], tmp_path / "scores.csv", True)
    save_png(np.zeros((4, 4, 3), dtype=np.uint8), tmp_path / "panel.png")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "checkpoints" / "task_0.ckpt")
    written = {p.name: mode_of(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert set(written) == {"tasks.json", "metrics.json", "metrics.md", "scores.csv", "panel.png", "task_0.ckpt"}
    assert set(written.values()) == {0o644}, written
    os.umask(0o077)
    save_tasks([Task("task_1")], tmp_path / "tasks.json")
    assert mode_of(tmp_path / "tasks.json") == 0o600  # the umask is honoured, not overridden


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_a_report_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    from hiad_pl.metrics import save_report

    json_path, _ = save_report({"texture": {"image_auroc": 0.75}}, tmp_path)
    before = json_path.read_bytes()
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(WriteError, match=r"metrics.json: cannot write \(No space left on device\)"):
        save_report({"texture": {"image_auroc": 0.5}}, tmp_path)
    assert json_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "metrics.md"]  # no temporary file left


def test_atomic_write_replaces_whole_files_only(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.txt"
    atomic_write(target, "old")

    def half_then_fail(stream) -> None:
        stream.write(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["file.txt"]
    atomic_write(target, b"new")
    assert target.read_text() == "new"


HOLD_LOCK = """
import sys, time
from hiad_pl.engine.run_folder import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_run_folder_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(small_demo: Path, tmp_path: Path, capsys) -> None:
    import signal
    import socket
    import subprocess
    import sys

    from conftest import write_config
    from hiad_pl.cli import main
    from hiad_pl.engine.run_folder import LOCK_NAME, run_folder_lock

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["fit", "--config", str(write_config(tmp_path, small_demo))]) == 2
        err = capsys.readouterr().err
        assert f"{run} is in use by process {holder.pid} on {socket.gethostname()}" in err and LOCK_NAME in err
        assert not (run / "config.yaml").exists()  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert f'"pid": {holder.pid}' in (run / LOCK_NAME).read_text()  # a kill -9 leaves the lock file behind
    with run_folder_lock(run):  # ... and the next process takes it over
        assert f'"pid": {os.getpid()}' in (run / LOCK_NAME).read_text()
        with run_folder_lock(run):  # the holder may lock the same folder again (orchestrator inside the CLI)
            pass
    assert (run / LOCK_NAME).read_text() == ""


FASTFLOW = {
    "class_path": "hiad_pl.detectors.HRFastFlow",
    "init_args": {"backbone_name": "resnet18", "layers_to_extract_from": ["layer1"], "weights": "none", "flow_steps": 1},
}


def fastflow_config(tmp_path: Path, root: Path, epochs: int, validation: dict | None = None) -> Path:
    """A CLI config: FastFlow (random-init backbone) on the texture images at 256 px, one task, ``epochs`` epochs."""
    from conftest import write_config

    data = {"root": str(root), "categories": ["texture"], "image_size": 256, "patch_size": 256, "batch_size": 4}
    extra = {} if validation is None else {"validation": validation}
    return write_config(
        tmp_path, root, data=data, detector=FASTFLOW, tasks={"class_path": "hiad_pl.tasks.A2OTaskGenerator"},
        trainer={"max_epochs": epochs}, **extra,
    )


def cli_process(*args: str, inject: str = "pass") -> list[str]:
    """The command line of a ``hiad-pl`` subprocess, with ``inject`` (Python) run first."""
    import sys

    code = f"import sys; {inject}; from hiad_pl.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def cli_env(script: Path | None = None) -> dict[str, str]:
    import sys

    from faults_support import SCRIPT_ENV

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if script is not None:
        env[SCRIPT_ENV] = str(script)
    return env


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def selector_state(path: Path) -> dict:
    checkpoint = torch.load(path, weights_only=True)
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ValidationSelector"))


SCRIPTED_VALIDATION = {
    "anomaly_syn_fn": {"class_path": "hiad_pl.syn.RandomBoxSynthesizer", "init_args": {"p": 0.5, "seed": 0}},
    "val_sample_ratio": 0.5,
    "evaluators": ["faults_support.scripted_auroc"],
}


def assert_resumed_with_the_best_epoch_of_before(epochs: Path, best_before: dict[str, torch.Tensor], script: Path) -> None:
    """The final checkpoint holds epoch 2's weights (the best, validated before the interruption)."""
    final = epochs.parent / "task_0.ckpt"
    assert selector_state(final)["best_epoch"] == 2 and selector_state(final)["best_score"] == pytest.approx(0.9)
    kept, last = state_of(final), state_of(epochs / "last.ckpt")
    assert kept.keys() == best_before.keys()
    assert all(torch.equal(kept[k], best_before[k]) for k in kept)  # the weights after epoch 2, from before the stop
    assert any(not torch.equal(kept[k], last[k]) for k in kept)  # not those of the last epoch
    assert int(script.with_suffix(".count").read_text()) == 5  # resumed: epochs 3 and 4 validated after the stop


def best_weights_before(epochs: Path) -> dict[str, torch.Tensor]:
    """Epoch 2's weights, from its best-epoch checkpoint, as the interrupted run left them."""
    assert selector_state(epochs / "last.ckpt")["best_epoch"] == 2
    assert not (epochs.parent / "task_0.ckpt").exists()
    return state_of(epochs / "best-epoch001.ckpt")


def test_crash_during_a_validated_fit_then_rerun_keeps_the_best_epoch_of_before(
    small_demo: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from faults_support import SCRIPT_ENV
    from hiad_pl.cli import main

    script = tmp_path / "scores.txt"
    script.write_text("0.5\n0.9\ncrash\n0.6\n0.7\n")  # epoch 2 is the best; epoch 3's validation fails
    monkeypatch.setenv(SCRIPT_ENV, str(script))
    config = fastflow_config(tmp_path, small_demo, epochs=4, validation=SCRIPTED_VALIDATION)
    epochs = tmp_path / "run" / "texture" / "checkpoints" / "task_0"
    assert main(["fit", "--config", str(config)]) == 1
    assert "internal error: RuntimeError: the validation crashed" in capsys.readouterr().err
    best_before = best_weights_before(epochs)
    assert main(["fit", "--config", str(config)]) == 0
    assert_resumed_with_the_best_epoch_of_before(epochs, best_before, script)


@pytest.mark.slow
def test_kill_during_a_validated_fit_then_rerun_keeps_the_best_epoch_of_before(small_demo: Path, tmp_path: Path) -> None:
    import signal
    import subprocess

    script = tmp_path / "scores.txt"
    script.write_text("0.5\n0.9\nhang\n0.6\n0.7\n")  # epoch 2 is the best; the kill comes in epoch 3's validation
    config = fastflow_config(tmp_path, small_demo, epochs=4, validation=SCRIPTED_VALIDATION)
    epochs = tmp_path / "run" / "texture" / "checkpoints" / "task_0"
    first = subprocess.Popen(cli_process("fit", "--config", str(config)), env=cli_env(script), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not script.with_suffix(".hang").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the fit never reached its third validation"
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    best_before = best_weights_before(epochs)
    rerun = subprocess.run(
        cli_process("--verbose", "true", "fit", "--config", str(config)),
        env=cli_env(script), capture_output=True, text=True, timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stderr and "kept the weights after epoch 2" in rerun.stderr
    assert_resumed_with_the_best_epoch_of_before(epochs, best_before, script)


@pytest.mark.slow  # the in-process disk-full test below covers the same writes and resume
def test_kill_while_a_checkpoint_is_written_keeps_the_previous_and_the_rerun_continues(small_demo: Path, tmp_path: Path) -> None:
    import subprocess

    config = fastflow_config(tmp_path, small_demo, epochs=3)
    epochs = tmp_path / "run" / "texture" / "checkpoints" / "task_0"
    inject = "import faults_support; faults_support.write_then_kill('last.ckpt', 2)"
    killed = subprocess.run(
        cli_process("fit", "--config", str(config), inject=inject), env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -9, killed.stderr
    previous = torch.load(epochs / "last.ckpt", weights_only=True)  # complete, as written after epoch 1
    assert previous["epoch"] == 0 and previous["global_step"] > 0  # Lightning counts the epoch in progress, from 0
    assert list(epochs.glob(".last.ckpt.*.tmp"))  # the half-written file never took the checkpoint's name

    rerun = subprocess.run(
        cli_process("--verbose", "true", "fit", "--config", str(config)),
        env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stderr
    final = torch.load(epochs.parent / "task_0.ckpt", weights_only=True)
    assert final["epoch"] == 3 and final["global_step"] == 3 * previous["global_step"]
    assert not list(epochs.glob(".*.tmp"))  # the rerun removed what the killed write left


def test_disk_full_while_writing_a_checkpoint_then_corrupt_checkpoint_is_named(
    small_demo: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from hiad_pl.cli import main

    config = fastflow_config(tmp_path, small_demo, epochs=2)
    epochs = tmp_path / "run" / "texture" / "checkpoints" / "task_0"
    original, calls = torch.save, []

    def save_until_full(obj, target, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # epoch 1's two checkpoints fit; the disk is full from epoch 2 on
            target.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot write (No space left on device); the previous file is unchanged" in err
    assert torch.load(epochs / "last.ckpt", weights_only=True)["epoch"] == 0  # epoch 1's, complete
    assert not list(epochs.parent.rglob("*.tmp"))
    (epochs / ".last.ckpt.x1y2.tmp").write_bytes(b"half")  # as a kill -9 in mid-write leaves it

    monkeypatch.setattr(torch, "save", original)
    assert main(["fit", "--config", str(config)]) == 0  # space freed: the rerun resumes and finishes
    final = epochs.parent / "task_0.ckpt"
    assert torch.load(final, weights_only=True)["epoch"] == 2
    assert not list(epochs.parent.rglob("*.tmp"))  # the rerun removed the killed write's temporary file
    capsys.readouterr()

    final.write_bytes(final.read_bytes()[:1000])  # a truncated copy, a broken disk ...
    spots = small_demo / "texture" / "test" / "spot"
    status = main(["predict", "--run_dir", str(tmp_path / "run"), "--input", str(spots), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"{final}: unreadable checkpoint" in err and "refit task 'task_0'" in err

    (epochs / "last.ckpt").write_bytes(b"not a checkpoint")
    final.unlink()
    assert main(["fit", "--config", str(config)]) == 2
    assert f"{epochs / 'last.ckpt'}: unreadable checkpoint" in capsys.readouterr().err


def test_retrieval_routing_is_computed_once_for_every_worker_and_rerun(small_demo: Path, tmp_path: Path, monkeypatch) -> None:
    import pickle

    from conftest import PATCHCORE_TEST_CONFIG
    from hiad_pl.data.discovery import discover
    from hiad_pl.data.tiling import MultiResolutionHRImageSpliter
    from hiad_pl.detectors import HRPatchCore
    from hiad_pl.engine import routing
    from hiad_pl.engine.launchers import LocalLauncher
    from hiad_pl.orchestrator import TaskOrchestrator
    from hiad_pl.tasks.base import Task

    (split,) = discover(small_demo, categories=["texture"], image_size=512)
    grid = MultiResolutionHRImageSpliter(512, 256)
    tasks = [Task(f"task_{k}", indexes=grid[2 * k : 2 * k + 2], centers=[[float(k)]]) for k in range(2)]
    calls: list[int] = []

    def route(detector, samples, patch_tasks, batch_size=8, top_k=None, context_margin=0):  # stands in for embedding
        calls.append(len(samples))
        count = len(samples) * len(grid)
        return list(grid), {t.name: [i for i in range(count) if i % len(patch_tasks) == k] for k, t in enumerate(patch_tasks)}

    monkeypatch.setattr(routing, "retrieval_train_items", route)
    dispatched: list[TaskOrchestrator] = []

    def dispatch(self, orchestrator, pending, samples, val_config):  # what the worker processes receive
        dispatched.extend(pickle.loads(pickle.dumps(orchestrator)) for _ in pending)

    monkeypatch.setattr(LocalLauncher, "fit", dispatch)
    config = {**PATCHCORE_TEST_CONFIG, "patch_size": 256}
    TaskOrchestrator(HRPatchCore, config, tasks, tmp_path).fit(split.train, devices=["cpu", "cpu"])
    assert calls == [len(split.train)] and len(dispatched) == 2
    for worker, task in zip(dispatched, tasks):
        _, items = worker.routed_items(None, task, split.train)
        assert items == route(None, split.train, tasks)[1][task.name]
    rerun = TaskOrchestrator(HRPatchCore, config, tasks, tmp_path)  # a new process on the same folder
    rerun.routed_items(None, tasks[0], split.train)
    assert len(calls) == 1 + 2  # the two reference calls above; the workers and the rerun embedded nothing
    assert len(list((tmp_path / "retrieval").glob("training-*.json"))) == 1
