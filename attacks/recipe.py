"""Gradient-matching recipes: paper algorithms as presets (plain data) over shared building blocks.

Every field can be overridden from the scenario (``[[attacks]] name = "ggi"  iterations = 2000``);
unknown keys and bad values are rejected with the key named.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from attacks.labels import LABEL_STRATEGIES
from fl_sim.base.registry import UnknownNameError


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # matching
    loss: Literal["l2", "cosine"] = Field(description="gradient distance: squared L2 (DLG) or 1 - cosine (GGI, AFGI)")
    layer_weights: Literal["uniform", "linear", "exp"] = Field(
        "uniform", description="per-layer weights: equal, or decaying linearly / exponentially with depth")
    # initialisation and labels
    init: Literal["uniform", "gaussian", "gray"] = Field(
        description="U(0, 1) image, N(0, 1) in the model's input space (GGI), or mid-gray (AFGI)")
    labels: str = Field(description="label strategy (attacks.labels.LABEL_STRATEGIES): idlg, yin, lrb, joint, oracle")
    # regularisers (weights; 0 switches a term off)
    tv: float = Field(0.0, ge=0, description="total variation: mean |dx| + mean |dy|")
    mean_prior: float = Field(0.0, ge=0, description="AFGI: L2 between per-channel image mean and mean_prior_value")
    mean_prior_value: tuple[float, float, float] = (0.491, 0.467, 0.421)
    edge: float = Field(0.0, ge=0, description="AFGI R_ed / RAF-GI R_canny")
    edge_beta: float = Field(0.6, gt=0, le=1, description="fin = (max(G) - mean(G)) · β")
    edge_theta1: float = Field(0.8, gt=0, description="Canny low threshold, fraction of the 8-bit range")
    edge_theta2: float = Field(0.9, gt=0, description="Canny high threshold, fraction of the 8-bit range")
    sixth_power: float = Field(0.0, ge=0)
    l2: float = Field(0.0, ge=0)
    orthogonality: float = Field(0.0, ge=0, description="mean squared cosine similarity between images of a batch")
    bn_stats: float = Field(0.0, ge=0, description="GradInversion: match BatchNorm running statistics")
    # optimisation
    optimizer: Literal["lbfgs", "adam"]
    signed: bool = Field(False, description="step on the sign of the gradient (GGI)")
    lr: float = Field(gt=0)
    iterations: int = Field(ge=1)
    schedule: Literal["none", "ggi", "afgi"] = Field(
        "none", description="ggi: ×0.1 at 3/8, 5/8, 7/8 of the iterations; afgi: ×0.2 after each 2/7")
    clip: bool = Field(True, description="keep the image in the valid range [0, 1] after each step")
    restarts: int = Field(1, ge=1, description="independent trials; the lowest final loss wins")
    early_stop: float = Field(0.0, ge=0, description="stop when |Δloss| < ε over `patience` iterations (0: off)")
    patience: int = Field(10, ge=1)
    compile: bool = Field(False, description="torch.compile the matching step (FedSGD with Adam): a one-time "
                          "compilation (0.7-12 s LeNet, 81-86 s ResNet-18 on 2 CPU cores, cached on disk; "
                          "benchmarks/batched_attacks.py), then 1.5-2.3x faster iterations")
    # label recovery parameters
    lrb_gamma: float = Field(0.4, gt=0, description="LRB probability-gap threshold γ")
    lrb_scale: float = Field(1e7, gt=0, description="LRB input scale Con (RAF-GI: 1e17 / 1e10 ≡ 1e7)")
    seed: int = Field(0, ge=0)

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, v: str) -> str:
        if v not in LABEL_STRATEGIES:
            raise ValueError(str(UnknownNameError("label strategy", v, LABEL_STRATEGIES.names())))
        return v


PRESETS: dict[str, dict] = {
    # Zhu et al. 2019: L2 matching, random image and soft labels optimised jointly with L-BFGS.
    "dlg": dict(loss="l2", init="gaussian", labels="joint", optimizer="lbfgs", lr=1.0, iterations=300, clip=False),
    # Zhao et al. 2020: DLG with the label read off the last layer's gradient.
    "idlg": dict(loss="l2", init="uniform", labels="idlg", optimizer="lbfgs", lr=1.0, iterations=300, clip=False),
    # Geiping et al. 2020 (their framework's defaults): cosine, signed Adam, TV, boxed, step decay.
    "ggi": dict(loss="cosine", init="gaussian", labels="idlg", optimizer="adam", signed=True, lr=0.1,
                iterations=24_000, schedule="ggi", tv=0.1, clip=True, restarts=1),
    # AFGI (and RAF-GI, its earlier name): gray init, LRB labels, TV + channel mean + edge, Adam.
    "afgi": dict(loss="cosine", init="gray", labels="lrb", optimizer="adam", lr=1e-2, iterations=10_000,
                 schedule="afgi", tv=1e-1, mean_prior=1e-3, edge=1e-2, clip=True, restarts=1),
}
PRESETS["raf-gi"] = dict(PRESETS["afgi"])


def recipe(preset: str, **overrides: object) -> Recipe:
    """A preset with scenario overrides applied (pydantic validates them)."""
    return Recipe.model_validate(PRESETS[preset] | overrides)
