"""Time the inference pipeline stage by stage beside the bare-backbone floor; fit time and peak memory.

Two experiments on the procedural demo data (texture category), PatchCore with
the tutorial's settings (EfficientNet-Lite0 ``blocks.2`` + ``blocks.4``, embed
dimensions 1024/1024, which pool down to the layers' 152 channels, coreset 10%):

``scale``
    per image size (2048, 4096) and layout (A2O: one detector for all 512-px
    patches; O2O: one per patch position): fit time and peak RSS (in its own
    process), then per-stage inference times (decode, backbone, heads / k-NN,
    stitch, post-processing) beside the bare backbone over the same patches,
    timed in the same process, and that process's peak RSS.
``search``
    accuracy per second of the memory-bank choices at 1024 px (patches of 256,
    A2O): every training feature searched exactly (the reference), every
    feature with an IVF index, the chunked coreset with exact or IVF search;
    pixel and image AUROC, fit and inference time, measured recall@1.
``knn``
    the nearest-neighbour search alone on the bank of the 2048-px A2O fit
    (``--train`` images) and the features of two test images (131,072
    queries): exact search by matrix products (the reference; with
    ``--faiss-flat`` also faiss's ``IndexFlatL2``), faiss's ``IndexIVFFlat``
    (``4 sqrt(M)`` and ``sqrt(M)`` cells), hiad-pl's ``CellIndex`` at several
    ``nprobe`` (and its k = 1 scoring path, the nearest distance alone, scanned
    in float32 and in bfloat16) and
    faiss HNSW; seconds per image (65,536 queries, in calls of
    32,768 as the pipeline makes them), build time, recall@1 and the mean
    relative distance error against exact search.

    python benchmarks/bench_inference.py scale --sizes 2048 --train 30 --test 10
    python benchmarks/bench_inference.py search --out docs/bench_inference.json
    python benchmarks/bench_inference.py knn --train 30 --out docs/bench_inference.json

Results accumulate in the JSON file (``--out``) and are printed as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: The tutorial's PatchCore settings.
TUTORIAL_PATCHCORE = {
    "backbone_name": "efficientnet_lite0",
    "weights": "offline",
    "layers_to_extract_from": ["blocks.2", "blocks.4"],
    "merge_size": 3,
    "percentage": 0.1,
    "pretrain_embed_dimension": 1024,
    "target_embed_dimension": 1024,
}
#: Memory-bank variants of the ``search`` experiment: PatchCore overrides.
SEARCH_VARIANTS: dict[str, dict[str, Any]] = {
    "all features, exact": {"percentage": 1.0, "search": "exact"},
    "all features, IVF": {"percentage": 1.0, "search": "ivf"},
    "all features, HNSW": {"percentage": 1.0, "search": "hnsw"},
    "coreset 10%, exact": {"percentage": 0.1, "search": "exact"},
    "coreset 10%, IVF": {"percentage": 0.1, "search": "ivf"},
}


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def in_child(function: Callable[..., dict], *args: Any) -> dict:
    """Run ``function(*args)`` in a fresh process (its own peak RSS) and return its result."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def demo_split(root: Path, image_size: int, train: int, test: int) -> Any:
    """The texture category of a demo data set (written once under ``root``)."""
    from hiad_pl.data.discovery import discover
    from hiad_pl.demo import make_demo_dataset

    folder = root / f"demo_{image_size}_{train}_{test}"
    good = max(1, test // 3)
    make_demo_dataset(folder, categories=["texture"], image_size=image_size, num_train=train,
                      num_test_good=good, num_test_defect=max(1, test - good))
    (split,) = discover(folder, categories=["texture"], image_size=image_size)
    return split


def make_tasks(layout: str, split: Any, image_size: int, patch_size: int) -> list:
    """A2O or O2O tasks over ``patch_size`` patches."""
    from hiad_pl.tasks import A2OTaskGenerator, O2OTaskGenerator
    from hiad_pl.utils.split_and_gather import MultiResolutionHRImageSpliter

    generator = {"a2o": A2OTaskGenerator, "o2o": O2OTaskGenerator}[layout]()
    return generator.create_tasks(split.train, MultiResolutionHRImageSpliter(image_size=image_size, patch_size=patch_size))


def fit_phase(run: str, data_root: str, image_size: int, patch_size: int, train: int, test: int,
              layout: str, config: dict, threads: int) -> dict:
    """Fit one run folder; wall time and peak RSS of the fitting process."""
    import torch

    from hiad_pl.detectors import HRPatchCore
    from hiad_pl.orchestrator import TaskOrchestrator

    torch.set_num_threads(threads)
    split = demo_split(Path(data_root), image_size, train, test)
    tasks = make_tasks(layout, split, image_size, patch_size)
    start = time.perf_counter()
    TaskOrchestrator(HRPatchCore, config, tasks, run, batch_size=8).fit(split.train, [])
    return {"fit_s": time.perf_counter() - start, "fit_peak_rss_gb": peak_rss_gb(), "tasks": len(tasks)}


def backbone_floor(pipeline: Any, split: Any, images: int | None = None) -> float:
    """Mean seconds per image of the bare shared backbone over every patch of the (first ``images``) test images."""
    import torch

    backbone, size = pipeline._leader.backbone, pipeline.batch_size
    with torch.inference_mode():  # warm-up: the first pass builds the convolution kernels
        backbone(pipeline.decode(split.test[0], 0).patches.image[:size])
    total = 0.0
    timed = split.test[:images] if images else split.test
    for sample_id, sample in enumerate(timed):
        patches = pipeline.decode(sample, sample_id).patches.image
        with torch.inference_mode():
            start = time.perf_counter()
            for chunk in patches.split(size):
                backbone(chunk)
            total += time.perf_counter() - start
    return total / len(timed)


def test_phase(run: str, data_root: str, image_size: int, train: int, test: int, threads: int,
               floor_images: int | None = None) -> dict:
    """Score the test images of a fitted run: per-stage times, the backbone floor, metrics, peak RSS."""
    import torch

    from hiad_pl.metrics import default_evaluators
    from hiad_pl.orchestrator import TaskOrchestrator, collect
    from hiad_pl.outputs import evaluate_predictions

    torch.set_num_threads(threads)
    split = demo_split(Path(data_root), image_size, train, test)
    orchestrator = TaskOrchestrator("hiad_pl.detectors.HRPatchCore", {}, [], run, batch_size=8)
    orchestrator.load("cpu")
    pipeline = orchestrator.pipeline("cpu")
    floor_before = backbone_floor(pipeline, split, floor_images)
    start = time.perf_counter()
    # the maps are kept as `hiad-pl test` and HRTrainer.inference keep them: in memory up to 1 GB, on disk beyond
    scores, maps = collect(pipeline.predict(split.test), len(split.test))
    wall = (time.perf_counter() - start) / len(split.test)
    inference_peak_rss_gb = peak_rss_gb()
    # The floor is timed before and after the pipeline; on shared cores the smaller is the fairer.
    floor = min(floor_before, backbone_floor(pipeline, split, floor_images))
    start = time.perf_counter()
    report = evaluate_predictions(split.test, scores, maps, default_evaluators())  # full resolution, as `hiad-pl test`
    evaluation_s = time.perf_counter() - start
    recalls = [d.model._search[1].recall_at_1 for d in orchestrator.models.detectors.values() if d.model._search is not None]
    banks = [int(d.model.memory_bank.shape[0]) for d in orchestrator.models.detectors.values()]
    kinds = sorted({d.model._search[1].kind for d in orchestrator.models.detectors.values() if d.model._search is not None})
    return {
        "floor_s": floor,
        "inference_s": wall,
        "stages_s": pipeline.times.per_image(),
        "setup_s": pipeline.times.setup,
        "inference_peak_rss_gb": inference_peak_rss_gb,
        "test_peak_rss_gb": peak_rss_gb(),
        "pixel_auroc": report["mean"]["pixel_auroc"],
        "image_auroc": report["mean"]["image_auroc"],
        "aupro": report["mean"]["pro"],
        "evaluation_s": evaluation_s,
        "maps_on_disk": maps.num_on_disk,
        "recall_at_1": min((r for r in recalls if r is not None), default=None),
        "bank_size": sum(banks),
        "search": kinds,
        "backbones": len({id(d.backbone) for d in orchestrator.models.detectors.values()}),
    }


def knn_features(work: Path, train: int, threads: int) -> Path:
    """Bank and two test images' features of a 2048-px A2O fit, saved once under ``work``."""
    import torch

    from hiad_pl.orchestrator import TaskOrchestrator

    saved = work / f"knn_2048_{train}.pt"
    if saved.is_file():
        return saved
    run = work / f"knn_fit_{train}"
    shutil.rmtree(run, ignore_errors=True)
    in_child(fit_phase, str(run), str(work), 2048, 512, train, 10, "a2o", dict(TUTORIAL_PATCHCORE), threads)
    torch.set_num_threads(threads)
    split = demo_split(work, 2048, train, 10)
    orchestrator = TaskOrchestrator("hiad_pl.detectors.HRPatchCore", {}, [], str(run), batch_size=8)
    orchestrator.load("cpu")
    pipeline = orchestrator.pipeline("cpu")
    detector = pipeline._leader
    queries = []
    with torch.inference_mode():
        for sample_id in (0, len(split.test) // 2):  # a normal and a defective image
            patches = pipeline.decode(split.test[sample_id], sample_id).patches
            queries.append(detector.model.locally_aware_features(pipeline._embed(patches)).flatten(0, 2))
    torch.save({"bank": detector.model.memory_bank.clone(), "queries": torch.cat(queries)}, saved)
    shutil.rmtree(run, ignore_errors=True)
    return saved


def knn_experiment(saved: Path, threads: int, with_faiss_flat: bool = False) -> list[dict]:
    """Time and recall of the search choices on the saved bank and queries."""
    import math

    import numpy as np
    import torch

    from hiad_pl.detectors.nn_search import CellIndex, NearestNeighbourIndex, ivf_cells
    from hiad_pl.utils.allocator import keep_freed_memory

    keep_freed_memory()  # as the pipeline runs
    torch.set_num_threads(threads)
    data = torch.load(saved)
    bank, queries = data["bank"].float(), data["queries"].float()
    images = len(queries) / 65_536
    start = time.perf_counter()
    exact = NearestNeighbourIndex(bank, backend="torch")
    truth = torch.cat([exact._torch_search(part, 1, ids=True)[:, 0] for part in queries.split(4096)])
    true_distance = (queries - bank[truth]).norm(dim=1)
    rows = [{"name": "exact (matrix products)", "bank_size": len(bank), "build_s": 0.0,
             "search_s_per_image": (time.perf_counter() - start) / images, "recall_at_1": 1.0, "distance_error": 0.0}]

    def measure(name: str, build: Callable[[], Any], search: Callable[[Any, Any], Any]) -> None:
        begin = time.perf_counter()
        index = build()
        built = time.perf_counter() - begin
        search(index, queries[:32_768])  # warm-up
        begin = time.perf_counter()
        found = torch.cat([torch.as_tensor(search(index, part)).reshape(-1).long() for part in queries.split(32_768)])
        seconds = (time.perf_counter() - begin) / images
        distance = (queries - bank[found]).norm(dim=1)
        rows.append({"name": name, "bank_size": len(bank), "build_s": built, "search_s_per_image": seconds,
                     "recall_at_1": float((found == truth).float().mean()),
                     "distance_error": float(((distance - true_distance) / true_distance.clamp_min(1e-6)).mean())})
        print(json.dumps(rows[-1]), flush=True)

    try:
        import faiss
    except ImportError:
        faiss = None
    cells = ivf_cells(len(bank))
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
        data_np = np.ascontiguousarray(bank.numpy())

        def faiss_ivf(count: int) -> Any:
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(bank.shape[1]), bank.shape[1], count)
            sample = np.random.default_rng(0).choice(len(bank), min(len(bank), count * 64), replace=False)
            index.train(data_np[np.sort(sample)])
            index.add(data_np)
            index.nprobe = 8
            return index

        def faiss_flat() -> Any:
            index = faiss.IndexFlatL2(bank.shape[1])
            index.add(data_np)
            return index

        if with_faiss_flat:
            measure("faiss IndexFlatL2 (exact)", faiss_flat,
                    lambda index, part: index.search(np.ascontiguousarray(part.numpy()), 1)[1])
        for count in (int(4 * math.sqrt(len(bank))), cells):
            measure(f"faiss IVFFlat, {count} cells, nprobe 8", lambda count=count: faiss_ivf(count),
                    lambda index, part: index.search(np.ascontiguousarray(part.numpy()), 1)[1])
    for nprobe in (4, 6, 8, 16):
        measure(f"CellIndex, {cells} cells, nprobe {nprobe}", lambda nprobe=nprobe: CellIndex(bank, cells, nprobe),
                lambda index, part: index.search(part, 1)[1])
    # the k = 1 scoring path: the nearest distance without its position (the cells probed as above),
    # scanned in float32 and in bfloat16
    same = next(r for r in rows if r["name"] == f"CellIndex, {cells} cells, nprobe 8")
    for scan_dtype in (torch.float32, torch.bfloat16):
        begin = time.perf_counter()
        index = CellIndex(bank, cells, 8, scan_dtype=scan_dtype)
        built = time.perf_counter() - begin
        index.nearest_distances(queries[:32_768])
        begin = time.perf_counter()
        nearest = torch.cat([index.nearest_distances(part) for part in queries.split(32_768)]).sqrt()
        seconds = (time.perf_counter() - begin) / images
        relative = (nearest - true_distance) / true_distance.clamp_min(1e-6)
        rows.append({"name": f"CellIndex, {cells} cells, nprobe 8, nearest distances only, {str(scan_dtype)[6:]} scan",
                     "bank_size": len(bank), "build_s": built, "search_s_per_image": seconds,
                     "recall_at_1": same["recall_at_1"], "distance_error": float(relative.mean()),
                     "distance_error_abs": float(relative.abs().mean())})
        print(json.dumps(rows[-1]), flush=True)
    if faiss is not None:
        for ef in (16, 32, 64):
            def hnsw(ef: int = ef) -> Any:
                index = faiss.IndexHNSWFlat(bank.shape[1], 32)
                index.hnsw.efConstruction = 80
                index.add(np.ascontiguousarray(bank.numpy()))
                index.hnsw.efSearch = ef
                return index

            measure(f"faiss HNSW32, efSearch {ef}", hnsw,
                    lambda index, part: index.search(np.ascontiguousarray(part.numpy()), 1)[1])
    return rows


def knn_table(rows: list[dict]) -> str:
    """Markdown table of the ``knn`` experiment."""
    lines = table_head(["search", "bank size", "build (s)", "search (s/img)", "recall@1", "mean distance error",
                        "mean |distance error|"])
    for r in rows:
        absolute = f"{r['distance_error_abs']:.5f}" if "distance_error_abs" in r else ""
        lines.append(f"| {r['name']} | {r['bank_size']} | {r['build_s']:.1f} | {r['search_s_per_image']:.2f} "
                     f"| {r['recall_at_1']:.4f} | {r['distance_error']:.5f} | {absolute} |")
    return "\n".join(lines)


def run_experiment(name: str, work: Path, image_size: int, patch_size: int, train: int, test: int,
                   layout: str, config: dict, threads: int, floor_images: int | None = None) -> dict:
    """Fit then test in two fresh processes; one result row."""
    run = work / name.replace(" ", "_").replace(",", "").replace("%", "")
    shutil.rmtree(run, ignore_errors=True)
    row = {"name": name, "image_size": image_size, "patch_size": patch_size, "layout": layout,
           "train": train, "test": test, "threads": threads, "config": config}
    row.update(in_child(fit_phase, str(run), str(work), image_size, patch_size, train, test, layout, config, threads))
    row.update(in_child(test_phase, str(run), str(work), image_size, train, test, threads, floor_images))
    shutil.rmtree(run, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def table_head(columns: list[str]) -> list[str]:
    """The header and separator lines of a markdown table."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def scale_table(rows: list[dict]) -> str:
    """Markdown table of the ``scale`` experiment."""
    lines = table_head([
        "images", "layout", "train / test", "fit (s)", "fit peak RSS (GB)", "floor (s/img)", "inference (s/img)", "x floor",
        "x backbone stage", "decode*", "backbone", "heads / k-NN", "stitch", "post", "test peak RSS (GB)", "pixel AUROC", "search",
    ])
    for r in rows:
        s = r["stages_s"]
        lines.append(
            f"| {r['image_size']} | {r['layout'].upper()} ({r['tasks']} tasks) | {r['train']} / {r['test']} | {r['fit_s']:.0f} "
            f"| {r['fit_peak_rss_gb']:.2f} | {r['floor_s']:.2f} | {r['inference_s']:.2f} | {r['inference_s'] / r['floor_s']:.2f} "
            f"| {r['inference_s'] / s['backbone']:.2f} "
            f"| {s['decode']:.2f} | {s['backbone']:.2f} | {s['heads']:.2f} | {s['stitch']:.2f} | {s['post']:.2f} "
            f"| {r['test_peak_rss_gb']:.2f} | {r['pixel_auroc']:.4f} | {', '.join(r['search'])} |"
        )
    return "\n".join(lines)


def search_table(rows: list[dict]) -> str:
    """Markdown table of the ``search`` experiment."""
    lines = table_head([
        "memory bank", "bank size", "fit (s)", "inference (s/img)", "backbone (s/img)", "heads / k-NN (s/img)",
        "x backbone", "recall@1", "pixel AUROC", "image AUROC",
    ])
    for r in rows:
        recall = "exact" if r["recall_at_1"] is None or r["search"] == ["exact"] else f"{r['recall_at_1']:.3f}"
        lines.append(
            f"| {r['name']} | {r['bank_size']} | {r['fit_s']:.0f} | {r['inference_s']:.2f} | {r['stages_s']['backbone']:.2f} "
            f"| {r['stages_s']['heads']:.2f} | {r['inference_s'] / r['stages_s']['backbone']:.2f} | {recall} "
            f"| {r['pixel_auroc']:.6f} | {r['image_auroc']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Command line: ``scale`` or ``search``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["scale", "search", "knn"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--layouts", nargs="+", default=["a2o", "o2o"], choices=["a2o", "o2o"])
    parser.add_argument("--train", type=int, default=30, help="training images")
    parser.add_argument("--test", type=int, default=10, help="test images")
    parser.add_argument("--variants", nargs="+", default=list(SEARCH_VARIANTS), choices=list(SEARCH_VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--floor-images", type=int, default=None,
                        help="time the backbone floor on the first N test images only (default: all)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_inference"))
    parser.add_argument("--out", type=Path, default=None, help="JSON file the rows are added to")
    parser.add_argument("--faiss-flat", action="store_true", help="knn: also time faiss's exact IndexFlatL2 (slow)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.experiment == "scale":
        for size in args.sizes:
            for layout in args.layouts:
                rows.append(run_experiment(f"{layout} {size}", args.work, size, 512, args.train, args.test,
                                           layout, dict(TUTORIAL_PATCHCORE), args.threads, args.floor_images))
        print(scale_table(rows))
    elif args.experiment == "knn":
        rows = knn_experiment(knn_features(args.work, args.train, args.threads), args.threads, args.faiss_flat)
        print(knn_table(rows))
    else:
        for name in args.variants:
            config = {**TUTORIAL_PATCHCORE, **SEARCH_VARIANTS[name]}
            rows.append(run_experiment(name, args.work, 1024, 256, args.train, args.test, "a2o", config, args.threads))
        print(search_table(rows))
    if args.out is not None:
        saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
        saved.setdefault(args.experiment, []).extend(rows)
        args.out.write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
