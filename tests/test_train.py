"""The sequential training step: chunk order, zero-weight chunks, resume, learning, memory vs instance count."""

import math

import pytest
import torch

import instagan.memory as MEM
import instagan.train as T
from instagan import checkpoint
from instagan import masks as M
from instagan.bench import make_inputs
from instagan.config import Config
from instagan.synthetic import make_batch

TINY = {"model": {"ngf": 8, "ndf": 8, "n_blocks": 1}, "data": {"size": 32, "load_size": 32}}


def tiny_cfg(**train) -> Config:
    return Config.from_dict({**TINY, "train": {"ins_max": 4, "ins_per": 2, "batch_size": 2, **train}})


def batches(i: int, n: int = 2, size: int = 32, ins=(1, 6)):
    return make_batch("a", n, size, ins=ins, start=n * i), make_batch("b", n, size, ins=ins, start=n * i + 500)


def test_chunks_follow_decreasing_area(monkeypatch):
    seen = {"ab": [], "ba": []}
    real = T._translation_losses

    def spy(G, F, D, d, masks, valid, active, *args, **kwargs):
        key = "ab" if d.real is state_dirs["a"] else "ba"
        seen[key].append(M.areas(masks, valid).clone())
        return real(G, F, D, d, masks, valid, active, *args, **kwargs)

    monkeypatch.setattr(T, "_translation_losses", spy)
    state = T.TrainState.create(tiny_cfg(ins_max=5, ins_per=2))
    a, b = batches(0, ins=(5, 6))
    orig_prepare = T.prepare_batch
    state_dirs = {}

    def prepare(batch, ins_max, device, union=False):
        out = orig_prepare(batch, ins_max, device)
        state_dirs["a" if batch is a else "b"] = out
        return out

    monkeypatch.setattr(T, "prepare_batch", prepare)
    # Shuffle slots so the step itself must order them.
    perm = torch.randperm(a["masks"].shape[1])
    a = {"img": a["img"], "masks": a["masks"][:, perm], "valid": a["valid"][:, perm]}
    metrics = T.train_step(state, a, b)
    assert metrics["chunks"] == 3  # 5 instances used (ins_max), 2 per chunk
    for key, batch in (("ab", a), ("ba", b)):
        seq = torch.cat(seen[key], 1)  # (B, chunks * ins_per) areas in the order G saw them
        expected = torch.sort(M.areas(batch["masks"], batch["valid"]), 1, descending=True).values[:, :5]
        assert torch.equal(seq[:, :5], expected)
        assert (seq[:, 5:] == 0).all()  # the last chunk's second slot is padding


def test_chunk_count_is_what_the_largest_image_needs():
    a, b = make_batch("a", 2, 32, ins=(1, 1)), make_batch("b", 2, 32, ins=(3, 3))
    assert T.chunk_count(a, b, ins_max=4, ins_per=2) == 2
    assert T.chunk_count(a, b, ins_max=2, ins_per=2) == 1


def test_extra_agreed_chunks_with_no_instances_run_and_stay_finite():
    """A data-parallel rank may have to run more chunks than its images need (the count is agreed across
    ranks): those chunks give its images zero weight, yet forward and backward still run."""
    state = T.TrainState.create(tiny_cfg())
    a, b = batches(0, ins=(1, 2))
    metrics = T.train_step(state, a, b, n_chunks=3)
    assert metrics["chunks"] == 3
    assert all(math.isfinite(v) for v in metrics.values())
    for net in state.nets.values():
        assert all(torch.isfinite(p).all() for p in net.parameters())


def _params(state):
    return {f"{k}.{n}": p.detach().clone() for k, net in state.nets.items() for n, p in net.named_parameters()}


# The quality recipe's options (README "Quality"): every one of them must checkpoint and resume exactly too.
RECIPE = {"model": {"composite": True, "paint": "extend", "sharp": True, "mask_cond": True, "d_img_head": True,
                    "d_mask": True},
          "loss": {"lambda_seg": 2.0, "cyc_free_change": True}}


@pytest.mark.parametrize("recipe", [False, True], ids=["paper", "recipe"])
def test_resume_takes_the_same_next_step(tmp_path, recipe):
    # A small pool is full by step 2, so swaps (random draws) happen; one constant epoch, then the lr decays.
    cfg = tiny_cfg(pool_size=2, seed=3, epochs=1, epochs_decay=3)
    if recipe:
        cfg = Config.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], **RECIPE["model"]},
                                "loss": RECIPE["loss"]})
        assert "S" in T.TrainState.create(cfg).nets
    state = T.TrainState.create(cfg)
    for i in range(3):
        T.train_step(state, *batches(i))
    state.end_epoch()
    checkpoint.save(state, tmp_path / "ckpt")
    m_cont = T.train_step(state, *batches(3))
    m_cont2 = T.train_step(state, *batches(4))
    cont = _params(state)

    resumed = T.TrainState.from_checkpoint(tmp_path / "ckpt")
    assert resumed.step == 3 and resumed.epoch == 1
    assert resumed.lr()["lr/G"] == pytest.approx(0.75 * cfg.train.lr_g)  # the scheduler's state came back
    m_res = T.train_step(resumed, *batches(3))
    m_res2 = T.train_step(resumed, *batches(4))
    assert m_res == pytest.approx(m_cont, rel=1e-5, abs=1e-6)
    assert m_res2 == pytest.approx(m_cont2, rel=1e-5, abs=1e-6)
    res = _params(resumed)
    for k in cont:
        torch.testing.assert_close(res[k], cont[k], rtol=1e-5, atol=1e-6, msg=k)
    # A fresh start with the same seed does NOT match: the checkpoint carried real state.
    fresh = T.TrainState.create(cfg)
    T.train_step(fresh, *batches(3))
    key = next(k for k in cont if k.startswith("G_ab.dec_img."))
    assert not torch.allclose(_params(fresh)[key], cont[key])


