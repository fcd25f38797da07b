"""Leakage metrics: Reconstruction vs Secret on [0, 1] images, by name."""

from fl_sim.registry import Registry

METRICS: Registry[object] = Registry("metric")
