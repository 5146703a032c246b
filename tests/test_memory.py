"""instagan.memory: freed heap memory really goes back to the operating system."""

import sys

import pytest
import torch

from instagan.memory import release_free_heap


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim is Linux-only")
def test_release_free_heap_returns_freed_tensor_memory():
    # Many small tensors (below glibc's mmap threshold, so they live in the heap), all freed but the last:
    # the heap cannot shrink from the top, so the freed pages stay resident until they are released.
    tensors = [torch.ones(16_000) for _ in range(8_000)]  # 64 kB each, about 500 MB
    keep = tensors[-1]
    del tensors
    before = _rss_bytes()
    assert release_free_heap() is True
    after = _rss_bytes()
    assert before - after > 300e6, (before, after)
    assert keep.sum().item() == 16_000  # live memory is untouched
