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
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from hiad_pl.cli import main as cli
from hiad_pl.demo import make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
#: Sections of docs/results.md that other benchmarks write (real_data.py, bench_inference.py, load_test.py): kept.
KEPT_SECTIONS = ("## Real data", "## Inference and PatchCore at scale", "## Serving")
SMALL = 1024  # comparisons of options run at 1024 px (defects keep their pixel size) to stay affordable on a CPU

PATCHCORE = "configs/patchcore_quickstart.yaml"
PADIM = "configs/padim_quickstart.yaml"
FASTFLOW = "configs/fastflow_quickstart.yaml"
RETRIEVAL = "configs/retrieval_quickstart.yaml"
BOXES = {"class_path": "hiad_pl.syn.RandomBoxSynthesizer", "init_args": {"p": 0.5, "seed": 0}}
STAINS = {"class_path": "hiad_pl.syn.ColorShiftSynthesizer",
          "init_args": {"p": 0.5, "region": "ellipse", "ellipse_axes": [4, 24], "seed": 0}}


def at_1024(*categories: str, **data: Any) -> dict[str, Any]:
    """Overrides that run a config on ``demo_data_1024`` (patches of 256), optionally on some categories."""
    chosen = {"categories": list(categories)} if categories else {}
    return {"data": {"root": "demo_data_1024", **chosen, "image_size": SMALL, "patch_size": 256, **data}}


def tasks(generator: str, **init_args: Any) -> dict[str, Any]:
    """Overrides that choose a task generator of ``hiad_pl.tasks``."""
    return {"tasks": {"class_path": f"hiad_pl.tasks.{generator}", "init_args": init_args}}


