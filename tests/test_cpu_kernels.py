"""The CPU fast paths of gradient matching compute the same functions as PyTorch's own kernels:
GemmConv2d against nn.Conv2d and AffineBatchNorm2d against nn.BatchNorm2d (values, first and second
derivatives), the strided Im2col against F.unfold, FusedCosine against autograd of the plain formula and against
finite differences (gradcheck); retained memory is reused without page faults."""

import _thread
import contextlib
import copy
import platform
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

from attacks.matching import FusedCosine, GradientDistance, gradient_distance, weighted_norm
from attacks.optimize import optimize
from attacks.recipe import recipe
from fl_sim.base import cpu
from fl_sim.base.cpu import AffineBatchNorm2d, GemmConv2d, affine_batch_norms, gemm_convolutions, im2col

CONVS = [  # (in, out, kernel, stride, padding, dilation, bias)
    (3, 8, 3, 1, 1, 1, True), (4, 6, 3, 2, 1, 1, False), (5, 7, 1, 2, 0, 1, False), (5, 7, 1, 1, 0, 1, True),
    (3, 4, (5, 3), (1, 2), (2, 0), 1, True), (3, 4, 3, 1, 2, 2, True)]


def client_gradient_and_its_derivative(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output, the weight gradient of a loss, and ∂(a function of that gradient)/∂x — the double backward."""
    x = x.clone().requires_grad_(True)
    out = conv(x)
    wrt = [conv.weight, *([conv.bias] if conv.bias is not None else [])] if conv.weight is not None else [x]
    gw, *rest = torch.autograd.grad(out.sin().sum(), wrt, create_graph=True)
    (gx,) = torch.autograd.grad(gw.pow(2).sum() + sum(r.pow(3).sum() for r in rest), x)
    return out.detach(), gw.detach(), gx


@pytest.mark.parametrize("spec", CONVS)
def test_gemm_convolution_equals_pytorchs_convolution_to_the_second_derivative(spec):
    c_in, c_out, k, s, p, d, bias = spec
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=bias).double()
    gemm = gemm_convolutions(nn.Sequential(copy.deepcopy(conv)))[0]
    assert type(gemm) is GemmConv2d
    x = torch.randn(1, c_in, 11, 9, dtype=torch.float64)  # one image: larger batches take PyTorch's convolution
    for ours, theirs in zip(client_gradient_and_its_derivative(gemm, x), client_gradient_and_its_derivative(conv, x),
                            strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("summed", [True, False], ids=["tap-by-tap", "fold"])
@pytest.mark.parametrize("spec", CONVS)
def test_strided_im2col_is_pytorchs_unfold_to_the_second_derivative(spec, summed):
    """Im2col / Col2im (each the other's backward; col2im tap by tap or by F.fold) against F.unfold, whose backward is
    PyTorch's col2im: values, and gradcheck / gradgradcheck against finite differences in float64."""
    c_in, c_out, k, s, p, d, _ = spec
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d)
    x = torch.randn(2, c_in, 11, 9, dtype=torch.float64, requires_grad=True)
    theirs, oh, ow = im2col(x, conv)
    with pytest.MonkeyPatch.context() as mp:  # the thresholds hold for the whole test: each col2im branch checked
        mp.setattr(cpu, "STRIDED_MIN_POSITIONS", 1)
        mp.setattr(cpu, "SUMMED_MIN_ELEMENTS", 1 if summed else 10**9)
        calls, summed_columns = [], cpu.summed_columns
        mp.setattr(cpu, "summed_columns", lambda *a: calls.append(a) or summed_columns(*a))
        ours, *out = im2col(x, conv, strided=True)

        def strided(t):
            return im2col(t, conv, strided=True)[0]
        assert torch.autograd.gradcheck(strided, (x,))
        assert torch.autograd.gradgradcheck(strided, (x,))
        assert out == [oh, ow]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        cols = torch.randn_like(theirs, requires_grad=True)
        (ours_back,) = torch.autograd.grad(ours, x, cols, create_graph=True)  # col2im
        (theirs_back,) = torch.autograd.grad(theirs, x, cols, create_graph=True)  # PyTorch's col2im kernel
        torch.testing.assert_close(ours_back, theirs_back, rtol=1e-12, atol=1e-12)
        probe = torch.randn_like(x)  # col2im's backward: im2col again
        torch.testing.assert_close(torch.autograd.grad((ours_back * probe).sum(), cols)[0],
                                   torch.autograd.grad((theirs_back * probe).sum(), cols)[0], rtol=1e-12, atol=1e-12)
    assert bool(calls) == (summed and (k, p) != (1, 0))  # a 1×1 kernel without padding: a view


def test_a_gemm_convolution_of_a_large_image_takes_the_strided_im2col_in_plain_autograd_only(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu.Im2col, "apply", lambda *a: calls.append(a) or cpu.strided_columns(*a))
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 16, 16)
    plain = gemm_convolutions(nn.Sequential(copy.deepcopy(conv)))[0]
    fast = cpu.cpu_kernels(nn.Sequential(copy.deepcopy(conv)))[0]
    assert not plain.strided and fast.strided
    torch.testing.assert_close(plain(x), conv(x))
    assert not calls
    torch.testing.assert_close(fast(x), conv(x))
    assert len(calls) == 1
    fast(x[..., :7, :7])  # 49 positions: under STRIDED_MIN_POSITIONS, PyTorch's kernels
    assert len(calls) == 1
    assert not cpu.cpu_kernels(nn.Sequential(copy.deepcopy(conv)), autograd=False)[0].strided


