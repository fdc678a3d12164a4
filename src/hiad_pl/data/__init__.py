"""Samples, tiling, data modules, synthetic anomalies and demo data."""
