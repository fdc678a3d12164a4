"""Tiny fitted run folders for the serving and export tests (fitted in-process with the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from conftest import PATCHCORE_TEST_CONFIG

#: Task layouts of the test runs: by position (A2O, O2O) and by appearance (retrieval).
TASK_LAYOUTS: dict[str, dict[str, Any]] = {
    "a2o": {"class_path": "hiad_pl.tasks.A2OTaskGenerator"},
    "o2o": {"class_path": "hiad_pl.tasks.O2OTaskGenerator"},
    "retrieval": {"class_path": "hiad_pl.tasks.RetrieveTaskGenerator", "init_args": {"cluster_number": 2}},
}
VALIDATION = {
    "anomaly_syn_fn": {"class_path": "hiad_pl.syn.RandomBoxSynthesizer", "init_args": {"p": 0.5, "seed": 0}},
    "val_sample_ratio": 0.25,
}


#: Detection resolution of the test runs (the 512 px demo images are resized to it) and their patch size.
IMAGE_SIZE, PATCH_SIZE = 256, 128


def fit_run(root: Path, run_dir: Path, layout: str, *, thumbnail: bool = False, validation: bool = False) -> Path:
    """Fit PatchCore on the small demo's texture (256 px, 128 px patches) into ``run_dir``; a rerun reuses it."""
    from hiad_pl.cli import main

    config: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": {"root": str(root), "categories": ["texture"], "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "batch_size": 8},
        "detector": {"class_path": "hiad_pl.detectors.HRPatchCore", "init_args": dict(PATCHCORE_TEST_CONFIG)},
        "tasks": TASK_LAYOUTS[layout],
    }
    if thumbnail:
        config["thumbnail"] = {"thumbnail_size": 64}
    if validation:
        config["validation"] = VALIDATION
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    if main(["fit", "--config", str(path)]) != 0:
        raise RuntimeError(f"fitting the {layout} test run failed")
    return run_dir


#: ``python -c BLOCK_TORCH --export ...``: the standalone predictor with torch, Lightning, torchvision and timm unimportable.
BLOCK_TORCH = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'lightning', 'torchvision', 'timm'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Blocked())
from hiad_pl.deploy.predictor import main
code = main(sys.argv[1:])
assert not any(m.split('.')[0] in ('torch', 'lightning') for m in sys.modules), 'torch was imported'
sys.exit(code)
"""
