"""Fit the DeSTSeg or RealNet quickstart on the small 1024-px demo texture and print its metrics.

    OMP_NUM_THREADS=1 python benchmarks/synthetic_quickstarts.py destseg
    OMP_NUM_THREADS=1 python benchmarks/synthetic_quickstarts.py realnet
    OMP_NUM_THREADS=1 python benchmarks/synthetic_quickstarts.py destseg --set '{"steps": 40}'

The data are the slow learning tests' (``DEMO_1024`` in tests/conftest.py: 2
training images, 4 normal and 4 defective test images of 1024 px, 256-px
patches, one A2O task); the detector options are those of
``configs/<name>_quickstart.yaml``, updated by ``--set``. Prints image AUROC,
pixel AUROC, AUPRO and the fit time (one torch thread).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from hiad_pl.data.discovery import discover
from hiad_pl.data.tiling import MultiResolutionHRImageSpliter
from hiad_pl.demo import make_demo_dataset
from hiad_pl.detectors import HRDesTSeg, HRRealNet
from hiad_pl.tasks import A2OTaskGenerator
from hiad_pl.trainer import HRTrainer
from hiad_pl.utils import metrics

ROOT = Path(__file__).resolve().parents[1]
DETECTORS = {"destseg": HRDesTSeg, "realnet": HRRealNet}
#: The slow tests' data set (tests/conftest.py, DEMO_1024).
DEMO_1024 = {"image_size": 1024, "num_train": 2, "num_test_good": 4, "num_test_defect": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(DETECTORS))
    parser.add_argument("--set", default="{}", help="JSON object of detector options that replace the quickstart's")
    parser.add_argument("--data", type=Path, default=ROOT / "demo_data_1024_small")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "synthetic_quickstarts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    make_demo_dataset(args.data, categories=["texture"], seed=0, **DEMO_1024)
    config = yaml.safe_load((ROOT / "configs" / f"{args.name}_quickstart.yaml").read_text())
    options = {**config["detector"]["init_args"], **json.loads(args.set)}
    size, patch = config["data"]["image_size"], config["data"]["patch_size"]
    (split,) = discover(args.data, categories=["texture"], image_size=size)
    tasks = A2OTaskGenerator().create_tasks(split.train, MultiResolutionHRImageSpliter(image_size=size, patch_size=patch))
    work = args.work / args.name
    if work.exists():
        raise SystemExit(f"{work} exists: remove it to fit again (a fitted task would be skipped)")
    trainer = HRTrainer(
        batch_size=config["data"]["batch_size"],
        tasks=tasks,
        detector_class=DETECTORS[args.name],
        config={"patch": {**options, "patch_size": patch}},
        checkpoint_root=work / "models",
        log_root=work / "logs",
        vis_root=None,
    )
    start = time.perf_counter()
    trainer.train(train_samples=split.train, gpu_ids=[])
    fit_s = time.perf_counter() - start
    evaluators = [metrics.compute_imagewise_metrics, metrics.compute_pixelwise_metrics, metrics.compute_pro]
    values = trainer.inference(test_samples=split.test, gpu_ids=[], evaluators=evaluators)["texture"]
    print(
        f"{args.name}: image AUROC {values['image_auroc']:.4f}, pixel AUROC {values['pixel_auroc']:.4f}, "
        f"AUPRO {values['pro']:.4f}, fit {fit_s:.0f} s"
    )


if __name__ == "__main__":
    main()
