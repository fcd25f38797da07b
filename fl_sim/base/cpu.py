"""CPU settings for small-model autograd work (reconstructions, Soteria's per-feature backward passes).

A LeNet-sized double-backward is a few hundred tiny kernels: on CPU, OpenMP threading and oneDNN
(mkldnn) convolutions cost more than they save there. Measured on 2 cores (DLG LeNet, 32 px,
batch 1): 11.5 ms per objective evaluation with PyTorch's defaults, 3.0 ms on one thread with
native convolutions. Larger models keep the defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

SMALL_MODEL_PARAMETERS = 1_000_000


@contextmanager
def tuned_for(model: nn.Module, device: torch.device) -> Iterator[None]:
    """One thread and native convolutions for small models on CPU; restored afterwards."""
    small = device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS
    if not small:
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
