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
0.568 → 0.544, ResNet-50 224 px batch 8 8.0 → 5.6 (the ConvNet unchanged). In plain autograd, im2col of 8 × 8
positions and more is a strided copy (:class:`Im2col`), on CPU freed memory stays in the process
(:func:`retain_freed_memory`), and a large model's single-image attack runs PyTorch's kernels on one thread and only
MKL's products on all (:func:`threads_for_gemms_only`); chains of small BLAS calls run on one thread
(:func:`blas_on_one_thread`), and independent problems side by side, one per core (:func:`one_per_core`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MODEL_PARAMETERS = 1_000_000
T = TypeVar("T")
R = TypeVar("R")


def small_on_cpu(model: nn.Module, device: torch.device) -> bool:
    """A model under SMALL_MODEL_PARAMETERS on the CPU: per-operation overhead, not arithmetic, bounds it."""
    return device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def retain_freed_memory() -> bool:
    """Keep freed tensor memory in the process (glibc only; once per process; True where set).

    By default glibc returns freed blocks above its thresholds to the kernel, and the next tensor of that size is
    faulted in again page by page: a ResNet-18 gradient-matching iteration at batch 1 allocates ~40 MB of fresh
    pages (~10 000 minor page faults), ~20 ms of its ~230 on 2 cores. Blocks up to 32 MB (glibc's most) then come
    from the heap, which is never trimmed; the heap grows in steps of 64 MB. Peak memory is unchanged, but the
    process keeps its peak after a reconstruction."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 << 20)))


@functools.cache
def bundled_mkl() -> ctypes.CDLL | None:
    """The Intel MKL inside PyTorch's CPU library (the x86 wheels link it in), for its service functions; None where
    PyTorch has none (ARM builds, say)."""
    if not torch.backends.mkl.is_available():
        return None
    name = {"Windows": "torch_cpu.dll", "Darwin": "libtorch_cpu.dylib"}.get(platform.system(), "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name))
    except OSError:
        return None
    if not hasattr(lib, "MKL_Set_Num_Threads_Local"):  # the C interface (the lower-case name is Fortran's)
        return None
    lib.MKL_Set_Num_Threads_Local.argtypes, lib.MKL_Set_Num_Threads_Local.restype = [ctypes.c_int], ctypes.c_int
    return lib


@contextmanager
def threads_for_gemms_only() -> Iterator[None]:
    """PyTorch's own kernels on one thread, MKL's matrix products and dot products on all of PyTorch's threads (this
    thread only; restored afterwards; without PyTorch's MKL, or on one thread, nothing changes). With
    ``OMP_WAIT_POLICY=PASSIVE`` every parallel kernel wakes the sleeping threads first: on 2 cores an add of 60 000
    floats takes 48 µs on two threads and 9 µs on one, a strided im2col of 64 channels at 32 px 238 against 76 µs,
    while a 4608 × 512 @ 512 × 16 product keeps its two threads (0.76 ms; 1.18 ms on one)."""
    threads = torch.get_num_threads()
    mkl = bundled_mkl()
    if threads == 1 or mkl is None:
        yield
        return
    try:
        torch.set_num_threads(1)  # PyTorch sets MKL's count for this thread too: raised again just below
        mkl.MKL_Set_Num_Threads_Local(threads)
        yield
    finally:
        torch.set_num_threads(threads)  # both counts as they were


@contextmanager
def blas_on_one_thread() -> Iterator[None]:
    """MKL's routines on the calling thread alone (this thread's count; restored afterwards; without PyTorch's MKL
    nothing changes): for a chain of small memory-bound BLAS calls, where waking the sleeping threads under
    ``OMP_WAIT_POLICY=PASSIVE`` costs more than they save — on 2 cores a dot product of 131 072 floats takes 97 µs
    on two threads and 18 µs on one."""
    mkl = bundled_mkl()
    if mkl is None:
        yield
        return
    previous = mkl.MKL_Set_Num_Threads_Local(1)  # 0 where none was set: MKL's global count again
    try:
        yield
    finally:
        mkl.MKL_Set_Num_Threads_Local(previous)


_WORKER = threading.local()  # in one_per_core's workers: .stop, that call's Event


def interrupted() -> bool:
    """In a worker of :func:`one_per_core`: whether it should stop (its caller was interrupted, or another item
    raised); a long loop then raises KeyboardInterrupt at its next iteration. Elsewhere False."""
    stop = getattr(_WORKER, "stop", None)
    return stop is not None and stop.is_set()


def one_per_core(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]``, side by side on as many threads as PyTorch has, each alone on a core (PyTorch's
    count 1 meanwhile, MKL's 1 in each worker: :func:`blas_on_one_thread`; restored afterwards); results in order.
    The first exception, or an interrupt (Ctrl-C), is re-raised once the workers have returned: they stop at their
    loops' next check of :func:`interrupted`. With one thread, or fewer than two items, one after another. For work
    that keeps the cores busy only in part, e.g. batch-1 gradient matching (ResNet-18, 32 px, 8 problems on 2 cores:
    1.6–1.8x the throughput). ``fn`` must not change PyTorch's global settings (thread counts, backends' switches)."""
    threads = torch.get_num_threads()
    if threads == 1 or len(items) < 2:
        return [fn(x) for x in items]
    results: list[R | None] = [None] * len(items)
    errors: list[BaseException] = []
    todo, lock, stop = iter(range(len(items))), threading.Lock(), threading.Event()

    def work() -> None:
        _WORKER.stop = stop
        with blas_on_one_thread():
            while not stop.is_set():
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                try:
                    results[i] = fn(items[i])
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    errors.append(err)
                    stop.set()

    workers = [threading.Thread(target=work) for _ in range(min(threads, len(items)))]
    try:
        torch.set_num_threads(1)
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():  # in steps: the main thread then sees an interrupt at once
                worker.join(0.05)
    except BaseException:  # an interrupt: the workers stop at their loops' next check
        stop.set()
        for worker in workers:
            if worker.ident is not None:
                worker.join()
        raise
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def faster_one_per_core(model: nn.Module, device: torch.device, single_images: bool, problems: int) -> bool:
    """Whether ``problems`` attacks of ``model`` finish sooner side by side (:func:`one_per_core`) than one after
    another: on CPU, a model of SMALL_MODEL_PARAMETERS and more (small ones run on one thread anyway: tuned_for),
    every forward of one image (batches: oneDNN's convolutions need all threads), and no core left idle (at least as
    many problems as PyTorch's threads)."""
    return (device.type == "cpu" and not small_on_cpu(model, device) and single_images
            and problems >= torch.get_num_threads())


