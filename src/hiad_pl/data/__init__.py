"""Samples, tiling, data modules and synthetic anomalies."""
