"""Deployment: exported models and the standalone predictor that runs them.

:mod:`hiad_pl.deploy.export` (needs torch) writes one ONNX graph per task and a
manifest; :mod:`hiad_pl.deploy.predictor` scores images with them using
onnxruntime, numpy and Pillow only (``pip install hiad-pl[deploy]``), and
:mod:`hiad_pl.deploy.files` writes the prediction files both ``predict`` paths share.
This package imports nothing at import time, so the predictor loads without torch.
"""