def validation(synthesizer: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Overrides that add a validation set: 20% of the training images, at most 200 patches per task."""
    return {"validation": {"anomaly_syn_fn": synthesizer, "val_sample_ratio": 0.2, "max_patch_number": 200, **extra}}


def epochs(count: int, **init_args: Any) -> dict[str, Any]:
    """Overrides of the detector's training length (and other init_args)."""
    return {"detector": {"init_args": {"epochs": count, **init_args}}}


def experiment(name: str, group: str, base: str, what: str, *overrides: dict[str, Any]) -> dict[str, Any]:
    """One experiment: ``base`` config updated by ``overrides`` (merged in order)."""
    combined: dict[str, Any] = {}
    for part in overrides:
        combined = merge(combined, part)
    return {"name": name, "group": group, "base": base, "what": what, **({"set": combined} if combined else {})}


def merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, dicts merged recursively except class_path blocks (replaced)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and "class_path" not in value:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


ROTATED = at_1024("object_rotated")
EXPERIMENTS: list[dict[str, Any]] = [
    # full-resolution detection vs the same detector on a 256-px thumbnail
    experiment("quickstart", "resolution", PATCHCORE, "PatchCore, 2048 px, 16 patches of 512, 4 neighbourhood tasks"),
    experiment("downscaled_256", "resolution", PATCHCORE, "PatchCore, image downscaled to 256 px (one patch)",
               {"data": {"image_size": 256, "patch_size": 256}}, tasks("A2OTaskGenerator")),
    # more detectors
    experiment("padim", "detectors", PADIM, "PaDiM, 2048 px, 4 neighbourhood tasks"),
    experiment("fastflow", "detectors", FASTFLOW, "FastFlow, 2048 px, 4 neighbourhood tasks"),
    # thumbnail branch on large defects, fusion on fine texture
    experiment("large_patch_only", "thumbnail", PATCHCORE, "PatchCore patches only", at_1024("texture_large")),
    experiment("large_thumbnail", "thumbnail", PATCHCORE, "PatchCore patches + 256-px thumbnail",
               at_1024("texture_large"), {"thumbnail": {"thumbnail_size": 256}}),
    experiment("large_thumbnail_shared", "thumbnail", PATCHCORE,
               "PatchCore patches + 256-px thumbnail, box validation, normalization shared",
               at_1024("texture_large"), {"thumbnail": {"thumbnail_size": 256}}, validation(BOXES, normalization="shared")),
    experiment("fine_plain", "fusion", PATCHCORE, "PatchCore, no fusion", at_1024("texture_fine")),
    experiment("fine_fusion", "fusion", PATCHCORE, "PatchCore, fusion ds_factors [0, 1], weights [0.5, 0.5]",
               at_1024("texture_fine", ds_factors=[0, 1]), {"fusion_weights": [0.5, 0.5]}),
    # task generators that look at the images
    experiment("object_a2o", "tasks", PATCHCORE, "A2O (1 detector)", at_1024("object"), tasks("A2OTaskGenerator")),
    experiment("object_spatial4", "tasks", PATCHCORE, "SpatialClustering, 4 clusters (4 detectors)",
               at_1024("object"), tasks("SpatialClusteringTaskGenerator", cluster_number=4)),
    experiment("object_o2o", "tasks", PATCHCORE, "O2O (16 detectors)", at_1024("object"), tasks("O2OTaskGenerator")),
    experiment("rotated_a2o", "tasks", PATCHCORE, "rotated object, A2O (1 detector)", ROTATED, tasks("A2OTaskGenerator")),
    experiment("rotated_spatial4", "tasks", PATCHCORE, "rotated object, SpatialClustering 4",
               ROTATED, tasks("SpatialClusteringTaskGenerator", cluster_number=4)),
    experiment("rotated_retrieve4", "tasks", PATCHCORE, "rotated object, RetrieveTaskGenerator 4",
               ROTATED, tasks("RetrieveTaskGenerator", cluster_number=4)),
    experiment("rotated_retrieve4_top2", "tasks", PATCHCORE, "rotated object, RetrieveTaskGenerator 4, train_top_k 2",
               ROTATED, tasks("RetrieveTaskGenerator", cluster_number=4, train_top_k=2)),
    experiment("rotated_retrieve4_top2_val", "tasks", RETRIEVAL,
               "rotated object, RetrieveTaskGenerator 4, train_top_k 2, stain validation of 2 images (normalised)",
               validation(STAINS)),
    experiment("rotated_retrieve4_top2_shared", "tasks", RETRIEVAL,
               "rotated object, RetrieveTaskGenerator 4, train_top_k 2, stain validation of 2 images, normalization shared",
               validation(STAINS, normalization="shared")),
    experiment("padim_rotated_a2o", "tasks", PADIM, "PaDiM, rotated object, A2O", ROTATED, tasks("A2OTaskGenerator")),
    experiment("padim_rotated_spatial4", "tasks", PADIM, "PaDiM, rotated object, SpatialClustering 4",
               ROTATED, tasks("SpatialClusteringTaskGenerator", cluster_number=4)),
    experiment("padim_rotated_retrieve4", "tasks", PADIM, "PaDiM, rotated object, Retrieve 4",
               ROTATED, tasks("RetrieveTaskGenerator", cluster_number=4)),
    # validation set (FastFlow's quality depends on the epoch)
    experiment("fastflow_plain_1024", "validation", FASTFLOW, "FastFlow, 8 epochs, last epoch kept, raw scores",
               at_1024(), epochs(8)),
    experiment("fastflow_val_1024", "validation", FASTFLOW, "FastFlow, 8 epochs, best validated epoch kept, normalised",
               at_1024(), epochs(8), validation(BOXES)),
    experiment("fastflow_val_stain_1024", "validation", FASTFLOW,
               "FastFlow, 8 epochs, best epoch on small colour-shift stains, normalised",
               at_1024(), epochs(8), validation(STAINS)),
    experiment("fastflow_plain_lr_1024", "validation", FASTFLOW, "FastFlow, lr 0.005, 8 epochs, last epoch kept, raw scores",
               at_1024(), epochs(8, lr=0.005)),
    experiment("fastflow_val_stain_lr_1024", "validation", FASTFLOW,
               "FastFlow, lr 0.005, 8 epochs, best epoch on small colour-shift stains, normalised",
               at_1024(), epochs(8, lr=0.005), validation(STAINS)),
]
COLUMNS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1", "pro")


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
    markdown = args.out.with_suffix(".md")
    markdown.write_text(table(results) + "".join(kept_sections(markdown)))


def kept_sections(markdown: Path) -> list[str]:
    """The sections of ``markdown`` that other benchmarks own, each with its leading blank line."""
    if not markdown.is_file():
        return []
    parts = re.split(r"(?m)^(?=## )", markdown.read_text())
    return ["\n" + part.rstrip("\n") + "\n" for part in parts if part.startswith(KEPT_SECTIONS)]


if __name__ == "__main__":
    main()
