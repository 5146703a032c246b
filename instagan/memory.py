"""Host memory: give freed heap pages back to the operating system.

A CPU training step frees and re-allocates hundreds of MB of activations per pass. glibc keeps freed memory in
its heap (resident) unless it sits at the very top, so the process's resident set creeps towards the sum of
every pass's high-water marks instead of the largest one. `release_free_heap` (glibc `malloc_trim(0)`) returns
the free pages to the OS; the next pass faults them in again. `instagan.train.train_step` calls it before each
chunk's last generator pass (its peak: a translate-and-reconstruct pass with both generators' gradients
allocated) and before the discriminator step, when the step runs lean (`use_lean`) on the CPU.

    from instagan.memory import release_free_heap, use_lean
    release_free_heap()   # True where glibc's malloc_trim exists (Linux/glibc); False elsewhere (a no-op)
    use_lean(cfg)         # train.memory: "lean", "plain", or "auto" (the rule below)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


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


def use_lean(cfg) -> bool:
    """Whether a training step of `cfg` runs the memory machinery (train.memory; "auto": see LEAN_FROM)."""
    mode = cfg.train.memory
    if mode != "auto":
        return mode == "lean"
    return cfg.model.ngf * cfg.data.size ** 2 >= LEAN_FROM
