"""The speed work of the small-model step (instagan.bench_step): the plain yardstick computes the project's losses,
the faster layers and the compiled path change no numbers beyond rounding."""

import json

import pytest
import torch
from torch import nn

import instagan.bench_step as B
from instagan.config import Config
from instagan.memory import ReflectionPad2d
from instagan.networks import NarrowConv2d, SetGenerator, fast_narrow_convs
from instagan.synthetic import make_batch
from instagan.train import TrainState, train_step

TINY = {"model": {"ngf": 8, "ndf": 8, "n_blocks": 1}, "data": {"size": 32, "load_size": 32},
        "train": {"batch_size": 2, "ins_max": 4, "ins_per": 2}}


def _batches(i: int, n: int = 2, size: int = 32):
    return make_batch("a", n, size, ins=(1, 4), start=n * i), make_batch("b", n, size, ins=(1, 4), start=n * i + 50)


@pytest.mark.parametrize("amp,narrow", [(None, False), (None, True), (torch.bfloat16, True)])
def test_plain_step_gives_the_project_steps_first_losses(amp, narrow):
    """Same init, same batch: every loss of the first step agrees (both steps run two chunks here). fp32 to 1e-5
    relative with the project's NarrowConv2d running as a plain conv (the step's logic is the same); as the project
    runs it (space-to-depth on CPU) to 1e-3: the conv's other summation order, amplified over the step's chunks,
    moved loss/D_a by 3e-4 on an AVX2 EPYC (within 1e-5 on an AVX512 Xeon); bf16 to 2e-2 (bf16 rounding differs:
    the plain step pads in fp32 under autocast, as torch does)."""
    cfg = Config.from_dict(TINY)
    batch = _batches(0)
    assert B.plain_step.__module__ == "instagan.bench_step"
    state = TrainState.create(cfg)
    for net in state.nets.values():
        fast_narrow_convs(net, on=narrow)
    ours = train_step(state, *batch, amp_dtype=amp)
    plain = B.plain_step(B.PlainState(cfg), *batch, amp=amp)
    assert ours["chunks"] == plain["chunks"] == 2
    assert set(ours) == set(plain)
    tol = 2e-2 if amp is not None else 1e-3 if narrow else 1e-5
    for k in ours:
        assert plain[k] == pytest.approx(ours[k], rel=tol, abs=tol), k


