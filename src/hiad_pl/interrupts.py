"""Stopping on Ctrl-C (``SIGINT``) and ``SIGTERM`` (a scheduler's pre-emption, ``timeout``, ``kill``).

A stopped run raises :class:`Interrupted`, a ``KeyboardInterrupt`` that knows its
signal; ``hiad-pl`` turns it into one line saying how to resume and the exit
status ``128 + signal`` (130 for Ctrl-C, 143 for SIGTERM), never 0.

Where the stop lands:

- inside a Lightning fit, Lightning's own handling decides. SIGTERM lets the
  batch in progress finish and stops before the next (the epoch in progress is
  lost, the checkpoints of the epochs before it are kept); Ctrl-C stops at once.
  Lightning reports either as ``SystemExit`` (status 0 for SIGTERM, 1 for
  Ctrl-C): :func:`lightning_stop` turns that back into :class:`Interrupted`;
- anywhere else (data discovery, task generation, scoring, writing results) the
  signal raises :class:`Interrupted` where the program is. Every file is written
  atomically (:func:`hiad_pl.run_folder.atomic_write`), so a stop in mid-write leaves the
  previous file.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: The signals that stop a run.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by ``signum`` (SIGINT or SIGTERM); :attr:`exit_status` is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(self.signal_name)

    @property
    def signal_name(self) -> str:
        """``SIGINT`` or ``SIGTERM``."""
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """The shell's status of a process killed by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    if signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is not _raise_interrupted:
        # Called by the handler Lightning installs during a fit (it calls the previous
        # handler too): Lightning stops the fit at the end of the batch, a safe point.
        return
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted`; the previous handlers return after it.

    Only the main thread can install handlers; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def lightning_stop(trainer: Any) -> Iterator[None]:
    """Run a ``trainer.fit`` / ``trainer.validate`` in the block; a stop by a signal leaves it as :class:`Interrupted`.

    Lightning ends a fit stopped by SIGTERM with ``SystemExit`` (status 0) and one
    stopped by Ctrl-C with ``sys.exit(1)``; both would end the program silently or
    as a success. A SIGTERM that arrives after the last batch lets the fit end
    normally: it is raised after the block, before the task's final checkpoint.
    """
    try:
        yield
    except SystemExit as exit_:
        if trainer.received_sigterm:
            raise Interrupted(signal.SIGTERM) from None
        cause = exit_.__context__
        if isinstance(cause, KeyboardInterrupt):
            raise (cause if isinstance(cause, Interrupted) else Interrupted(signal.SIGINT)) from None
        raise
    if trainer.received_sigterm:
        raise Interrupted(signal.SIGTERM)
