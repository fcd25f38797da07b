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
    labels: str = Field(description="label strategy (attacks.labels.LABEL_STRATEGIES): idlg, yin, lrb, bias-count, "
                                    "joint, oracle")
    # regularisers (weights; 0 switches a term off)
    tv: float = Field(0.0, ge=0, description="total variation (see tv_space)")
    tv_space: Literal["image", "input"] = Field(
        "image", description="image: mean |dx| + mean |dy| of the [0, 1] image (inversefed's form); input: of the "
                             "model-input tensor with zero-padded edges (breaching's TotalVariation)")
    mean_prior: float = Field(0.0, ge=0, description="AFGI: L2 between per-channel image mean and mean_prior_value")
    mean_prior_value: tuple[float, float, float] = (0.491, 0.467, 0.421)
    edge: float = Field(0.0, ge=0, description="AFGI R_ed / RAF-GI R_canny")
    edge_beta: float = Field(0.6, gt=0, le=1, description="fin = (max(G) - mean(G)) · β")
    edge_theta1: float = Field(0.8, gt=0, description="Canny low threshold, fraction of the 8-bit range")
    edge_theta2: float = Field(0.9, gt=0, description="Canny high threshold, fraction of the 8-bit range")
    sixth_power: float = Field(0.0, ge=0)
    l2: float = Field(0.0, ge=0)
    orthogonality: float = Field(0.0, ge=0, description="mean squared cosine similarity between images of a batch")
    bn_stats: float = Field(0.0, ge=0, description="BatchNorm-statistics prior (GradInversion), against bn_target")
    bn_target: Literal["global", "client"] = Field(
        "global", description="what bn_stats matches: the global model's running statistics (GradInversion), or the "
                              "client's batch statistics recovered from the BatchNorm buffers it returns")
    bn_forward: Literal["batch", "client"] = Field(
        "batch", description="train-mode BatchNorm in the replayed forward: the candidates' own batch statistics, or "
                             "the client's, recovered from its BatchNorm buffers (one local step; attacks.bn_buffers)")
    epochs: Literal["shared", "separate"] = Field(
        "shared", description="FedAvg over local epochs: one set of N candidates replayed in every epoch, or one copy "
                              "per epoch tied by the epoch prior (Dimitrov et al. 2022)")
    epoch_prior: float = Field(0.0, ge=0, description="weight of the order-invariant epoch prior (epochs = separate)")
    # optimisation
    optimizer: Literal["lbfgs", "adam"]
    line_search: Literal["none", "strong_wolfe"] = Field(
        "none", description="L-BFGS step rule: none (a fixed step, as the DLG / iDLG code) or strong Wolfe")
    signed: bool = Field(False, description="step on the sign of the gradient (GGI)")
    lr: float = Field(gt=0)
    iterations: int = Field(ge=1)
    fine_tune: int = Field(0, ge=0, description="extra iterations when the batch has more than one image (AFGI "
                           "§V-A: 10K); the step schedule spans the whole budget")
    schedule: Literal["none", "ggi", "afgi"] = Field(
        "none", description="ggi: ×0.1 at 3/8, 5/8, 7/8 of the iterations; afgi: ×0.2 after each 2/7")
    clip: bool = Field(True, description="keep the image in the valid range [0, 1] after each step")
    restarts: int = Field(1, ge=1, description="independent trials; the lowest gradient distance wins (the priors "
                          "are not evidence); within a trial the iterate with the lowest objective is kept")
    early_stop: float = Field(0.0, ge=0, description="stop when |Δloss| < ε over `patience` iterations (0: off)")
    patience: int = Field(10, ge=1)
    batched: bool = Field(False, description="solve a round's attacked clients (and restarts) as one vmapped "
                          "problem (FedSGD with Adam): faster, but equal to one by one only up to float drift that "
                          "the optimiser amplifies, so off by default (attacks/batched.py)")
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="the optimisation's matrix products and convolutions: IEEE float32 (on CUDA too: "
                            "TF32 off), TensorFloat-32 (CUDA) or bfloat16 autocast (fl_sim.base.precision)")
    compile: bool = Field(False, description="torch.compile the functional matching step (FedSGD with Adam): a "
                          "one-time compilation (0.7-12 s LeNet, 81-86 s ResNet-18 on 2 CPU cores, cached on disk; "
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
    # Zhu et al. 2019: L2 matching, N(0, 1) image and soft labels optimised jointly with L-BFGS (lr 1, unboxed;
    # breaching's deepleakage). Strong-Wolfe line search: without it L-BFGS's first steps often jump into the
    # sigmoids' flat region and never leave it (vs_breaching.py: 7 of 24 runs stuck without it, none with it).
    "dlg": dict(loss="l2", init="gaussian", labels="joint", optimizer="lbfgs", line_search="strong_wolfe", lr=1.0,
                iterations=300, clip=False),
    # Zhao et al. 2020: DLG with the label read off the last layer's gradient; N(0, 1) start as their code.
    "idlg": dict(loss="l2", init="gaussian", labels="idlg", optimizer="lbfgs", line_search="strong_wolfe", lr=1.0,
                 iterations=300, clip=False),
    # Geiping et al. 2020 exactly as breaching 0.1.2's attack/invertinggradients.yaml: cosine objective, N(0, 1)
    # init in the model's input space (_default_optimization_attack: init randn), signed Adam lr 0.1, boxed,
    # 24 000 iterations, step-lr (×0.1 at n // 2.667, n // 1.6, n // 1.142), TV 0.2 on the model-input tensor,
    # one trial scored by the gradient distance.
    "ggi": dict(loss="cosine", init="gaussian", labels="idlg", optimizer="adam", signed=True, lr=0.1,
                iterations=24_000, schedule="ggi", tv=0.2, tv_space="input", clip=True, restarts=1),
    # fl-sim's earlier GGI variant: TV 0.1 on the [0, 1] image (about 3-4x weaker at CIFAR normalisation).
    "ggi-image-tv": dict(loss="cosine", init="gaussian", labels="idlg", optimizer="adam", signed=True, lr=0.1,
                         iterations=24_000, schedule="ggi", tv=0.1, clip=True, restarts=1),
    # AFGI (and RAF-GI, its earlier name): gray init, LRB labels, TV + channel mean + edge, Adam.
    "afgi": dict(loss="cosine", init="gray", labels="lrb", optimizer="adam", lr=1e-2, iterations=10_000,
                 fine_tune=10_000, schedule="afgi", tv=1e-1, mean_prior=1e-3, edge=1e-2, clip=True, restarts=1),
}
PRESETS["raf-gi"] = dict(PRESETS["afgi"])
# GGI with what a train-mode client's reply also carries: its BatchNorm buffers. A GradInversion-style prior pulls the
# candidates' batch statistics to the client's (recovered from the buffers). Normalising the replayed forward with the
# client's statistics (bn_forward = "client") is exact too, but from a random start it lands lower
# (benchmarks/bn_buffers.py), so the preset keeps the candidates' own statistics in the forward.
PRESETS["ggi-bn"] = PRESETS["ggi"] | dict(bn_stats=1e-2, bn_target="client")


