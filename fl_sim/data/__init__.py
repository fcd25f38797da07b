"""Datasets (real images in [0, 1]), partitions and per-round batches."""
