"""Real industrial defect benchmark: three public sets with pixel masks, detectors run on them, decisions.

Every set is built from a public git repository at a pinned commit (``build``),
cached outside the package (``~/.cache/hiad-pl/real_data``, never committed), in
the MVTec layout that hiad-pl's ``discover`` and the original HiAD's peer runner
both read::

    <out>/<set>/train/good/*.png
    <out>/<set>/test/<kind>/*.png
    <out>/<set>/ground_truth/<kind>/<stem>_mask.png
    <out>/<set>/set.json        (source, commit, licence, sizes and every file, written last)

Images stay at (or within 2.4% of) their native resolution and aspect; where the
source's images are small, real cells are composed into larger panels. Splits
are fixed by ``SEED``; every test set has >= 100 images, >= 40 of them defective.

``ksdd`` (object surface: electrical commutators, 512 x 1280)
    KolektorSDD, Tabernik et al., "Segmentation-based deep-learning approach for
    surface-defect detection" (J. Intell. Manuf. 2020), CC BY-NC-SA 4.0, as kept in
    https://github.com/songpeixuan22/Unet-Defect-Detection-in-kolektorSSD (commit
    50cf5720): ``data/kosNN/PartK.jpg`` with ``PartK_label.bmp`` (50 commutators, 8
    views each, ~500 x 1260 px). Every image with a defect (52) is in the test set,
    with 60 normal ones; 40 other normal images train. Images are resized to
    512 x 1280 (bicubic; +2.4% / +1.5%), masks by nearest neighbour. Defects cover
    0.1-1% of an image.
``bsd_screw`` (machine element: ball-screw spindle, one camera view, 1130 x 460 native)
    BSData, Schlagenhauf and Burghardt, "Industrial Machine Tool Element Surface
    Defect Dataset" (2021), CC BY-SA 4.0, https://github.com/2Obe/BSData (commit
    7204b28a). BSD type 2 in its 1130 x 460 view (the other view, 1540 x 645, has
    22 normal images: too few to train and test); labelme polygons of pitting are
    the masks. Every pitting image of the view (167) is in the test set, with 80
    normal ones; 50 other normal images train. Native size, no resizing.
``mt_panels`` (texture: magnetic tiles, 1024 x 1024 panels of 2 x 2 real tiles)
    Magnetic tile defects, Huang et al., "Surface defect saliency of magnetic
    tile" (The Visual Computer, 2020), https://github.com/abin24/Magnetic-tile-defect-datasets.
    (commit cc4eb530; no licence stated: research use). The tiles are 100-600 px, so
    four of them (each resized to 512 x 512, ~1.9x for the median tile) make one
    panel: normal panels of four ``MT_Free`` tiles, defective panels with one
    defective tile (blowhole, break, crack, fray, uneven: 20 each) at a random
    position and three normal ones. 40 training panels, 60 normal and 100 defective
    test panels; no tile is used twice.

``run`` fits and tests hiad-pl detectors on the built sets through the tutorial API
(``HRTrainer``, one detector for all patches: A2O) in one subprocess per run (its
peak RSS is its own), and keeps each run's per-image statistics
(``real_stats.RunStats``: image scores, binned pixel histograms per image and per
defect region) under ``<cache>/runs``; the table shows image AUROC with its 95%
bootstrap interval, pixel AUROC, AUPRO (FPR 0.3), pixel AP, pixel F1-max, fit time,
seconds per image and peak RSS. A finished run is not run again unless its
settings change. ``compare`` gives paired bootstrap differences of two variants
over the sets together; ``peer`` adds the original HiAD's maps (``hiad_peer.py``).

    python benchmarks/real_data.py build
    python benchmarks/real_data.py run --detectors patchcore --variant default
    python benchmarks/real_data.py run --detectors patchcore --variant hiad_features \\
        --override aggregation='"neighbourhood"' layer_weighting='"equal"'
    python benchmarks/real_data.py compare patchcore/hiad_features patchcore/default
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_stats  # noqa: E402

CACHE = Path(os.environ.get("HIAD_PL_REAL_DATA", "~/.cache/hiad-pl/real_data")).expanduser()
SEED = 0


class BuildError(RuntimeError):
    """A data set cannot be built: the message names the source and the problem."""


@dataclass(frozen=True)
class Source:
    """A public repository a set is built from, pinned to a commit."""

    url: str
    commit: str
    licence: str


SOURCES = {
    "kolektorsdd": Source("https://github.com/songpeixuan22/Unet-Defect-Detection-in-kolektorSSD",
                          "50cf572a15d12bcd951dd2bdcbcf5356cc52d6bd", "CC BY-NC-SA 4.0 (KolektorSDD)"),
    "bsdata": Source("https://github.com/2Obe/BSData", "7204b28a621733c01cd75899ed9ea27f6ea0b9e3", "CC BY-SA 4.0"),
    "magnetic_tile": Source("https://github.com/abin24/Magnetic-tile-defect-datasets.",
                            "cc4eb530b57b9cb7225bf76023873043ffd50655", "none stated (research use)"),
}


class SourceTree:
    """Read-only files of a source repository: a (bare) git directory, read at HEAD, or a plain folder."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.git_dir = self._git_dir(path)
        if self.git_dir is None and not path.is_dir():
            raise BuildError(f"source {name}: {path} is neither a folder nor a git directory")
        self._batch: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _git_dir(path: Path) -> Path | None:
        for candidate in (path, path / ".git", path / "repo"):
            if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
                return candidate
        return None

    def _git(self, *args: str) -> bytes:
        done = subprocess.run(["git", "--git-dir", str(self.git_dir), *args], capture_output=True)
        if done.returncode != 0:
            raise BuildError(f"source {self.name} ({self.path}): git {' '.join(args)}: {done.stderr.decode().strip()}")
        return done.stdout

    def commit(self) -> str | None:
        """The commit the files are read from (``None`` for a plain folder)."""
        return None if self.git_dir is None else self._git("rev-parse", "HEAD").decode().strip()

    def files(self) -> list[str]:
        """Every file path, relative to the repository root, sorted."""
        if self.git_dir is not None:
            return sorted(self._git("ls-tree", "-r", "--name-only", "HEAD").decode().splitlines())
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        """The bytes of one file (one long-lived ``git cat-file --batch`` serves a git source)."""
        if self.git_dir is None:
            try:
                return (self.path / name).read_bytes()
            except OSError as error:
                raise BuildError(f"source {self.name} ({self.path}): cannot read {name}: {error}") from error
        if self._batch is None:
            self._batch = subprocess.Popen(["git", "--git-dir", str(self.git_dir), "cat-file", "--batch"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._batch.stdin is not None and self._batch.stdout is not None
        self._batch.stdin.write(f"HEAD:{name}\n".encode())
        self._batch.stdin.flush()
        header = self._batch.stdout.readline().decode().split()
        if len(header) != 3:
            raise BuildError(f"source {self.name} ({self.path}): {name} is not in the repository at HEAD")
        data = self._batch.stdout.read(int(header[2]))
        self._batch.stdout.read(1)
        return data

    def image(self, name: str, mode: str = "RGB") -> Image.Image:
        """One image file, decoded; an unreadable file raises :class:`BuildError` naming it."""
        try:
            with Image.open(io.BytesIO(self.read(name))) as image:
                return image.convert(mode)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
            raise BuildError(f"source {self.name} ({self.path}): {name}: unreadable image ({error})") from error

    def close(self) -> None:
        """Stop the reader process."""
        if self._batch is not None:
            self._batch.communicate()
            self._batch = None


def open_source(name: str, given: dict[str, Path], any_commit: bool = False) -> SourceTree:
    """The repository of source ``name``: ``--source`` if given, else a clone in the cache; its commit checked."""
    source = SOURCES[name]
    if name in given:
        path = given[name]
        if not path.exists():
            raise BuildError(f"source {name}: {path} does not exist (a clone of {source.url} at {source.commit[:8]})")
    else:
        path = CACHE / "sources" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(["git", "clone", "--bare", source.url, str(path)], capture_output=True)
            if done.returncode != 0:
                raise BuildError(f"source {name}: cannot clone {source.url} ({done.stderr.decode().strip()}); "
                                 f"clone it elsewhere and pass --source {name}=PATH")
    tree = SourceTree(name, path)
    commit = tree.commit()
    if commit is not None and commit != source.commit and not any_commit:
        raise BuildError(f"source {name}: {path} is at commit {commit[:8]}, the benchmark is pinned to "
                         f"{source.commit[:8]} of {source.url}; check that commit out (or pass --any-commit)")
    return tree


# ------------------------------------------------------------------------------------------ set plans


@dataclass
class Planned:
    """One image of a built set: where it goes and how to draw it (and its mask)."""

    split: str  # train | test
    kind: str  # good or the defect kind
    stem: str
    render: Callable[[], tuple[Image.Image, Image.Image | None]]


@dataclass(frozen=True)
class SetSpec:
    """A benchmark set: its source, how it is planned, and the geometry detectors run it at."""

    source: str
    plan: Callable[[SourceTree, SetSpec], list[Planned]]
    image_size: tuple[int, int]  # (width, height) of every written image
    patch_size: int
    train: int
    test_normal: int
    notes: str = ""


def _binary(mask: Image.Image) -> Image.Image:
    return Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8))


