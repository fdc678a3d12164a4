"""The original HiAD's online inference API on the hiad-pl service.

``HRInferencer(detector_class, config, checkpoint_root, gpu_ids, models_per_gpu)``
loads a model folder and serves it (``client_inference(ip, port)``), and
:func:`hiad_pl.inferencer.client.client_detection` scores images against it,
returning ``{"image_scores": [N], "anomaly_maps": [N, H, W]}``. Requests travel
over HTTP to ``POST /predict`` (see :mod:`hiad_pl.serve`), so any HTTP client
can use the same service.
"""

from hiad_pl.inferencer.inferencer import HRInferencer

__all__ = ["HRInferencer"]
