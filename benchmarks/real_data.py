"""Real industrial defect data with pixel masks at 2048 px: build the sets, run the detectors, write a table.

Two public data sets kept in git repositories (read from a local git directory or
folder with ``--source NAME=PATH``, otherwise cloned with ``git clone --depth 1``
into ``~/.cache/hiad-pl/real_data``; nothing is written inside the package):

``mt_tile`` (texture-like)
    Magnetic tile surface defects, Huang et al., "Surface defect saliency of
    magnetic tile" (The Visual Computer, 2020), from
    https://github.com/abin24/Magnetic-tile-defect-datasets. at commit
    cc4eb530b57b9cb7225bf76023873043ffd50655. Grey images of 100-600 px
    (``MT_<kind>/Imgs/<stem>.jpg``) with a pixel mask ``<stem>.png`` each.
    Normal images come from ``MT_Free``, defects from ``MT_Blowhole``,
    ``MT_Break``, ``MT_Crack``, ``MT_Fray`` and ``MT_Uneven`` (two of each kind).
``bsd_screw`` (object-like)
    Ball screw drive spindles with pitting, Schlagenhauf and Burghardt,
    "Industrial Machine Tool Element Surface Defect Dataset" (CC BY-SA 4.0), from
    https://github.com/2Obe/BSData at commit 7204b28a621733c01cd75899ed9ea27f6ea0b9e3.
    Only BSD type 2 in its 1130 x 460 view, so that every image shows the same
    part in the same pose. Images with a labelme annotation (``label/*.json``,
    polygons of pitting) are defective, their masks are the filled polygons;
    images without one are normal.

Building (``build``): for each data set, the normal images are shuffled with a
fixed seed (0); the first ``TEST_NORMAL`` go to ``test/good``, the following ones
to ``train/good``; defective test images are drawn with the same seed. Every
image is resized to 2048 x 2048 (bicubic, written as RGB PNG) and every mask to
the same size (nearest neighbour, 0/255 PNG), in the MVTec layout that hiad-pl's
``discover`` and ``run_hiad.py`` both read::

    <out>/train<N>/<set>/train/good/*.png
    <out>/train<N>/<set>/test/<kind>/*.png
    <out>/train<N>/<set>/ground_truth/<kind>/<stem>_mask.png

Two settings share one test set and differ in their training images:
``train2`` (2 images, coreset 10%: the original HiAD's configs/patchcore.yaml)
and ``train10`` (10 images, coreset 1%: the quick start's share). Ten training
images are what a 2-core CPU with ~8 GB for one job affords today: one detector
for all 16 patches of 10 images holds 655,360 features of 1024 values (2.7 GB)
before the coreset (the original HiAD's greedy coreset over the 131,072 features
of ``train2`` alone ran for over an hour on a loaded 2-core CPU); the data sets
have hundreds of normal images (``--train`` takes more).

Running (``run``): hiad-pl PatchCore, PaDiM and FastFlow through the tutorial
API (``HRTrainer``), one detector for all patches of 512 px (A2O), the offline
EfficientNet-Lite0 weights, layers blocks.2 + blocks.4; metrics as the peer
runner computes them (image AUROC; pixel AUROC and AUPRO at 512 x 512, maps
bilinear, masks nearest). Results accumulate in ``--results`` (JSON) and the
Markdown table is rebuilt from it; ``--peer NAME=FILE`` adds the JSON that
``run_hiad.py`` wrote for the same folder.

    python benchmarks/real_data.py build --out ~/.cache/hiad-pl/real_data/built
    python benchmarks/real_data.py run --data ~/.cache/hiad-pl/real_data/built --settings train2 \\
        --detectors patchcore padim fastflow
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw

CACHE = Path("~/.cache/hiad-pl/real_data").expanduser()
IMAGE_SIZE = 2048
PATCH_SIZE = 512
SEED = 0
TEST_NORMAL = 10
TRAIN_SETTINGS = {"train2": 2, "train10": 10}
#: Coreset share of each setting: the original's configs/patchcore.yaml (10%), the quick start's (1%).
CORESET_SHARE = {"train2": 0.1, "train10": 0.01}
METRIC_RESIZE = 512


@dataclass(frozen=True)
class Origin:
    """Where a data set comes from: repository and the commit it was built from."""

    url: str
    commit: str


ORIGINS = {
    "mt_tile": Origin("https://github.com/abin24/Magnetic-tile-defect-datasets.", "cc4eb530b57b9cb7225bf76023873043ffd50655"),
    "bsd_screw": Origin("https://github.com/2Obe/BSData", "7204b28a621733c01cd75899ed9ea27f6ea0b9e3"),
}


class SourceTree:
    """Read-only files of a data set's repository: a (bare) git directory or a checked-out folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.git_dir = self._git_dir(path)
        if self.git_dir is None and not path.is_dir():
            raise FileNotFoundError(f"{path}: neither a folder nor a git directory")

    @staticmethod
    def _git_dir(path: Path) -> Path | None:
        for candidate in (path, path / ".git", path / "repo"):
            if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
                return candidate
        return None

    def commit(self) -> str | None:
        """The commit the files are read from (``None`` for a plain folder)."""
        if self.git_dir is None:
            return None
        return self._git("rev-parse", "HEAD").decode().strip()

    def _git(self, *args: str) -> bytes:
        return subprocess.run(["git", "--git-dir", str(self.git_dir), *args], check=True, capture_output=True).stdout

    def files(self) -> list[str]:
        """Every file path, relative to the repository root, sorted."""
        if self.git_dir is not None:
            return sorted(self._git("ls-tree", "-r", "--name-only", "HEAD").decode().splitlines())
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        """The bytes of one file."""
        if self.git_dir is not None:
            return self._git("show", f"HEAD:{name}")
        return (self.path / name).read_bytes()


