"""Files of a run folder: atomic writes, checkpoints, the run-folder lock.

Every file hiad-pl writes (``config.yaml``, ``tasks.json``, checkpoints,
``metrics.json``, ``scores.csv``, maps and visualisations) goes through
:func:`atomic_write`: the bytes go to a temporary file beside the target, are
flushed to disk, and the file is renamed over the target. A crash or a full
disk leaves the previous file or the new one, never a mix. Files get the mode
``0666`` less the umask (``0644`` under the usual ``022``), as ``open()`` would give.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from hiad_pl.errors import CheckpointError, InputError, RunFolderLockedError, WriteError

log = logging.getLogger("hiad_pl")

Content = bytes | str | Callable[[IO[bytes]], None]
LOCK_NAME = ".hiad-pl.lock"
_HELD_LOCKS: set[Path] = set()  # folders this process has locked (a nested lock of one folder is a no-op)


def file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` gives a new file."""
    try:  # Linux shows the umask without changing it (os.umask would, for a moment, in every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, content: Content) -> Path:
    """Write ``content`` (bytes, text, or a function writing to a binary stream) to ``path`` atomically.

    Raises :class:`~hiad_pl.errors.WriteError` naming ``path`` when the write
    fails (disk full, read-only folder); ``path`` is then unchanged and no
    temporary file is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            if callable(content):
                content(stream)
            else:
                stream.write(content.encode("utf-8") if isinstance(content, str) else content)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise WriteError(error.errno or errno.EIO, f"{path}: cannot write ({reason}); the previous file is unchanged") from error
        raise
    _sync_folder(path.parent)
    return path


def read_json(path: str | Path, remedy: str) -> Any | None:
    """The JSON a run folder keeps in ``path``; ``None`` when there is no such file.

    Raises:
        InputError: naming the file and ``remedy`` when it is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error}); {remedy}") from None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed in flight left under ``folder``; returns them.

    Call it only while holding the folder's lock: a live writer's temporary file looks the same.
    """
    stale = [p for p in Path(folder).rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("%s: removed %d temporary file(s) of interrupted writes", folder, len(stale))
    return stale


def _sync_folder(folder: Path) -> None:
    """Flush the rename to disk (a no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def check_checkpoint(path: str | Path, task: str | None = None) -> None:
    """Raise :class:`~hiad_pl.errors.CheckpointError` when ``path`` is not a complete checkpoint archive.

    Reads only the archive's directory (at the end of the file), so a truncated
    or overwritten checkpoint is found before a long fit or a test starts.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise corrupt_checkpoint(path, error, task) from error


def corrupt_checkpoint(path: str | Path, error: BaseException, task: str | None = None) -> CheckpointError:
    """The error for an unreadable checkpoint: names the file and how to refit its task."""
    what = f"task {task!r}" if task else "its task"
    return CheckpointError(
        f"{path}: unreadable checkpoint ({type(error).__name__}: {error}); "
        f"delete it and rerun `hiad-pl fit` to refit {what} (the other tasks are kept)"
    )


def load_checkpoint(path: str | Path, task: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """``torch.load`` of a checkpoint (``weights_only=True`` by default) with a clear error when it is corrupt."""
    import torch  # here, so that the file helpers above serve the torch-free exported predictor too

    check_checkpoint(path, task)
    kwargs.setdefault("weights_only", True)
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(path, **kwargs)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as error:
        raise corrupt_checkpoint(path, error, task) from error
    except Exception as error:  # unpickling errors have no common base class
        if "pickle" in type(error).__module__ or "Unpickling" in type(error).__name__:
            raise corrupt_checkpoint(path, error, task) from error
        raise


def _lock_owner(stream: IO[str]) -> dict[str, Any]:
    stream.seek(0)
    try:
        owner = json.loads(stream.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return owner if isinstance(owner, dict) else {}


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

    The lock is an advisory ``flock`` that the system releases when its process
    dies (also on ``kill -9``), so a dead process's lock is simply taken over.
    The file records the holder's pid, host and start time for the refusal's
    message. The file stays after release (emptied), because deleting it would
    let two processes lock two different files of the same name.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = path.resolve()
    if key in _HELD_LOCKS:
        yield path
        return
    handle = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    stream = os.fdopen(handle, "r+", encoding="utf-8")
    try:
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _lock_owner(stream)
            holder = f"process {owner.get('pid', '?')} on {owner.get('host', '?')}"
            since = f" since {owner['started']}" if "started" in owner else ""
            raise RunFolderLockedError(
                f"{folder} is in use by {holder}{since} (lock file {path}); "
                "wait for it to finish or use another run folder"
            ) from None
        previous = _lock_owner(stream)
        if previous.get("pid") and previous.get("host") == socket.gethostname() and not _process_alive(int(previous["pid"])):
            log.info("%s: took over the lock of process %s, which is no longer running", folder, previous["pid"])
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        stream.seek(0)
        stream.truncate()
        stream.write(json.dumps(owner))
        stream.flush()
        _HELD_LOCKS.add(key)
        try:
            yield path
        finally:
            _HELD_LOCKS.discard(key)
            stream.seek(0)
            stream.truncate()
            stream.flush()
    finally:
        stream.close()  # closing the file releases the flock


def locks_root(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` of an object with a ``root`` folder while holding that folder's lock."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with run_folder_lock(self.root):
            return method(self, *args, **kwargs)

    return locked
