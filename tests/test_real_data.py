"""benchmarks/real_data.py builds the real sets from the repositories' layouts (fake copies built here);
benchmarks/real_stats.py computes metrics, intervals and paired differences that agree with exact ones."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_data():
    """The benchmark script as a module."""
    return _load("real_data")


@pytest.fixture(scope="module")
def real_stats():
    """The statistics module."""
    return _load("real_stats")


def _grey(path: Path, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(path)


def _box_mask(path: Path, size: tuple[int, int], box: tuple[int, int, int, int] | None) -> None:
    mask = np.zeros((size[1], size[0]), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def fake_kolektorsdd(root: Path) -> Path:
    """``data/kosNN/PartK.jpg`` with ``PartK_label.bmp``; kos01 Part0 and kos02 Part1 defective; a nested copy."""
    for item in range(1, 4):
        for part in range(4):
            base = root / "data" / f"kos{item:02d}" / f"Part{part}"
            _grey(base.with_suffix(".jpg"), (50, 126), 90 + part)
            defective = (item, part) in {(1, 0), (2, 1)}
            _box_mask(base.parent / f"Part{part}_label.bmp", (50, 126), (10, 40, 20, 60) if defective else None)
    nested = root / "data" / "kos03" / "kos01" / "Part0.jpg"  # a stray copy in the repository: not an image of the set
    _grey(nested, (50, 126), 10)
    return root


def fake_bsdata(root: Path) -> Path:
    """``data/*.jpg``, ``label/*.json`` (labelme polygons) and ``image_data.json``, as in BSData."""
    records = []
    for i in range(8):
        name = f"01_good{i:02d}_crop_2.jpg"
        _grey(root / "data" / name, (113, 46), 120)
        records.append({"filename": name, "type": 2, "annotations": None})
    _grey(root / "data" / "01_other_crop_1.jpg", (90, 90), 120)  # another view: left out
    records.append({"filename": "01_other_crop_1.jpg", "type": 2, "annotations": None})
    for i in range(3):
        name = f"01_pit{i}_crop_2.jpg"
        _grey(root / "data" / name, (113, 46), 90)
        label = {"shapes": [{"label": "Pitting", "shape_type": "polygon", "points": [[10, 10], [30, 10], [30, 20], [10, 20]]}],
                 "imageWidth": 113, "imageHeight": 46}
        (root / "label").mkdir(parents=True, exist_ok=True)
        (root / "label" / f"01_pit{i}_crop_2.json").write_text(json.dumps(label))
        records.append({"filename": name, "type": 2, "annotations": f"01_pit{i}_crop_2.json"})
    (root / "image_data.json").write_text(json.dumps({"images": records}))
    return root


def fake_magnetic_tile(root: Path) -> Path:
    """``MT_<kind>/Imgs/<stem>.jpg`` + ``<stem>.png`` masks, as in the magnetic tile repository."""
    for i in range(40):
        _grey(root / "MT_Free" / "Imgs" / f"exp1_num_{i}.jpg", (40, 30), 100 + i)
        _box_mask(root / "MT_Free" / "Imgs" / f"exp1_num_{i}.png", (40, 30), None)
    for kind in ("Blowhole", "Crack"):
        for i in range(3):
            stem = root / f"MT_{kind}" / "Imgs" / f"exp2_num_{kind}{i}"
            _grey(stem.with_suffix(".jpg"), (40, 30), 20)
            _box_mask(stem.with_suffix(".png"), (40, 30), (20, 10, 24, 14))
    return root


@pytest.fixture
def small_sets(real_data, monkeypatch: pytest.MonkeyPatch):
    """The three sets with small counts and sizes."""
    sets = {
        "ksdd": dataclasses.replace(real_data.SETS["ksdd"], image_size=(64, 160), train=4, test_normal=3),
        "bsd_screw": dataclasses.replace(real_data.SETS["bsd_screw"], image_size=(113, 46), train=4, test_normal=3),
        "mt_panels": dataclasses.replace(real_data.SETS["mt_panels"], image_size=(32, 32), train=3, test_normal=2),
    }
    monkeypatch.setattr(real_data, "SETS", sets)
    monkeypatch.setattr(real_data, "MT_TILE", 16)
    monkeypatch.setattr(real_data, "MT_PER_KIND", 2)
    return sets


def _sources(tmp_path: Path) -> dict[str, Path]:
    return {"kolektorsdd": fake_kolektorsdd(tmp_path / "ksdd"), "bsdata": fake_bsdata(tmp_path / "bsd"),
            "magnetic_tile": fake_magnetic_tile(tmp_path / "mt")}


def test_builds_three_sets_in_the_mvtec_layout(real_data, small_sets, tmp_path: Path) -> None:
    out = tmp_path / "built"
    records = real_data.build(out, _sources(tmp_path), list(small_sets))

    from hiad_pl.data.discovery import discover

    splits = {s.name: s for s in discover(str(out), categories=list(small_sets), image_size=None)}
    ksdd = splits["ksdd"]
    assert len(ksdd.train) == 4 and sum(s.label for s in ksdd.test) == 2 and len(ksdd.test) == 5
    assert all("kos03_kos01" not in str(s.get_image_path()) for s in ksdd.train + ksdd.test)
    image = Image.open(ksdd.test[0].get_image_path())
    assert image.size == (64, 160) and image.mode == "RGB"
    mask = np.asarray(Image.open(out / "ksdd" / "ground_truth" / "defect" / "kos01_Part0_mask.png"))
    ys, xs = np.nonzero(mask)
    assert set(np.unique(mask)) == {0, 255} and abs(xs.min() - 10 * 64 / 50) <= 1 and abs(ys.max() - 60 * 160 / 126) <= 2

    bsd = splits["bsd_screw"]
    assert len(bsd.train) == 4 and sum(s.label for s in bsd.test) == 3 and len(bsd.test) == 6
    assert all("other" not in str(s.get_image_path()) for s in bsd.train + bsd.test)  # the other view is left out
    assert Image.open(bsd.test[0].get_image_path()).size == (113, 46)  # native size, not resized

    mt = splits["mt_panels"]
    assert len(mt.train) == 3 and sorted({s.label_name for s in mt.test}) == ["blowhole", "crack", "good"]
    tiles = []
    for sample in mt.train + mt.test:
        panel = np.asarray(Image.open(sample.get_image_path()).convert("L"))
        tiles += [int(panel[y + 8, x + 8]) for y in (0, 16) for x in (0, 16)]
        if sample.label:  # one defective tile per panel: its mask lies inside one 16-px tile
            stem = Path(sample.get_image_path()).stem
            panel_mask = np.asarray(Image.open(out / "mt_panels" / "ground_truth" / sample.label_name / f"{stem}_mask.png"))
            ys, xs = np.nonzero(panel_mask)
            assert len(ys) and ys.max() - ys.min() < 16 and xs.max() - xs.min() < 16
    normal_tiles = [v for v in tiles if v >= 100]  # each normal tile has its own grey value: none is used twice
    assert len(normal_tiles) == len(set(normal_tiles)) == 3 * 4 + 2 * 4 + 4 * 3
    record = records["mt_panels"]
    assert record["test_defective"] == 4 and len(record["files"]["test"]) == 6
    assert json.loads((out / "ksdd" / "set.json").read_text())["pinned_commit"] == real_data.SOURCES["kolektorsdd"].commit
    assert not (out / "ksdd" / ".plan.json").exists()


def test_split_is_fixed_by_the_seed(real_data, small_sets, tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    first = real_data.build(tmp_path / "a", sources, ["mt_panels", "ksdd"])
    second = real_data.build(tmp_path / "b", sources, ["mt_panels", "ksdd"])
    assert first["ksdd"]["files"] == second["ksdd"]["files"]
    for name in first["mt_panels"]["files"]["test"]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "mt_panels" / "test" / f"{name}.png")),
                              np.asarray(Image.open(tmp_path / "b" / "mt_panels" / "test" / f"{name}.png")))


def test_a_rerun_completes_a_half_built_set(real_data, small_sets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = _sources(tmp_path)
    out = tmp_path / "built"
    calls = {"n": 0}
    original = real_data._save_png

    def interrupted(image: Image.Image, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        original(image, path)

    monkeypatch.setattr(real_data, "_save_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        real_data.build(out, sources, ["bsd_screw"])
    assert (out / "bsd_screw" / ".plan.json").exists() and not (out / "bsd_screw" / "set.json").exists()
    first_files = {p: p.stat().st_mtime_ns for p in (out / "bsd_screw").rglob("*.png")}
    assert 0 < len(first_files) < 10
    monkeypatch.setattr(real_data, "_save_png", original)
    record = real_data.build(out, sources, ["bsd_screw"])["bsd_screw"]
    assert len(record["files"]["test"]) == 6
    assert all(p.stat().st_mtime_ns == t for p, t in first_files.items())  # kept, not rewritten
    assert not list((out / "bsd_screw").rglob(".*.tmp.png"))


def test_other_settings_on_a_built_folder_are_refused(real_data, small_sets, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sources = _sources(tmp_path)
    out = tmp_path / "built"
    real_data.build(out, sources, ["ksdd"])
    monkeypatch.setitem(real_data.SETS, "ksdd", dataclasses.replace(small_sets["ksdd"], train=2))
    with pytest.raises(real_data.BuildError, match=r"other settings.*train"):
        real_data.build(out, sources, ["ksdd"])


def test_bad_sources_are_named(real_data, small_sets, tmp_path: Path) -> None:
    with pytest.raises(real_data.BuildError, match=r"source bsdata: .*nowhere does not exist"):
        real_data.build(tmp_path / "out", {"bsdata": tmp_path / "nowhere"}, ["bsd_screw"])
    sources = _sources(tmp_path)
    (sources["kolektorsdd"] / "data" / "kos02" / "Part3.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(real_data.BuildError, match=r"source kolektorsdd .*kos02/Part3.jpg: unreadable image"):
        real_data.build(tmp_path / "out", sources, ["ksdd"])


def test_a_repository_at_another_commit_is_refused(real_data, small_sets, tmp_path: Path) -> None:
    repo = fake_bsdata(tmp_path / "bsd")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "fake"], check=True)
    with pytest.raises(real_data.BuildError, match=r"source bsdata: .* is at commit \w{8}, .*pinned to 7204b28a"):
        real_data.build(tmp_path / "out", {"bsdata": repo}, ["bsd_screw"])
    record = real_data.build(tmp_path / "out", {"bsdata": repo}, ["bsd_screw"], any_commit=True)
    assert len(record["bsd_screw"]["files"]["test"]) == 6  # read from the git tree, HEAD


# -------------------------------------------------------------------------------------------- statistics


def _synthetic_run(real_stats, seed: int, signal: float, n: int = 60):
    rng = np.random.default_rng(seed)
    maps, masks, labels = [], [], []
    for i in range(n):
        m = rng.normal(size=(48, 64)).astype(np.float32)
        mask = None
        if i % 3 == 0:
            mask = np.zeros((48, 64), np.uint8)
            mask[5:12, 10:20] = 1
            mask[30:33, 40:50] = 1
            m[mask > 0] += signal
        maps.append(m)
        masks.append(mask)
        labels.append(int(mask is not None))
    scores = [float(m.max()) for m in maps]
    return real_stats.collect([f"img{i}" for i in range(n)], labels, scores, maps, masks), maps, masks, labels, scores


def test_binned_metrics_agree_with_exact_ones(real_stats) -> None:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    stats, maps, masks, labels, scores = _synthetic_run(real_stats, 0, 1.5)
    point = real_stats.point(stats)
    pixels = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([(k if k is not None else np.zeros(m.shape, np.uint8)).ravel() for m, k in zip(maps, masks)])
    assert point["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert point["pixel_auroc"] == pytest.approx(roc_auc_score(truth, pixels), abs=2e-4)
    assert point["pixel_ap"] == pytest.approx(average_precision_score(truth, pixels), abs=2e-3)
    precision, recall, _ = precision_recall_curve(truth, pixels)
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    assert point["pixel_f1_max"] == pytest.approx(f1, abs=2e-3)
    # AUPRO: per-region overlap against the normal-pixel FPR, integrated to 0.3, by brute force
    thresholds = np.quantile(pixels, np.linspace(0, 1, 3000))
    normal = pixels[truth == 0]
    from scipy import ndimage

    regions = []
    for m, k in zip(maps, masks):
        if k is not None:
            labelled, count = ndimage.label(k > 0, structure=np.ones((3, 3)))
            regions += [m[labelled == r] for r in range(1, count + 1)]
    fpr = np.array([(normal >= t).mean() for t in thresholds])
    pro = np.array([np.mean([(r >= t).mean() for r in regions]) for t in thresholds])
    order = np.argsort(fpr)
    x, y = fpr[order], pro[order]
    keep = x <= 0.3
    exact = np.trapezoid(np.append(y[keep], np.interp(0.3, x, y)), np.append(x[keep], 0.3)) / 0.3
    assert point["aupro"] == pytest.approx(exact, abs=3e-3)


def test_intervals_cover_the_point_and_narrow_with_more_images(real_stats) -> None:
    small = real_stats.summary(_synthetic_run(real_stats, 1, 1.0, n=30)[0], resamples=300)
    large = real_stats.summary(_synthetic_run(real_stats, 1, 1.0, n=120)[0], resamples=300)
    for row in (small, large):
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            assert row[f"{metric}_lo"] <= row[metric] <= row[f"{metric}_hi"]
    assert large["image_auroc_hi"] - large["image_auroc_lo"] < small["image_auroc_hi"] - small["image_auroc_lo"]


def test_paired_bootstrap_tells_a_better_run_from_noise(real_stats, tmp_path: Path) -> None:
    strong = _synthetic_run(real_stats, 2, 2.0)[0]
    weak = _synthetic_run(real_stats, 2, 0.7)[0]  # same noise, weaker defects
    weak.save(tmp_path / "weak.npz")
    weak = real_stats.RunStats.load(tmp_path / "weak.npz")
    # the pairing follows the keys, not the order
    shuffled = weak.aligned(list(reversed(weak.keys)))
    result = real_stats.paired([(strong, shuffled), (strong, weak)], resamples=300)
    assert result["pixel_auroc"]["lo"] > 0 and result["aupro"]["lo"] > 0 and result["pixel_auroc"]["p_better"] == 1.0
    same = real_stats.paired([(strong, strong)], resamples=100)
    assert same["image_auroc"]["difference"] == 0.0 and same["image_auroc"]["lo"] == same["image_auroc"]["hi"] == 0.0
    other = real_stats.collect(["x"] * 2, [0, 1], [0.1, 0.2], None, None)
    with pytest.raises(ValueError, match="different images"):
        real_stats.paired([(strong, other)])


def test_every_benchmark_setting_is_an_option_of_its_detector(real_data) -> None:
    import inspect

    from hiad_pl.detectors import get_detector

    for name, (class_path, config) in real_data.DETECTORS.items():
        options = inspect.signature(get_detector(class_path).__init__).parameters
        assert not set(config) - set(options), f"{name}: {sorted(set(config) - set(options))} are not options"


def test_the_control_fit_leaves_the_trainable_parts_at_their_initialisation(real_data, small_demo: Path,
                                                                           tmp_path: Path) -> None:
    import torch

    from conftest import texture_split
    from hiad_pl.detectors import HRFastFlow
    from hiad_pl.orchestrator import TaskOrchestrator

    split, tasks = texture_split(small_demo)
    config = {"backbone_name": "resnet18", "layers_to_extract_from": ["layer1"], "weights": "none", "flow_steps": 1,
              "epochs": 2}

    def flows(control: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        orchestrator = TaskOrchestrator(HRFastFlow, config, tasks, tmp_path / str(control), batch_size=8,
                                        trainer_kwargs=dict(real_data.CONTROL_TRAINER) if control else None)
        orchestrator.fit(split.train[:2], [])
        state = torch.load(orchestrator.checkpoint_path(tasks[0]), weights_only=True)
        return {k: v for k, v in state["state_dict"].items() if k.startswith("model.flows.")}

    torch.manual_seed(0)
    initial = {f"model.flows.{k}": v for k, v in HRFastFlow(**config, input_size=256).model.flows.state_dict().items()}
    control, trained = flows(True), flows(False)
    assert control.keys() == initial.keys()
    assert all(torch.equal(control[k], initial[k]) for k in initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if trained[k].is_floating_point())


def test_seam_statistics_separate_patch_seams_from_content_along_the_grid(real_data) -> None:
    size, patch = (96, 64), 32
    rng = np.random.default_rng(0)
    flat = 1.0 + 0.01 * rng.random((64, 96))
    seamed = flat.copy()
    seamed[:, 28:36] += 0.5  # a raised column along the patch border x = 32 only
    seamed[:, 60:68] += 0.5  # and x = 64
    grid = flat.copy()
    grid[:, ::4] += 0.5  # structure everywhere, at borders and centres alike
    stats = real_data.seam_statistics([flat, seamed, grid], [0, 0, 0], size, patch)
    per_map = [real_data.seam_statistics([m], [0], size, patch) for m in (flat, seamed, grid)]
    assert abs(per_map[0]["seam_excess"] - 1) < 0.01
    assert per_map[1]["seam_excess"] > 1.1 and per_map[1]["seam_ratio"] > 1.1
    assert abs(per_map[2]["seam_excess"] - 1) < 0.05
    assert stats["seam_ratio"] == pytest.approx(np.mean([p["seam_ratio"] for p in per_map]))
    # a composed set's cells (64 px) meet at the patch border x = 64: content, left out with cell_side
    joined = 1.0 + 0.01 * rng.random((64, 128))
    joined[:, 60:68] += 0.5
    assert real_data.seam_statistics([joined], [0], (128, 64), patch)["seam_excess"] > 1.05
    with_cells = real_data.seam_statistics([joined], [0], (128, 64), patch, cell_side=64)
    assert abs(with_cells["seam_ratio_content"] - 1) < 0.01 and abs(with_cells["seam_excess"] - 1) < 0.01


def test_seam_profile_finds_a_slope_towards_patch_borders_and_none_on_a_flat_map() -> None:
    seam_profile = _load("seam_profile")
    size, patch = (96, 64), 32  # interior borders at x = 32, 64 and y = 32
    distance = seam_profile.border_distance(size, patch)
    assert distance.shape == (64, 96)
    assert distance[10, 31] == pytest.approx(0.5) and distance[31, 10] == pytest.approx(0.5)
    assert distance[10, 16] == pytest.approx(min(15.5, 21.5))  # nearest: x = 32 (15.5 px) before y = 32 (21.5 px)
    assert distance[2, 2] == pytest.approx(29.5)  # the image's own edges are no seam
    size, patch = (384, 256), 128
    distance = seam_profile.border_distance(size, patch)
    rng = np.random.default_rng(0)
    flat = 1.0 + 0.01 * rng.random((256, 384))
    sloped = flat + 0.5 * np.exp(-distance / 6.0)  # hotter towards every interior border, as a receptive field
    flat_profile = seam_profile.profile([flat], distance)
    assert all(abs(v - 1) < 0.01 for v in flat_profile.values())
    sloped_profile = seam_profile.profile([sloped], distance)
    values = [sloped_profile[k] for k in ("0-4", "4-8", "8-16")]
    assert values[0] > values[1] > values[2] and values[0] > 1.2
