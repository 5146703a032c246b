"""instagan.memory: the lean forward keeps less for backward with the same gradients; freed heap memory really goes
back to the operating system; the auto rule."""

import sys

import pytest
import torch

import instagan.memory as MEM
from instagan.memory import ReflectionPad2d, release_free_heap
from instagan.networks import SetDiscriminator, SetGenerator
from instagan.synthetic import make_batch


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


def test_auto_rule_runs_the_paper_model_lean_on_cpu_and_the_small_model_and_gpus_plain():
    from instagan.config import Config
    from instagan.memory import use_lean

    paper = Config.from_dict({"data": {"size": 128, "load_size": 144}})  # ngf 64, 128 px: the bench's setting
    small = Config.from_dict({"model": {"ngf": 16, "n_blocks": 3}, "data": {"size": 64, "load_size": 72}})
    assert use_lean(paper) and use_lean(Config())  # 200 px, the paper's COCO size
    assert not use_lean(small)
    assert use_lean(small.replace(**{"train.memory": "lean"}))
    assert not use_lean(paper.replace(**{"train.memory": "plain"}))
    assert use_lean(paper, "cpu") and not use_lean(paper, "cuda") and not use_lean(paper, torch.device("cuda:1"))
    assert use_lean(paper.replace(**{"train.memory": "lean"}), "cuda")


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


# ---- memory-lean training forward: the same numbers, less kept for backward ------------------------------------

def test_reflection_pad_matches_torch_and_keeps_the_input_dtype_under_autocast():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 9, 11, dtype=dtype, requires_grad=True)
        g = torch.randn(2, 5, 15, 17, dtype=dtype)
        ours, ref = ReflectionPad2d(3)(x), torch.nn.ReflectionPad2d(3)(x)
        (grad_ours,), (grad_ref,) = torch.autograd.grad(ours, x, g), torch.autograd.grad(ref, x, g)
        assert torch.equal(ours, ref) and torch.equal(grad_ours, grad_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast would pad in fp32
        x = torch.randn(1, 3, 8, 8, dtype=torch.bfloat16, requires_grad=True)
        assert ReflectionPad2d(1)(x).dtype == torch.bfloat16
        with torch.no_grad():
            assert ReflectionPad2d(1)(x).dtype == torch.bfloat16


def _kept_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while fn() runs (parameters not counted)."""
    kept, hold = {}, []  # hold: no storage is freed and its address reused while counting

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            hold.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


@pytest.mark.parametrize("amp", [False, True])
def test_lean_saved_tensors_give_the_same_gradients_and_keep_less(amp, monkeypatch):
    torch.manual_seed(0)
    G, D = SetGenerator(ngf=8, n_blocks=2), SetDiscriminator(ndf=8).eval()  # eval: no power-iteration update
    batch = make_batch("a", 2, 64, ins=(1, 3))
    img, masks, valid = batch["img"], batch["masks"], batch["valid"]
    params = [*G.parameters(), *D.parameters()]

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            out_img, out_masks = G(img, masks, valid)
            return D(out_img, out_masks, valid).float().square().mean() + out_masks.float().square().mean()

    plain = torch.autograd.grad(loss(), params)
    with MEM.lean_saved_tensors():
        lean = torch.autograd.grad(loss(), params)
    assert all(torch.equal(a, b) for a, b in zip(plain, lean))

    # What the lean hooks keep: their own packing, counted through a wrapper (a parameter reference is free).
    kept, hold = {}, []
    pack = MEM._pack_lean

    def counting_pack(t):
        packed = pack(t)
        held = packed[1] if isinstance(packed, tuple) else packed
        if not (isinstance(packed, tuple) and packed[0] == "cast"):
            kept[held.untyped_storage().data_ptr()] = held.untyped_storage().nbytes()
            hold.append(held)
        return packed

    monkeypatch.setattr(MEM, "_pack_lean", counting_pack)
    with MEM.lean_saved_tensors():
        loss()
    full = _kept_bytes(loss)
    # With no lean hooks the ratio is 1. Tiny widths show less than the paper's model (weights are small here).
    assert sum(kept.values()) < (0.9 if amp else 0.95) * full, (sum(kept.values()), full)


def test_lean_saved_tensors_refuse_a_source_changed_in_place():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    conv = torch.nn.Conv2d(2, 2, 3)
    with MEM.lean_saved_tensors():
        y = x * 1.0  # the pad's source
        out = conv(MEM.ReflectionPad2d(1)(y)).sum()
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()
