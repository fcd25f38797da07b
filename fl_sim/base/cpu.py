"""CPU settings for autograd work (reconstructions, Soteria's per-feature backward passes).

A LeNet-sized double-backward is a few hundred tiny kernels: on CPU, OpenMP threading and oneDNN
(mkldnn) convolutions cost more than they save there. Measured on 2 cores (DLG LeNet, 32 px,
batch 1): 11.5 ms per objective evaluation with PyTorch's defaults, 3.0 ms on one thread with
native convolutions. Larger models keep the defaults.

Gradient matching differentiates the client's gradient, and PyTorch's CPU double backward of a
convolution of one image runs its passes through the slow im2col kernels; :func:`gemm_convolutions`
makes every pass one matrix product instead (``GemmConv2d``, batch 1 only). Measured on 2 cores, one
GGI objective evaluation with ∂/∂z at batch 1: ResNet-18 (32 px, eval-mode BatchNorm) 247 → 215 ms,
the ConvNet 14.3 → 9.1 ms, the DLG LeNet 2.1 → 1.9 ms (one thread, tuned_for); train-mode ResNet-18
288 → 256 ms. An eval-mode BatchNorm's double backward is cheaper as the affine map it is
(:func:`affine_batch_norms`); GGI seconds per iteration on 2 cores: ResNet-18 32 px batch 1 0.176 → 0.168, batch 8
0.568 → 0.544, ResNet-50 224 px batch 8 8.0 → 5.6 (the ConvNet unchanged).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MODEL_PARAMETERS = 1_000_000


def small_on_cpu(model: nn.Module, device: torch.device) -> bool:
    """A model under SMALL_MODEL_PARAMETERS on the CPU: per-operation overhead, not arithmetic, bounds it."""
    return device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS


@contextmanager
def tuned_for(model: nn.Module, device: torch.device) -> Iterator[None]:
    """One thread and native convolutions for small models on CPU; restored afterwards."""
    if not small_on_cpu(model, device):
        yield
        return
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn


def im2col(x: torch.Tensor, conv: nn.Conv2d | nn.Module) -> tuple[torch.Tensor, int, int]:
    """The columns of ``x`` (N, C, H, W) under ``conv``'s kernel, stride, padding and dilation: (N, C·kh·kw, L) with
    L = oh · ow, and (oh, ow). A 1×1 kernel without padding is a strided view (no copy)."""
    _, _, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw, ph, pw) == (1, 1, 0, 0):
        return x[:, :, ::sh, ::sw].flatten(2), oh, ow
    return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride), oh, ow


class GemmConv2d(nn.Conv2d):
    """``nn.Conv2d`` of a single image as im2col (``F.unfold``) and one matrix product, (O, C·kh·kw) @
    (C·kh·kw, L): the same function, and every pass of its first and second derivatives is one GEMM (plus
    im2col / col2im). A 1×1 kernel without padding skips im2col (a strided view). Batches of two and more take
    PyTorch's convolution, which is faster there (ResNet-18, train-mode BatchNorm: batch 4 0.57 vs 0.70 s,
    batch 16 1.23 vs 2.26 s per objective evaluation)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if input.shape[0] != 1:
            return super()._conv_forward(input, weight, bias)
        cols, oh, ow = im2col(input, self)
        out = weight.flatten(1) @ cols  # (1, O, oh · ow)
        if bias is not None:
            out = out + bias[:, None].to(out.dtype)  # under autocast as nn.Conv2d: the output in the GEMM's dtype
        return out.view(1, -1, oh, ow)


def gemm_convolutions(model: nn.Module) -> nn.Module:
    """``model`` (changed in place, and returned) with each plain zero-padded, ungrouped ``nn.Conv2d`` replaced by a
    ``GemmConv2d`` holding the same parameters (same names: state dicts and ``functional_call`` are unaffected)."""
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(
                    conv.padding, str):
                continue
            gemm = GemmConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, bias=conv.bias is not None, device="meta")
            gemm.weight, gemm.bias = conv.weight, conv.bias
            setattr(parent, name, gemm)
    return model


class AffineBatchNorm2d(nn.BatchNorm2d):
    """An eval-mode ``nn.BatchNorm2d`` as the per-channel affine map it is, x·s + (β − μ·s) with s = γ / √(σ² + ε)
    from the running statistics: the same function, and its double backward is two elementwise products instead of
    ``native_batch_norm``'s. In train mode (or without running statistics) it is ``nn.BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_mean is None:
            return super().forward(x)
        scale = torch.rsqrt(self.running_var + self.eps)  # (C,)
        shift = -self.running_mean * scale
        if self.weight is not None:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return (x * scale[:, None, None] + shift[:, None, None]).to(x.dtype)  # in the statistics' precision


def affine_batch_norms(model: nn.Module) -> nn.Module:
    """``model`` (changed in place, and returned) with each eval-mode ``nn.BatchNorm2d`` with running statistics
    replaced by an ``AffineBatchNorm2d`` holding the same parameters and buffers (same names). Call after setting
    the modes; train-mode BatchNorm keeps PyTorch's kernel (written out, it measured slower at batch 8)."""
    for parent in list(model.modules()):
        for name, bn in list(parent.named_children()):
            if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_mean is None:
                continue
            affine = AffineBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, device="meta")
            affine.weight, affine.bias = bn.weight, bn.bias
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(affine, buffer, getattr(bn, buffer))
            setattr(parent, name, affine.eval())
    return model


def cpu_kernels(model: nn.Module) -> nn.Module:
    """The attacks' CPU fast paths in ``model`` (in place, and returned): GEMM convolutions and eval-mode BatchNorm as
    an affine map — the same functions with cheaper double backwards. Call after setting the modes."""
    return affine_batch_norms(gemm_convolutions(model))
