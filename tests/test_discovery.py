"""Data discovery: MVTec-style, flat tutorial folder, JSON-lines list, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from hiad_pl.data.discovery import DatasetError, discover
from hiad_pl.errors import ImageReadError


def _img(path, size=(32, 32), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _mask(path, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[3:6, 3:6] = 255
    Image.fromarray(m).save(path)


def make_mvtec(root):
    for c in ("a", "b"):
        for k in range(3):
            _img(root / c / "train" / "good" / f"{k:03d}.png")
        _img(root / c / "test" / "good" / "000.png")
        _img(root / c / "test" / "scratch" / "000.png")
        _mask(root / c / "ground_truth" / "scratch" / "000_mask.png")


def test_mvtec_layout(tmp_path):
    make_mvtec(tmp_path)
    splits = discover(tmp_path, image_size=32)
    assert [s.name for s in splits] == ["a", "b"]
    a = splits[0]
    assert len(a.train) == 3 and all(s.label == 0 for s in a.train)
    assert sorted((s.label, s.label_name, s.mask is not None) for s in a.test) == [(0, "good", False), (1, "scratch", True)]
    assert [s.name for s in discover(tmp_path, categories=["b"])] == ["b"]
    assert [s.name for s in discover(tmp_path / "a")] == ["a"]


def test_flat_tutorial_layout(tmp_path):
    for k in range(2):
        _img(tmp_path / f"train{k:03d}.jpg")
    _img(tmp_path / "test000.jpg")
    _img(tmp_path / "test001.jpg")
    _mask(tmp_path / "test001_mask.jpg")
    (split,) = discover(tmp_path)
    assert len(split.train) == 2
    labels = {s.get_image_path().rsplit("/", 1)[-1]: (s.label, s.mask is not None) for s in split.test}
    assert labels == {"test000.jpg": (0, False), "test001.jpg": (1, True)}


def test_jsonl_list(tmp_path):
    _img(tmp_path / "i" / "n1.png")
    _img(tmp_path / "i" / "n2.png")
    _img(tmp_path / "i" / "d1.png")
    _mask(tmp_path / "i" / "d1_mask.png")
    lines = [
        {"image": "i/n1.png", "label": 0, "clsname": "x"},
        {"image": "i/n2.png", "label": 0, "clsname": "x", "split": "test"},
        {"image": "i/d1.png", "mask": "i/d1_mask.png", "label": 1, "clsname": "x"},
    ]
    path = tmp_path / "list.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    (split,) = discover(path)
    assert split.name == "x" and len(split.train) == 1 and len(split.test) == 2


def test_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty or unrecognised"):
        discover(tmp_path / "empty")
    (tmp_path / "c" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images"):
        discover(tmp_path / "c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\nnot json\n')
    with pytest.raises(Exception, match="bad.jsonl"):
        discover(bad)
    make_mvtec(tmp_path / "m")
    with pytest.raises(DatasetError, match="categories"):
        discover(tmp_path / "m", categories=["zzz"])


def test_defective_images_without_masks_are_known_by_their_label(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "a" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    _img(tmp_path / "a" / "test" / "dent" / "000.png")  # no ground_truth/dent folder at all
    a = discover(tmp_path, categories=["a"])[0]
    assert sorted((s.label_name, s.label, s.mask is None) for s in a.test) == [
        ("dent", 1, True), ("good", 0, True), ("scratch", 1, True)
    ]
    lines = [{"image": "a/test/dent/000.png", "label": 1, "clsname": "x"}, {"image": "a/train/good/000.png", "clsname": "x"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    (split,) = discover(tmp_path / "list.jsonl")
    assert [(s.label, s.mask) for s in split.test] == [(1, None)]


def test_without_test_only_the_training_images_are_read(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "a" / "test" / "scratch" / "001.png").write_bytes(b"not an image")  # and no mask either
    (split,) = discover(tmp_path, categories=["a"], test=False)
    assert len(split.train) == 3 and split.test == []
    with pytest.raises(ImageReadError, match="001.png: unreadable image"):
        discover(tmp_path, categories=["a"])  # the test split is checked where it is used
    lines = [{"image": "a/train/good/000.png", "clsname": "x"}, {"image": "missing.png", "label": 1, "clsname": "x"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    (split,) = discover(tmp_path / "list.jsonl", test=False)
    assert len(split.train) == 1 and split.test == []
