"""The HTTP service: scores equal `hiad-pl predict`'s, bad requests are refused, concurrency, the original's client."""

from __future__ import annotations

import base64
import csv
import io
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deploy_runs import IMAGE_SIZE, fit_run
from hiad_pl.commands import predict
from hiad_pl.serve import free_port


@pytest.fixture(scope="module")
def run_dir(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A2O with a thumbnail and validation statistics (normalised scores)."""
    return fit_run(small_demo, tmp_path_factory.getbasetemp() / "deploy_runs" / "a2o", "a2o", thumbnail=True, validation=True)


@pytest.fixture(scope="module")
def test_images(small_demo: Path) -> list[Path]:
    return sorted((small_demo / "texture" / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def reference(run_dir: Path, small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[float, Path]]:
    """`hiad-pl predict` on the test images: image path -> (score, map .npy)."""
    out = predict(run_dir, [small_demo / "texture" / "test"], tmp_path_factory.mktemp("predict"))
    rows = list(csv.DictReader(line for line in (out / "scores.csv").read_text().splitlines() if not line.startswith("#")))
    return {row["image"]: (float(row["score"]), out / row["map"].replace("_map.png", "_map.npy")) for row in rows}


@pytest.fixture(scope="module")
def server(run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`hiad-pl serve` in its own process on a free loopback port; yields (url, log file)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    command = [sys.executable, "-m", "hiad_pl.cli", "serve", "--run_dir", str(run_dir), "--port", str(port),
               "--max_batch_size", "4", "--max_wait_ms", "200", "--max_upload_mb", "2"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"hiad-pl serve did not start:\n{log_path.read_text()}")
        time.sleep(0.5)
    yield url, log_path
    process.terminate()
    process.wait(timeout=60)


def post_image(url: str, path: Path, **params: str) -> httpx.Response:
    return httpx.post(f"{url}/predict", params=params, files={"image": (path.name, path.read_bytes(), "image/png")}, timeout=300)


def test_health_names_the_model(server) -> None:
    url, _ = server
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["category"] == "texture"
    assert health["tasks"] == ["task_0", "thumbnail"] and health["normalized"] is True
    assert health["image_size"] == [IMAGE_SIZE, IMAGE_SIZE]


def stored_thresholds(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "texture" / "thresholds.json").read_text())


def test_health_and_answers_carry_the_runs_thresholds(server, run_dir: Path, test_images: list[Path], reference) -> None:
    url, _ = server
    stored = stored_thresholds(run_dir)
    assert stored["rule"] == "f1_adaptive" and stored["scale"] == "normalised"  # the run has a synthetic validation set
    health = httpx.get(f"{url}/health").json()
    assert (health["threshold"], health["pixel_threshold"], health["threshold_rule"]) == (stored["image"], stored["pixel"], "f1_adaptive")
    for path in test_images:
        body = post_image(url, path, mask="true").json()
        assert body["threshold"] == stored["image"] and body["pixel_threshold"] == stored["pixel"]
        assert body["label"] == ("NG" if body["image_score"] > stored["image"] else "OK")
        assert body["is_anomalous"] is (body["label"] == "NG")
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
        expected = np.where(np.load(reference[str(path)][1]) > stored["pixel"], 255, 0)
        assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and (mask != expected).mean() < 1e-3, path
    assert "mask_png" not in post_image(url, test_images[0]).json()


def test_scores_and_maps_equal_predict(server, test_images: list[Path], reference) -> None:
    url, _ = server
    for path in test_images:
        body = post_image(url, path).json()
        score, npy = reference[str(path)]
        assert body["image_score"] == pytest.approx(score, abs=1e-4), path
        assert body["is_anomalous"] is (body["image_score"] > body["threshold"])
        assert "anomaly_map_png" not in body
    path = test_images[-1]
    exact = post_image(url, path, map="true", map_format="npy").json()
    anomaly_map = np.load(io.BytesIO(base64.b64decode(exact["anomaly_map_npy"])))
    np.testing.assert_allclose(anomaly_map, np.load(reference[str(path)][1]), atol=1e-4)
    png = post_image(url, path, map="true").json()
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["anomaly_map_png"]))))
    assert decoded.shape == (IMAGE_SIZE, IMAGE_SIZE) and (png["map_min"], png["map_max"]) == (0.0, 1.0)
    np.testing.assert_allclose(decoded / 65535.0, np.clip(anomaly_map, 0, 1), atol=1e-4)


def bad_requests(image: bytes) -> dict[str, dict]:
    """Each kind of bad request as httpx.post keyword arguments."""
    return {
        "not an image": {"files": {"image": ("notes.png", b"these are not pixels" * 10, "image/png")}},
        "truncated": {"files": {"image": ("half.png", image[: len(image) // 2], "image/png")}},
        "empty": {"files": {"image": ("empty.png", b"", "image/png")}},
        "too large": {"files": {"image": ("big.png", image + b"\0" * (3 * 2**20), "image/png")}},
        "wrong field": {"files": {"file": ("good.png", image, "image/png")}},
        "not multipart": {"json": {"image": "good.png"}},
        "bad option": {"files": {"image": ("good.png", image, "image/png")}, "params": {"map_format": "jpeg"}},
    }


EXPECTED = {
    "not an image": (400, "not an image"),
    "truncated": (400, "truncated"),
    "empty": (400, "empty file"),
    "too large": (413, "exceed"),
    "wrong field": (400, "no multipart field 'image'"),
    "not multipart": (415, "multipart/form-data"),
    "bad option": (422, "map_format"),
}


def test_bad_requests_get_a_4xx_with_the_problem_and_the_server_keeps_serving(server, test_images, reference) -> None:
    url, log_path = server
    good = test_images[0]
    before = log_path.read_text().count("POST /predict")
    for kind, request in bad_requests(good.read_bytes()).items():
        response = httpx.post(f"{url}/predict", timeout=60, **request)
        status, words = EXPECTED[kind]
        assert response.status_code == status, (kind, response.text)
        assert words in response.json()["error"], (kind, response.json())
        ok = post_image(url, good)
        assert ok.status_code == 200 and ok.json()["image_score"] == pytest.approx(reference[str(good)][0], abs=1e-4)
    assert httpx.get(f"{url}/nowhere").json() == {"error": "Not Found"}
    time.sleep(0.5)
    lines = log_path.read_text().splitlines()
    assert sum("POST /predict" in line for line in lines) - before == 2 * len(EXPECTED)
    assert any("POST /predict 400" in line and "truncated" in line for line in lines)


def test_concurrent_requests_all_succeed_in_shared_batches(server, test_images, reference) -> None:
    url, _ = server
    paths = (test_images * 2)[:12]
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        responses = list(pool.map(lambda p: post_image(url, p), paths))
    assert [r.status_code for r in responses] == [200] * len(paths)
    for path, response in zip(paths, responses):
        assert response.json()["image_score"] == pytest.approx(reference[str(path)][0], abs=1e-4)
    assert max(r.json()["batch_size"] for r in responses) > 1


def test_hrinferencer_and_client_detection_return_the_original_shapes(run_dir, test_images, reference) -> None:
    from hiad_pl.detectors import HRPatchCore
    from hiad_pl.inferencer import HRInferencer
    from hiad_pl.inferencer.client import client_detection

    config = {"patch": {"patch_size": 128}, "thumbnail": {"thumbnail_size": 64}}
    inferencer = HRInferencer(HRPatchCore, config, checkpoint_root=run_dir / "texture", gpu_ids=[], models_per_gpu=1)
    port = free_port()
    inferencer.client_inference(ip="127.0.0.1", port=port, block=False)
    try:
        array = np.array(Image.open(test_images[-1]).convert("RGB"))
        result = client_detection([str(test_images[0]), array], image_size=IMAGE_SIZE, ip="127.0.0.1", port=str(port), return_fps=True)
    finally:
        inferencer.close()
    assert result["image_scores"].shape == (2,)
    assert result["anomaly_maps"].shape == (2, IMAGE_SIZE, IMAGE_SIZE) and result["fps"] > 0
    assert result["image_scores"][0] == pytest.approx(reference[str(test_images[0])][0], abs=1e-4)
    assert result["image_scores"][1] == pytest.approx(reference[str(test_images[-1])][0], abs=1e-4)
    from hiad_pl.data.sample import HRSample

    scores, maps = inferencer.inference([HRSample(test_images[0], image_size=IMAGE_SIZE)])
    assert scores.shape == (1,) and maps[0].shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert scores[0] == pytest.approx(result["image_scores"][0], abs=1e-5)
    stored = stored_thresholds(run_dir)
    samples = [HRSample(path, image_size=IMAGE_SIZE) for path in test_images]
    decisions = inferencer.decisions(samples, masks=True)
    for path, (decision, mask) in zip(test_images, decisions):
        score = reference[str(path)][0]
        assert decision.threshold == stored["image"] and decision.score == pytest.approx(score, abs=1e-4)
        assert decision.label == ("NG" if decision.score > stored["image"] else "OK")
        assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and mask.dtype == np.uint8
        assert ((mask == 255) != (np.load(reference[str(path)][1]) > stored["pixel"])).mean() < 1e-3