def _split_normals(names: list[str], spec: SetSpec) -> tuple[list[str], list[str]]:
    """``(test, train)`` normal names: shuffled with ``SEED``, ``test_normal`` first, then ``train``."""
    shuffled = sorted(names)
    random.Random(SEED).shuffle(shuffled)
    if len(shuffled) < spec.test_normal + spec.train:
        raise BuildError(f"source {spec.source}: {len(shuffled)} normal images, the set needs "
                         f"{spec.test_normal} test + {spec.train} training images")
    return shuffled[: spec.test_normal], shuffled[spec.test_normal : spec.test_normal + spec.train]


def plan_ksdd(tree: SourceTree, spec: SetSpec) -> list[Planned]:
    """KolektorSDD: ``data/kosNN/PartK.jpg`` + ``PartK_label.bmp``; defective = a non-empty label."""
    images = [n for n in tree.files() if n.endswith(".jpg") and n.startswith("data/kos") and n.count("/") == 2]
    if not images:
        raise BuildError(f"source {tree.name} ({tree.path}): no data/kosNN/PartK.jpg images")
    size = spec.image_size
    normal, defective = [], []
    for name in images:
        label = name[: -len(".jpg")] + "_label.bmp"
        (defective if np.asarray(tree.image(label, "L")).any() else normal).append(name)

    def stem(name: str) -> str:
        return "_".join(name[: -len(".jpg")].split("/")[1:])

    def render(name: str, with_mask: bool) -> Callable[[], tuple[Image.Image, Image.Image | None]]:
        def draw() -> tuple[Image.Image, Image.Image | None]:
            image = tree.image(name).resize(size, Image.BICUBIC)
            if not with_mask:
                return image, None
            mask = tree.image(name[: -len(".jpg")] + "_label.bmp", "L").resize(size, Image.NEAREST)
            return image, _binary(mask)
        return draw

    test_normal, train = _split_normals(normal, spec)
    return ([Planned("train", "good", stem(n), render(n, False)) for n in train]
            + [Planned("test", "good", stem(n), render(n, False)) for n in test_normal]
            + [Planned("test", "defect", stem(n), render(n, True)) for n in sorted(defective)])