def test_plain_step_is_not_the_project_step():
    """The yardstick holds torch's layers and torch's default Adam, with the same parameters."""
    cfg = Config.from_dict(TINY)
    plain, ours = B.PlainState(cfg), TrainState.create(cfg)
    for k in ("G_ab", "D_b"):
        kinds = {type(m) for m in plain.nets[k].modules()}
        assert NarrowConv2d not in kinds and ReflectionPad2d not in kinds
        assert plain.nets[k].state_dict().keys() == ours.nets[k].state_dict().keys()
        for (n1, p1), (n2, p2) in zip(plain.nets[k].named_parameters(), ours.nets[k].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    assert not plain.opt_g.defaults.get("fused") and ours.opt_g.defaults["fused"]
    assert all(m.space_to_depth for m in ours.nets["G_ab"].modules() if isinstance(m, NarrowConv2d))


@pytest.mark.parametrize("cin,cout", [(48, 1), (32, 3), (34, 4), (8, 6)])
def test_narrow_conv_is_a_conv(cin, cout):
    """NarrowConv2d (space-to-depth on CPU) gives nn.Conv2d's output and gradients to fp32 rounding."""
    torch.manual_seed(0)
    narrow, conv = NarrowConv2d(cin, cout, 7), nn.Conv2d(cin, cout, 7)
    narrow.space_to_depth = True
    conv.load_state_dict(narrow.state_dict())
    x1 = torch.randn(3, cin, 22, 22, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = narrow(x1), conv(x2)
    assert y1.shape == y2.shape == (3, cout, 16, 16)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    for a, b in ((x1.grad, x2.grad), (narrow.weight.grad, conv.weight.grad), (narrow.bias.grad, conv.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item())


def test_static_sets_give_the_same_translation():
    """Encoding every slot (padding with weight 0, compiled path) translates the valid instances the same."""
    torch.manual_seed(0)
    G = SetGenerator(ngf=8, n_blocks=1)
    batch = make_batch("a", 3, 32, ins=(1, 4))
    assert not batch["valid"].all()  # some padding to skip
    img1, masks1 = G(batch["img"], batch["masks"], batch["valid"])
    G.static_sets = True
    img2, masks2 = G(batch["img"], batch["masks"], batch["valid"])
    torch.testing.assert_close(img1, img2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(masks1, masks2, rtol=1e-4, atol=1e-5)
    assert (masks2[~batch["valid"]] == -1).all()


@pytest.mark.slow
def test_compiled_steps_match_eager_after_two_steps():
    """train.compile: two steps give the eager losses and parameters, fp32. Inductor's kernels round differently
    (weight gradients agree to about 2e-3 relative, measured), and Adam turns the noise-level gradients of a conv
    bias before instance norm into full lr steps, so the tolerances are: losses 1e-2 relative; every parameter
    within 2e-3 (10 lr) and each network's mean difference below lr / 2 (measured: about lr / 6). State dict keys
    stay those of eager."""
    torch._dynamo.reset()
    small = {**TINY, "model": {"ngf": 4, "ndf": 4, "n_blocks": 1}}
    states = {c: TrainState.create(Config.from_dict({**small, "train": {**small["train"], "compile": c}}))
              for c in (False, True)}
    assert states[True].nets["G_ab"].state_dict().keys() == states[False].nets["G_ab"].state_dict().keys()
    for i in range(2):
        batch = _batches(i)
        eager, compiled = (train_step(states[c], *batch) for c in (False, True))
        for k in eager:
            assert compiled[k] == pytest.approx(eager[k], rel=1e-2, abs=1e-6), (i, k)
    lr = states[False].cfg.train.lr_g
    for k in ("G_ab", "G_ba", "D_a", "D_b"):
        diffs = [(q - p).abs().flatten() for p, q in zip(states[False].nets[k].parameters(),
                                                         states[True].nets[k].parameters())]
        diff = torch.cat(diffs)
        assert diff.max() <= 10 * lr and diff.mean() < lr / 2, (k, diff.max().item(), diff.mean().item())


def test_benchmark_prints_medians_and_ratios(monkeypatch, capsys):
    monkeypatch.setattr(B, "SMALL", TINY)
    assert B.main(["--steps", "2", "--warmup", "0", "--amp", "none"]) == 0
    out = json.loads(capsys.readouterr().out)
    (run,) = out["runs"]
    assert run["amp"] == "none" and len(run["project_all"]) == len(run["plain_all"]) == 2
    assert run["ratio"] == pytest.approx(run["project_cpu_s"] / run["plain_cpu_s"])
    assert out["threads"] == 1


def test_channels_last_changes_the_layout_not_the_losses():
    """train.channels_last: every 4-D weight is NHWC, and a step gives the default layout's losses (fp32, 1e-3).
    One step: after it, Adam's first update (lr * sign(gradient)) turns rounding noise in near-zero gradients into
    lr-sized differences (tests/test_memory.py)."""
    cfg = Config.from_dict(TINY)
    nhwc = TrainState.create(cfg.replace(**{"train.channels_last": True}))
    nchw = TrainState.create(cfg)
    w = nhwc.nets["G_ab"].state_dict()
    convs = [v for k, v in w.items() if k.endswith("weight") and v.ndim == 4]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)
    assert not any(v.is_contiguous() for v in convs if v.shape[1] > 1 and v.shape[2] > 1)
    ours, ref = train_step(nhwc, *_batches(0)), train_step(nchw, *_batches(0))
    assert ours["chunks"] == 2
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], rel=1e-3, abs=1e-3), k


def test_narrow_conv_trains_after_inference_asked_first():
    """The cached space-to-depth index is not an inference tensor even when a Translator (inference mode) is the
    first to ask for it: a training backward through the same shape works afterwards."""
    narrow = NarrowConv2d(40, 3, 7)  # a shape no other test uses, so this test builds the cache entry
    narrow.space_to_depth = True
    with torch.inference_mode():
        narrow(torch.randn(1, 40, 14, 14))
    x = torch.randn(1, 40, 14, 14, requires_grad=True)
    narrow(x).sum().backward()
    assert x.grad is not None and narrow.weight.grad is not None