def open_source(name: str, given: dict[str, Path]) -> SourceTree:
    """The repository of data set ``name``: ``--source`` if given, else a shallow clone in the cache."""
    if name in given:
        return SourceTree(given[name])
    clone = CACHE / "sources" / name
    if not clone.exists():
        clone.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--depth", "1", ORIGINS[name].url, str(clone)], check=True)
    return SourceTree(clone)


@dataclass
class Item:
    """One image of a data set: its name, defect kind (``good`` when normal) and how to read image and mask."""

    stem: str
    kind: str
    image: Callable[[], Image.Image]
    mask: Callable[[], Image.Image] | None = None


def _image_reader(tree: SourceTree, name: str) -> Callable[[], Image.Image]:
    return lambda: Image.open(io.BytesIO(tree.read(name))).convert("RGB")


def mt_tile_items(tree: SourceTree) -> list[Item]:
    """Magnetic tile images: ``MT_<kind>/Imgs/<stem>.jpg`` with masks ``<stem>.png``."""
    items = []
    for name in tree.files():
        parts = name.split("/")
        if len(parts) != 3 or parts[1] != "Imgs" or not name.endswith(".jpg"):
            continue
        kind = parts[0].removeprefix("MT_").lower()
        stem = Path(parts[2]).stem
        if kind == "free":
            items.append(Item(stem, "good", _image_reader(tree, name)))
        else:
            mask_name = name[: -len(".jpg")] + ".png"
            items.append(Item(stem, kind, _image_reader(tree, name),
                              lambda n=mask_name: Image.open(io.BytesIO(tree.read(n))).convert("L")))
    return items


#: The BSData view kept: type 2 spindles imaged at this size.
BSD_VIEW = (1130, 460)


def _polygon_mask(annotation: dict[str, Any]) -> Image.Image:
    mask = Image.new("L", (annotation["imageWidth"], annotation["imageHeight"]), 0)
    draw = ImageDraw.Draw(mask)
    for shape in annotation["shapes"]:
        points = [tuple(p) for p in shape["points"]]
        if shape.get("shape_type", "polygon") == "polygon" and len(points) >= 3:
            draw.polygon(points, fill=255, outline=255)
    return mask


def bsd_screw_items(tree: SourceTree) -> list[Item]:
    """BSData type-2 spindles of one view; labelme polygons of pitting are the masks."""
    records = json.loads(tree.read("image_data.json"))["images"]
    items = []
    for record in records:
        if record["type"] != 2:
            continue
        name = f"data/{record['filename']}"
        stem = Path(record["filename"]).stem
        if record["annotations"]:
            annotation = json.loads(tree.read(f"label/{record['annotations']}"))
            if (annotation["imageWidth"], annotation["imageHeight"]) != BSD_VIEW or not annotation["shapes"]:
                continue
            items.append(Item(stem, "pitting", _image_reader(tree, name), lambda a=annotation: _polygon_mask(a)))
        else:
            with Image.open(io.BytesIO(tree.read(name))) as probe:
                if probe.size != BSD_VIEW:
                    continue
            items.append(Item(stem, "good", _image_reader(tree, name)))
    return items


