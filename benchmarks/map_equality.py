"""Maps before and after a change of the code: run the same fits twice and compare every map.

``run`` fits and scores five layouts with the CLI (``hiad-pl fit`` then ``hiad-pl predict``)
on the procedural demo texture and, with ``--real``, on one built real set
(``benchmarks/real_data.py build``): one detector for all patches (``a2o``), one per
patch position (``o2o``), retrieval of look-alike tasks (``retrieval``), the low-resolution
thumbnail branch (``thumbnail``) and multi-resolution feature fusion (``fusion``). PatchCore
on the offline EfficientNet-Lite0 with a 1% coreset keeps each case to about a minute on two
cores. Each case's maps (``.npy``), scores and fit / predict seconds go under ``--out``.

``compare A B`` reads two such folders and prints, per case, the largest absolute map
difference, the largest image-score difference and the time ratio; it exits 1 when a
map differs by more than ``--atol``.

    python benchmarks/map_equality.py run --out /tmp/maps_before --real ~/.cache/hiad-pl/real_data/built/ksdd
    # ... change the code ...
    python benchmarks/map_equality.py run --out /tmp/maps_after --real ~/.cache/hiad-pl/real_data/built/ksdd
    python benchmarks/map_equality.py compare /tmp/maps_before /tmp/maps_after
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: The detector of every case (the quickstart's PatchCore with a 1% coreset); the image score
#: is pinned so that a change of the default rule does not read as a change of the maps' code.
DETECTOR = {
    "class_path": "hiad_pl.detectors.HRPatchCore",
    "init_args": {"backbone_name": "efficientnet_lite0", "weights": "offline",
                  "layers_to_extract_from": ["blocks.2", "blocks.4"], "merge_size": 3, "percentage": 0.01,
                  "pretrain_embed_dimension": None, "target_embed_dimension": None,
                  "image_score": {"rule": "window_max", "window": 16}},
}

#: What each case adds to the base config.
CASES: dict[str, dict[str, Any]] = {
    "a2o": {"tasks": {"class_path": "hiad_pl.tasks.A2OTaskGenerator"}},
    "o2o": {"tasks": {"class_path": "hiad_pl.tasks.O2OTaskGenerator"}},
    "retrieval": {"tasks": {"class_path": "hiad_pl.tasks.RetrieveTaskGenerator",
                            "init_args": {"cluster_number": 3, "train_top_k": 2}}},
    "thumbnail": {"tasks": {"class_path": "hiad_pl.tasks.A2OTaskGenerator"}, "thumbnail": {"thumbnail_size": 256}},
    "fusion": {"tasks": {"class_path": "hiad_pl.tasks.A2OTaskGenerator"}, "fusion_weights": [0.5, 0.5],
               "data": {"ds_factors": [0, 1]}},
}


def _cli(*args: str) -> None:
    """Run the CLI of the code on ``PYTHONPATH`` (or the installed one) and fail loudly."""
    done = subprocess.run([sys.executable, "-m", "hiad_pl.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"hiad-pl {' '.join(args[:3])} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def _dataset(out: Path, real: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(name, data section) of the demo texture and, if given, the real set."""
    demo = out / "demo_data"
    if not demo.exists():
        _cli("demo-data", "--root", str(demo), "--categories", "texture", "--image_size", "1024")
    sets = [("demo", {"root": str(demo), "categories": ["texture"], "image_size": 1024, "patch_size": 256})]
    if real is not None:
        record = json.loads((real / "set.json").read_text())
        sets.append((real.name, {"root": str(real.parent), "categories": [real.name],
                                 "image_size": record["image_size"], "patch_size": record["patch_size"]}))
    return sets


def run(out: Path, real: Path | None, cases: list[str]) -> None:
    """Fit and predict every case on every set; maps and timings under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for set_name, data in _dataset(out, real):
        for case in cases:
            folder = out / f"{set_name}_{case}"
            if (folder / "timing.json").exists():
                print(f"{folder.name}: done before", flush=True)
                continue
            extra = CASES[case]
            config = {"run_dir": str(folder / "run"), "seed": 0,
                      "data": {**data, "batch_size": 8, **extra.get("data", {})}, "detector": DETECTOR,
                      **{k: v for k, v in extra.items() if k != "data"}}
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(config, indent=1))
            start = time.perf_counter()
            _cli("fit", "--config", str(folder / "config.json"))
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            _cli("predict", "--run_dir", str(folder / "run"), "--input",
                 str(Path(data["root"]) / data["categories"][0] / "test"), "--output", str(folder / "predict"))
            predict_s = time.perf_counter() - start
            (folder / "timing.json").write_text(json.dumps({"fit_s": fit_s, "predict_s": predict_s}))
            print(f"{folder.name}: fit {fit_s:.1f} s, predict {predict_s:.1f} s", flush=True)


def _scores(folder: Path) -> dict[str, float]:
    """Image scores of a case's ``scores.csv`` (its ``#`` comment lines skipped) by image."""
    with open(next((folder / "predict").rglob("scores.csv"))) as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    return {"/".join(Path(row["image"]).parts[-2:]): float(row["score"]) for row in rows if row["score"]}


def compare(a: Path, b: Path, atol: float) -> int:
    """Print the differences of every case in both folders; 1 if a map differs by more than ``atol``."""
    worst = 0.0
    print("| case | maps | max abs map difference | max abs score difference | fit s before / after "
          "| predict s before / after |")
    print("|:--|--:|--:|--:|--:|--:|")
    for case in sorted(p.name for p in a.iterdir() if (p / "timing.json").exists()):
        if not (b / case / "timing.json").exists():
            print(f"| {case} | missing in {b} | | | | |")
            continue
        maps_a = {p.relative_to(a / case): p for p in (a / case / "predict").rglob("*.npy")}
        maps_b = {p.relative_to(b / case): p for p in (b / case / "predict").rglob("*.npy")}
        if set(maps_a) != set(maps_b):
            raise SystemExit(f"{case}: different map files ({len(maps_a)} vs {len(maps_b)})")
        diff = max(float(np.abs(np.load(maps_a[k]).astype(np.float64) - np.load(maps_b[k])).max()) for k in maps_a)
        sa, sb = _scores(a / case), _scores(b / case)
        score_diff = max(abs(sa[k] - sb[k]) for k in sa)
        worst = max(worst, diff)
        ta, tb = (json.loads((x / case / "timing.json").read_text()) for x in (a, b))
        print(f"| {case} | {len(maps_a)} | {diff:.2e} | {score_diff:.2e} | {ta['fit_s']:.1f} / {tb['fit_s']:.1f} "
              f"| {ta['predict_s']:.1f} / {tb['predict_s']:.1f} |")
    return int(worst > atol)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--real", type=Path, default=None, help="a built real set (its folder holds set.json)")
    r.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if args.command == "run":
        run(args.out, args.real.expanduser() if args.real else None, args.cases)
    else:
        raise SystemExit(compare(args.a, args.b, args.atol))


if __name__ == "__main__":
    main()
