"""The Ray launcher: same checkpoints and metrics as the local one, retries of dead workers, scoring in order."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PATCHCORE_TEST_CONFIG
from hiad_pl.config import RayOptions
from hiad_pl.detectors import HRFastFlow, HRPatchCore
from hiad_pl.engine.launchers import LocalLauncher, RayLauncher, make_launcher

ray = pytest.importorskip("ray")

#: Set in the driver before the cluster starts, so every Ray worker sees it.
KILL_MARKER_ENV = "HIAD_PL_TEST_KILL_MARKER"
FIT_LOG_ENV = "HIAD_PL_TEST_FIT_LOG"


class DyingFastFlow(HRFastFlow):
    """FastFlow whose worker process is killed (SIGKILL) at the end of its second epoch, once per run."""

    def on_train_epoch_start(self) -> None:
        with open(os.environ[FIT_LOG_ENV], "a") as log:
            log.write(f"{self.trainer.logger.version} {self.current_epoch}\n")

    def on_train_epoch_end(self) -> None:
        marker = Path(os.environ[KILL_MARKER_ENV])
        if self.current_epoch == 1 and not marker.exists():
            marker.write_text(str(self.trainer.logger.version))
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray cluster of 2 CPUs shared by this module's tests."""
    work = tmp_path_factory.mktemp("ray")
    os.environ[KILL_MARKER_ENV] = str(work / "killed")
    os.environ[FIT_LOG_ENV] = str(work / "fits.log")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}},
    )
    yield work
    ray.shutdown()


def o2o_trainer(small_demo: Path, root: Path, detector_class: type, config: dict, launcher: str | RayLauncher):
    from hiad_pl.data.discovery import discover
    from hiad_pl.data.tiling import MultiResolutionHRImageSpliter
    from hiad_pl.tasks import O2OTaskGenerator
    from hiad_pl.trainer import HRTrainer

    (split,) = discover(small_demo, categories=["texture"], image_size=512)
    tasks = O2OTaskGenerator().create_tasks(split.train, MultiResolutionHRImageSpliter(image_size=512, patch_size=256))
    assert len(tasks) == 4
    trainer = HRTrainer(
        batch_size=4,
        tasks=tasks,
        detector_class=detector_class,
        config={"patch": {**config, "patch_size": 256}},
        checkpoint_root=root / "models",
        log_root=root / "logs",
        vis_root=root / "vis",
        launcher=launcher,
        ray_options={"cpus_per_task": 1, "max_retries": 2},
    )
    return split, trainer


def state_dicts(models: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.stem: torch.load(p, weights_only=True)["state_dict"] for p in sorted(models.glob("checkpoints/*.ckpt"))}


def test_ray_fits_the_same_checkpoints_and_metrics_as_local(cluster: Path, small_demo: Path, tmp_path: Path) -> None:
    results, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker of one CPU: the same arithmetic, bit for bit
    try:
        for name in ("local", "ray"):
            split, trainer = o2o_trainer(small_demo, tmp_path / name, HRPatchCore, PATCHCORE_TEST_CONFIG, name)
            trainer.train(split.train, gpu_ids=[])
            scores, maps = trainer.inference(split.test, gpu_ids=[], return_results_only=True)
            results[name] = (state_dicts(tmp_path / name / "models"), scores, maps)
    finally:
        torch.set_num_threads(threads)
    (local_sd, local_scores, local_maps), (ray_sd, ray_scores, ray_maps) = results["local"], results["ray"]
    assert sorted(local_sd) == sorted(ray_sd) and len(ray_sd) == 4
    for task in local_sd:
        assert local_sd[task].keys() == ray_sd[task].keys()
        for key in local_sd[task]:
            assert torch.equal(local_sd[task][key], ray_sd[task][key]), (task, key)
    assert np.array_equal(local_scores, ray_scores)  # sharded scoring, gathered in input order
    assert all(np.array_equal(a, b) for a, b in zip(local_maps, ray_maps))


def test_a_killed_worker_is_retried_and_resumes_without_refitting_final_tasks(
    cluster: Path, small_demo: Path, tmp_path: Path
) -> None:
    config = {"backbone_name": "resnet18", "weights": "none", "layers_to_extract_from": ["layer1"], "flow_steps": 1, "epochs": 3}
    split, trainer = o2o_trainer(small_demo, tmp_path, DyingFastFlow, config, "ray")
    paths = trainer.train(split.train, gpu_ids=[])
    assert all(p.is_file() for p in paths) and (cluster / "killed").is_file()

    epochs: dict[str, list[int]] = {}
    for task, epoch in (line.split() for line in (cluster / "fits.log").read_text().splitlines()):
        epochs.setdefault(task, []).append(int(epoch))
    assert sorted(epochs) == sorted(p.stem for p in paths)
    killed = (cluster / "killed").read_text()
    # the killed task died at the end of its second epoch; its retry resumed there from the first epoch's checkpoint
    assert epochs[killed] == [0, 1, 1, 2]
    # Ray may take down a sibling worker with it (its lease fails): that task resumes too, never going back
    for task, seen in epochs.items():
        assert seen[0] == 0 and seen[-1] == 2 and all(b - a in (0, 1) for a, b in zip(seen, seen[1:])), (task, seen)
        assert len(seen) - len(set(seen)) <= 1, (task, seen)  # at most one retry each

    # a rerun skips every final task: nothing is fitted twice
    before = (cluster / "fits.log").read_text()
    trainer.train(split.train, gpu_ids=[])
    assert (cluster / "fits.log").read_text() == before


def test_make_launcher_by_name_and_options() -> None:
    assert isinstance(make_launcher("local", ["cpu"]), LocalLauncher)
    launcher = make_launcher("ray", ["cuda:0"], {"address": "auto"})
    assert isinstance(launcher, RayLauncher) and launcher.options.gpus_per_task == 1.0
    with pytest.raises(ValueError, match="launcher must be one of"):
        make_launcher("slurm", ["cpu"])
    with pytest.raises(ValueError, match="max_retries"):
        RayOptions(max_retries=-1)
