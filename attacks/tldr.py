"""TLDR: training-like data reconstruction by network inversion of the global model.

The curious server trains a conditioned generator (attacks.generator) against the frozen global
classifier it holds — no client update is needed:

    inversion:       L_Inv   = α·KL + β·CE + γ·Cosine + δ·Ortho                 (soft-maxed random vectors)
    reconstruction:  L_Recon = L_Inv + α'·KL_pert + β'·CE_pert + η1·Var + η2·Pix + η3·Grad  (hot vectors)

KL / CE on the classifier's outputs for the generated images (and for L∞-perturbed copies, ‖δ‖∞ ≤ ε
drawn uniformly); Cosine / Ortho on its penultimate features; Var / Pix on the images; Grad the norm
of the classifier's weight gradient (attacks.inversion_losses). The paper gives no loss weights or
sizes; the presets are ours, sized to train in minutes on a CPU for 28×28 and 32×32 models.
"""

from __future__ import annotations

import copy
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from attacks.base import Inversion, ModelAttack
from attacks.generator import ConditionedGenerator, balanced_labels, hot_vectors, soft_vectors
from attacks.inversion_losses import (
    cosine_similarity,
    cross_entropy,
    feature_orthogonality,
    gradient_norm,
    kl_divergence,
    pixel_range,
    variation,
)
from attacks.labels import last_linear
from attacks.optimize import divergence
from fl_sim.base.streams import GENERATOR_DRAWS, GENERATOR_INIT
from fl_sim.observation import Normalization


class TLDRRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    mode: Literal["reconstruction", "inversion"] = Field(
        description="reconstruction: hot conditioning vectors and every loss; inversion: soft vectors, L_Inv only")
    latent_dim: int = Field(64, ge=1)
    width: int = Field(64, ge=2, description="generator channels (the first stage has twice as many)")
    dropout: float = Field(0.5, ge=0, lt=1)
    batch: int = Field(64, ge=2, description="generated images per step")
    steps: int = Field(1000, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam (β1 0.5, β2 0.999)")
    kl: float = Field(1.0, ge=0, description="α")
    ce: float = Field(1.0, ge=0, description="β")
    cosine: float = Field(0.1, ge=0, description="γ")
    orthogonality: float = Field(0.1, ge=0, description="δ")
    kl_perturbed: float = Field(1.0, ge=0, description="α' (reconstruction)")
    ce_perturbed: float = Field(1.0, ge=0, description="β' (reconstruction)")
    variation: float = Field(1e-3, ge=0, description="η1 (reconstruction)")
    pixel: float = Field(1e-2, ge=0, description="η2 (reconstruction)")
    gradient: float = Field(0.1, ge=0, description="η3 (reconstruction)")
    epsilon: float = Field(0.05, ge=0, le=1, description="L∞ radius of the perturbation, in [0, 1] pixel units")
    samples_per_class: int = Field(8, ge=1, description="images generated per class at the end")
    seed: int = Field(0, ge=0)


TLDR_PRESETS: dict[str, dict] = {
    "tldr": dict(mode="reconstruction"),
    "tldr-inversion": dict(mode="inversion"),
}


class Classifier:
    """The frozen global model seen from [0, 1] images: logits and penultimate features (inputs of the last
    linear layer)."""

    def __init__(self, model: nn.Module, norm: Normalization) -> None:
        self.model, self.norm = model, norm
        self._features: list[torch.Tensor] = []
        _, fc = last_linear(model)
        fc.register_forward_pre_hook(lambda _m, inputs: self._features.append(inputs[0]))

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._features.clear()
        logits = self.model(self.norm.normalize(images))
        return logits, self._features[-1].flatten(1)


def tldr_loss(recipe: TLDRRecipe, classifier: Classifier, images: torch.Tensor, vectors: torch.Tensor,
              labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """L_Inv, or L_Recon in reconstruction mode, for one generated batch (images (B, C, H, W), vectors (B, K))."""
    r = recipe
    logits, features = classifier(images)
    loss = (r.kl * kl_divergence(vectors, logits) + r.ce * cross_entropy(labels, logits)
            + r.cosine * cosine_similarity(features) + r.orthogonality * feature_orthogonality(features))
    if r.mode == "inversion":
        return loss
    noise = (torch.rand(images.shape, generator=gen) * 2 - 1).to(images.device) * r.epsilon
    perturbed, _ = classifier(images + noise)
    return (loss + r.kl_perturbed * kl_divergence(vectors, perturbed)
            + r.ce_perturbed * cross_entropy(labels, perturbed)
            + r.variation * variation(images) + r.pixel * pixel_range(images)
            + r.gradient * gradient_norm(classifier.model, logits, labels))


class NetworkInversion(ModelAttack):
    """``invert(model, normalization, num_classes, shape)`` → Inversion: a model attack (it reads only the
    global model the server holds; no Observation, no client data)."""

    def __init__(self, name: str, recipe: TLDRRecipe) -> None:
        self.name, self.recipe = name, recipe

    def invert(self, model: nn.Module, norm: Normalization, num_classes: int,
               shape: tuple[int, int, int]) -> Inversion:
        device = next(model.parameters()).device  # (no fl_sim.cpu tuning: the generator is the large part)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # seeds stay local
            return self._invert(model, norm, num_classes, shape, device)

    def _invert(self, model: nn.Module, norm: Normalization, num_classes: int, shape: tuple[int, int, int],
                device: torch.device) -> Inversion:
        r, start = self.recipe, time.perf_counter()
        torch.manual_seed(GENERATOR_INIT.seed(r.seed))  # generator initialisation and dropout
        gen = torch.Generator().manual_seed(GENERATOR_DRAWS.seed(r.seed))
        model = copy.deepcopy(model).eval()
        for p in model.parameters():
            p.requires_grad_(True)  # L_Grad differentiates the classifier's loss w.r.t. its weights
        classifier = Classifier(model, norm)
        generator = ConditionedGenerator(r.latent_dim, num_classes, shape, r.width, r.dropout).to(device).train()
        opt = torch.optim.Adam(generator.parameters(), lr=r.lr, betas=(0.5, 0.999))
        conditioning = hot_vectors if r.mode == "reconstruction" else soft_vectors
        trace: list[float] = []
        failure = None
        for step in range(r.steps):
            labels = balanced_labels(r.batch, num_classes, gen)
            vectors = conditioning(labels, num_classes, gen)
            latent = torch.randn(r.batch, r.latent_dim, generator=gen)
            vectors, labels, latent = vectors.to(device), labels.to(device), latent.to(device)
            images = generator(latent, vectors, labels)
            loss = tldr_loss(r, classifier, images, vectors, labels, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=list(generator.parameters()))
            value = float(loss.detach())
            if (failure := divergence(value, step + 1)) is not None:
                break
            opt.step()
            trace.append(value)
        labels = torch.arange(num_classes).repeat_interleave(r.samples_per_class)
        with torch.no_grad():  # sampled as trained: dropout and batch statistics on
            vectors = conditioning(labels, num_classes, gen)
            latent = torch.randn(len(labels), r.latent_dim, generator=gen)
            images = generator(latent.to(device), vectors.to(device), labels.to(device)).clamp(0, 1)
            probabilities = F.softmax(classifier(images)[0], dim=-1)
        images = images.cpu()
        if failure is None and not torch.isfinite(images).all():
            failure = "the generator produced non-finite images"
        confidence = probabilities.gather(1, labels.to(device)[:, None])[:, 0].cpu()
        return Inversion(images, labels, confidence, probabilities.argmax(-1).cpu(), trace, len(trace),
                         time.perf_counter() - start, failure)
