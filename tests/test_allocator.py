"""keep_freed_memory: glibc's malloc tuned once per process, or left alone when switched off."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hiad_pl.utils import allocator

PROBE = (
    "from hiad_pl.utils.allocator import keep_freed_memory; "
    "first = keep_freed_memory(); print(first, keep_freed_memory() is first)"
)


def _run(env_value: str | None) -> str:
    import os

    env = dict(os.environ)
    env.pop(allocator.ENVIRONMENT_SWITCH, None)
    if env_value is not None:
        env[allocator.ENVIRONMENT_SWITCH] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_is_tuned_once_on_glibc():
    tuned, same = _run(None)
    assert tuned == "True" and same == "True"


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_the_switch_leaves_malloc_alone(value):
    tuned, same = _run(value)
    assert tuned == "False" and same == "True"


def test_entry_points_apply_it(monkeypatch):
    from hiad_pl import inference

    calls = []
    monkeypatch.setattr(inference, "keep_freed_memory", lambda: calls.append(1) or True)
    inference.InferencePipeline([], {})
    assert calls == [1]
