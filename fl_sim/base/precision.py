"""The arithmetic of an attack's optimisation: IEEE float32, TensorFloat-32 (CUDA) or bfloat16 autocast."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def unavailable(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device`` (None: it can)."""
    if precision == "tf32" and device.type != "cuda":
        return (f"precision = 'tf32' is TensorFloat-32 on CUDA tensor cores and this attack runs on {device.type}; "
                "use precision 'fp32' or 'bf16'")
    return None


@contextmanager
def arithmetic(precision: str, device: torch.device) -> Iterator[None]:
    """Matrix products and convolutions within run as ``precision`` says, restored afterwards:

    - ``fp32``: IEEE float32 — on CUDA TF32 is switched off for both (cuDNN's convolutions use it by default);
    - ``tf32``: TensorFloat-32 for both (CUDA only: ValueError elsewhere);
    - ``bf16``: ``torch.autocast`` to bfloat16 (CPU or CUDA); parameters, gradients' leaves and the optimiser
      stay float32, as do TF32's switches (off).
    """
    if (why := unavailable(precision, device)) is not None:
        raise ValueError(why)
    cuda = device.type == "cuda"
    if cuda:  # the allow_tf32 switches (PyTorch refuses to read them once code mixed in its fp32_precision API)
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