def _polygon_mask(annotation: dict[str, Any]) -> Image.Image:
    mask = Image.new("L", (annotation["imageWidth"], annotation["imageHeight"]), 0)
    draw = ImageDraw.Draw(mask)
    for shape in annotation["shapes"]:
        points = [tuple(p) for p in shape["points"]]
        if shape.get("shape_type", "polygon") == "polygon" and len(points) >= 3:
            draw.polygon(points, fill=255, outline=255)
    return mask


def plan_bsd(tree: SourceTree, spec: SetSpec) -> list[Planned]:
    """BSData type 2 in one view (``spec.image_size``); labelme polygons of pitting are the masks."""
    try:
        records = json.loads(tree.read("image_data.json"))["images"]
    except (ValueError, KeyError) as error:
        raise BuildError(f"source {tree.name} ({tree.path}): image_data.json unreadable ({error})") from error
    normal, defective = [], {}
    for record in records:
        if record.get("type") != 2:
            continue
        name = f"data/{record['filename']}"
        if record.get("annotations"):
            annotation = json.loads(tree.read(f"label/{record['annotations']}"))
            if (annotation["imageWidth"], annotation["imageHeight"]) == spec.image_size and annotation["shapes"]:
                defective[name] = annotation
        elif tree.image(name).size == spec.image_size:
            normal.append(name)

    def render(name: str) -> Callable[[], tuple[Image.Image, Image.Image | None]]:
        def draw() -> tuple[Image.Image, Image.Image | None]:
            image = tree.image(name)
            if image.size != spec.image_size:
                raise BuildError(f"source {tree.name}: {name} is {image.size}, expected {spec.image_size}")
            return image, (_polygon_mask(defective[name]) if name in defective else None)
        return draw

    test_normal, train = _split_normals(normal, spec)
    stem = lambda n: Path(n).stem  # noqa: E731
    return ([Planned("train", "good", stem(n), render(n)) for n in train]
            + [Planned("test", "good", stem(n), render(n)) for n in test_normal]
            + [Planned("test", "pitting", stem(n), render(n)) for n in sorted(defective)])


#: Magnetic-tile panels: tiles per side, tile side (px), defective test panels per defect kind.
MT_GRID, MT_TILE, MT_PER_KIND = 2, 512, 20


