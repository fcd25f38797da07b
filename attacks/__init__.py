"""Attacks of the curious server: ``reconstruct(observation, model) -> Reconstruction``, by name."""

from fl_sim.registry import Registry

ATTACKS: Registry[object] = Registry("attack")