@contextmanager
def tuned_for(model: nn.Module, device: torch.device, single_image: bool = False) -> Iterator[None]:
    """One thread and native convolutions for small models on CPU; restored afterwards. Larger models, when every
    forward is of one image (``single_image``: the convolutions are GemmConv2d's GEMMs then), run everything but
    MKL's products on one thread (:func:`threads_for_gemms_only`; GGI, batch 1, one iteration: ResNet-18 32 px 0.83–
    0.88x the time, ResNet-50 224 px 0.91x) — PyTorch's batched convolutions (oneDNN) need all threads. On CPU, freed
    memory is retained (:func:`retain_freed_memory`)."""
    if device.type == "cpu":
        retain_freed_memory()
    if not small_on_cpu(model, device):
        with threads_for_gemms_only() if device.type == "cpu" and single_image else contextlib.nullcontext():
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


STRIDED_MIN_POSITIONS = 64  # output positions from which im2col is a strided copy (Im2col)
SUMMED_MIN_ELEMENTS = 32_768  # columns per kernel tap (C · oh · ow) from which col2im adds tap by tap


class Geometry(NamedTuple):
    """A convolution's kernel, stride, padding and dilation (each (rows, columns)), its input (N, C, H, W) and
    output positions (oh, ow)."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    input: tuple[int, int, int, int]
    out: tuple[int, int]

    def taps(self) -> Iterator[tuple[int, int, tuple[slice, slice]]]:
        """Each kernel tap (ky, kx) with the rows and columns of the padded input it reads."""
        (kh, kw), (sh, sw), (dh, dw), (oh, ow) = self.kernel, self.stride, self.dilation, self.out
        for ky in range(kh):
            for kx in range(kw):
                yield ky, kx, (slice(ky * dh, ky * dh + sh * (oh - 1) + 1, sh),
                               slice(kx * dw, kx * dw + sw * (ow - 1) + 1, sw))


def strided_columns(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """im2col as one copy of a strided view of the zero-padded input: (N, C, H, W) → (N, C·kh·kw, oh·ow)."""
    (ph, pw), (sh, sw), (dh, dw), (kh, kw), (oh, ow) = g.padding, g.stride, g.dilation, g.kernel, g.out
    padded = F.pad(x, (pw, pw, ph, ph))
    s_n, s_c, s_h, s_w = padded.stride()
    view = padded.as_strided((x.shape[0], x.shape[1], kh, kw, oh, ow),
                             (s_n, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w))
    return view.reshape(x.shape[0], -1, oh * ow)


def summed_columns(cols: torch.Tensor, g: Geometry) -> torch.Tensor:
    """col2im, the adjoint of strided_columns: each tap's columns added into a zero-padded image, then cropped —
    (N, C·kh·kw, oh·ow) → (N, C, H, W)."""
    (n, c, h, w), (ph, pw), (kh, kw), (oh, ow) = g.input, g.padding, g.kernel, g.out
    taps = cols.reshape(n, c, kh, kw, oh, ow)
    padded = cols.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
    for ky, kx, (rows, columns) in g.taps():
        padded[:, :, rows, columns] += taps[:, :, ky, kx]
    return padded[:, :, ph:ph + h, pw:pw + w].contiguous()


def col2im(cols: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The adjoint of strided_columns, (N, C·kh·kw, oh·ow) → (N, C, H, W): tap by tap (summed_columns) where each tap
    holds SUMMED_MIN_ELEMENTS columns or more, else PyTorch's col2im (``F.fold``), whose per-call cost is lower than
    kh·kw additions there (one thread, F.fold against tap by tap: 5×5 taps of 96 channels at 8 × 8 155 against
    387 µs; 3×3 of 64 channels at 32 px 633 against 210 µs)."""
    (_, c, h, w), (oh, ow) = g.input, g.out
    if c * oh * ow >= SUMMED_MIN_ELEMENTS:
        return summed_columns(cols, g)
    return F.fold(cols, (h, w), g.kernel, g.dilation, g.padding, g.stride)


