"""Keep freed memory in the process for reuse instead of handing it back to the kernel.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MB)
with a fresh ``mmap`` and returns it to the kernel on ``free``. A convolution
over a batch of 512-px patches allocates activations of 60 MB and more on
every forward pass, so each pass faults its pages in again and the kernel
zeroes them: on a 2-core virtual machine that is most of the backbone's time
(the bare EfficientNet-Lite0 over 16 patches of 512 px took 3.97 s per image
with the defaults and 1.32 s with freed memory kept; see docs/results.md).

:func:`keep_freed_memory` asks glibc to serve large blocks from its heap and
to keep freed memory (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = 2 GB), as
jemalloc or tcmalloc would. The process's resident memory then stays near its
peak instead of shrinking between passes; the peak itself barely moves. It is
applied by the fitting and scoring entry points (``TaskOrchestrator.fit_task``,
``InferencePipeline``, the CLI) and changes nothing on other C libraries.
``HIAD_PL_KEEP_FREED_MEMORY=0`` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("hiad_pl")

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: Free memory at the top of the heap above which glibc gives it back (the largest ``int``: 2 GB).
TRIM_THRESHOLD_BYTES = 2**31 - 1
#: Environment variable that turns the tuning off (``0``, ``off``, ``false``, ``no``).
ENVIRONMENT_SWITCH = "HIAD_PL_KEEP_FREED_MEMORY"

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc to reuse freed memory (once per process); whether it is tuned."""
    global _applied
    if _applied is None:
        _applied = _tune()
    return _applied


def _tune() -> bool:
    if os.environ.get(ENVIRONMENT_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        log.debug("malloc left as it is (%s)", ENVIRONMENT_SWITCH)
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: mallopt's parameters differ elsewhere
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    tuned = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    log.debug("malloc keeps freed memory for reuse: %s", tuned)
    return tuned
