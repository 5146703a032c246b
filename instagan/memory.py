"""Memory machinery of a training step: lean saved tensors, reflection padding that keeps nothing, heap trims.

Autograd (`lean_saved_tensors`, `ReflectionPad2d`): see their docstrings; the networks use ReflectionPad2d and
`instagan.train.train_step` runs its passes inside lean_saved_tensors() when `use_lean(cfg)`.

Host memory: give freed heap pages back to the operating system.

A CPU training step frees and re-allocates hundreds of MB of activations per pass. glibc keeps freed memory in
its heap (resident) unless it sits at the very top, so the process's resident set creeps towards the sum of
every pass's high-water marks instead of the largest one. `release_free_heap` (glibc `malloc_trim(0)`) returns
the free pages to the OS; the next pass faults them in again. `instagan.train.train_step` calls it before each
chunk's last generator pass (its peak: a translate-and-reconstruct pass with both generators' gradients
allocated) and before the discriminator step, when the step runs lean (`use_lean`) on the CPU.

    from instagan.memory import release_free_heap, use_lean
    release_free_heap()   # True where glibc's malloc_trim exists (Linux/glibc); False elsewhere (a no-op)
    use_lean(cfg)         # train.memory: "lean", "plain", or "auto" (the rule below)
    with lean_saved_tensors(): loss = ...   # forward passes keep less for backward, same gradients
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading

import torch
from torch import Tensor, nn


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, Windows, musl)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS. True if the allocator supports it (glibc), else False."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


# train.memory "auto": lean from this many ngf x pixels per image up. The paper model at 128 px is 64 x 128^2 = 1.0M
# (lean: peak RSS 2.87 -> 2.29 GB, step time within noise); the small model of the README and the quality harness
# is 16 x 64^2 = 66k, where the step is mostly per-op overhead and lean only costs time (bf16, 1 thread: 2.59 vs
# 2.41 CPU-s a step with only the heap trim off; README "Benchmark").
LEAN_FROM = 256 * 1024


def use_lean(cfg, device: torch.device | str | None = None) -> bool:
    """Whether a training step of `cfg` on `device` (default CPU) runs the memory machinery (train.memory; "auto":
    on CPU from LEAN_FROM up, never on CUDA)."""
    mode = cfg.train.memory
    if mode != "auto":
        return mode == "lean"
    if device is not None and torch.device(device).type == "cuda":
        # H200, paper model at 200 px, bf16, batch 8: plain 6.77 samples/s at 7.9 GiB against lean 5.76 at 6.8 GiB
        # (README "Benchmark"): the recomputation costs 15% of the time to save 1 GiB a GPU has to spare.
        return False
    return cfg.model.ngf * cfg.data.size ** 2 >= LEAN_FROM


# ---- autograd: keep less for backward ----------------------------------------------------------------------

_lean = threading.local()  # .on: inside lean_saved_tensors() on this thread


def _reflect(x: Tensor, padding) -> Tensor:
    """Reflection padding in x's own dtype, whatever autocast would choose."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.ops.aten.reflection_pad2d(x, list(padding))


class _ReflectionPad(torch.autograd.Function):
    """Reflection padding whose backward keeps no tensor (its gradient reads only the input's shape). Inside
    `lean_saved_tensors()` its node also holds the input, so the padded output can be rebuilt from it."""

    @staticmethod
    def forward(ctx, x: Tensor, padding: tuple[int, int, int, int]) -> Tensor:
        ctx.in_shape, ctx.padding = x.shape, padding
        ctx.source = x if getattr(_lean, "on", False) else None
        return _reflect(x, padding)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        shape_only = grad.new_zeros(()).expand(ctx.in_shape)  # read for its sizes only; no memory
        return torch.ops.aten.reflection_pad2d_backward(grad, shape_only, list(ctx.padding)), None


class ReflectionPad2d(nn.ReflectionPad2d):
    """nn.ReflectionPad2d with the same numbers forward and backward, lighter on memory in training.

    - It pads in the input's own dtype. CPU autocast runs reflection padding in fp32: a bf16 activation is
      upcast, the fp32 copy is kept for backward, and the next conv casts the padded result back to bf16 and
      keeps that copy too.
    - Its backward keeps no tensor (nn.ReflectionPad2d keeps its input, which only the shape is read from).
    - Inside `lean_saved_tensors()`, the conv after it keeps the unpadded input (often kept anyway, by the ReLU
      before) and pads it again in backward.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
            return _ReflectionPad.apply(x, tuple(self.padding))
        return _reflect(x, self.padding)


def _pack_lean(t: Tensor):
    fn = t.grad_fn
    source = getattr(fn, "source", None)
    if source is not None and isinstance(fn, _ReflectionPad._backward_cls):  # a padded activation
        fn.source = None  # the graph node lives on after backward; only the packed copy may hold the input
        return "pad", source, fn.padding, source._version
    if type(fn).__name__ == "ToCopyBackward0" and fn.next_functions:  # a cast ...
        param = getattr(fn.next_functions[0][0], "variable", None)  # ... of a leaf: a parameter
        if param is not None and param.shape == t.shape and param.dtype != t.dtype:
            return "cast", param, t.dtype, param._version
    return t


def _unpack_lean(packed):
    if not isinstance(packed, tuple):
        return packed
    kind, source, arg, version = packed
    if source._version != version:
        raise RuntimeError(f"a tensor saved for backward as its {kind} source was modified in place since")
    return _reflect(source, arg) if kind == "pad" else source.to(arg)


def lean_on() -> bool:
    """Whether this thread runs inside lean_saved_tensors()."""
    return getattr(_lean, "on", False)


@contextlib.contextmanager
def lean_saved_tensors():
    """Forward passes run inside this keep less for backward, with the same gradients:

    - A low-precision copy of a parameter (what autocast makes for each conv) is kept as the parameter and cast
      again in backward, instead of one more copy of the weights per pass (about 100 MB for a generator step's
      translate-and-reconstruct pass; run autocast with cache_enabled=False so the copies go right away).
    - A reflection-padded activation (ReflectionPad2d) is kept as its unpadded input and padded again.
    Parameters must not change between a forward and its backward (true of any optimizer step after backward).
    """
    prev = getattr(_lean, "on", False)
    _lean.on = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack_lean, _unpack_lean):
            yield
    finally:
        _lean.on = prev
