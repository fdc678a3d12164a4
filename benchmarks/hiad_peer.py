"""The original HiAD 0.2.1 PatchCore on one built real set, kept as per-image statistics beside hiad-pl's runs.

Runs in the original's own virtual environment (the peer runner's header says how
to make it). It imports that runner (``--peer-script``) for its CPU adaptations and
its injection of the offline EfficientNet-Lite0 weights, then fits and scores one
set of ``real_data.py`` at the set's own geometry (non-square image sizes as the
original supports them) with the original's configs/patchcore.yaml values (layers
blocks.2 + blocks.4, merge size 3, coreset 10%, 1 nearest neighbour, embedding
dimensions 1024 / 1024, one detector for all patches; its coreset selection computed by
:func:`fast_greedy_coreset_indices`, which picks the same indices), and writes the same per-image
statistics as ``real_data.py run`` (``real_stats.RunStats``, image scores as the
original computes them) and a summary row that ``real_data.py peer`` adds to the
results::

    /tmp/venv_hiad/bin/python benchmarks/hiad_peer.py --peer-script ../shared/peers/run_hiad.py \\
        --set ~/.cache/hiad-pl/real_data/built/ksdd --out ~/.cache/hiad-pl/real_data/runs/ksdd/hiad__patchcore.npz
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_stats  # noqa: E402

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def fast_greedy_coreset_indices(self: Any, features: Any) -> np.ndarray:
    """HiAD's approximate greedy coreset selection, the same indices in a fraction of the time.

    The original recomputes every feature's squared norm and concatenates a new
    ``[N, 2]`` tensor for each of its ``0.1 N`` steps (hours on a 2-core CPU for half a
    million features); here the norms are computed once, by the same operation, and
    the running minimum is updated in place. Same start points (numpy's global
    generator), same distance formula, same first-maximum tie rule: the selected
    indices are identical (checked by ``--check-coreset``).
    """
    import torch

    starts = np.clip(self.number_of_starting_points, None, len(features))
    start_points = np.random.choice(len(features), starts, replace=False).tolist()
    distances = self._compute_batchwise_differences(features, features[start_points])
    anchor = torch.mean(distances, axis=-1).detach().reshape(-1).clone()
    count = int(len(features) * self.percentage)
    if self.logger is not None:
        self.logger.info(f"Approximate Greedy Coreset Feature Num is {count}")
    indices = []
    with torch.no_grad():
        features = features.detach()
        squares = features.unsqueeze(1).bmm(features.unsqueeze(2)).reshape(-1, 1)
        for _ in range(count):
            select = int(torch.argmax(anchor))
            indices.append(select)
            chosen = features[select : select + 1]
            chosen_square = chosen.unsqueeze(1).bmm(chosen.unsqueeze(2)).reshape(1, -1)
            step = (-2 * features.mm(chosen.T) + squares + chosen_square).clamp(0, None).sqrt()
            torch.minimum(anchor, step.reshape(-1), out=anchor)
    return np.array(indices)


def check_coreset() -> None:
    """The fast selection picks the original's indices on random features."""
    import torch
    from hiad.detectors.patchcore.sampler import ApproximateGreedyCoresetSampler

    features = torch.nn.Linear(256, 128, bias=False)(torch.randn(20000, 256))
    sampler = ApproximateGreedyCoresetSampler(0.05, torch.device("cpu"), None)
    np.random.seed(0)
    original = sampler._compute_greedy_coreset_indices(features)
    np.random.seed(0)
    fast = fast_greedy_coreset_indices(sampler, features)
    if not np.array_equal(original, fast):
        raise SystemExit(f"coreset indices differ at {int(np.argmax(original != fast))} of {len(original)}")
    print(f"coreset: the same {len(fast)} indices")


