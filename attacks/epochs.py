"""Dimitrov et al. (TMLR 2022, "Data leakage in federated averaging"): one copy of the client's N images per
local epoch, tied together by an order-invariant epoch prior.

A client that runs E epochs sees its N images E times, each epoch in an order the server does not know. The
attack replays epoch e on its own copy z_e (N candidates) and pulls the copies together:

    R_epoch = mean over e, i and pixels of (z_e[π_e(i)] − z̄_i)²,   z̄ = mean_e z_e[π_e],

where π_e matches epoch e's candidates to epoch 0's (Hungarian on squared distance, only between candidates of
the same label), so the prior does not depend on the order of any epoch's candidates. The reconstruction is z̄.
"""

from __future__ import annotations

import numpy as np
import torch


class EpochTie:
    """``tie(z)`` → R_epoch for candidates z (copies · N, C, H, W), re-matching every ``every`` calls;
    ``tie.merged(z)`` → z̄ (N, C, H, W). ``labels`` (N,): the label of each image slot (None: unlabelled)."""

    def __init__(self, copies: int, n: int, labels: torch.Tensor | None, every: int = 25) -> None:
        self.copies, self.n, self.every = copies, n, every
        self.labels = None if labels is None else labels.detach().cpu()
        self.perms = [torch.arange(n) for _ in range(copies)]
        self.calls = 0

    def match(self, z: torch.Tensor) -> None:
        """π_e for every epoch: its candidates assigned to epoch 0's, within labels."""
        from scipy.optimize import linear_sum_assignment  # scipy on first use, not on the client's path

        flat = z.detach().flatten(1).double().cpu().view(self.copies, self.n, -1)
        same = (torch.ones(self.n, self.n, dtype=torch.bool) if self.labels is None
                else self.labels[:, None] == self.labels[None, :])
        for e in range(1, self.copies):
            cost = torch.cdist(flat[0], flat[e]) ** 2
            cost = torch.where(same, cost, cost.max() * 10 + 1)
            rows, cols = linear_sum_assignment(cost.numpy())
            perm = np.empty(self.n, dtype=np.int64)
            perm[rows] = cols
            self.perms[e] = torch.from_numpy(perm)

    def aligned(self, z: torch.Tensor) -> torch.Tensor:
        """(copies, N, C, H, W): every epoch's candidates in epoch 0's order."""
        epochs = z.view(self.copies, self.n, *z.shape[1:])
        return torch.stack([epochs[e][self.perms[e].to(z.device)] for e in range(self.copies)])

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.calls % self.every == 0:
            self.match(z)
        self.calls += 1
        aligned = self.aligned(z)
        return (aligned - aligned.mean(0, keepdim=True)).pow(2).mean()

    def merged(self, z: torch.Tensor) -> torch.Tensor:
        self.match(z)
        return self.aligned(z).mean(0)
