"""Faults lose nothing: atomic writes, full disks, corrupt checkpoints, a locked run folder."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from hiad_pl.errors import WriteError
from hiad_pl.io import atomic_write


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_every_run_file_gets_the_same_mode_from_the_umask(tmp_path: Path, umask_022) -> None:
    from hiad_pl.engine import write_scores_csv
    from hiad_pl.io import AtomicCheckpointIO
    from hiad_pl.metrics import save_report
    from hiad_pl.tasks.base import Task, save_tasks
    from hiad_pl.visualize import save_png
    import numpy as np

    save_tasks([Task("task_0")], tmp_path / "tasks.json")
    save_report({"texture": {"image_auroc": 1.0}}, tmp_path)
    write_scores_csv([{"image": "a.png", "score": "0.5", "map": "a_map.png", "map_min": "0", "map_max": "1"}], tmp_path / "scores.csv", True)
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
from hiad_pl.io import run_folder_lock
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
    from hiad_pl.io import LOCK_NAME, run_folder_lock

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
