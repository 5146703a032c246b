"""Host memory: give freed heap pages back to the operating system.

A CPU training step frees and re-allocates hundreds of MB of activations per pass. glibc keeps freed memory in
its heap (resident) unless it sits at the very top, so the process's resident set creeps towards the sum of
every pass's high-water marks instead of the largest one. `release_free_heap` (glibc `malloc_trim(0)`) returns
the free pages to the OS; the next pass faults them in again. `instagan.train.train_step` calls it before each
chunk's last generator pass (its peak: a translate-and-reconstruct pass with both generators' gradients
allocated) and before the discriminator step, when `train.trim_heap` is on (CPU only).

    from instagan.memory import release_free_heap
    release_free_heap()   # True where glibc's malloc_trim exists (Linux/glibc); False elsewhere (a no-op)
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
