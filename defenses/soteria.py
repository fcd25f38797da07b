"""Soteria (Sun et al., CVPR 2021): perturb the representation layer's gradient.

The representation r (B, F) is the input of the model's last linear layer. For every feature f the
client measures how strongly r_f depends on the input, ‖∂r_f/∂x‖ / (r_f + 0.1) summed over its batch, as
the authors' code does (GS_attack/reconstruct_image.py; the 0.1 keeps a dead ReLU feature, r_f = 0,
from giving 0/0), and zeroes the last layer's weight gradient for the ``ratio`` fraction of features
with the smallest values (percentile threshold) — the features from which the input is easiest to
reconstruct. FedAvg: the mask is applied to that layer's weight change.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn

from defenses.base import DefenseContext, Params, Update, UpdateDefense
from fl_sim.base.cpu import tuned_for
from fl_sim.observation.features import last_linear


class SoteriaParams(Params):
    ratio: float = Field(0.6, ge=0, lt=1, description="fraction of representation features whose gradient is "
                                                      "pruned (Soteria's GS_attack example: 60%)")


class Soteria(UpdateDefense):
    params: SoteriaParams

    def apply(self, update: Update, ctx: DefenseContext) -> Update:
        model = ctx.global_model()
        name, layer = last_linear(model)
        with tuned_for(model, ctx.inputs.device):
            scores = feature_sensitivity(model, layer, ctx.inputs)  # (F,)
        threshold = np.percentile(scores.numpy(), 100 * self.params.ratio)
        keep = ~(scores.abs() < threshold)
        out = dict(update)
        weight = f"{name}.weight"
        out[weight] = update[weight] * keep.to(update[weight].dtype)[None, :]
        return out


RF_OFFSET = 0.1  # the authors' constant in ‖∂r_f/∂x‖ / (r_f + 0.1)


def feature_sensitivity(model: nn.Module, layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """Σ_batch ‖∂r_f/∂x‖₂ / (r_f + 0.1) for each feature f of the input r of ``layer``; (F,) float64."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    x = inputs.detach().clone().requires_grad_(True)
    try:
        model(x)
    finally:
        handle.remove()
    r = captured[0].flatten(1)  # (B, F)
    scores = torch.zeros(r.shape[1], dtype=torch.float64)
    for f in range(r.shape[1]):
        (dx,) = torch.autograd.grad(r[:, f].sum(), x, retain_graph=True)  # samples are independent in eval mode
        norms = dx.flatten(1).norm(dim=1).double()
        scores[f] = (norms / (r[:, f].detach().double() + RF_OFFSET)).sum()
    return scores