def test_checkpoint_is_weights_only_and_complete(tmp_path):
    state = T.TrainState.create(tiny_cfg())
    a, b = batches(0)
    T.train_step(state, a, b)
    checkpoint.save(state, tmp_path)
    payload = torch.load(tmp_path / "state.pt", weights_only=True)
    for key in ("G_ab", "G_ba", "D_a", "D_b", "opt_g", "opt_d", "sched_g", "sched_d", "pool_a", "pool_b", "step",
                "epoch"):
        assert key in payload
    # Pool "a" holds G_ba's fakes: one per (image of b, chunk with an instance of it).
    per_image = b["valid"].sum(1).clamp(max=4)
    assert len(payload["pool_a"]["images"]) == int(((per_image + 1) // 2).sum())
    assert Config.from_dict(__import__("json").loads((tmp_path / "config.json").read_text())) == state.cfg


def test_lr_schedule_constant_then_linear_to_zero():
    cfg = tiny_cfg(epochs=2, epochs_decay=3, lr_g=1.0, lr_d=0.5)
    state = T.TrainState.create(cfg)
    lrs = []
    for _ in range(5):
        lrs.append(state.lr()["lr/G"])
        state.end_epoch()
    assert lrs == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.25])
    assert state.lr()["lr/D"] == pytest.approx(0.0)


def test_tiny_training_run_lowers_content_losses():
    torch.manual_seed(0)
    state = T.TrainState.create(tiny_cfg(batch_size=4))
    history = [T.train_step(state, *batches(i % 8, n=4)) for i in range(24)]

    def content(m):
        return sum(m[k] for k in ("loss/cyc_a", "loss/cyc_b", "loss/idt_ab", "loss/idt_ba"))

    first = content(history[0])
    last = sum(content(m) for m in history[-4:]) / 4
    assert last < 0.6 * first, (first, last)
    assert all(math.isfinite(m["loss/D_a"]) and math.isfinite(m["loss/D_b"]) for m in history)


