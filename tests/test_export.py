"""Export to ONNX: `predict --export` equals `predict --run_dir`, with onnxruntime and no torch."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy_runs import BLOCK_TORCH, fit_run
from hiad_pl.cli import main
from hiad_pl.config import DEFAULT_CONTEXT_MARGIN

#: Normalised maps agree to ~2e-6; raw PatchCore distances (~20) to float32 rounding of the k-NN (~1e-5 relative).
RTOL, ATOL = 1e-5, 1e-4
LAYOUTS = {"a2o": {"thumbnail": True, "validation": True}, "o2o": {}, "retrieval": {}}
#: A normal image and two defects (their stems collide, so output names carry the folder).
IMAGES = ("good/000.png", "scratch/000.png", "spot/000.png")
_EXPORTS: dict[str, tuple[str, Path, Path, Path]] = {}


def export_layout(layout: str, root: Path, factory: pytest.TempPathFactory) -> tuple[str, Path, Path, Path]:
    """(layout, run, export, its predictions) of a test run, fitted, exported and scored once per session."""
    if layout not in _EXPORTS:
        run = fit_run(root, factory.getbasetemp() / "deploy_runs" / layout, layout, **LAYOUTS[layout])
        export = factory.mktemp(f"export_{layout}")
        assert main(["export", "--run_dir", str(run), "--format", "onnx", "--output", str(export)]) == 0
        predictions = factory.mktemp(f"export_pred_{layout}")
        images = [str(root / "texture" / "test" / name) for name in IMAGES]
        assert main(["predict", "--export", str(export), "--input", *images, "--output", str(predictions)]) == 0
        _EXPORTS[layout] = (layout, run, export, predictions)
    return _EXPORTS[layout]


@pytest.fixture(params=list(LAYOUTS))
def exported(request, small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path, Path]:
    """A2O with thumbnail and validation statistics, O2O and retrieval runs, exported and scored."""
    return export_layout(request.param, small_demo, tmp_path_factory)


def read_scores(folder: Path) -> tuple[str, list[dict]]:
    lines = (folder / "scores.csv").read_text().splitlines()
    return lines[0], list(csv.DictReader(line for line in lines if not line.startswith("#")))


def test_export_writes_graphs_and_a_manifest(exported) -> None:
    layout, run, export, _ = exported
    manifest = json.loads((export / "manifest.json").read_text())
    tasks = json.loads((run / "texture" / "tasks.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == [t["name"] for t in tasks]
    assert all((export / t["graph"]).is_file() for t in manifest["tasks"])
    assert manifest["image_size"] == [256, 256] and manifest["spliter"]["patch_size"] == 128
    # patches are read with the default context: the graphs take the widened patch, the predictor crops it back
    margin = manifest["context_margin"]
    assert margin == DEFAULT_CONTEXT_MARGIN > 0
    assert all(t["input_size"] == [128 + 2 * margin] * 2 for t in manifest["tasks"] if t["thumbnail_size"] is None)
    assert manifest["input"]["mean"] == [0.485, 0.456, 0.406] and manifest["postprocess"]["blur_sigma"] == 4.0
    assert manifest["routing"] == ("retrieval" if layout == "retrieval" else "position")
    if layout == "retrieval":
        assert len(manifest["router"]["centers"]) == 2 and (export / "router.onnx").is_file()
    assert manifest["normalized"] is (layout == "a2o")
    stored = json.loads((run / "texture" / "thresholds.json").read_text())
    assert manifest["thresholds"] == stored
    assert stored["rule"] == ("f1_adaptive" if layout == "a2o" else "normal_fpr")
    if layout == "a2o":
        assert all(t["normalization"]["high"] > t["normalization"]["low"] for t in manifest["tasks"])


def test_predict_export_equals_predict_run_dir(exported, small_demo: Path, tmp_path: Path) -> None:
    from hiad_pl.commands import predict

    _, run, _, from_export = exported
    from_run = predict(run, [small_demo / "texture" / "test" / name for name in IMAGES], tmp_path / "run")
    (scale_a, rows_a), (scale_b, rows_b) = read_scores(from_export), read_scores(from_run)
    assert scale_a == scale_b and [r["image"] for r in rows_a] == [r["image"] for r in rows_b]
    assert sorted(p.name for p in from_export.iterdir()) == sorted(p.name for p in from_run.iterdir())
    for a, b in zip(rows_a, rows_b):
        assert float(a["score"]) == pytest.approx(float(b["score"]), rel=RTOL, abs=ATOL), a["image"]
        assert a["label"] == b["label"] and a["label"] in ("OK", "NG") and a["image_threshold"] == b["image_threshold"]
        assert abs(int(a["defect_pixels"]) - int(b["defect_pixels"])) <= 0.001 * 256 * 256
        npy = a["map"].replace("_map.png", "_map.npy")
        np.testing.assert_allclose(np.load(from_export / npy), np.load(from_run / npy), rtol=RTOL, atol=ATOL)


def test_standalone_predictor_runs_without_torch(small_demo: Path, tmp_path_factory, tmp_path: Path) -> None:
    _, _, export, from_cli = export_layout("a2o", small_demo, tmp_path_factory)
    image = small_demo / "texture" / "test" / "scratch" / "000.png"
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, "--export", str(export), "--input", str(image), "--output", str(tmp_path),
         "--batch_size", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (row,) = read_scores(tmp_path)[1]
    expected = {r["image"]: r for r in read_scores(from_cli)[1]}[str(image)]
    assert float(row["score"]) == pytest.approx(float(expected["score"]), abs=1e-6)  # one patch per call
    assert row["label"] == expected["label"] and row["label"] in ("OK", "NG")  # the decision, without torch
    assert (tmp_path / row["mask"]).is_file() and (tmp_path / row["panel"]).is_file()
    np.testing.assert_allclose(np.load(tmp_path / "000_map.npy"), np.load(from_cli / "scratch_000_map.npy"), atol=1e-6)


def test_bad_export_folder_is_named(tmp_path: Path, capsys) -> None:
    from hiad_pl.deploy.predictor import main as predictor_main

    (tmp_path / "image.png").write_bytes(b"")
    assert predictor_main(["--export", str(tmp_path / "nothing"), "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "not an export" in capsys.readouterr().err


def test_predict_takes_either_a_run_or_an_export(tmp_path: Path, capsys) -> None:
    for choice in ([], ["--run_dir", str(tmp_path), "--export", str(tmp_path)]):
        assert main(["predict", *choice, "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
        assert "either --run_dir (a fitted run) or --export" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_openvino_conversion_sends_no_telemetry(tmp_path: Path, monkeypatch) -> None:
    """The IR is written by the runtime's ONNX reader: OpenVINO's conversion tool, which reports
    usage over the network (and waits on a machine without DNS), is never called."""
    import openvino as ov
    import torch

    from hiad_pl.deploy.export import export_graph, to_openvino

    def refuse(*args, **kwargs):
        raise AssertionError("openvino.convert_model (usage telemetry) was called")

    monkeypatch.setattr(ov, "convert_model", refuse)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 16, 16)
    export_graph(module, (x,), tmp_path / "g.onnx", "map")
    to_openvino(tmp_path / "g.onnx", tmp_path / "g.xml")
    compiled = ov.Core().compile_model(str(tmp_path / "g.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(x.numpy())[compiled.output(0)]
    np.testing.assert_allclose(got, module(x).detach().numpy(), atol=1e-5)
    assert not list(tmp_path.glob(".*tmp*"))