def _keep_geometry(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.geometry = inputs[1]


class Im2col(torch.autograd.Function):
    """strided_columns (x, geometry), differentiable to any order: its backward is Col2im, whose backward is Im2col."""

    forward = staticmethod(strided_columns)
    setup_context = staticmethod(_keep_geometry)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return Col2im.apply(grad, ctx.geometry), None


class Col2im(torch.autograd.Function):
    """col2im (cols, geometry), differentiable to any order (its backward is Im2col)."""

    forward = staticmethod(col2im)
    setup_context = staticmethod(_keep_geometry)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return Im2col.apply(grad, ctx.geometry), None


def im2col(x: torch.Tensor, conv: nn.Conv2d | nn.Module, strided: bool = False) -> tuple[torch.Tensor, int, int]:
    """The columns of ``x`` (N, C, H, W) under ``conv``'s kernel, stride, padding and dilation: (N, C·kh·kw, L) with
    L = oh · ow, and (oh, ow). A 1×1 kernel without padding is a strided view (no copy). ``strided`` (plain autograd
    only: vmap and compile take ``F.unfold``): from STRIDED_MIN_POSITIONS output positions on, ``Im2col`` — a copy of
    a strided view (its backward: :func:`col2im`) — instead of PyTorch's im2col kernel (one thread: 3×3 on 64
    channels at 32 px 76 against 729 µs, on 256 at 8 × 8 102 against 182 µs, 5×5 on 96 at 8 × 8 96 against 187 µs;
    slower at 4 × 4: 75 against 52 µs on 256 channels)."""
    _, _, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw, ph, pw) == (1, 1, 0, 0):
        return x[:, :, ::sh, ::sw].flatten(2), oh, ow
    if strided and oh * ow >= STRIDED_MIN_POSITIONS:
        geometry = Geometry((kh, kw), (sh, sw), (ph, pw), (dh, dw), tuple(x.shape), (oh, ow))
        return Im2col.apply(x, geometry), oh, ow
    return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride), oh, ow


class GemmConv2d(nn.Conv2d):
    """``nn.Conv2d`` of a single image as im2col (``F.unfold``) and one matrix product, (O, C·kh·kw) @
    (C·kh·kw, L): the same function, and every pass of its first and second derivatives is one GEMM (plus
    im2col / col2im). A 1×1 kernel without padding skips im2col (a strided view). Batches of two and more take
    PyTorch's convolution, which is faster there (ResNet-18, train-mode BatchNorm: batch 4 0.57 vs 0.70 s,
    batch 16 1.23 vs 2.26 s per objective evaluation). ``strided``: im2col's ``strided`` (plain autograd only)."""

    strided = False

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if input.shape[0] != 1:
            return super()._conv_forward(input, weight, bias)
        cols, oh, ow = im2col(input, self, self.strided)
        out = weight.flatten(1) @ cols  # (1, O, oh · ow)
        if bias is not None:
            out = out + bias[:, None].to(out.dtype)  # under autocast as nn.Conv2d: the output in the GEMM's dtype
        return out.view(1, -1, oh, ow)


def gemm_convolutions(model: nn.Module, strided: bool = False) -> nn.Module:
    """``model`` (changed in place, and returned) with each plain zero-padded, ungrouped ``nn.Conv2d`` replaced by a
    ``GemmConv2d`` holding the same parameters (same names: state dicts and ``functional_call`` are unaffected);
    ``strided``: their im2col's (plain autograd only)."""
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(
                    conv.padding, str):
                continue
            gemm = GemmConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, bias=conv.bias is not None, device="meta")
            gemm.weight, gemm.bias, gemm.strided = conv.weight, conv.bias, strided
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


def cpu_kernels(model: nn.Module, autograd: bool = True) -> nn.Module:
    """The attacks' CPU fast paths in ``model`` (in place, and returned): GEMM convolutions and eval-mode BatchNorm as
    an affine map — the same functions with cheaper double backwards; ``autograd``: the model runs in plain autograd
    (not under vmap or compile), so im2col may be ``strided``. Call after setting the modes."""
    return affine_batch_norms(gemm_convolutions(model, strided=autograd))