def main() -> None:
    """Fit and score the original HiAD PatchCore on one built set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-script", type=Path, required=True, help="the peer runner (run_hiad.py)")
    parser.add_argument("--set", type=Path, help="a set folder built by real_data.py")
    parser.add_argument("--out", type=Path, help="per-image statistics (.npz); the row goes beside it (.json)")
    parser.add_argument("--check-coreset", action="store_true", help="only check the fast coreset selection")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("run_hiad", args.peer_script)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)  # its CPU adaptations and backbone injection
    if args.check_coreset:
        check_coreset()
        return
    if args.set is None or args.out is None:
        parser.error("--set and --out are required")
    from hiad.detectors.patchcore.sampler import ApproximateGreedyCoresetSampler

    ApproximateGreedyCoresetSampler._compute_greedy_coreset_indices = fast_greedy_coreset_indices

    from hiad.detectors import HRPatchCore
    from hiad.task import A2OTaskGenerator
    from hiad.trainer import HRTrainer
    from hiad.utils.base import create_logger
    from hiad.utils.split_and_gather import HRSample, MultiResolutionHRImageSpliter

    root = args.set
    record = json.loads((root / "set.json").read_text())
    image_size, patch_size = list(record["image_size"]), int(record["patch_size"])
    train = [HRSample(image=str(p), image_size=image_size)
             for p in sorted((root / "train" / "good").iterdir()) if p.suffix.lower() in EXTENSIONS]
    test, keys, masks = [], [], []
    for kind in sorted(d for d in (root / "test").iterdir() if d.is_dir()):
        for path in sorted(kind.iterdir()):
            if path.suffix.lower() not in EXTENSIONS:
                continue
            mask = root / "ground_truth" / kind.name / f"{path.stem}_mask.png"
            defective = kind.name != "good"
            test.append(HRSample(image=str(path), mask=str(mask) if defective else None, image_size=image_size,
                                 label=int(defective), label_name=kind.name, clsname=root.name))
            keys.append(f"{kind.name}/{path.stem}")
            masks.append(mask if defective else None)
    config = {"patch": {
        "backbone_name": "efficientnet_lite0_imagenet", "layers_to_extract_from": ["blocks.2", "blocks.4"],
        "merge_size": 3, "percentage": 0.1, "pretrain_embed_dimension": 1024, "target_embed_dimension": 1024,
        "anomaly_scorer_num_nn": 1, "faiss_on_gpu": False, "faiss_num_workers": 2, "patch_size": patch_size,
    }}
    indexes = MultiResolutionHRImageSpliter(image_size=image_size, patch_size=patch_size)
    tasks = A2OTaskGenerator().create_tasks(train, indexes)
    with tempfile.TemporaryDirectory(prefix="hiad_peer_") as work:
        (Path(work) / "ckpt").mkdir()
        (Path(work) / "logs").mkdir()
        logger = create_logger("main", str(Path(work) / "logs" / "main.log"), print_console=True)
        trainer = HRTrainer(batch_size=1, tasks=tasks, checkpoint_root=str(Path(work) / "ckpt"),
                            log_root=str(Path(work) / "logs"), detector_class=HRPatchCore, vis_root=None,
                            config=config, seed=0)
        start = time.perf_counter()
        trainer.train(train_samples=train, gpu_ids=[0], main_logger=logger)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        scores, maps = trainer.inference(test_samples=test, gpu_ids=[0], return_results_only=True, main_logger=logger)
        per_image_s = (time.perf_counter() - start) / len(test)
    from PIL import Image

    full_masks = [None if m is None else (np.asarray(Image.open(m).convert("L")) > 0).astype(np.uint8) for m in masks]
    labels = [int(m is not None) for m in masks]
    stats = real_stats.collect(keys, labels, [float(s) for s in scores], [np.asarray(m, np.float32) for m in maps],
                               full_masks)
    stats.save(args.out)
    row = {"set": root.name, "detector": "hiad", "variant": "patchcore", "class_path": "HiAD 0.2.1 HRPatchCore",
           "config": config["patch"], "image_size": image_size, "patch_size": patch_size, "train_images": len(train),
           "test_images": len(test), "test_defective": sum(labels), "fit_s": fit_s, "inference_s_per_image": per_image_s,
           "floor_s_per_image": float("nan"), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    row.update(real_stats.summary(stats))
    args.out.with_suffix(".json").write_text(json.dumps(row, indent=1))
    print("RESULT", json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
