"""Client-side update transforms and protocol choices, by name."""

from fl_sim.registry import Registry

DEFENSES: Registry[object] = Registry("defense")
