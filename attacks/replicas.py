"""K copies of one model as one module: K gradient-matching problems on the same global model in plain autograd on
K-times wider layers, instead of ``vmap`` (attacks/batched.py picks it for small models on CPU, where vmap's
per-operation cost dominates).

The input (N, K·C, H, W) holds the K problems' candidates side by side in the channels. Convolutions become one
batched GEMM over the K blocks (``GemmConv2d``'s im2col), BatchNorm has K·C channels (a problem's own batch
statistics in train mode, its copy of the running ones in eval mode), linear layers are block-diagonal on the
flattened (N, K·F) features, and parameter-free layers act per channel already. Block k of a replicated parameter
is problem k's copy, so the gradient of the K losses' sum w.r.t. it is problem k's client gradient. Any other
parameterised layer, or a forward that mixes channels (checked once on a random input against the model), refuses
the model (None).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fl_sim.base.cpu import im2col
from fl_sim.base.streams import REPLICA_CHECK


class ReplicatedConv2d(nn.Module):
    """K copies of a zero-padded, ungrouped convolution: (N, K·C, H, W) → (N, K·O, H', W'), one bmm per pass."""

    def __init__(self, conv: nn.Conv2d, k: int) -> None:
        super().__init__()
        self.k, self.out_channels = k, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (conv.kernel_size, conv.stride, conv.padding,
                                                                      conv.dilation)
        self.weight = nn.Parameter(conv.weight.detach().repeat(k, 1, 1, 1))  # (K·O, C, kh, kw)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().repeat(k))  # (K·O,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        cols, oh, ow = im2col(x, self, strided=True)  # (N, K·C·kh·kw, L)
        cols = cols.view(n, self.k, -1, oh * ow).permute(1, 2, 0, 3).reshape(self.k, -1, n * oh * ow)
        weight = self.weight.view(self.k, self.out_channels, -1)
        out = (torch.bmm(weight, cols) if self.bias is None  # (K, O, N·L)
               else torch.baddbmm(self.bias.view(self.k, -1, 1), weight, cols))
        return out.view(self.k, self.out_channels, n, oh * ow).permute(2, 0, 1, 3).reshape(n, -1, oh, ow)


class BlockLinear(nn.Module):
    """K copies of a linear layer, block-diagonal: (N, K·F) → (N, K·O)."""

    def __init__(self, linear: nn.Linear, k: int) -> None:
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(linear.weight.detach().repeat(k, 1, 1))  # (K, O, F)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().repeat(k, 1))  # (K, O)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.reshape(n, self.k, -1).transpose(0, 1)  # (K, N, F)
        out = (torch.bmm(x, self.weight.transpose(1, 2)) if self.bias is None  # (K, N, O)
               else torch.baddbmm(self.bias[:, None], x, self.weight.transpose(1, 2)))
        return out.transpose(0, 1).reshape(n, -1)


def replicated_batch_norm(bn: nn.BatchNorm2d, k: int) -> nn.BatchNorm2d:
    """K·C channels: train mode normalises with the batch's statistics (none tracked), eval mode with K copies of
    the running ones."""
    running = not bn.training and bn.running_mean is not None
    out = nn.BatchNorm2d(bn.num_features * k, bn.eps, bn.momentum, bn.affine, track_running_stats=running,
                         device=bn.weight.device if bn.affine else None, dtype=bn.weight.dtype if bn.affine else None)
    with torch.no_grad():
        if bn.affine:
            out.weight.copy_(bn.weight.repeat(k))
            out.bias.copy_(bn.bias.repeat(k))
        if running:
            out.running_mean.copy_(bn.running_mean.repeat(k))
            out.running_var.copy_(bn.running_var.repeat(k))
    return out.train(bn.training)


def replicate(model: nn.Module, k: int, shape: tuple[int, ...], seed: int = 0) -> nn.Module | None:
    """K copies of ``model`` (its parameters' names and order kept) for inputs of ``shape`` (N, C, H, W) per problem,
    or None when the model has another parameterised layer or its forward mixes channels (``seed``: the attack's,
    for the check's random input)."""
    rep = copy.deepcopy(model)
    for parent in list(rep.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                if child.groups != 1 or child.padding_mode != "zeros" or isinstance(child.padding, str):
                    return None
                setattr(parent, name, ReplicatedConv2d(child, k))
            elif type(child) is nn.Linear:
                setattr(parent, name, BlockLinear(child, k))
            elif isinstance(child, nn.BatchNorm2d):  # AffineBatchNorm2d too
                setattr(parent, name, replicated_batch_norm(child, k))
    supported = (ReplicatedConv2d, BlockLinear, nn.BatchNorm2d)
    if any(next(m.parameters(recurse=False), None) is not None and not isinstance(m, supported) for m in rep.modules()):
        return None
    if [n for n, _ in rep.named_parameters()] != [n for n, _ in model.named_parameters()]:
        return None
    n, c, *image = shape
    ref = next(model.parameters())
    gen = torch.Generator().manual_seed(REPLICA_CHECK.seed(seed))
    x = torch.randn(n, k * c, *image, generator=gen, dtype=ref.dtype).to(ref.device)
    with torch.no_grad():
        try:
            ours = rep(x).view(n, k, -1)
        except RuntimeError:  # a layer whose shapes the replicas break (a subclass left unreplaced, say)
            return None
        theirs = torch.stack([model(x[:, i * c:(i + 1) * c]) for i in range(k)], dim=1)
    return rep if torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5) else None
