"""An attack's arithmetic (recipe ``precision``): what each mode switches, checked on CPU (the CUDA switches are
flags that a CPU build sets too); the GPU's own numbers are benchmarks/ work."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from attacks.gradient_inversion import GradientInversion
from attacks.recipe import recipe
from fl_sim.base.precision import arithmetic
from tests.test_batched import round_of

CUDA = torch.device("cuda")


def test_bf16_autocasts_convolutions_and_matrix_products_and_fp32_leaves_them():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with arithmetic("bf16", torch.device("cpu")):
        assert F.conv2d(x, w).dtype == torch.bfloat16 and (x.flatten(1) @ x.flatten(1).T).dtype == torch.bfloat16
        assert (x + 1).dtype == torch.float32  # elementwise work keeps its dtype
    with arithmetic("fp32", torch.device("cpu")):
        assert F.conv2d(x, w).dtype == torch.float32
    assert F.conv2d(x, w).dtype == torch.float32  # autocast ends with the block


@pytest.mark.parametrize("precision, inside", [("fp32", False), ("tf32", True), ("bf16", False)])
def test_on_cuda_tf32_is_on_only_when_asked_for_and_restored_afterwards(monkeypatch, precision, inside):
    """cuDNN's convolutions use TF32 by default: 'fp32' must switch it off. (autocast is patched out: this
    machine may have no CUDA to autocast on; only the switches are under test.)"""
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # (cuBLAS's flag is a property
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # monkeypatch can't undo)
    try:
        with arithmetic(precision, CUDA):
            assert torch.backends.cuda.matmul.allow_tf32 is inside and torch.backends.cudnn.allow_tf32 is inside
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_off_cuda_is_an_error_and_an_attack_on_cpu_records_it_as_its_failure():
    with pytest.raises(ValueError, match="TensorFloat-32 on CUDA"), arithmetic("tf32", torch.device("cpu")):
        pass
    model, observations = round_of("lenet", 2)
    attack = GradientInversion("ggi", recipe("ggi", iterations=5, precision="tf32", batched=True))
    for rec in [attack.reconstruct(observations[0], model), *attack.reconstruct_many(observations, model)]:
        assert rec.failure is not None and "precision = 'tf32'" in rec.failure and rec.images.shape[0] == 0


def test_a_bf16_attack_runs_in_bf16_and_returns_float32_images():
    """The same GGI from the same start: bf16 changes the iterates (autocast took effect), the result stays a
    float32 image in [0, 1], and the optimisation still descends."""
    model, [obs] = round_of("lenet", 1)
    runs = {p: GradientInversion("ggi", recipe("ggi", iterations=30, precision=p)).reconstruct(obs, model)
            for p in ("fp32", "bf16")}
    for rec in runs.values():
        assert rec.failure is None and rec.images.dtype == torch.float32
        assert 0 <= rec.images.min() and rec.images.max() <= 1 and rec.loss_trace[-1] < rec.loss_trace[0]
    assert not torch.equal(runs["fp32"].images, runs["bf16"].images)
