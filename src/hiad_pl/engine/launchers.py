"""Where task fits and image scoring run: local processes, or a Ray cluster.

A launcher receives the pending tasks of a :class:`~hiad_pl.engine.orchestrator.TaskOrchestrator`
and runs ``orchestrator.fit_task`` for each, and it scores test images. The
orchestrator keeps the rules (which tasks are pending, how a task resumes, where
checkpoints go); the launcher only decides where the work runs.

``local`` (the default, no extra dependency)
    one device: the tasks in turn, in this process. Several devices (GPU ids or
    ``"cpu"`` entries): one spawned worker process per device, each fitting one task
    at a time.
``ray``
    each task is a Ray task asking for ``cpus_per_task`` CPUs and ``gpus_per_task``
    GPUs, on an existing cluster (``address``: ``"auto"`` or ``"ray://host:10001"``)
    or on a local cluster started for the run and stopped after it. A task whose
    worker dies is retried up to ``max_retries`` times; the retry resumes from the
    task's last epoch checkpoint, and a task whose final checkpoint already exists is
    never fitted again. Test images are cut into contiguous shards, each scored by one
    Ray task that loads the run once; results come back in input order.

The run folder must be one path that every node sees (a shared file system such as
NFS); object-store URLs (``s3://``) are not supported for run folders.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

# RayOptions lives with the other config dataclasses; imported here, it stays importable from here
from hiad_pl.config import RayOptions
from hiad_pl.errors import ConfigError
from hiad_pl.inference import Prediction

if TYPE_CHECKING:
    from hiad_pl.data.sample import HRSample
    from hiad_pl.engine.orchestrator import TaskOrchestrator
    from hiad_pl.engine.validation import ValidationConfig
    from hiad_pl.tasks.base import Task

log = logging.getLogger("hiad_pl")

LAUNCHERS = ("local", "ray")


def resolve_devices(devices: Sequence[int | str] | int | str | None) -> list[str]:
    """Normalise ``gpu_ids``/``devices`` to torch device strings.

    ``None`` or ``[]`` is one CPU; ints are CUDA ids; ``"cpu"`` entries are CPU
    worker processes (``["cpu", "cpu"]`` fits two tasks at a time).
    """
    if devices is None or devices == [] or devices == ():
        return ["cpu"]
    if isinstance(devices, (int, str)):
        devices = [devices]
    resolved = []
    for device in devices:
        if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
            if not torch.cuda.is_available():
                raise ConfigError(f"GPU id {device} requested but CUDA is not available; use gpu_ids=[] for CPU")
            if int(device) >= torch.cuda.device_count():
                raise ConfigError(f"GPU id {device} requested but only {torch.cuda.device_count()} GPU(s) are visible")
            resolved.append(f"cuda:{int(device)}")
        elif str(device) == "cpu" or str(device).startswith("cuda"):
            resolved.append(str(device))
        else:
            raise ConfigError(f"unknown device {device!r}: use GPU ids (0, 1, ...) or 'cpu'")
    return resolved


class Launcher:
    """Runs task fits and image scoring somewhere."""

    def fit(
        self,
        orchestrator: TaskOrchestrator,
        tasks: Sequence[Task],
        samples: Sequence[HRSample],
        val_config: ValidationConfig | None,
    ) -> None:
        """Fit every task of ``tasks`` (each writes its final checkpoint)."""
        raise NotImplementedError

    def predict(self, orchestrator: TaskOrchestrator, samples: Sequence[HRSample]) -> Iterator[Prediction]:
        """Predictions of ``samples`` in input order."""
        raise NotImplementedError


class LocalLauncher(Launcher):
    """This machine: in this process for one device, one spawned process per device for several."""

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = list(devices) or ["cpu"]

    def fit(self, orchestrator, tasks, samples, val_config) -> None:
        """Fit the tasks in turn (one device) or spread over one worker process per device."""
        if len(self.devices) == 1 or len(tasks) <= 1:
            for task in tasks:
                orchestrator.fit_task(task, list(samples), self.devices[0], val_config, progress=True)
            return
        ctx = torch.multiprocessing.get_context("spawn")
        queue = ctx.Manager().Queue()
        for device in self.devices:
            queue.put(device)
        threads = max(1, (os.cpu_count() or 1) // len(self.devices))
        with ProcessPoolExecutor(len(self.devices), mp_context=ctx, initializer=_claim_device, initargs=(queue, threads)) as pool:
            futures = [pool.submit(_fit_in_worker, orchestrator, task, list(samples), val_config) for task in tasks]
            for done, future in enumerate(futures, 1):
                log.info("task %s fitted (%d/%d)", future.result(), done, len(futures))

    def predict(self, orchestrator, samples) -> Iterator[Prediction]:
        """Score on the first device, one image at a time."""
        yield from orchestrator.predict(samples, self.devices[0])


class RayLauncher(Launcher):
    """A Ray cluster: one Ray task per detector fit, test images scored in shards."""

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()

    # ----------------------------------------------------------------- cluster
    def _connect(self) -> bool:
        """Connect to the cluster; returns whether this call started it (and so must stop it)."""
        ray = import_ray()
        if ray.is_initialized():
            return False
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
        if self.options.address is not None:
            ray.init(address=self.options.address, runtime_env=env, log_to_driver=True)
        else:
            ray.init(num_cpus=self.options.num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)
        return True

    def _device(self) -> str:
        return "cuda:0" if self.options.gpus_per_task > 0 else "cpu"

    def _remote(self, function: Any) -> Any:
        ray = import_ray()
        return ray.remote(function).options(
            num_cpus=self.options.cpus_per_task,
            num_gpus=self.options.gpus_per_task,
            max_retries=self.options.max_retries,
        )

    # --------------------------------------------------------------------- fit
    def fit(self, orchestrator, tasks, samples, val_config) -> None:
        """One Ray task per detector; waits for all and reports each as it ends."""
        ray = import_ray()
        started = self._connect()
        try:
            remote = self._remote(_ray_fit_task)
            threads = max(1, int(self.options.cpus_per_task))
            refs = {
                remote.remote(orchestrator, task, list(samples), val_config, self._device(), threads): task.name
                for task in tasks
            }
            progress = _progress(len(refs), "tasks fitted")
            pending, failures = list(refs), []
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                name = refs[ready[0]]
                try:
                    outcome = ray.get(ready[0])
                    log.info("%s: %s (%d/%d)", name, outcome, len(refs) - len(pending), len(refs))
                except Exception as error:  # a task failed for good: report it after the others finish
                    failures.append((name, error))
                    log.error("%s: failed: %s", name, error)
                progress.update(1)
            progress.close()
            if failures:
                names = ", ".join(name for name, _ in failures)
                raise RuntimeError(f"{len(failures)} task(s) failed on the Ray cluster: {names}") from failures[0][1]
        finally:
            if started:
                ray.shutdown()

    # ----------------------------------------------------------------- predict
    def predict(self, orchestrator, samples) -> Iterator[Prediction]:
        """Shard ``samples`` over Ray tasks (each loads the run once); yields in input order."""
        ray = import_ray()
        started = self._connect()
        try:
            samples = list(samples)
            shards = self.options.shards or max(1, int(ray.cluster_resources().get("CPU", 1) // self.options.cpus_per_task))
            bounds = np.linspace(0, len(samples), min(shards, len(samples)) + 1).round().astype(int)
            remote = self._remote(_ray_predict_shard)
            detached = orchestrator.detached()
            refs = [
                remote.remote(detached, samples[lo:hi], int(lo), self._device())
                for lo, hi in zip(bounds[:-1], bounds[1:])
                if hi > lo
            ]
            progress = _progress(len(samples), "images scored")
            for ref in refs:  # in order: shards are contiguous
                for sample_id, score, anomaly_map in ray.get(ref):
                    progress.update(1)
                    yield Prediction(sample_id, torch.from_numpy(anomaly_map.astype(np.float32)), score)
            progress.close()
        finally:
            if started:
                ray.shutdown()


def make_launcher(name: str | Launcher, devices: Sequence[str], ray: RayOptions | dict | None = None) -> Launcher:
    """A launcher by name (``local`` | ``ray``), or ``name`` itself when it already is one."""
    if isinstance(name, Launcher):
        return name
    if name == "local":
        return LocalLauncher(devices)
    if name == "ray":
        options = RayOptions(**ray) if isinstance(ray, dict) else ray
        if options is not None and options.gpus_per_task == 0 and any(d.startswith("cuda") for d in devices):
            options = RayOptions(**{**vars(options), "gpus_per_task": 1.0})
        return RayLauncher(options)
    raise ConfigError(f"launcher must be one of {LAUNCHERS}, got {name!r}")


def import_ray() -> Any:
    """The ``ray`` module, or an error saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError("launcher 'ray' needs Ray: pip install 'hiad-pl[ray]'") from error
    return ray


