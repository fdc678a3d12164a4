"""A model folder: its layout, its lock, and the state a fit resumes from.

::

    <root>/tasks.json                 the tasks (patch indexes, retrieval centres, thumbnail)
    <root>/fit_settings.json          the settings the models were fitted with (see :mod:`hiad_pl.fit_settings`)
    <root>/checkpoints/<task>.ckpt    one Lightning checkpoint per task, written atomically
    <root>/checkpoints/<task>/        per-epoch checkpoints of gradient-trained detectors (resume)
    <root>/retrieval/                 routing of the training patches to retrieval tasks (computed once)
    <root>/.hiad-pl.lock              held while a fit runs

A rerun with the settings the folder was fitted with skips fitted tasks and resumes
interrupted ones; other settings are refused unless a refit is asked for. The file
helpers every layer uses (atomic writes, checkpoint reading) are in :mod:`hiad_pl.run_folder`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from hiad_pl import fit_settings
from hiad_pl.errors import ConfigError, RunFolderLockedError
from hiad_pl.run_folder import atomic_write, file_mode, remove_stale_temporaries
from hiad_pl.tasks.base import Task, load_tasks, save_tasks

log = logging.getLogger("hiad_pl")

LOCK_NAME = ".hiad-pl.lock"
#: Where a refit moves a model folder's old contents before deleting them (left over only by a crash).
DISCARDED_PREFIX = ".discarded-"
_HELD_LOCKS: set[Path] = set()  # folders this process has locked (a nested lock of one folder is a no-op)


def _lock_owner(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _write_owner(path: Path, owner: dict[str, Any] | None) -> None:
    # in place, not atomically: the lock is held on this very file (inode), which a rename would replace
    with open(path, "r+", encoding="utf-8") as stream:
        stream.truncate()
        if owner:
            stream.write(json.dumps(owner))
        stream.flush()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def run_folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder/.hiad-pl.lock`` while the block runs; refuse when another live process holds it.

    The lock is :class:`filelock.FileLock`, an advisory ``flock`` that the system
    releases when its process dies (also on ``kill -9``), so a dead process's lock
    is simply taken over. The file records the holder's pid, host and start time
    for the refusal's message; it stays after release (emptied), because deleting
    it would let two processes lock two different files of the same name.

    Raises:
        RunFolderLockedError: naming the holder and the lock file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = path.resolve()
    if key in _HELD_LOCKS:
        yield path
        return
    lock = FileLock(path, timeout=0, mode=file_mode())
    try:
        lock.acquire()
    except Timeout:
        owner = _lock_owner(path)
        holder = f"process {owner.get('pid', '?')} on {owner.get('host', '?')}"
        since = f" since {owner['started']}" if "started" in owner else ""
        raise RunFolderLockedError(
            f"{folder} is in use by {holder}{since} (lock file {path}); wait for it to finish or use another run folder"
        ) from None
    try:
        previous = _lock_owner(path)
        if previous.get("pid") and previous.get("host") == socket.gethostname() and not _process_alive(int(previous["pid"])):
            log.info("%s: took over the lock of process %s, which is no longer running", folder, previous["pid"])
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_owner(path, owner)
        _HELD_LOCKS.add(key)
        try:
            yield path
        finally:
            _HELD_LOCKS.discard(key)
            _write_owner(path, None)
    finally:
        lock.release()


def locks_root(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` of an object with a ``root`` folder while holding that folder's lock."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with run_folder_lock(self.root):
            return method(self, *args, **kwargs)

    return locked


class ModelFolder:
    """The files of one model folder (one category) and the rules that decide whether a fit may resume in it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def tasks_path(self) -> Path:
        """``tasks.json``."""
        return self.root / "tasks.json"

    @property
    def settings_path(self) -> Path:
        """``fit_settings.json``: the settings the folder's models were fitted with."""
        return self.root / fit_settings.SETTINGS_NAME

    @property
    def retrieval_dir(self) -> Path:
        """Where the routing of training and validation patches to retrieval tasks is kept."""
        return self.root / "retrieval"

    def checkpoint_path(self, task: Task) -> Path:
        """Final checkpoint of a task."""
        return self.root / "checkpoints" / f"{task.name}.ckpt"

    def epoch_dir(self, task: Task) -> Path:
        """The per-epoch checkpoints of a gradient-trained task (``last.ckpt`` resumes it)."""
        return self.root / "checkpoints" / task.name

    def pending(self, tasks: Sequence[Task]) -> list[Task]:
        """Tasks without a final checkpoint."""
        return [t for t in tasks if not self.checkpoint_path(t).is_file()]

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse (:class:`~hiad_pl.fit_settings.SettingsChangedError`) when the folder was fitted with other ``settings``."""
        saved = fit_settings.load(self.settings_path)
        if saved is None:
            if self.tasks_path.is_file():
                log.warning(
                    "%s was fitted by an earlier hiad-pl without %s: its settings cannot be compared; resuming "
                    "with this run's settings (fit with --refit true to start again)", self.root, fit_settings.SETTINGS_NAME
                )
            return
        changed = fit_settings.differences(saved, settings)
        if changed:
            raise fit_settings.SettingsChangedError(
                f"{self.root} was fitted with other settings ({'; '.join(changed)}); its models are kept: "
                "rerun with --refit true (fit(refit=True)) to discard them and fit again, or use another run folder"
            )

    def discard_fitted(self) -> None:
        """Remove everything the folder holds (models, tasks, routing, logs) before a refit.

        The old contents are first renamed into one hidden folder (each rename is atomic),
        the new settings file replaces the old one only after that, and the hidden folder is
        deleted last; the old settings file goes only after every model has gone: a crash
        leaves old models under their own settings, or none, never old models under new settings.
        A leftover hidden folder is deleted by the next fit.
        """
        if not self.root.is_dir():
            return
        keep = {fit_settings.SETTINGS_NAME, fit_settings.HOLDOUT_NAME, LOCK_NAME}
        trash = self.root / f"{DISCARDED_PREFIX}{uuid.uuid4().hex[:8]}"
        entries = [p for p in self.root.iterdir() if p.name not in keep and not p.name.startswith(DISCARDED_PREFIX)]
        if entries:
            trash.mkdir()
            for entry in entries:
                entry.replace(trash / entry.name)
            log.info("%s: discarded %d old entries for the refit", self.root, len(entries))
        self.settings_path.unlink(missing_ok=True)

    def _remove_discarded(self) -> None:
        for leftover in self.root.glob(f"{DISCARDED_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def prepare_fit(self, tasks: Sequence[Task], settings: dict[str, Any], resume: bool, refit: bool) -> None:
        """Make the folder ready for a fit with ``settings`` of ``tasks``, or refuse before any work.

        A refit discards the folder's models first; otherwise other saved settings, other
        saved tasks, or (without ``resume``) any checkpoint are refused. Then the leftovers
        of interrupted writes and refits go, and the settings and tasks are written.
        Call it while holding the folder's lock.
        """
        if refit:
            self.discard_fitted()
        else:
            self.check_settings(settings)
        if not resume and any((self.root / "checkpoints").glob("**/*.ckpt")):
            raise ConfigError(
                f"{self.root} already holds checkpoints: resume, refit (--refit true), or choose another run folder"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.root)
        if self.tasks_path.is_file():
            saved = [t.todict() for t in load_tasks(self.tasks_path)]
            if saved != [t.todict() for t in tasks]:
                raise fit_settings.SettingsChangedError(
                    f"{self.tasks_path}: this model folder was fitted with other tasks ({len(saved)} -> "
                    f"{len(tasks)} tasks); rerun with --refit true to fit again, or use another run folder"
                )
        atomic_write(self.settings_path, fit_settings.dumps(settings))
        self._remove_discarded()
        save_tasks(list(tasks), self.tasks_path)
