"""Reconstruction robustness (ReRo) from a defense's DP guarantee.

Hayes, Mahloujifar & Balle (NeurIPS 2023): a mechanism is (η, κ)-ReRo when no reconstruction attack succeeds
with probability above η on a target for which the best prior-only guess succeeds with probability κ. Through
the hypothesis-testing view of DP (Kaissis, Hayes, Ziller & Rueckert, arXiv 2307.03928), a mechanism whose
trade-off function is f is (1 − f(κ), κ)-ReRo:

- μ-GDP (the Gaussian mechanism, composed T times: μ = √T · sensitivity / noise): η = Φ(Φ⁻¹(κ) + μ), exact.
- a privacy profile, pairs (ε, δ) the mechanism satisfies (DP-SGD's subsampled Gaussian, from an accountant):
  each pair gives f(α) ≥ max(0, 1 − δ − e^ε α, e^−ε (1 − δ − α)), so
  η ≤ min over the pairs of min(e^ε κ + δ, 1 − e^−ε (1 − δ − κ)).

Every bound lies in [κ, 1]: a guess that ignores the release already succeeds with probability κ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from statistics import NormalDist

_PHI = NormalDist()


def gdp_bound(mu: float, kappa: float) -> float:
    """η of a μ-GDP mechanism at baseline success ``kappa``: Φ(Φ⁻¹(κ) + μ)."""
    _check(kappa)
    if kappa in (0.0, 1.0) or mu == 0:
        return kappa
    if math.isinf(mu):
        return 1.0
    return _PHI.cdf(_PHI.inv_cdf(kappa) + mu)


def profile_bound(profile: Iterable[tuple[float, float]], kappa: float) -> float:
    """η implied by (ε, δ) pairs the mechanism satisfies (any ε < 0 of an accountant's upper bound read as 0)."""
    _check(kappa)
    eta = 1.0
    for epsilon, delta in profile:
        e = max(0.0, epsilon)
        if math.isinf(e):
            continue
        eta = min(eta, math.exp(e) * kappa + delta, 1 - math.exp(-e) * (1 - delta - kappa))
    return min(1.0, max(kappa, eta))


def _check(kappa: float) -> None:
    if not 0 <= kappa <= 1:
        raise ValueError(f"kappa must be a probability in [0, 1], got {kappa}")
