"""Helpers the fault tests load into a ``hiad-pl`` subprocess: a scripted evaluator, injected faults."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path
from typing import Any

#: Where the scripted evaluator keeps its call count, and which scores it gives in turn ("hang" blocks).
SCRIPT_ENV = "HIAD_FAULTS_SCRIPT"


def scripted_auroc(prediction_scores: Any, gt_labels: Any, prediction_masks: Any, gt_masks: Any, device: Any = None) -> dict:
    """An ``image_auroc`` read from the script file (one value per line, in call order, across processes).

    A ``hang`` line writes ``<script>.hang`` and blocks, so a test can kill the fit in mid-validation;
    a ``crash`` line raises, as a fault inside the process would.
    """
    script = Path(os.environ[SCRIPT_ENV])
    counter = script.with_suffix(".count")
    calls = int(counter.read_text()) if counter.is_file() else 0
    counter.write_text(str(calls + 1))
    value = script.read_text().split()[calls]
    if value == "hang":
        script.with_suffix(".hang").write_text("validating")
        time.sleep(600)
    if value == "crash":
        raise RuntimeError("the validation crashed")
    return {"image_auroc": float(value)}


def write_then_kill(name: str, occurrence: int) -> None:
    """Kill this process (SIGKILL) halfway through the ``occurrence``-th atomic write of a file called ``name``."""
    import hiad_pl.run_folder

    original = hiad_pl.run_folder.atomic_write
    seen = 0

    def writing(path: Any, content: Any) -> Path:
        nonlocal seen
        if Path(path).name != name:
            return original(path, content)
        seen += 1
        if seen != occurrence:
            return original(path, content)

        def half_then_die(stream: Any) -> None:
            buffer = io.BytesIO()
            content(buffer)
            data = buffer.getvalue()
            stream.write(data[: len(data) // 2])
            stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        return original(path, half_then_die)

    hiad_pl.run_folder.atomic_write = writing
