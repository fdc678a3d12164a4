"""Import paths of the tutorial: metrics, metrics_gpu, split_and_gather, base."""