def test_gemm_convolutions_keeps_the_parameters_and_leaves_other_convolutions_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Sequential(nn.Conv2d(4, 2, 1)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gemm_convolutions(model)
    assert [type(m) for m in (model[0], model[1], model[2], model[3][0])] == [GemmConv2d, nn.Conv2d, nn.Conv2d,
                                                                              GemmConv2d]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    x = torch.randn(1, 3, 8, 8)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("affine", [True, False])
def test_eval_batch_norm_as_an_affine_map_equals_pytorchs_to_the_second_derivative(affine):
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(5, eps=1e-3, affine=affine).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    model = affine_batch_norms(nn.Sequential(copy.deepcopy(bn).eval(), copy.deepcopy(bn).train(),
                                             nn.BatchNorm2d(5, track_running_stats=False).eval()))
    assert [type(m) for m in model] == [AffineBatchNorm2d, nn.BatchNorm2d, nn.BatchNorm2d]
    assert model[0].state_dict().keys() == bn.state_dict().keys() and not model[0].training
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64) * 3 + 1
    for ours, theirs in zip(client_gradient_and_its_derivative(model[0], x),
                            client_gradient_and_its_derivative(bn.eval(), x), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model[0].train()(x), bn.train()(x))  # train mode: PyTorch's own


def test_an_affine_batch_norm_of_bf16_inputs_computes_in_the_statistics_precision_as_pytorchs():
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(64).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(0, 3), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    affine = affine_batch_norms(nn.Sequential(copy.deepcopy(bn)))[0]
    x = (torch.randn(8, 64, 16, 16) + 1.5).bfloat16()
    ours, theirs = affine(x), bn(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-2)  # bf16 rounding of the output alone


