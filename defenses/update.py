"""Transforms of the whole update: the Gaussian mechanism (dp), magnitude pruning, quantization."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from defenses.base import Accountant, Budget, DefenseContext, Params, Releases, Update, UpdateDefense, rdp_epsilon
from defenses.rero import gdp_bound


class GaussianParams(Params):
    clip: float = Field(1.0, gt=0, description="C: the update's L2 norm (over all parameters) is clipped to C")
    sigma: float = Field(0.01, ge=0, description="noise multiplier: Gaussian noise of standard deviation sigma·C")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) budget the report states")


class GaussianMechanism(UpdateDefense, Accountant):
    """Clip the update to norm C, add N(0, (σC)²) to every entry (client-level DP, McMahan et al. 2018)."""

    params: GaussianParams

    def apply(self, update: Update, ctx: DefenseContext) -> Update:
        c, sigma = self.params.clip, self.params.sigma
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
        scale = min(1.0, c / norm) if norm > 0 else 1.0
        return {k: v * scale + sigma * c * torch.randn(v.shape, generator=ctx.generator, dtype=v.dtype)
                for k, v in update.items()}

    def budget(self, releases: Releases) -> Budget:
        """Client-level (ε, δ) against the server, which sees each clipped update alone and chose who took part:
        no amplification by sampling (rate 1), one Gaussian release per participation. Two datasets of one client
        can move its clipped update anywhere in the ball of radius C — L2 sensitivity 2C against noise σC, so the
        accountant (written for sensitivity 1) gets noise multiplier σ/2."""
        p = self.params
        return Budget(rdp_epsilon(p.sigma / 2, 1.0, releases.participations, p.delta), p.delta, "client",
                      "replace the client's dataset (clipped update: L2 sensitivity 2C)",
                      "Opacus RDP: noise multiplier σ/2, sample rate 1, one step per participation")

    def reconstruction_bound(self, releases: Releases, kappa: float) -> float:
        """Each release is a Gaussian mechanism of sensitivity 2C and noise σC, i.e. (2/σ)-GDP; T of them compose
        to μ = 2√T / σ (exact: no subsampling against this server)."""
        sigma = self.params.sigma
        mu = math.inf if sigma == 0 else 2 * math.sqrt(releases.participations) / sigma
        return gdp_bound(mu, kappa)


class PruneParams(Params):
    ratio: float = Field(0.5, ge=0, lt=1, description="fraction of each tensor's entries set to zero (smallest |x|)")


class Prune(UpdateDefense):
    """DLG's defense: zero the smallest-magnitude fraction ``ratio`` of every update tensor."""

    params: PruneParams

    def apply(self, update: Update, ctx: DefenseContext) -> Update:
        out = {}
        for k, v in update.items():
            drop = int(math.floor(self.params.ratio * v.numel()))
            if drop == 0:
                out[k] = v.clone()
                continue
            flat = v.flatten().clone()
            flat[flat.abs().argsort(stable=True)[:drop]] = 0
            out[k] = flat.view_as(v)
        return out


class QuantizeParams(Params):
    mode: Literal["uniform", "sign"] = Field("uniform", description="uniform: k-bit grid; sign: sign × mean |x|")
    bits: int = Field(8, ge=1, le=16, description="uniform: 2**bits levels between each tensor's min and max")


class Quantize(UpdateDefense):
    """Per tensor: round to 2**bits evenly spaced levels over [min, max], or keep only signs (scaled by mean |x|)."""

    params: QuantizeParams

    def apply(self, update: Update, ctx: DefenseContext) -> Update:
        return {k: self._quantize(v) for k, v in update.items()}

    def _quantize(self, v: torch.Tensor) -> torch.Tensor:
        if self.params.mode == "sign":
            return torch.sign(v) * v.abs().mean()
        lo, hi = v.min(), v.max()
        if hi <= lo:
            return v.clone()
        step = (hi - lo) / (2**self.params.bits - 1)
        return lo + torch.round((v - lo) / step) * step
