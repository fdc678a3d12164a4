"""benchmarks/real_data.py builds MVTec-layout sets from the repositories' layouts (fake copies built here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_data():
    """The benchmark script as a module."""
    spec = importlib.util.spec_from_file_location("real_data", ROOT / "benchmarks" / "real_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_data"] = module
    spec.loader.exec_module(module)
    return module


def _grey(path: Path, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(path)


def fake_magnetic_tile(root: Path) -> Path:
    """``MT_<kind>/Imgs/<stem>.jpg`` + ``<stem>.png`` masks, as in the magnetic tile repository."""
    for i in range(14):
        _grey(root / "MT_Free" / "Imgs" / f"exp1_num_{i}.jpg", (40, 30), 100 + i)
        _grey(root / "MT_Free" / "Imgs" / f"exp1_num_{i}.png", (40, 30), 0)
    for kind in ("Blowhole", "Crack"):
        for i in range(3):
            stem = root / f"MT_{kind}" / "Imgs" / f"exp2_num_{kind}{i}"
            _grey(stem.with_suffix(".jpg"), (40, 30), 60)
            mask = np.zeros((30, 40), np.uint8)
            mask[10:14, 20:24] = 255
            Image.fromarray(mask).save(stem.with_suffix(".png"))
    return root


def fake_bsdata(root: Path) -> Path:
    """``data/*.jpg``, ``label/*.json`` (labelme polygons) and ``image_data.json``, as in BSData."""
    records = []
    for i in range(14):
        name = f"01_good{i:02d}_crop_2.jpg"
        _grey(root / "data" / name, (113, 46), 120)
        records.append({"filename": name, "type": 2, "train_test_split": None, "annotations": None})
    _grey(root / "data" / "01_other_crop_1.jpg", (90, 90), 120)  # another view: left out
    records.append({"filename": "01_other_crop_1.jpg", "type": 2, "train_test_split": None, "annotations": None})
    for i in range(3):
        name = f"01_pit{i}_crop_2.jpg"
        _grey(root / "data" / name, (113, 46), 90)
        label = {"shapes": [{"label": "Pitting", "shape_type": "polygon", "points": [[10, 10], [30, 10], [30, 20], [10, 20]]}],
                 "imageWidth": 113, "imageHeight": 46}
        (root / "label").mkdir(parents=True, exist_ok=True)
        (root / "label" / f"01_pit{i}_crop_2.json").write_text(json.dumps(label))
        records.append({"filename": name, "type": 2, "train_test_split": "test", "annotations": f"01_pit{i}_crop_2.json"})
    (root / "image_data.json").write_text(json.dumps({"images": records}))
    return root


def test_builds_both_sets_in_the_mvtec_layout(real_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(real_data, "IMAGE_SIZE", 64)
    monkeypatch.setattr(real_data, "BSD_VIEW", (113, 46))
    sources = {"mt_tile": fake_magnetic_tile(tmp_path / "mt"), "bsd_screw": fake_bsdata(tmp_path / "bsd")}
    out = tmp_path / "built"
    real_data.build(out, sources, ["mt_tile", "bsd_screw"], {"train2": 2, "train4": 4})

    from hiad_pl.data.discovery import discover

    for setting, count in (("train2", 2), ("train4", 4)):
        splits = {s.name: s for s in discover(str(out / setting), categories=["mt_tile", "bsd_screw"], image_size=64)}
        assert len(splits["mt_tile"].train) == len(splits["bsd_screw"].train) == count
        mt_kinds = sorted({s.label_name for s in splits["mt_tile"].test})
        assert mt_kinds == ["blowhole", "crack", "good"]
        assert sum(s.label for s in splits["mt_tile"].test) == 4  # two of each defect kind
        assert sum(1 - s.label for s in splits["bsd_screw"].test) == real_data.TEST_NORMAL
        # the off-view image never enters a split
        assert all("other" not in str(s.get_image_path()) for s in splits["bsd_screw"].train + splits["bsd_screw"].test)
    train2 = {p.name for p in (out / "train2/mt_tile/train/good").iterdir()}
    train4 = {p.name for p in (out / "train4/mt_tile/train/good").iterdir()}
    assert train2 < train4
    assert not train4 & {p.name for p in (out / "train4/mt_tile/test/good").iterdir()}

    mask = np.asarray(Image.open(next((out / "train2/bsd_screw/ground_truth/pitting").iterdir())))
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    # the polygon [10, 30] x [10, 20] of a 113 x 46 image, resized by nearest neighbour
    ys, xs = np.nonzero(mask)
    assert abs(xs.min() - 10 * 64 / 113) <= 1 and abs(ys.max() - 20 * 64 / 46) <= 2
    image = Image.open(next((out / "train2/mt_tile/test/crack").iterdir()))
    assert image.size == (64, 64) and image.mode == "RGB"


def test_split_is_fixed_by_the_seed(real_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = real_data.SourceTree(fake_magnetic_tile(tmp_path / "mt"))
    first = real_data.split_items(real_data.mt_tile_items(tree), 2, 4)
    second = real_data.split_items(real_data.mt_tile_items(tree), 2, 4)
    assert [[i.stem for i in part] for part in first] == [[i.stem for i in part] for part in second]


def test_section_replaces_only_its_own_part(real_data, tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("### resolution\n\n| a |\n")
    real_data.write_section(doc, "| first |")
    real_data.write_section(doc, "| second |")
    text = doc.read_text()
    assert text.startswith("### resolution") and "| second |" in text and "| first |" not in text
    assert text.count(real_data.SECTION) == 1


def test_offline_weights_are_aligned_only_with_tf_padding(real_data) -> None:
    """The shipped Lite0 weights were trained with TF padding: symmetric padding moves stride-s maps by ~s - 1 px."""
    aligned = real_data.feature_offsets("tf_efficientnet_lite0", size=128)
    shifted = real_data.feature_offsets("efficientnet_lite0", size=128)
    assert all(abs(v) < 3 for offset in aligned.values() for v in offset)
    assert all(5 < v < 9 for v in shifted["blocks.2"])
    assert all(10 < v < 17 for v in shifted["blocks.4"])


def test_run_one_fits_and_scores_a_built_set(real_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(real_data, "IMAGE_SIZE", 128)
    out = tmp_path / "built"
    real_data.build(out, {"mt_tile": fake_magnetic_tile(tmp_path / "mt")}, ["mt_tile"], {"train2": 2})
    result = real_data.run_one(out / "train2" / "mt_tile", "patchcore", "train2", {}, image_size=128, patch_size=64)
    assert result["train_images"] == 2 and result["test_images"] == real_data.TEST_NORMAL + 4
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= result[key] <= 1.0
    assert "| mt_tile | train2 | hiad-pl HRPatchCore |" in real_data.table([result])