def _progress(total: int, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=unit, unit="", leave=False, file=sys.stderr)


# ------------------------------------------------------------------ workers
_WORKER_DEVICE = "cpu"


def _claim_device(queue: Any, threads: int) -> None:
    global _WORKER_DEVICE
    _WORKER_DEVICE = queue.get()
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)


def _fit_in_worker(orchestrator: TaskOrchestrator, task: Task, samples: list, val_config: Any) -> str:
    orchestrator.fit_task(task, samples, _WORKER_DEVICE, val_config, progress=False)
    return task.name


def _ray_fit_task(orchestrator: TaskOrchestrator, task: Task, samples: list, val_config: Any, device: str, threads: int) -> str:
    """Fit one task on a Ray worker; a retry after a final checkpoint was written does nothing."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if orchestrator.checkpoint_path(task).is_file():
        return "already fitted"
    orchestrator.fit_task(task, samples, device, val_config, progress=False)
    return "fitted"


def _ray_predict_shard(orchestrator: TaskOrchestrator, samples: list, first_id: int, device: str) -> list[tuple[int, float, np.ndarray]]:
    """Score one contiguous shard: (sample id, image score, float16 map) per image."""
    orchestrator.load(device)
    return [
        (first_id + p.sample_id, p.score, p.anomaly_map.numpy().astype(np.float16))
        for p in orchestrator.predict(samples, device)
    ]