BUILDERS: dict[str, tuple[Callable[[SourceTree], list[Item]], int]] = {
    # data set: (its items, defective test images per defect kind)
    "mt_tile": (mt_tile_items, 2),
    "bsd_screw": (bsd_screw_items, 10),
}


def _save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(path)


def _write_item(item: Item, folder: Path, split: str) -> None:
    """Resize one item to 2048 px (bicubic image, nearest mask) into ``folder``'s MVTec layout."""
    target = folder / split / item.kind / f"{item.stem}.png"
    if target.exists():
        return
    if item.mask is not None:
        mask = item.mask().resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
        mask = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8))
        _save_png(mask, folder / "ground_truth" / item.kind / f"{item.stem}_mask.png")
    _save_png(item.image().resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), target)


def split_items(items: list[Item], per_kind: int, max_train: int) -> tuple[list[Item], list[Item]]:
    """Fixed split (seed 0): ``(train, test)`` with ``TEST_NORMAL`` normal and ``per_kind`` defects per kind in test."""
    rng = random.Random(SEED)
    normal = sorted((i for i in items if i.kind == "good"), key=lambda i: i.stem)
    rng.shuffle(normal)
    test = normal[:TEST_NORMAL]
    for kind in sorted({i.kind for i in items} - {"good"}):
        defects = sorted((i for i in items if i.kind == kind), key=lambda i: i.stem)
        test += rng.sample(defects, min(per_kind, len(defects)))
    return normal[TEST_NORMAL : TEST_NORMAL + max_train], test


def build(out: Path, sources: dict[str, Path], names: Iterable[str], settings: dict[str, int]) -> dict[str, Any]:
    """Write every data set under ``out/<setting>/<set>``; returns and writes ``out/sources.json``."""
    record: dict[str, Any] = {}
    for name in names:
        tree = open_source(name, sources)
        items_of, per_kind = BUILDERS[name]
        train, test = split_items(items_of(tree), per_kind, max(settings.values()))
        for setting, count in settings.items():
            folder = out / setting / name
            for item in test:
                _write_item(item, folder, "test")
            for item in train[:count]:
                _write_item(item, folder, "train")
        record[name] = {"url": ORIGINS[name].url, "commit": tree.commit() or ORIGINS[name].commit,
                        "train": [i.stem for i in train], "test": [f"{i.kind}/{i.stem}" for i in test]}
        print(f"{name}: {len(test)} test images ({sum(i.kind != 'good' for i in test)} defective), "
              f"up to {len(train)} training images, from {record[name]['commit']}")
    (out / "sources.json").write_text(json.dumps(record, indent=1))
    return record


# ---------------------------------------------------------------------------------------------- running

BACKBONE = {"backbone_name": "efficientnet_lite0", "weights": "offline", "layers_to_extract_from": ["blocks.2", "blocks.4"]}


