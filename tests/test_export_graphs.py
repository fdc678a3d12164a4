"""Every built-in detector's exported task graph equals its own anomaly map (PatchCore also with fusion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hiad_pl.data.batch import PatchBatch
from hiad_pl.data.tiling import MultiResolutionHRImageSpliter
from hiad_pl.deploy.export import TaskGraph, example_inputs, export_graph
from hiad_pl.detectors import DETECTORS as REGISTERED
from hiad_pl.detectors import (
    HRRDPP,
    HRDesTSeg,
    HRDinomaly,
    HRFastFlow,
    HRINPFormer,
    HRPaDiM,
    HRPatchCore,
    HRRealNet,
    HRVitAD,
)
from hiad_pl.postprocess import normalize_scores
from hiad_pl.tasks.base import Task

SIZE = 64
COMMON = {"backbone_name": "efficientnet_lite0", "weights": "none", "input_size": SIZE}
TINY_VIT = {"backbone_name": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
            "layers_to_extract_from": ["blocks.0", "blocks.1"], "decoder_depth": 2}
DETECTORS = {
    # 40 + 112 channels pooled to 48 each and 96 overall: adaptive pooling that does not divide evenly
    "patchcore_fused": (HRPatchCore, {"pretrain_embed_dimension": 48, "target_embed_dimension": 96, "num_neighbors": 3,
                                      "percentage": 0.5, "fusion_weights": [0.7, 0.3]}),
    "padim": (HRPaDiM, {"d_reduced": 20}),
    "fastflow": (HRFastFlow, {"flow_steps": 2}),
    "rdpp": (HRRDPP, {"layers_to_extract_from": ["blocks.2", "blocks.4"], "ocbe_blocks": 1, "decoder_blocks": 1}),
    "destseg": (HRDesTSeg, {"backbone_name": "resnet18", "layers_to_extract_from": ["layer1", "layer2"],
                            "student_encoder": "mobilenetv3_small_050", "decoder_blocks": 1, "segmentation_width": 16}),
    "realnet": (HRRealNet, {"backbone_name": "resnet18", "layers_to_extract_from": ["layer1", "layer2"],
                            "afs_channels": [16, 32], "init_bsn": 2, "res_blocks": 1, "channel_mult": [1, 2],
                            "attention_at": [2], "rrs_counts": [8, 8], "rrs_residual_layers": 1}),
    # ViTs built for 224 px and run on 64-px patches: the export fixes the resampled position embedding
    "vitad": (HRVitAD, {**TINY_VIT, "decoder_taps": [2]}),
    "dinomaly": (HRDinomaly, {**TINY_VIT, "groups": [[0], [1]]}),
    "inpformer": (HRINPFormer, {**TINY_VIT, "groups": [[0], [1]], "num_prototypes": 2}),
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
    detector = cls(**{**COMMON, **options}).eval()
    fused = "fusion_weights" in options
    if detector.fits_in_one_pass:
        detector.accumulate(patch_batch(4, fused, seed=1))
        detector.finalize()
    statistics = {"low": 0.5, "high": 3.0}
    batch = patch_batch(3, fused, seed=2)
    with torch.inference_mode():  # the detector as the pipeline runs it, before the export touches it
        expected = normalize_scores(detector.predict_step(batch, 0), statistics["low"], statistics["high"]).numpy()
    (index,) = MultiResolutionHRImageSpliter(2 * SIZE, 2 * SIZE, ds_factors=[0, 1] if fused else None)
    task = Task("task_0", [index])
    inputs = example_inputs(task, detector)
    assert len(inputs) == (3 if fused else 1)
    export_graph(TaskGraph(detector, statistics).eval(), inputs, tmp_path / "task.onnx", "anomaly_map")

    session = ort.InferenceSession(str(tmp_path / "task.onnx"), providers=["CPUExecutionProvider"])
    feed = {"image": batch.image.numpy()}
    if fused:
        feed.update(low_images=batch.low_resolution_images.numpy(), low_windows=batch.low_resolution_windows.numpy())
    (actual,) = session.run(None, feed)
    assert actual.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_every_built_in_detector_is_exported() -> None:
    built_in = {cls for cls in REGISTERED.values() if cls.__module__.startswith("hiad_pl.detectors.")}
    assert len(built_in) == 9 and {cls for cls, _ in DETECTORS.values()} == built_in