class SavedBytes:
    """Peak bytes of tensors saved for backward that are alive at once (autograd activation memory)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        tracker = self

        class Held:
            def __init__(self, tensor):
                self.tensor, self.n = tensor, tensor.numel() * tensor.element_size()
                tracker.live += self.n
                tracker.peak = max(tracker.peak, tracker.live)

            def __del__(self):
                tracker.live -= self.n

        return Held(t)

    @staticmethod
    def unpack(held):
        return held.tensor


def _activation_peak(ins: int, monkeypatch) -> int:
    """Peak bytes kept for backward in one train_step, counted through the step's own saved-tensor hooks
    (instagan.memory.lean_saved_tensors): what they keep instead of a tensor (a padded activation's source)
    counts; a reference to a parameter does not."""
    cfg = Config.from_dict({"model": {"ngf": 8, "ndf": 8, "n_blocks": 1}, "data": {"size": 64, "load_size": 64},
                            "train": {"ins_max": ins, "ins_per": 2, "memory": "lean"}})
    state = T.TrainState.create(cfg)
    g = torch.Generator().manual_seed(0)
    a, b = make_inputs(1, ins, 64, g), make_inputs(1, ins, 64, g)
    tracker = SavedBytes()
    pack, unpack = MEM._pack_lean, MEM._unpack_lean

    def counted_pack(t):
        packed = pack(t)
        if isinstance(packed, tuple) and packed[0] == "cast":
            return packed  # a parameter: no activation memory
        kept = packed[1] if isinstance(packed, tuple) else packed  # a padded activation keeps its source
        return "counted", tracker.pack(kept), packed  # counted while autograd holds this

    def counted_unpack(item):
        return unpack(item[2] if isinstance(item, tuple) and item[0] == "counted" else item)

    with monkeypatch.context() as mp:
        mp.setattr(MEM, "_pack_lean", counted_pack)
        mp.setattr(MEM, "_unpack_lean", counted_unpack)
        T.train_step(state, a, b)
    return tracker.peak


def test_activation_memory_does_not_grow_with_instances(monkeypatch):
    small, large = _activation_peak(4, monkeypatch), _activation_peak(16, monkeypatch)
    assert small > 1_000_000  # the hooks saw the step's activations
    assert large <= 1.15 * small, (small, large)


def test_bf16_config_runs_the_step_under_autocast_and_keeps_fp32_state():
    with pytest.raises(ValueError, match="train.amp"):
        tiny_cfg(amp="fp8")
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(o.dtype) if isinstance(m, torch.nn.Conv2d) else None)
    try:
        state = T.TrainState.create(tiny_cfg(amp="bf16"))
        metrics = T.train_step(state, *batches(0))
    finally:
        hook.remove()
    assert torch.bfloat16 in seen  # convolutions ran in bf16
    assert all(p.dtype == torch.float32 and p.grad is None for n in T.NETS for p in state.nets[n].parameters())
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("native", [False, True])
def test_auto_amp_runs_bf16_only_where_the_cpu_has_it_natively(native, monkeypatch):
    """train.amp: auto is bf16 on a CPU with AVX512-BF16/AMX and fp32 elsewhere, where emulated bf16 autocast is
    many times slower (a 3x3 conv 160x on an AVX2 EPYC); an explicit bf16 there runs but warns."""
    import instagan.config as C

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(C, "_WARNED", set())
    assert C.amp_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(o.dtype) if isinstance(m, torch.nn.Conv2d) else None)
    try:
        T.train_step(T.TrainState.create(tiny_cfg(amp="auto")), *batches(0))
    finally:
        hook.remove()
    assert (torch.bfloat16 in seen) == native and (torch.float32 in seen) != native
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert C.amp_dtype("bf16", "cpu") == torch.bfloat16
    assert any("emulated" in str(w.message) for w in caught) != native


def test_segmentation_consistency_pulls_the_image_towards_the_translated_masks_only():
    """seg_consistency: low when the segmenter finds the translated masks in the image, high when the image still
    shows the old shape; its gradient reaches the image only where the chunk may paint (input or translated
    masks) and never the masks (the image follows the masks, not the other way round)."""
    size = 16
    old = torch.full((1, 1, size, size), -1.0)
    old[..., 4:12, 4:8] = 1  # the input instance
    new = torch.full((1, 1, size, size), -1.0)
    new[..., 4:12, 4:12] = 1  # its translation: wider
    valid = torch.ones(1, 1, dtype=torch.bool)

    class Bright(torch.nn.Module):  # a segmenter that calls bright pixels objects
        def forward(self, img):
            return 20 * img[:, :1]

    follows = new[:, :1].expand(1, 3, size, size).clone()  # bright exactly inside the translated mask
    lags = old[:, :1].expand(1, 3, size, size).clone()  # still the old shape
    loss_follows = T.seg_consistency(Bright(), follows, old, valid, new)
    loss_lags = T.seg_consistency(Bright(), lags, old, valid, new)
    assert loss_follows < 1e-3 < 0.5 < loss_lags

    img = lags.clone().requires_grad_(True)
    out_masks = new.clone().requires_grad_(True)
    T.seg_consistency(Bright(), img, old, valid, out_masks).sum().backward()
    assert out_masks.grad is None or not out_masks.grad.any()
    outside = (old < 0) & (new < 0)
    assert not img.grad[:, :, outside[0, 0]].any() and img.grad[:, :, 4:12, 8:12].abs().sum() > 0


def test_segmenter_learns_the_foreground_inside_training():
    """With loss.lambda_seg the step trains the segmenter on real images: its loss falls fast (supervised)."""
    cfg = Config.from_dict({**TINY, "loss": {"lambda_seg": 1.0},
                            "train": {"batch_size": 4, "ins_per": 4, "lr_s": 3e-3}})
    state = T.TrainState.create(cfg)
    losses = [T.train_step(state, *batches(i % 3, n=4))["loss/S"] for i in range(30)]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3, losses


def test_keep_loss_is_reported_and_pulls_the_kept_interior_towards_the_input():
    cfg = tiny_cfg().replace(**{"loss.lambda_keep": 10.0})
    state = T.TrainState.create(cfg)
    metrics = T.train_step(state, *batches(0))
    assert metrics["loss/keep_ab"] > 0 and metrics["loss/keep_ba"] > 0
    assert "loss/keep_ab" not in T.train_step(T.TrainState.create(tiny_cfg()), *batches(0))
    G, F, D = state.nets["G_ab"], state.nets["G_ba"], state.nets["D_b"]
    a = T.prepare_batch(batches(1)[0], 4, state.device)
    d = T.Direction(a, a["img"])
    terms, (y, b) = T._translation_losses(G, F, D, d, a["masks"], a["valid"], a["valid"].any(1), keep=True)
    (grad,) = torch.autograd.grad(terms["keep"], y)
    w = M.keep_weight(a["masks"], a["valid"], b.detach())
    assert (grad.abs().sum(1, keepdim=True)[w == 0] == 0).all() and grad.abs().sum() > 0
