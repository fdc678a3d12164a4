"""hiad-pl: high-resolution industrial image anomaly detection on PyTorch Lightning."""

__version__ = "0.1.0"
