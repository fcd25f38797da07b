"""Flower's LocalDpMod: the client clips its model update to norm C and adds Gaussian noise to its weights.

It runs as a Flower mod on the ClientApp's train function (``@app.train(mods=[...])``; app-wide mods
would also wrap federated evaluation). The mod sees the weights the server sent and the weights the
client returns, so it needs FedAvg (a FedSGD reply is a gradient, not weights). Flower calibrates the
noise to one (ε, δ) release per round: σ = sensitivity · √(2 ln(1.25/δ)) / ε.
"""

from __future__ import annotations

import math

from flwr.clientapp.mod import LocalDpMod
from pydantic import Field

from defenses.base import Accountant, Budget, MessageDefense, Params, Releases
from defenses.rero import gdp_bound


class LocalDpParams(Params):
    clip: float = Field(1.0, gt=0, description="clipping norm of the update θ_local − θ_global")
    sensitivity: float = Field(1.0, ge=0, description="L2 sensitivity the noise is calibrated to (usually = clip)")
    epsilon: float = Field(10.0, gt=0, description="ε of each round's release")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of each round's release")


class LocalDp(MessageDefense, Accountant):
    params: LocalDpParams

    def mod(self) -> LocalDpMod:
        p = self.params
        return LocalDpMod(clipping_norm=p.clip, sensitivity=p.sensitivity, epsilon=p.epsilon, delta=p.delta)

    @property
    def noise_std(self) -> float:
        p = self.params
        return p.sensitivity * math.sqrt(2 * math.log(1.25 / p.delta)) / p.epsilon

    def budget(self, releases: Releases) -> Budget:
        """Basic composition of Flower's per-round (ε, δ) over the rounds the client took part in: (T·ε, T·δ)."""
        p, t = self.params, releases.participations
        return Budget(p.epsilon * t, p.delta * t, "client",
                      f"Flower's LocalDpMod: the clipped update (norm {p.clip:g}), noise calibrated to L2 sensitivity "
                      f"{p.sensitivity:g}",
                      "basic composition of LocalDpMod's per-round (ε, δ) over the participations")

    def reconstruction_bound(self, releases: Releases, kappa: float) -> float:
        """Each round adds N(0, noise_std²) to the update clipped to norm C: against the server a Gaussian mechanism
        of sensitivity 2C (the clipped update can move anywhere in the ball, whatever ``sensitivity`` Flower was
        told), so μ = 2C√T / noise_std."""
        std = self.noise_std
        mu = math.inf if std == 0 else 2 * self.params.clip * math.sqrt(releases.participations) / std
        return gdp_bound(mu, kappa)