def detector_setups(setting: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Detector class name and config of each detector, with the settings the original HiAD runs."""
    patchcore = {**BACKBONE, "merge_size": 3, "percentage": CORESET_SHARE[setting], "pretrain_embed_dimension": 1024,
                 "target_embed_dimension": 1024, "num_neighbors": 1, "coreset_max_candidates": None}
    return {
        "patchcore": ("HRPatchCore", patchcore),
        "padim": ("HRPaDiM", {**BACKBONE}),
        "fastflow": ("HRFastFlow", {**BACKBONE, "flow_steps": 4, "epochs": 2}),  # the quick start's
    }


def run_one(
    category_root: Path,
    detector: str,
    setting: str,
    overrides: dict[str, Any],
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
) -> dict[str, Any]:
    """Fit and test one detector on one category folder; metrics as the peer runner computes them.

    ``image_size`` / ``patch_size`` below 2048 / 512 make cheap probes on the same images.
    """
    import torch

    from hiad_pl import detectors
    from hiad_pl.data.discovery import discover
    from hiad_pl.task import A2OTaskGenerator
    from hiad_pl.trainer import HRTrainer
    from hiad_pl.utils import metrics
    from hiad_pl.utils.split_and_gather import MultiResolutionHRImageSpliter

    torch.manual_seed(SEED)
    (split,) = discover(str(category_root.parent), categories=[category_root.name], image_size=image_size)
    class_name, config = detector_setups(setting)[detector]
    config = {**config, **overrides, "patch_size": patch_size}
    indexes = MultiResolutionHRImageSpliter(image_size=image_size, patch_size=patch_size)
    tasks = A2OTaskGenerator().create_tasks(split.train, indexes)
    work = Path(tempfile.mkdtemp(prefix="hiad_pl_real_"))
    trainer = HRTrainer(batch_size=4, tasks=tasks, detector_class=getattr(detectors, class_name),
                        config={"patch": config}, checkpoint_root=str(work / "ckpt"), log_root=str(work / "logs"),
                        vis_root=str(work / "vis"))
    start = time.perf_counter()
    trainer.train(train_samples=split.train, gpu_ids=[])
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = trainer.inference(split.test, gpu_ids=[], return_results_only=True)
    per_image_s = (time.perf_counter() - start) / len(split.test)
    labels = [s.label for s in split.test]
    masks = [s.full_mask() if s.mask is not None else None for s in split.test]
    result = {"detector": f"hiad-pl {class_name}", "setting": setting, "data": category_root.name, "image_size": image_size,
              "overrides": overrides, "train_images": len(split.train), "test_images": len(split.test),
              "fit_s": fit_s, "inference_s_per_image": per_image_s}
    result.update(metrics.compute_imagewise_metrics(scores, labels))
    result.update(metrics.compute_pixelwise_metrics_resize(scores, labels, maps, masks, resize=METRIC_RESIZE))
    result["aupro"] = metrics.compute_pro_resize(scores, labels, maps, masks, resize=METRIC_RESIZE)["pro"]
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return result


def feature_offsets(architecture: str, size: int = 256) -> dict[str, tuple[float, float]]:
    """Mean ``(x, y)`` offset in px of each layer's response to a 4 x 4-px bright square from its centre.

    The offline weights run in ``architecture``; the square visits 56 positions of a flat
    ``size``-px image, and the response is the centroid of the feature change (fourth
    power, so the peak dominates) after bilinear upsampling to the image.
    """
    import torch
    import torch.nn.functional as F

    from hiad_pl.detectors import backbones

    default = backbones.OFFLINE_ARCHITECTURE
    backbones.OFFLINE_ARCHITECTURE = architecture
    try:
        extractor = backbones.create_feature_extractor("efficientnet_lite0", BACKBONE["layers_to_extract_from"], "offline")
    finally:
        backbones.OFFLINE_ARCHITECTURE = default
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    flat = torch.zeros(1, 3, size, size)
    offsets: dict[str, list[tuple[float, float]]] = {layer: [] for layer in extractor.layers}
    with torch.no_grad():
        base = extractor(flat)
        for cy in range(size * 3 // 8, size * 5 // 8, 9):
            for cx in range(size * 3 // 8, size * 5 // 8, 11):
                spot = flat.clone()
                spot[..., cy - 2 : cy + 2, cx - 2 : cx + 2] = 2.0
                for layer, before, after in zip(extractor.layers, base, extractor(spot)):
                    change = (after - before).norm(dim=1, keepdim=True)
                    weight = F.interpolate(change, size=(size, size), mode="bilinear", align_corners=False)[0, 0] ** 4
                    x = float((weight.sum(0) * centres).sum() / weight.sum()) - cx
                    y = float((weight.sum(1) * centres).sum() / weight.sum()) - cy
                    offsets[layer].append((x, y))
    return {layer: tuple(float(v) for v in np.mean(values, axis=0)) for layer, values in offsets.items()}


def _row_key(result: dict[str, Any]) -> str:
    overrides = ",".join(f"{k}={v}" for k, v in sorted(result.get("overrides", {}).items()))
    return f"{result['data']}|{result['setting']}|{result['detector']}|{overrides}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the results, grouped by data set and setting."""
    lines = ["| data | setting | detector | image AUROC | pixel AUROC | AUPRO | fit s | s/image | peak RSS GB |",
             "|:--|:--|:--|--:|--:|--:|--:|--:|--:|"]
    for r in sorted(results, key=lambda r: (r["data"], r["setting"], r["detector"])):
        label = r["detector"] + (f" ({', '.join(f'{k}={v}' for k, v in r['overrides'].items())})" if r.get("overrides") else "")
        lines.append(f"| {r['data']} | {r['setting']} | {label} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
                     f"{r['aupro']:.4f} | {r['fit_s']:.0f} | {r['inference_s_per_image']:.1f} | {r['peak_rss_gb']:.1f} |")
    return "\n".join(lines)


#: Heading of the section this script owns in docs/results.md (demo_results.py keeps it when it rebuilds the file).
SECTION = "## Real data"


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the ``## Real data`` section of ``path`` with ``body``, atomically."""
    text = path.read_text() if path.exists() else ""
    head = text.split(SECTION)[0].rstrip()
    new = (head + "\n\n" if head else "") + f"{SECTION}\n\n{body.strip()}\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """Accumulated results (by row key) of earlier runs."""
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(path: Path, results: dict[str, dict[str, Any]]) -> None:
    """Write the results atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(path)


def peer_result(setting: str, path: Path) -> dict[str, Any]:
    """A ``run_hiad.py`` result in this table's terms."""
    peer = json.loads(path.read_text())
    return {"detector": "HiAD 0.2.1 HRPatchCore", "setting": setting, "data": Path(peer["data"]).name, "overrides": {},
            "image_auroc": peer["image_auroc"], "pixel_auroc": peer["pixel_auroc"], "aupro": peer["aupro"],
            "fit_s": peer["fit_s"], "inference_s_per_image": peer["inference_s_per_image"],
            "peak_rss_gb": peer["peak_rss_gb"], "train_images": peer["train_images"], "test_images": peer["test_images"]}


def _pairs(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=VALUE, got {value!r}")
        out[key] = rest
    return out


def main() -> None:
    """Command line: ``build`` the data sets, ``run`` detectors on them, ``alignment`` of the backbone variants."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the data sets at 2048 px in the MVTec layout")
    b.add_argument("--out", type=Path, default=CACHE / "built")
    b.add_argument("--source", nargs="*", default=[], help="NAME=PATH: a git directory or folder of data set NAME")
    b.add_argument("--sets", nargs="*", default=list(BUILDERS))
    b.add_argument("--train", nargs="*", default=[f"{k}={v}" for k, v in TRAIN_SETTINGS.items()],
                   help="SETTING=N: settings and their number of training images")
    sub.add_parser("alignment", help="where the offline Lite0's features sit in tf_ and symmetric-padding timm models")
    r = sub.add_parser("run", help="fit and test hiad-pl detectors, update the results and the table")
    r.add_argument("--data", type=Path, default=CACHE / "built")
    r.add_argument("--sets", nargs="*", default=list(BUILDERS))
    r.add_argument("--settings", nargs="*", default=list(TRAIN_SETTINGS))
    r.add_argument("--detectors", nargs="*", default=["patchcore", "padim", "fastflow"])
    r.add_argument("--override", nargs="*", default=[], help="KEY=JSON: detector config overrides")
    r.add_argument("--results", type=Path, default=Path("docs/real_data.json"))
    r.add_argument("--peer", nargs="*", default=[], help="SETTING/SET=FILE: a run_hiad.py result to add")
    r.add_argument("--table", type=Path, default=None,
                   help="also write the table as the '## Real data' section of this Markdown file (docs/results.md)")
    args = parser.parse_args()
    if args.command == "build":
        settings = {k: int(v) for k, v in _pairs(args.train).items()}
        build(args.out.expanduser(), {k: Path(v).expanduser() for k, v in _pairs(args.source).items()}, args.sets, settings)
        return
    if args.command == "alignment":
        for architecture in ("tf_efficientnet_lite0", "efficientnet_lite0"):
            for layer, (x, y) in feature_offsets(architecture).items():
                print(f"{architecture} {layer}: offset x {x:+.1f} px, y {y:+.1f} px")
        return
    results = load_results(args.results)
    for key, file in _pairs(args.peer).items():
        setting = key.split("/")[0]
        peer = peer_result(setting, Path(file))
        results[_row_key(peer)] = peer
    overrides = {k: json.loads(v) for k, v in _pairs(args.override).items()}
    for setting in args.settings:
        for name in args.sets:
            for detector in args.detectors:
                result = run_one(args.data.expanduser() / setting / name, detector, setting, overrides)
                print(json.dumps(result), flush=True)
                results[_row_key(result)] = result
                save_results(args.results, results)
    save_results(args.results, results)
    text = table(list(results.values()))
    print(text)
    if args.table is not None:
        write_section(args.table, f"Built and measured by `benchmarks/real_data.py` (sources and settings in its docstring).\n\n{text}")


if __name__ == "__main__":
    main()
