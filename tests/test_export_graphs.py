"""Each detector's exported task graph equals its own anomaly map (PatchCore with fusion, PaDiM, FastFlow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.tiling import MultiResolutionHRImageSpliter
from hiad_pl.deploy.export import TaskGraph, example_inputs, export_graph
from hiad_pl.detectors import HRFastFlow, HRPaDiM, HRPatchCore
from hiad_pl.postprocess import normalize_scores
from hiad_pl.tasks.base import Task

SIZE = 64
COMMON = {"backbone_name": "efficientnet_lite0", "weights": "none", "input_size": SIZE}
DETECTORS = {
    # 40 + 112 channels pooled to 48 each and 96 overall: adaptive pooling that does not divide evenly
    "patchcore_fused": (HRPatchCore, {"pretrain_embed_dimension": 48, "target_embed_dimension": 96, "num_neighbors": 3,
                                      "percentage": 0.5, "fusion_weights": [0.7, 0.3]}),
    "padim": (HRPaDiM, {"d_reduced": 20}),
    "fastflow": (HRFastFlow, {"flow_steps": 2}),
}


def patch_batch(count: int, fused: bool, seed: int) -> PatchBatch:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(count, 3, SIZE, SIZE, generator=generator)
    batch = PatchBatch(image=image, mask=torch.zeros(count, SIZE, SIZE), label=torch.zeros(count, dtype=torch.long),
                       index=torch.zeros(count, 4, dtype=torch.long))
    if fused:
        batch.low_resolution_images = torch.randn(count, 1, 3, SIZE, SIZE, generator=generator)
        batch.low_resolution_windows = torch.tensor([[[0, 32, 32, 32]]] * count)
    return batch


@pytest.mark.parametrize("name", list(DETECTORS))
def test_task_graph_equals_the_detector(name: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    cls, options = DETECTORS[name]
    torch.manual_seed(0)
    detector = cls(**COMMON, **options).eval()
    fused = "fusion_weights" in options
    if detector.fits_in_one_pass:
        detector.accumulate(patch_batch(4, fused, seed=1))
        detector.finalize()
    (index,) = MultiResolutionHRImageSpliter(2 * SIZE, 2 * SIZE, ds_factors=[0, 1] if fused else None)
    task = Task("task_0", [index])
    inputs = example_inputs(task, detector)
    assert len(inputs) == (3 if fused else 1)
    statistics = {"low": 0.5, "high": 3.0}
    export_graph(TaskGraph(detector, statistics).eval(), inputs, tmp_path / "task.onnx", "anomaly_map")

    batch = patch_batch(3, fused, seed=2)
    with torch.inference_mode():
        expected = normalize_scores(detector.predict_step(batch, 0), statistics["low"], statistics["high"]).numpy()
    session = ort.InferenceSession(str(tmp_path / "task.onnx"), providers=["CPUExecutionProvider"])
    feed = {"image": batch.image.numpy()}
    if fused:
        feed.update(low_images=batch.low_resolution_images.numpy(), low_windows=batch.low_resolution_windows.numpy())
    (actual,) = session.run(None, feed)
    assert actual.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