# Dimitrov et al. (TMLR 2022) as a preset over the unrolled FedAvg replay: each local epoch on its own copy of the
# client's images (their order within an epoch unknown), tied by the order-invariant epoch prior, labels counted
# from the bias change; matching, priors and optimiser as `ggi`.
PRESETS["dimitrov"] = PRESETS["ggi"] | dict(epochs="separate", epoch_prior=0.1, labels="bias-count")
# ... with the client's BatchNorm statistics from its buffers (as ggi-bn): what a Flower server receives, all used.
PRESETS["dimitrov-bn"] = PRESETS["dimitrov"] | dict(bn_stats=1e-2, bn_target="client")


def uses_bn_buffers(r: Recipe) -> bool:
    """Whether the recipe reads the BatchNorm buffers the client returns."""
    return r.bn_forward == "client" or (r.bn_stats > 0 and r.bn_target == "client")


def budgeted(r: Recipe, num_images: int) -> Recipe:
    """``r`` with its fine-tuning iterations added when the batch has more than one image."""
    return r if num_images == 1 or not r.fine_tune else r.model_copy(update={"iterations": r.iterations + r.fine_tune})


def recipe(preset: str, **overrides: object) -> Recipe:
    """A preset with scenario overrides applied (pydantic validates them)."""
    return Recipe.model_validate(PRESETS[preset] | overrides)
