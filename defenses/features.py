"""Defenses of shared features (scenario ``[features] share = true``): stronger pruning, Gaussian noise."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from defenses.base import FeatureDefense, Params
from fl_sim.observation.features import SharedFeatures, reprune


def needs_shared_features(scenario: Any) -> str | None:
    if not scenario.features.share:
        return "defends shared features: set [features] share = true"
    return None


class FeaturePruneParams(Params):
    ratio: float = Field(0.5, ge=0, le=0.95, description="fraction of the F neurons removed (lowest activation)")


class FeaturePrune(FeatureDefense):
    """Prune the shared features further: keep the F − ⌊ratio·F⌋ largest of what the protocol kept."""

    params: FeaturePruneParams

    def apply_features(self, shared: SharedFeatures, generator: torch.Generator) -> SharedFeatures:
        return reprune(shared, self.params.ratio)


class FeatureNoiseParams(Params):
    sigma: float = Field(0.1, ge=0, description="standard deviation of the Gaussian noise on each kept value")


class FeatureNoise(FeatureDefense):
    """Add N(0, σ²) to every kept feature value (indices are sent as they are)."""

    params: FeatureNoiseParams

    def apply_features(self, shared: SharedFeatures, generator: torch.Generator) -> SharedFeatures:
        noise = torch.randn(shared.values.shape, generator=generator, dtype=shared.values.dtype)
        return SharedFeatures(shared.values + self.params.sigma * noise, shared.indices, shared.dim)
