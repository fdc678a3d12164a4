"""Files of a run folder: atomic writes, JSON and checkpoint reading (every layer writes through these).

Every file hiad-pl writes (``config.yaml``, ``tasks.json``, checkpoints,
``metrics.json``, ``scores.csv``, maps and visualisations) goes through
:func:`atomic_write`: the bytes go to a temporary file beside the target, are
flushed to disk, and the file is renamed over the target. A crash or a full
disk leaves the previous file or the new one, never a mix. Files get the mode
``0666`` less the umask (``0644`` under the usual ``022``), as ``open()`` would give.
The folder's layout, its lock and the resume rules are the engine's
(:mod:`hiad_pl.engine.run_folder`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from hiad_pl.errors import CheckpointError, InputError, WriteError

log = logging.getLogger("hiad_pl")

Content = bytes | str | Callable[[IO[bytes]], None]


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