def plan_mt_panels(tree: SourceTree, spec: SetSpec) -> list[Planned]:
    """Panels of ``MT_GRID x MT_GRID`` real magnetic tiles; a defective panel holds one defective tile."""
    tiles: dict[str, list[str]] = {}
    for name in tree.files():
        parts = name.split("/")
        if len(parts) == 3 and parts[1] == "Imgs" and name.endswith(".jpg") and parts[0].startswith("MT_"):
            tiles.setdefault(parts[0].removeprefix("MT_").lower(), []).append(name)
    if "free" not in tiles:
        raise BuildError(f"source {tree.name} ({tree.path}): no MT_Free/Imgs/*.jpg tiles")
    rng = random.Random(SEED)
    free = sorted(tiles.pop("free"))
    rng.shuffle(free)
    per_panel = MT_GRID * MT_GRID
    kinds = sorted(tiles)
    panels: list[tuple[str, str, list[str], int | None]] = []  # split, kind, tiles, defective slot
    needed = (spec.train + spec.test_normal) * per_panel + MT_PER_KIND * len(kinds) * (per_panel - 1)
    if len(free) < needed:
        raise BuildError(f"source {tree.name}: {len(free)} normal tiles, the panels need {needed}")
    take = iter(free)
    for split, count in (("train", spec.train), ("test", spec.test_normal)):
        panels += [(split, "good", [next(take) for _ in range(per_panel)], None) for _ in range(count)]
    for kind in kinds:
        chosen = rng.sample(sorted(tiles[kind]), MT_PER_KIND)
        for tile in chosen:
            slot = rng.randrange(per_panel)
            cells = [next(take) for _ in range(per_panel - 1)]
            cells.insert(slot, tile)
            panels.append(("test", kind, cells, slot))

    def render(cells: list[str], slot: int | None) -> Callable[[], tuple[Image.Image, Image.Image | None]]:
        def draw() -> tuple[Image.Image, Image.Image | None]:
            side = MT_GRID * MT_TILE
            image = Image.new("RGB", (side, side))
            mask = Image.new("L", (side, side), 0) if slot is not None else None
            for position, cell in enumerate(cells):
                corner = ((position % MT_GRID) * MT_TILE, (position // MT_GRID) * MT_TILE)
                image.paste(tree.image(cell).resize((MT_TILE, MT_TILE), Image.BICUBIC), corner)
                if mask is not None and position == slot:
                    tile_mask = tree.image(cell[: -len(".jpg")] + ".png", "L")
                    mask.paste(_binary(tile_mask.resize((MT_TILE, MT_TILE), Image.NEAREST)), corner)
            return image, mask
        return draw

    return [Planned(split, kind, f"panel_{index:03d}", render(cells, slot))
            for index, (split, kind, cells, slot) in enumerate(panels)]


SETS: dict[str, SetSpec] = {
    "ksdd": SetSpec("kolektorsdd", plan_ksdd, (512, 1280), 256, train=40, test_normal=60),
    "bsd_screw": SetSpec("bsdata", plan_bsd, (1130, 460), 256, train=50, test_normal=80),
    "mt_panels": SetSpec("magnetic_tile", plan_mt_panels, (MT_GRID * MT_TILE,) * 2, 256, train=40, test_normal=60),
}


def _spec_record(name: str, spec: SetSpec, commit: str | None) -> dict[str, Any]:
    source = SOURCES[spec.source]
    return {"set": name, "source": spec.source, "url": source.url, "pinned_commit": source.commit,
            "commit": commit, "licence": source.licence, "image_size": list(spec.image_size),
            "patch_size": spec.patch_size, "train": spec.train, "test_normal": spec.test_normal, "seed": SEED}


def _save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    image.save(tmp)
    tmp.replace(path)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def build_set(out: Path, name: str, tree: SourceTree) -> dict[str, Any]:
    """Write set ``name`` under ``out/name``; a half-built folder of the same plan is completed, not restarted."""
    spec = SETS[name]
    folder = out / name
    record = _spec_record(name, spec, tree.commit())
    done = folder / "set.json"
    started = folder / ".plan.json"
    for marker in (done, started):
        if marker.exists():
            previous = {k: v for k, v in json.loads(marker.read_text()).items() if k in record}
            if previous != record:
                changed = sorted(k for k in record if previous.get(k) != record[k])
                raise BuildError(f"{folder} was built from other settings or another commit ({', '.join(changed)}): "
                                 "remove it, or build into another --out")
    if done.exists():
        print(f"{name}: already built ({folder})")
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(started, record)
    planned = spec.plan(tree, spec)
    written = 0
    for item in planned:
        target = folder / item.split / item.kind / f"{item.stem}.png"
        if target.exists():
            continue
        image, mask = item.render()
        if mask is not None:
            _save_png(mask, folder / "ground_truth" / item.kind / f"{item.stem}_mask.png")
        _save_png(image, target)
        written += 1
    record["files"] = {split: sorted(f"{i.kind}/{i.stem}" for i in planned if i.split == split) for split in ("train", "test")}
    record["test_defective"] = sum(i.split == "test" and i.kind != "good" for i in planned)
    _write_json(done, record)
    started.unlink()
    print(f"{name}: {len(record['files']['test'])} test images ({record['test_defective']} defective), "
          f"{len(record['files']['train'])} training, {spec.image_size[0]} x {spec.image_size[1]} px "
          f"({written} written now) from {tree.name} at {record['commit'][:8] if record['commit'] else 'a plain folder'}")
    return record


def build(out: Path, sources: dict[str, Path], names: Iterable[str], any_commit: bool = False) -> dict[str, Any]:
    """Build every set in ``names`` under ``out``; returns their records."""
    records = {}
    trees: dict[str, SourceTree] = {}
    try:
        for name in names:
            if name not in SETS:
                raise BuildError(f"unknown set {name!r}; known: {', '.join(SETS)}")
            source = SETS[name].source
            if source not in trees:
                trees[source] = open_source(source, sources, any_commit)
            records[name] = build_set(out, name, trees[source])
    finally:
        for tree in trees.values():
            tree.close()
    return records


# ---------------------------------------------------------------------------------------------- running

BACKBONE = {"backbone_name": "efficientnet_lite0", "weights": "offline", "layers_to_extract_from": ["blocks.2", "blocks.4"]}

#: The ViT detectors' encoder: no ViT weights ship offline, so (as their quickstart configs do) a token
#: pyramid over the offline Lite0's ImageNet weights stands in for the ViT.
TOKEN_PYRAMID = {"backbone_name": "lite0_token_pyramid", "weights": "offline", "backbone_kwargs": {"embed_dim": 192}}
#: Dinomaly's and INP-Former's eight middle taps of the pyramid (their quickstarts').
PYRAMID_TAPS = [f"blocks.{i}" for i in range(3, 11)]

#: Detector class and settings: the offline Lite0 backbone (or its token pyramid), the method's
#: settings otherwise, and a training length a 2-core CPU fits in minutes per set (the detectors'
#: defaults, HiAD's, are 50-300 epochs or 3000-5000 steps for a GPU; ``--override`` gives longer ones).
#: Every trained detector is compared with its ``--control`` (the same fit with no training step).
DETECTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "patchcore": ("hiad_pl.detectors.HRPatchCore", {**BACKBONE, "merge_size": 3, "percentage": 0.1,
                                                    "pretrain_embed_dimension": 1024, "target_embed_dimension": 1024,
                                                    "num_neighbors": 1}),
    "padim": ("hiad_pl.detectors.HRPaDiM", {**BACKBONE, "d_reduced": 100, "epsilon": 0.01}),
    # 8 epochs of ~50 steps (400-500 patches, batch 8): the quickstart's small flows, 4x its epochs
    # (the default, HiAD's: 300).
    "fastflow": ("hiad_pl.detectors.HRFastFlow", {**BACKBONE, "flow_steps": 4, "hidden_ratio": 1.0,
                                                  "conv3x3_only": False, "epochs": 8}),
    # 8 epochs, the quickstart's (the default: 50).
    "rdpp": ("hiad_pl.detectors.HRRDPP", {**BACKBONE, "epochs": 8, "proj_lr": 0.001, "distill_lr": 0.005,
                                          "weight_proj": 0.2, "ocbe_blocks": 1, "decoder_blocks": 1}),
    # 300 steps (50 student, 250 segmentation): 3x the quickstart's, a tenth of the default 3000.
    "destseg": ("hiad_pl.detectors.HRDesTSeg", {**BACKBONE, "steps": 300, "de_st_steps": 50, "lr_de_st": 0.4,
                                                "lr_res": 0.1, "lr_seghead": 0.01,
                                                "student_encoder": "mobilenetv3_small_050", "decoder_blocks": 1,
                                                "segmentation_width": 64, "student_final_relu": False,
                                                "student_bn_recalibration": 4}),
    # 4 epochs, the quickstart's (the default: 200).
    "vitad": ("hiad_pl.detectors.HRVitAD", {**TOKEN_PYRAMID,
                                            "layers_to_extract_from": ["blocks.4", "blocks.7", "blocks.10", "blocks.15"],
                                            "lr": 0.001, "epochs": 4}),
    # 300 steps with a 20-step warm-up and the hard-mining ramp over the first half: 5x the quickstart's,
    # a tenth of the default 3000 (Dinomaly's groups: the pyramid's shallow and deep halves).
    "dinomaly": ("hiad_pl.detectors.HRDinomaly", {**TOKEN_PYRAMID, "layers_to_extract_from": PYRAMID_TAPS,
                                                  "total_steps": 300, "warmup_steps": 20,
                                                  "hard_mining_ramp_steps": 150, "eval_every": 100}),
    # 300 steps, as Dinomaly (the default: 3000 steps at lr 2e-3).
    "inpformer": ("hiad_pl.detectors.HRINPFormer", {**TOKEN_PYRAMID, "layers_to_extract_from": PYRAMID_TAPS,
                                                    "num_prototypes": 6, "total_steps": 300, "warmup_steps": 20,
                                                    "eval_every": 100}),
    # 4 epochs of ~50-63 steps (batch 8) with the quickstart's CPU-sized UNet and selections
    # (the default, HiAD's: 1000 epochs on WideResNet-50 features).
    "realnet": ("hiad_pl.detectors.HRRealNet", {**BACKBONE, "epochs": 4, "lr": 0.001, "afs_channels": [32, 64],
                                                "init_bsn": 2, "width_ratio": 0.5, "channel_mult": [1, 2, 4],
                                                "res_blocks": 1, "attention_at": [2, 4], "rrs_counts": [32, 32],
                                                "rrs_residual_layers": 1, "rrs_normalised_input": True}),
}

#: Trainer options of the untrained control: the fit runs (callbacks, checkpoint, normalisation)
#: without a training step, so the trainable parts score at their initialisation.
CONTROL_TRAINER = {"max_epochs": 0, "max_steps": 0}

#: Image-score rules evaluated on every run's maps besides the pipeline's own (the detector's rule).
SCORE_RULES = ("max", "top100_mean", "window16", "window32", "window64")


def rule_scores(maps: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Image scores of each rule in :data:`SCORE_RULES` from full-resolution maps."""
    import torch

    from hiad_pl.postprocess import image_score

    out: dict[str, list[float]] = {rule: [] for rule in SCORE_RULES}
    for m in maps:
        t = torch.from_numpy(np.asarray(m, np.float32))
        out["max"].append(float(t.max()))
        out["top100_mean"].append(float(t.flatten().topk(min(100, t.numel())).values.mean()))
        out["window16"].append(float(image_score(t, 16)))
        out["window32"].append(float(image_score(t, 32)))
        out["window64"].append(float(image_score(t, 64)))
    return {k: np.asarray(v) for k, v in out.items()}


#: Width (px) of the band along interior patch borders in which seams are measured.
SEAM_BAND = 8

#: Side (px) of the source cells a composed set joins into one image: the joins are real
#: content edges, so the content-controlled seam measures leave them out.
CELL_SIDE = {"mt_panels": MT_TILE}


def _lines_band(shape: tuple[int, int], xs: Iterable[int], ys: Iterable[int], width: int) -> np.ndarray:
    """``[H, W]`` mask of the pixels within ``width`` px of the vertical lines ``xs`` and horizontal lines ``ys``."""
    band = np.zeros(shape, bool)
    for x in xs:
        if 0 < x < shape[1]:
            band[:, max(0, x - width) : x + width] = True
    for y in ys:
        if 0 < y < shape[0]:
            band[max(0, y - width) : y + width, :] = True
    return band


def seam_statistics(maps: Iterable[np.ndarray], labels: Iterable[int], image_size: tuple[int, int],
                    patch_size: int, cell_side: int | None = None) -> dict[str, float]:
    """Patch-seam effects on the normal images' maps.

    ``seam_ratio``: mean score within ``SEAM_BAND`` px of an interior patch border over
    the mean elsewhere (1 = no seam); ``seam_argmax_share``: share of normal images
    whose hottest 16 x 16 window touches that band (the band covers ``band_share`` of the image).

    Content controls: a part's own structure may run along a patch border (or a composed
    set's cells meet there), which raises the ratio without any seam. ``seam_ratio_content``
    leaves the joins of ``cell_side``-px source cells out of both sides; ``centre_ratio`` is the
    same measure for lines through the patches' centres, where no patch ends; ``seam_excess``
    is their quotient, the part of the ratio that only patch borders have (1 = no seam).
    """
    import torch

    from hiad_pl.data.tiling import HRImageSpliter, seam_band

    band = seam_band(image_size, patch_size, SEAM_BAND)
    if not band.any():
        return {}
    shape = band.shape
    cells = (_lines_band(shape, range(cell_side, shape[1], cell_side), range(cell_side, shape[0], cell_side), SEAM_BAND)
             if cell_side else np.zeros(shape, bool))
    indexes = HRImageSpliter(image_size, patch_size)
    centre = _lines_band(shape, {i.x + i.width // 2 for i in indexes}, {i.y + i.height // 2 for i in indexes},
                         SEAM_BAND) & ~band & ~cells
    seam = band & ~cells
    ratios, content, centres, hits = [], [], [], []
    window = 16
    for m, label in zip(maps, labels):
        if label:
            continue
        ratios.append(float(m[band].mean() / max(m[~band].mean(), 1e-12)))
        content.append(float(m[seam].mean() / max(m[~band & ~cells].mean(), 1e-12)))
        centres.append(float(m[centre].mean() / max(m[~band & ~cells & ~centre].mean(), 1e-12)))
        sums = torch.from_numpy(np.ascontiguousarray(m)).unfold(1, window, 1).sum(-1).unfold(0, window, 1).sum(-1)
        y, x = divmod(int(sums.argmax()), sums.shape[1])
        hits.append(bool(band[y : y + window, x : x + window].any()))
    return {"seam_ratio": float(np.mean(ratios)), "seam_argmax_share": float(np.mean(hits)),
            "band_share": float(band.mean()), "seam_ratio_content": float(np.mean(content)),
            "centre_ratio": float(np.mean(centres)), "seam_excess": float(np.mean(content) / np.mean(centres))}


def config_hash(value: Any) -> str:
    """Short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def run_key(set_name: str, detector: str, variant: str) -> str:
    """Key of one run in the results: ``set|detector/variant``."""
    return f"{set_name}|{detector}/{variant}"


def stats_path(runs: Path, set_name: str, detector: str, variant: str) -> Path:
    """Where a run's per-image statistics are kept."""
    return runs / set_name / f"{detector}__{variant}.npz"


def peak_rss_gb() -> float:
    """Peak resident memory of this process (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_one(set_root: Path, detector: str, overrides: dict[str, Any], stats_file: Path,
            control: bool = False, threads: int = 2) -> dict[str, Any]:
    """Fit and test one detector on one built set; per-image statistics to ``stats_file``, the summary returned.

    ``control`` scores with the trainable parts at their initialisation (the fit runs
    with :data:`CONTROL_TRAINER`: no training step), the untrained control of a trained detector.
    """
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_inference import backbone_floor
    from hiad_pl.data.discovery import discover
    from hiad_pl.orchestrator import TaskOrchestrator, collect
    from hiad_pl.task import A2OTaskGenerator
    from hiad_pl.utils.split_and_gather import MultiResolutionHRImageSpliter

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    record = json.loads((set_root / "set.json").read_text())
    image_size, patch_size = tuple(record["image_size"]), int(record["patch_size"])
    (split,) = discover(str(set_root.parent), categories=[set_root.name], image_size=image_size)
    class_path, config = DETECTORS[detector]
    overrides = dict(overrides)
    context_margin = int(overrides.pop("context_margin", 0))  # a data setting, not a detector option
    config = {**config, **overrides, "input_size": patch_size}
    indexes = MultiResolutionHRImageSpliter(image_size=image_size, patch_size=patch_size)
    tasks = A2OTaskGenerator().create_tasks(split.train, indexes)
    with tempfile.TemporaryDirectory(prefix="hiad_pl_real_") as work:
        orchestrator = TaskOrchestrator(class_path, config, tasks, work, batch_size=8, context_margin=context_margin,
                                        trainer_kwargs=dict(CONTROL_TRAINER) if control else None)
        start = time.perf_counter()
        orchestrator.fit(split.train, [])
        fit_s = time.perf_counter() - start
        orchestrator.load("cpu")
        pipeline = orchestrator.pipeline("cpu")
        start = time.perf_counter()
        scores, maps = collect(pipeline.predict(split.test), len(split.test))
        per_image_s = (time.perf_counter() - start) / len(split.test)
        floor_s = backbone_floor(pipeline, split, 5)
        full = [np.asarray(m, np.float32) for m in maps]
    keys = [f"{s.label_name}/{Path(s.get_image_path()).stem}" for s in split.test]
    labels = [int(s.label) for s in split.test]
    masks = [s.full_mask() if s.mask is not None else None for s in split.test]
    stats = real_stats.collect(keys, labels, [float(v) for v in scores], full, masks)
    stats.rule_scores = rule_scores(full)
    stats.save(stats_file)
    row = {"set": set_root.name, "detector": detector, "class_path": class_path, "config": config,
           "control": control, "image_size": list(image_size), "patch_size": patch_size,
           "train_images": len(split.train), "test_images": len(split.test), "test_defective": int(sum(labels)),
           "fit_s": fit_s, "inference_s_per_image": per_image_s, "floor_s_per_image": floor_s,
           "peak_rss_gb": peak_rss_gb()}
    row.update(seam_statistics(full, labels, image_size, patch_size, CELL_SIDE.get(set_root.name)))
    row.update(real_stats.summary(stats))
    return row


def _run_in_child(args: list[str]) -> dict[str, Any]:
    """Run ``run-one`` in a fresh interpreter (its peak RSS and time are its own); its JSON row."""
    done = subprocess.run([sys.executable, __file__, "run-one", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run-one {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """Accumulated results (by run key) of earlier runs."""
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(path: Path, results: dict[str, dict[str, Any]]) -> None:
    """Write the results atomically."""
    _write_json(path, dict(sorted(results.items())))


def _interval(row: dict[str, Any], metric: str) -> str:
    if metric not in row:
        return "-"
    if f"{metric}_lo" in row:
        return f"{row[metric]:.3f} [{row[f'{metric}_lo']:.3f}, {row[f'{metric}_hi']:.3f}]"
    return f"{row[metric]:.3f}"


def table(results: Iterable[dict[str, Any]]) -> str:
    """Markdown table: set x detector/variant, metrics with 95% bootstrap intervals, cost."""
    lines = ["| set | detector / variant | image AUROC [95% CI] | pixel AUROC [95% CI] | AUPRO | pixel AP | pixel F1-max "
             "| fit s | s/image | floor s/image | peak RSS GB |",
             "|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    rows = [r for r in results if "set" in r and "variant" in r]  # rows of earlier formats are kept in the file only
    for r in sorted(rows, key=lambda r: (r["set"], r["detector"], r["variant"])):
        cost = (f"{r['fit_s']:.0f} | {r['inference_s_per_image']:.2f} | {r['floor_s_per_image']:.2f} | {r['peak_rss_gb']:.1f}"
                if "fit_s" in r else "- | - | - | -")
        lines.append(f"| {r['set']} | {r['detector']} / {r['variant']} | {_interval(r, 'image_auroc')} | "
                     f"{_interval(r, 'pixel_auroc')} | {_interval(r, 'aupro')} | {r.get('pixel_ap', float('nan')):.3f} | "
                     f"{r.get('pixel_f1_max', float('nan')):.3f} | {cost} |")
    return "\n".join(lines)


def comparison_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table of paired differences (A - B, mean over the sets) with intervals."""
    lines = ["| A - B | image AUROC | pixel AUROC | AUPRO | pixel AP |", "|:--|--:|--:|--:|--:|"]
    for label, diff in rows.items():
        cells = []
        for metric in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap"):
            d = diff.get(metric)
            cells.append("-" if d is None else f"{d['difference']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(runs: Path, a: str, b: str, sets: Iterable[str], rule_a: str | None = None,
            rule_b: str | None = None) -> dict[str, dict[str, float]]:
    """Paired bootstrap of run ``a`` minus run ``b`` (``detector/variant``) over ``sets`` together."""
    pairs = []
    for set_name in sets:
        files = [stats_path(runs, set_name, *name.split("/", 1)) for name in (a, b)]
        if all(f.exists() for f in files):
            sa, sb = (real_stats.RunStats.load(f) for f in files)
            pairs.append((sa.with_rule(rule_a), sb.with_rule(rule_b)))
    if not pairs:
        raise SystemExit(f"no set has both {a} and {b}")
    result = real_stats.paired(pairs)
    for value in result.values():
        value["sets"] = len(pairs)
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

    # the weights module reads the architecture when it builds the model
    default = backbones.weights.OFFLINE_ARCHITECTURE
    backbones.weights.OFFLINE_ARCHITECTURE = architecture
    try:
        extractor = backbones.create_feature_extractor("efficientnet_lite0", BACKBONE["layers_to_extract_from"], "offline")
    finally:
        backbones.weights.OFFLINE_ARCHITECTURE = default
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


def _pairs(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=VALUE, got {value!r}")
        out[key] = rest
    return out


def main() -> None:
    """Command line: ``build`` the sets, ``run`` detectors on them, ``compare`` two runs, ``table``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the sets in the MVTec layout")
    b.add_argument("--out", type=Path, default=CACHE / "built")
    b.add_argument("--source", nargs="*", default=[], help="SOURCE=PATH: a git directory or folder of a source")
    b.add_argument("--sets", nargs="*", default=list(SETS))
    b.add_argument("--any-commit", action="store_true", help="build from a source at another commit than the pinned one")
    r = sub.add_parser("run", help="fit and test detectors on the built sets, update the results and the table")
    r.add_argument("--data", type=Path, default=CACHE / "built")
    r.add_argument("--runs", type=Path, default=CACHE / "runs", help="per-image statistics of every run")
    r.add_argument("--sets", nargs="*", default=list(SETS))
    r.add_argument("--detectors", nargs="*", default=["patchcore"])
    r.add_argument("--variant", default="default", help="name of these settings in the results")
    r.add_argument("--override", nargs="*", default=[], help="KEY=JSON: detector config overrides")
    r.add_argument("--control", action="store_true", help="the untrained control (no training steps)")
    r.add_argument("--force", action="store_true", help="run again even if a result with these settings exists")
    r.add_argument("--results", type=Path, default=Path("docs/real_data.json"))
    r.add_argument("--table", type=Path, default=None, help="also write the table into this Markdown file's '## Real data'")
    one = sub.add_parser("run-one", help=argparse.SUPPRESS)
    one.add_argument("set_root", type=Path)
    one.add_argument("detector")
    one.add_argument("overrides")
    one.add_argument("stats_file", type=Path)
    one.add_argument("--control", action="store_true")
    sub.add_parser("alignment", help="where the offline Lite0's features sit in tf_ and symmetric-padding timm models")
    c = sub.add_parser("compare", help="paired bootstrap of A - B over the sets together")
    c.add_argument("a", help="DETECTOR/VARIANT[:RULE]")
    c.add_argument("b", help="DETECTOR/VARIANT[:RULE]")
    c.add_argument("--runs", type=Path, default=CACHE / "runs")
    c.add_argument("--sets", nargs="*", default=list(SETS))
    args = parser.parse_args()
    if args.command == "build":
        try:
            build(args.out.expanduser(), {k: Path(v).expanduser() for k, v in _pairs(args.source).items()}, args.sets,
                  args.any_commit)
        except BuildError as error:
            raise SystemExit(f"error: {error}") from None
        return
    if args.command == "alignment":
        for architecture in ("tf_efficientnet_lite0", "efficientnet_lite0"):
            for layer, (x, y) in feature_offsets(architecture).items():
                print(f"{architecture} {layer}: offset x {x:+.1f} px, y {y:+.1f} px")
        return
    if args.command == "run-one":
        row = run_one(args.set_root, args.detector, json.loads(args.overrides), args.stats_file, args.control)
        print(json.dumps(row), flush=True)
        return
    if args.command == "compare":
        (a, rule_a), (b, rule_b) = ((name.partition(":")[0], name.partition(":")[2] or None) for name in (args.a, args.b))
        result = compare(args.runs, a, b, args.sets, rule_a, rule_b)
        print(json.dumps(result, indent=1))
        print(comparison_table({f"{args.a} - {args.b}": result}))
        return
    results = load_results(args.results)
    overrides = {k: json.loads(v) for k, v in _pairs(args.override).items()}
    for set_name in args.sets:
        for detector in args.detectors:
            variant = args.variant + ("_control" if args.control else "")
            key = run_key(set_name, detector, variant)
            settings = {"overrides": overrides, "control": args.control, "base": DETECTORS[detector][1],
                        "set": json.loads((args.data / set_name / "set.json").read_text())["commit"]}
            stats_file = stats_path(args.runs, set_name, detector, variant)
            if (not args.force and key in results and results[key].get("settings_hash") == config_hash(settings)
                    and stats_file.exists()):
                print(f"{key}: done before with these settings (--force runs it again)")
                continue
            row = _run_in_child([str(args.data / set_name), detector, json.dumps(overrides), str(stats_file)]
                                + (["--control"] if args.control else []))
            row.update(variant=variant, overrides=overrides, settings_hash=config_hash(settings))
            results[key] = row
            save_results(args.results, results)
            print(f"{key}: image AUROC {_interval(row, 'image_auroc')}, pixel AUROC {_interval(row, 'pixel_auroc')}, "
                  f"AUPRO {_interval(row, 'aupro')}, fit {row['fit_s']:.0f} s, {row['inference_s_per_image']:.2f} s/image",
                  flush=True)
    text = table(results.values())
    print(text)
    if args.table is not None:
        write_section(args.table, f"Built and measured by `benchmarks/real_data.py` (sources in its docstring).\n\n{text}")


if __name__ == "__main__":
    main()
