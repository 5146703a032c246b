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


def test_auto_rule_runs_the_paper_model_lean_and_the_small_model_plain():
    from instagan.config import Config
    from instagan.memory import use_lean

    paper = Config.from_dict({"data": {"size": 128, "load_size": 144}})  # ngf 64, 128 px: the bench's setting
    small = Config.from_dict({"model": {"ngf": 16, "n_blocks": 3}, "data": {"size": 64, "load_size": 72}})
    assert use_lean(paper) and use_lean(Config())  # 200 px, the paper's COCO size
    assert not use_lean(small)
    assert use_lean(small.replace(**{"train.memory": "lean"}))
    assert not use_lean(paper.replace(**{"train.memory": "plain"}))


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_lean_and_plain_steps_give_the_same_losses(amp):
    """The memory machinery changes what is kept for backward, not the numbers: a step lean and a step plain
    report the same losses, and both run every pass. One chunk, so every loss is computed before an optimizer
    step (after one, Adam's first update, lr * sign(gradient), turns rounding noise in near-zero gradients such
    as a conv bias before instance norm into full steps; the gradients themselves are compared in
    test_networks.py and test_train.py)."""
    from instagan.config import Config
    from instagan.synthetic import make_batch
    from instagan.train import TrainState, train_step

    losses = {}
    for memory in ("lean", "plain"):
        cfg = Config.from_dict({"model": {"ngf": 8, "ndf": 8, "n_blocks": 1}, "data": {"size": 32, "load_size": 32},
                                "train": {"batch_size": 2, "ins_per": 4, "memory": memory, "amp": amp}})
        state = TrainState.create(cfg)
        losses[memory] = train_step(state, make_batch("a", 2, 32, ins=(3, 4)), make_batch("b", 2, 32, ins=(3, 4)))
    assert losses["lean"].keys() == losses["plain"].keys()
    for k, v in losses["lean"].items():
        assert v == pytest.approx(losses["plain"][k], rel=1e-5 if amp == "none" else 1e-2, abs=1e-7), k