@pytest.mark.parametrize("weights", ["uniform", "linear"])
def test_fused_cosine_distance_equals_the_plain_formula_and_its_gradient(weights):
    torch.manual_seed(1)
    target = [torch.randn(1000, 1000, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    trial = [torch.randn(1000, 1000, dtype=torch.float64, requires_grad=True),
             torch.randn(5, dtype=torch.float64, requires_grad=True)]
    distance = GradientDistance(target, "cosine", weights)
    assert distance.fused  # a million elements and more: one autograd node
    plain = gradient_distance(trial, target, distance.weights, "cosine", weighted_norm(target, distance.weights))
    fused = distance(trial)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad(fused, trial), torch.autograd.grad(plain, trial), strict=True):
        torch.testing.assert_close(a, b)
    small = [t[:3, :4] for t in target[:1]] + target[1:]
    assert not GradientDistance(small, "cosine", weights).fused
    assert torch.autograd.gradcheck(lambda *g: FusedCosine.apply(small, distance.weights, weighted_norm(
        small, distance.weights), *g), tuple(t.detach().clone().requires_grad_(True) for t in small))


def test_under_bf16_autocast_a_gemm_convolution_returns_what_pytorchs_does():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    gemm = gemm_convolutions(copy.deepcopy(nn.Sequential(conv)))[0]
    x = torch.randn(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = gemm(x), conv(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), atol=0.05, rtol=0.02)


FAULTS = """
import ctypes, resource, sys, torch
from fl_sim.base.cpu import M_MMAP_THRESHOLD, retain_freed_memory
if sys.argv[1] == "0":  # glibc's starting threshold (128 KiB), which its dynamic rule may or may not have raised
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10)
retained = sys.argv[1] == "1" and retain_freed_memory()
for _ in range(3):  # warm: the heap grows once
    [torch.ones(2_400_000) for _ in range(4)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # four 9.6 MB tensors freed together each round, as an iteration's layer gradients are
    [torch.ones(2_400_000) for _ in range(4)]
print(retained, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retained_memory_is_reused_without_faulting_its_pages_in_again():
    def faults(retain: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS, retain], capture_output=True, text=True, check=True)
        retained, count = out.stdout.split()
        return retained, int(count)

    default, kept = faults("0"), faults("1")
    assert default[0] == "False" and kept[0] == "True"
    pages = 20 * 4 * 4 * 2_400_000 // 4096  # every round's pages: ~188 000
    assert default[1] > pages // 2  # blocks above the threshold go back to the kernel: fresh pages each round
    assert kept[1] < pages // 10  # 0 in 11 of 12 runs here, 9 375 in one (one round's tensors placed afresh)


def test_a_large_model_of_single_images_runs_only_mkls_products_on_all_threads(torch_threads):
    """tuned_for(single_image=True), a model of a million parameters and more: PyTorch's kernels on one thread, MKL's
    products on all (MKL's own count, read back from MKL), the same outputs, and everything restored afterwards;
    batches (oneDNN's convolutions) keep the threads, and small models run on one thread throughout."""
    mkl = cpu.bundled_mkl()
    if mkl is None:
        pytest.skip("this PyTorch carries no MKL")
    here = torch.device("cpu")
    torch_threads(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 400), nn.ReLU(), nn.Linear(400, 10))  # 1.2 M
    assert not cpu.small_on_cpu(model, here)
    x = torch.randn(1, 3, 32, 32)
    outside = model(x)
    with cpu.tuned_for(model, here, single_image=True):
        threads = torch.get_num_threads(), mkl.MKL_Get_Max_Threads()
        inside = model(x)
    assert threads == (1, 2)
    assert (torch.get_num_threads(), mkl.MKL_Get_Max_Threads()) == (2, 2)
    torch.testing.assert_close(inside, outside)
    with cpu.tuned_for(model, here):
        assert (torch.get_num_threads(), mkl.MKL_Get_Max_Threads()) == (2, 2)
    with cpu.tuned_for(nn.Linear(10, 2), here, single_image=True):
        assert (torch.get_num_threads(), mkl.MKL_Get_Max_Threads()) == (1, 1)


def test_the_fused_distance_takes_its_dot_products_on_one_blas_thread(monkeypatch, torch_threads):
    """On CPU FusedCosine's dot products run with MKL's count at 1 (read back from MKL at every dot), inside the
    thread split too, and both counts are as they were afterwards."""
    mkl = cpu.bundled_mkl()
    if mkl is None:
        pytest.skip("this PyTorch carries no MKL")
    torch_threads(2)
    counts, dot = [], torch.dot
    monkeypatch.setattr(torch, "dot", lambda a, b: counts.append(mkl.MKL_Get_Max_Threads()) or dot(a, b))
    target = [torch.randn(300_000), torch.randn(700_000), torch.randn(10)]
    distance = GradientDistance(target, "cosine", "uniform")
    assert distance.fused
    for split in (False, True):
        with cpu.threads_for_gemms_only() if split else contextlib.nullcontext():
            outside = mkl.MKL_Get_Max_Threads()
            value = distance([t * 2 for t in target])
            assert mkl.MKL_Get_Max_Threads() == outside == 2
    assert len(counts) == 2 * 2 * (3 + 6 + 1) and set(counts) == {1}  # chunks of 131 072: 3 + 6 + 1 per dot
    assert abs(value.item()) < 1e-6  # the same direction: distance 0
    assert torch.get_num_threads() == 2


def test_one_per_core_runs_the_items_side_by_side_each_on_one_thread_in_order(torch_threads):
    mkl = cpu.bundled_mkl()
    torch_threads(2)
    started = threading.Barrier(2, timeout=10)  # passes only if two items run at once

    def item(x: int) -> tuple[int, int, int | None]:
        if x < 2:
            started.wait()
        return x * x, torch.get_num_threads(), mkl.MKL_Get_Max_Threads() if mkl is not None else None

    out = cpu.one_per_core(item, list(range(5)))
    assert [square for square, _, _ in out] == [0, 1, 4, 9, 16]
    assert {(threads, blas) for _, threads, blas in out} == {(1, 1 if mkl is not None else None)}
    assert torch.get_num_threads() == 2

    def fails(x: int) -> int:
        if x == 3:
            raise ValueError("item 3")
        return x

    with pytest.raises(ValueError, match="item 3"):
        cpu.one_per_core(fails, list(range(6)))
    assert torch.get_num_threads() == 2


def test_an_interrupted_one_per_core_stops_its_workers_and_reraises(torch_threads):
    """Ctrl-C while items run side by side: the workers see interrupted() and return, no new item starts, the
    interrupt reaches the caller within moments, and the thread count is restored."""
    torch_threads(2)
    started = []

    def item(x: int) -> int:
        started.append(x)
        deadline = time.monotonic() + 60
        while not cpu.interrupted() and time.monotonic() < deadline:
            time.sleep(0.005)
        if cpu.interrupted():
            raise KeyboardInterrupt
        return x

    threading.Timer(0.3, _thread.interrupt_main).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        cpu.one_per_core(item, list(range(6)))
    assert time.monotonic() - t0 < 10
    assert sorted(started) == [0, 1] and torch.get_num_threads() == 2


def test_the_optimisation_loop_stops_when_one_per_cores_caller_is_interrupted():
    """In a worker whose call was interrupted, optimize raises at its next iteration; elsewhere the flag is False."""
    r = recipe("dlg", optimizer="adam", lr=0.1, iterations=100)
    bounds = (torch.zeros(1), torch.ones(1))
    assert not cpu.interrupted()
    cpu._WORKER.stop = threading.Event()
    cpu._WORKER.stop.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            optimize(lambda z, _: ((z ** 2).sum(),) * 2, torch.ones(1, 1), None, r, bounds)
    finally:
        del cpu._WORKER.stop
