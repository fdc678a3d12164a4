"""Measure detectors and options on the demo data; writes the tables of docs/results.md.

Each experiment is a config from configs/ with a few overrides; it is fitted and
tested through the CLI (one process, run folders under runs/results/), timed,
and its per-category metrics are collected.

    python benchmarks/demo_results.py --list
    python benchmarks/demo_results.py --only quickstart downscaled_256
    python benchmarks/demo_results.py --out docs/results.json

Results accumulate in the JSON file (one entry per experiment), so groups can be
run separately; the Markdown tables are rebuilt from it every time.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from hiad_pl.cli import main as cli
from hiad_pl.data.demo import make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = 1024  # comparisons of options run at 1024 px (defects keep their pixel size) to stay affordable on a CPU

PATCHCORE = "configs/quickstart.yaml"
EXPERIMENTS: list[dict[str, Any]] = [
    # full-resolution detection vs the same detector on a 256-px thumbnail
    {"name": "quickstart", "group": "resolution", "base": PATCHCORE, "what": "PatchCore, 2048 px, 16 patches of 512, 4 neighbourhood tasks"},
    {"name": "downscaled_256", "group": "resolution", "base": PATCHCORE, "what": "PatchCore, image downscaled to 256 px (one patch)",
     "set": {"data": {"image_size": 256, "patch_size": 256}, "tasks": {"class_path": "hiad_pl.tasks.A2OTaskGenerator", "init_args": {}}}},
    # more detectors
    {"name": "padim", "group": "detectors", "base": "configs/padim_quickstart.yaml", "what": "PaDiM, 2048 px, 4 neighbourhood tasks"},
    {"name": "fastflow", "group": "detectors", "base": "configs/fastflow_quickstart.yaml", "what": "FastFlow, 2048 px, 4 neighbourhood tasks"},
    # thumbnail branch on large defects, fusion on fine texture
    {"name": "large_patch_only", "group": "thumbnail", "base": PATCHCORE, "what": "PatchCore patches only", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["texture_large"], "image_size": SMALL, "patch_size": 256}}},
    {"name": "large_thumbnail", "group": "thumbnail", "base": PATCHCORE, "what": "PatchCore patches + 256-px thumbnail", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["texture_large"], "image_size": SMALL, "patch_size": 256},
             "thumbnail": {"thumbnail_size": 256}}},
    {"name": "large_thumbnail_shared", "group": "thumbnail", "base": PATCHCORE, "what": "PatchCore patches + 256-px thumbnail, box validation, normalization shared", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["texture_large"], "image_size": SMALL, "patch_size": 256},
             "thumbnail": {"thumbnail_size": 256},
             "validation": {"anomaly_syn_fn": {"class_path": "hiad_pl.syn.RandomBoxSynthesizer", "init_args": {"p": 0.5, "seed": 0}},
                            "val_sample_ratio": 0.2, "max_patch_number": 200, "normalization": "shared"}}},
    {"name": "fine_plain", "group": "fusion", "base": PATCHCORE, "what": "PatchCore, no fusion", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["texture_fine"], "image_size": SMALL, "patch_size": 256}}},
    {"name": "fine_fusion", "group": "fusion", "base": PATCHCORE, "what": "PatchCore, fusion ds_factors [0, 1], weights [0.5, 0.5]", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["texture_fine"], "image_size": SMALL, "patch_size": 256, "ds_factors": [0, 1]},
             "fusion_weights": [0.5, 0.5]}},
    # task generators that look at the images
    {"name": "object_a2o", "group": "tasks", "base": PATCHCORE, "what": "A2O (1 detector)", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["object"], "image_size": SMALL, "patch_size": 256},
             "tasks": {"class_path": "hiad_pl.tasks.A2OTaskGenerator", "init_args": {}}}},
    {"name": "object_spatial4", "group": "tasks", "base": PATCHCORE, "what": "SpatialClustering, 4 clusters (4 detectors)", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["object"], "image_size": SMALL, "patch_size": 256},
             "tasks": {"class_path": "hiad_pl.tasks.SpatialClusteringTaskGenerator", "init_args": {"cluster_number": 4}}}},
    {"name": "object_o2o", "group": "tasks", "base": PATCHCORE, "what": "O2O (16 detectors)", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["object"], "image_size": SMALL, "patch_size": 256},
             "tasks": {"class_path": "hiad_pl.tasks.O2OTaskGenerator", "init_args": {}}}},
    {"name": "rotated_a2o", "group": "tasks", "base": PATCHCORE, "what": "rotated object, A2O (1 detector)", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["object_rotated"], "image_size": SMALL, "patch_size": 256},
             "tasks": {"class_path": "hiad_pl.tasks.A2OTaskGenerator", "init_args": {}}}},
    {"name": "rotated_spatial4", "group": "tasks", "base": PATCHCORE, "what": "rotated object, SpatialClustering 4", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["object_rotated"], "image_size": SMALL, "patch_size": 256},
             "tasks": {"class_path": "hiad_pl.tasks.SpatialClusteringTaskGenerator", "init_args": {"cluster_number": 4}}}},
    {"name": "rotated_retrieve4", "group": "tasks", "base": PATCHCORE, "what": "rotated object, RetrieveTaskGenerator 4", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["object_rotated"], "image_size": SMALL, "patch_size": 256},
             "tasks": {"class_path": "hiad_pl.tasks.RetrieveTaskGenerator", "init_args": {"cluster_number": 4}}}},
    {"name": "rotated_retrieve4_top2", "group": "tasks", "base": PATCHCORE, "what": "rotated object, RetrieveTaskGenerator 4, train_top_k 2", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["object_rotated"], "image_size": SMALL, "patch_size": 256},
             "tasks": {"class_path": "hiad_pl.tasks.RetrieveTaskGenerator", "init_args": {"cluster_number": 4, "train_top_k": 2}}}},
    {"name": "rotated_retrieve4_top2_val", "group": "tasks", "base": "configs/retrieval_quickstart.yaml", "data_root": "demo_data_1024",
     "what": "rotated object, RetrieveTaskGenerator 4, train_top_k 2, stain validation of 2 images (normalised)",
     "set": {"validation": {"anomaly_syn_fn": {"class_path": "hiad_pl.syn.ColorShiftSynthesizer",
                                               "init_args": {"p": 0.5, "region": "ellipse", "ellipse_axes": [4, 24], "seed": 0}},
                            "val_sample_ratio": 0.2, "max_patch_number": 200}}},
    {"name": "rotated_retrieve4_top2_shared", "group": "tasks", "base": "configs/retrieval_quickstart.yaml", "data_root": "demo_data_1024",
     "what": "rotated object, RetrieveTaskGenerator 4, train_top_k 2, stain validation of 2 images, normalization shared",
     "set": {"validation": {"anomaly_syn_fn": {"class_path": "hiad_pl.syn.ColorShiftSynthesizer",
                                               "init_args": {"p": 0.5, "region": "ellipse", "ellipse_axes": [4, 24], "seed": 0}},
                            "val_sample_ratio": 0.2, "max_patch_number": 200, "normalization": "shared"}}},
    {"name": "padim_rotated_a2o", "group": "tasks", "base": "configs/padim_quickstart.yaml", "what": "PaDiM, rotated object, A2O", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["object_rotated"], "image_size": SMALL, "patch_size": 256},
             "tasks": {"class_path": "hiad_pl.tasks.A2OTaskGenerator", "init_args": {}}}},
    {"name": "padim_rotated_spatial4", "group": "tasks", "base": "configs/padim_quickstart.yaml", "what": "PaDiM, rotated object, SpatialClustering 4", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["object_rotated"], "image_size": SMALL, "patch_size": 256},
             "tasks": {"class_path": "hiad_pl.tasks.SpatialClusteringTaskGenerator", "init_args": {'cluster_number': 4}}}},
    {"name": "padim_rotated_retrieve4", "group": "tasks", "base": "configs/padim_quickstart.yaml", "what": "PaDiM, rotated object, Retrieve 4", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "categories": ["object_rotated"], "image_size": SMALL, "patch_size": 256},
             "tasks": {"class_path": "hiad_pl.tasks.RetrieveTaskGenerator", "init_args": {'cluster_number': 4}}}},
    # validation set (FastFlow's quality depends on the epoch)
    {"name": "fastflow_plain_1024", "group": "validation", "base": "configs/fastflow_quickstart.yaml", "what": "FastFlow, 8 epochs, last epoch kept, raw scores", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "image_size": SMALL, "patch_size": 256}, "detector": {"init_args": {"epochs": 8}}}},
    {"name": "fastflow_val_1024", "group": "validation", "base": "configs/fastflow_quickstart.yaml", "what": "FastFlow, 8 epochs, best validated epoch kept, normalised", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "image_size": SMALL, "patch_size": 256}, "detector": {"init_args": {"epochs": 8}},
             "validation": {"anomaly_syn_fn": {"class_path": "hiad_pl.syn.RandomBoxSynthesizer", "init_args": {"p": 0.5, "seed": 0}},
                            "val_sample_ratio": 0.2, "max_patch_number": 200}}},
    {"name": "fastflow_val_stain_1024", "group": "validation", "base": "configs/fastflow_quickstart.yaml",
     "what": "FastFlow, 8 epochs, best epoch on small colour-shift stains, normalised", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "image_size": SMALL, "patch_size": 256}, "detector": {"init_args": {"epochs": 8}},
             "validation": {"anomaly_syn_fn": {"class_path": "hiad_pl.syn.ColorShiftSynthesizer",
                                               "init_args": {"p": 0.5, "region": "ellipse", "ellipse_axes": [4, 24], "seed": 0}},
                            "val_sample_ratio": 0.2, "max_patch_number": 200}}},
    {"name": "fastflow_plain_lr_1024", "group": "validation", "base": "configs/fastflow_quickstart.yaml",
     "what": "FastFlow, lr 0.005, 8 epochs, last epoch kept, raw scores", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "image_size": SMALL, "patch_size": 256}, "detector": {"init_args": {"epochs": 8, "lr": 0.005}}}},
    {"name": "fastflow_val_stain_lr_1024", "group": "validation", "base": "configs/fastflow_quickstart.yaml",
     "what": "FastFlow, lr 0.005, 8 epochs, best epoch on small colour-shift stains, normalised", "data_root": "demo_data_1024",
     "set": {"data": {"root": "demo_data_1024", "image_size": SMALL, "patch_size": 256}, "detector": {"init_args": {"epochs": 8, "lr": 0.005}},
             "validation": {"anomaly_syn_fn": {"class_path": "hiad_pl.syn.ColorShiftSynthesizer",
                                               "init_args": {"p": 0.5, "region": "ellipse", "ellipse_axes": [4, 24], "seed": 0}},
                            "val_sample_ratio": 0.2, "max_patch_number": 200}}},
]
COLUMNS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1", "pro")


def merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, dicts merged recursively except class_path blocks (replaced)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and "class_path" not in value:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def run(experiment: dict[str, Any], work: Path) -> dict[str, Any]:
    """Fit and test one experiment; returns its metrics and timings."""
    config = merge(yaml.safe_load((ROOT / experiment["base"]).read_text()), experiment.get("set", {}))
    config["run_dir"] = str(work / experiment["name"])
    shutil.rmtree(config["run_dir"], ignore_errors=True)  # measure a whole fit, never resume an older run
    data = config["data"]
    make_demo_dataset(data["root"], categories=data["categories"], image_size=2048 if data["root"] == "demo_data" else SMALL)
    path = work / f"{experiment['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    if cli(["fit", "--config", str(path)]) != 0:
        raise SystemExit(f"{experiment['name']}: fit failed")
    fitted = time.perf_counter()
    if cli(["test", "--config", str(path)]) != 0:
        raise SystemExit(f"{experiment['name']}: test failed")
    tested = time.perf_counter()
    report = json.loads((work / experiment["name"] / "metrics.json").read_text())["metrics"]
    return {
        "what": experiment["what"],
        "group": experiment["group"],
        "image_size": data["image_size"],
        "fit_s": round(fitted - start, 1),
        "test_s": round(tested - fitted, 1),
        "metrics": report,
    }


def table(results: dict[str, dict]) -> str:
    """Markdown tables, one per group."""
    lines: list[str] = []
    for group in dict.fromkeys(e["group"] for e in EXPERIMENTS):
        rows = [(name, r) for name, r in results.items() if r["group"] == group]
        if not rows:
            continue
        lines += [f"### {group}", "", "| experiment | setting | px | class | " + " | ".join(COLUMNS) + " | fit s | test s |",
                  "|:--|:--|--:|:--|" + "--:|" * len(COLUMNS) + "--:|--:|"]
        for name, result in rows:
            for clsname, values in result["metrics"].items():
                cells = [f"{values[c]:.4f}" if values.get(c) is not None else "-" for c in COLUMNS]
                lines.append(f"| {name} | {result['what']} | {result['image_size']} | {clsname} | " + " | ".join(cells)
                             + f" | {result['fit_s']} | {result['test_s']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Run the chosen experiments and rebuild the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="experiment names (default: all)")
    parser.add_argument("--list", action="store_true", help="list experiments and exit")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "results")
    args = parser.parse_args()
    if args.list:
        for e in EXPERIMENTS:
            print(f"{e['name']:22s} {e['group']:10s} {e['what']}")
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for experiment in EXPERIMENTS:
        if args.only and experiment["name"] not in args.only:
            continue
        print(f"== {experiment['name']}: {experiment['what']}", flush=True)
        results[experiment["name"]] = run(experiment, args.work)
        args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    args.out.with_suffix(".md").write_text(table(results))


if __name__ == "__main__":
    main()
