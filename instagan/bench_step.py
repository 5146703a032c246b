"""The small-model training step against a plain, faithful InstaGAN step on the same batches; prints one JSON line.

    python -m instagan.bench_step [--steps 7] [--warmup 2] [--amp none bf16] [--compile] [--threads 1]

`plain_step` is the yardstick (issue "Speed where users train"), not a product path: the step of
`instagan.train.train_step` with the default recipe (LSGAN + cycle + identity + context, sequential chunks of
`ins_per` instances with detached hand-offs, the history pool, the same loss weights and zero-weight images)
written straight, the way the authors' code reads: the discriminators frozen with requires_grad_(False), one
backward for both generators, D called on real and on fake separately, torch's default Adam, and none of the
project's memory or speed machinery. It uses the same networks (`instagan.train.build_networks`) with the
project's own layer implementations swapped for torch's (`plain_layers`), so from the same seed both steps start
from the same weights and give the same first-step losses (tests/test_bench_step.py).

The benchmark builds both from the same config (the small model users train on CPU: ngf 16, ndf 16, 3 blocks,
64 px, batch 4, 1-4 instances per image of `instagan.synthetic`), warms both up, then times them pair by pair,
alternating which goes first, in CPU-seconds (time.process_time) per step; it reports the medians and the ratio
project / plain for each precision. With --compile the project's step runs with train.compile (torch.compile of
the generators' layer stacks) and the wall time of its first, compiling, step is reported as compile_s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from torch import Tensor, nn

from instagan import losses as L
from instagan import masks as M
from instagan.config import Config, amp_dtype, native_bf16
from instagan.memory import ReflectionPad2d
from instagan.networks import NarrowConv2d
from instagan.pool import HistoryPool
from instagan.train import TrainState, build_networks, train_step

SMALL = {"model": {"ngf": 16, "ndf": 16, "n_blocks": 3}, "data": {"size": 64, "load_size": 64},
         "train": {"batch_size": 4, "ins_max": 4, "ins_per": 2}}


def plain_layers(module: nn.Module) -> nn.Module:
    """`module` with the project's own layer implementations swapped, in place, for torch's, parameters kept:
    NarrowConv2d -> nn.Conv2d, instagan.memory.ReflectionPad2d -> nn.ReflectionPad2d."""
    for name, child in module.named_children():
        if isinstance(child, NarrowConv2d):
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                             bias=child.bias is not None)
            conv.weight, conv.bias = child.weight, child.bias
            setattr(module, name, conv)
        elif isinstance(child, ReflectionPad2d):
            setattr(module, name, nn.ReflectionPad2d(child.padding))
        else:
            plain_layers(child)
    return module


class PlainState:
    """The plain step's networks, optimizers (torch's default Adam) and pools, seeded as TrainState's."""

    def __init__(self, cfg: Config):
        t = cfg.train
        self.cfg = cfg
        self.nets = {k: plain_layers(v) for k, v in build_networks(cfg).items()}
        G = [p for k in ("G_ab", "G_ba") for p in self.nets[k].parameters()]
        D = [p for k in ("D_a", "D_b") for p in self.nets[k].parameters()]
        self.opt_g = torch.optim.Adam(G, lr=t.lr_g, betas=(t.beta1, t.beta2))
        self.opt_d = torch.optim.Adam(D, lr=t.lr_d, betas=(t.beta1, t.beta2))
        self.pools = {d: HistoryPool(t.pool_size, seed=t.seed * 1000 + i) for i, d in enumerate("ab")}


def plain_step(s: PlainState, batch_a: dict[str, Tensor], batch_b: dict[str, Tensor],
               amp: torch.dtype | None = None) -> dict[str, float]:
    """One training step over a batch of each domain, every chunk's G and D step. -> losses averaged over chunks,
    with instagan.train.train_step's keys."""
    cfg = s.cfg
    t, lam = cfg.train, cfg.loss
    G_ab, G_ba, D_a, D_b = (s.nets[k] for k in ("G_ab", "G_ba", "D_a", "D_b"))
    real = {}
    for k, batch in (("a", batch_a), ("b", batch_b)):
        masks, valid, _ = M.sort_by_area(batch["masks"], batch["valid"].bool())
        real[k] = {"img": batch["img"], "masks": masks[:, :t.ins_max], "valid": valid[:, :t.ins_max]}
    most = max(int(real[k]["valid"].sum(1).max()) for k in "ab")
    n_chunks = max(1, -(-most // t.ins_per))
    x = {"a": real["a"]["img"], "b": real["b"]["img"]}  # y'_{m-1} of each source domain
    prev = {"a": [], "b": []}  # translated masks (and valid) of earlier chunks, by source domain
    autocast = torch.autocast("cpu", dtype=amp, enabled=amp is not None)
    sums: dict[str, Tensor] = {}

    def add(key: str, v: Tensor) -> None:
        sums[key] = sums.get(key, 0) + v.detach().float()

    for m in range(n_chunks):
        ch = {k: M.chunk(real[k]["masks"], real[k]["valid"], m, t.ins_per) for k in "ab"}
        act = {k: ch[k][1].any(1) for k in "ab"}

        # generators: D frozen, all losses of both directions, one backward
        D_a.requires_grad_(False)
        D_b.requires_grad_(False)
        with autocast:
            loss_g = 0
            out = {}
            for src, G, F, D in (("a", G_ab, G_ba, D_b), ("b", G_ba, G_ab, D_a)):
                xs, (ms, vs), w = x[src], ch[src], act[src]
                key = "ab" if src == "a" else "ba"
                idt_img, idt_masks = F(xs, ms, vs)
                idt = L.weighted_mean(L.masked_l1(idt_img, idt_masks, vs, xs, ms), w)
                fake_img, fake_masks = G(xs, ms, vs)
                rec_img, rec_masks = F(fake_img, fake_masks, vs)
                all_masks = torch.cat([pm for pm, _ in prev[src]] + [fake_masks], 1)
                all_valid = torch.cat([pv for _, pv in prev[src]] + [vs], 1)
                gan = L.weighted_mean(L.lsgan(D(fake_img, all_masks, all_valid), 1.0), w)
                cyc = L.weighted_mean(L.masked_l1(rec_img, rec_masks, vs, xs, ms), w)
                ctx = L.weighted_mean(L.context(xs, fake_img, M.context_weight(ms, vs, fake_masks, vs)), w)
                loss_g = loss_g + lam.lambda_idt * idt + lam.lambda_gan * gan + lam.lambda_cyc * cyc \
                    + lam.lambda_ctx * ctx
                add(f"loss/idt_{key[::-1]}", idt)
                add(f"loss/G_gan_{key}", gan)
                add(f"loss/cyc_{src}", cyc)
                add(f"loss/ctx_{key}", ctx)
                out[src] = (fake_img.detach(), fake_masks.detach())
        s.opt_g.zero_grad()
        loss_g.backward()
        s.opt_g.step()
        add("loss/G", loss_g)
        D_a.requires_grad_(True)
        D_b.requires_grad_(True)

        # hand-off: y'_m where the image had an instance in this chunk
        for src in "ab":
            x[src] = torch.where(act[src][:, None, None, None], out[src][0].to(x[src].dtype), x[src])
            prev[src].append((out[src][1].to(x[src].dtype), ch[src][1]))

        # discriminators: D_b judges real b against pooled fakes of G_ab, D_a likewise
        s.opt_d.zero_grad()
        loss_d = 0
        for src, D, tgt, name in (("a", D_b, "b", "D_b"), ("b", D_a, "a", "D_a")):
            fake = s.pools[tgt].query(x[src], torch.cat([pm for pm, _ in prev[src]], 1),
                                      torch.cat([pv for _, pv in prev[src]], 1), act[src])
            with autocast:
                pred_real = D(real[tgt]["img"], real[tgt]["masks"], real[tgt]["valid"])
                pred_fake = D(*fake)
                any_active = act[src].any().to(pred_real.dtype)
                loss = 0.5 * (L.lsgan(pred_real, 1.0).mean() * any_active
                              + L.weighted_mean(L.lsgan(pred_fake, 0.0), act[src]))
            loss.backward()
            add(f"loss/{name}", loss)
            loss_d = loss_d + loss.detach()
        s.opt_d.step()
    return {**{k: v.item() / n_chunks for k, v in sums.items()}, "chunks": float(n_chunks)}


def small_config(**train) -> Config:
    """The small model of the benchmark (`SMALL`), with train.* overrides."""
    return Config.from_dict({**SMALL, "train": {**SMALL["train"], **train}})


def small_batches(cfg: Config, n: int) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """`n` pairs of generated batches (1-4 instances per image), distinct images in each."""
    from instagan.synthetic import make_batch

    b, size = cfg.train.batch_size, cfg.data.size
    return [(make_batch("a", b, size, ins=(1, 4), start=b * i), make_batch("b", b, size, ins=(1, 4), start=b * i))
            for i in range(n)]


def _cpu_s(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def compare(amp: str, steps: int, warmup: int, compile: bool = False, batches: int = 4) -> dict:
    """Median CPU-s per step of train_step and plain_step on the same batches, timed pair by pair."""
    dtype = amp_dtype(amp)
    cfg = small_config(compile=compile)
    project, plain = TrainState.create(cfg), PlainState(cfg)
    data = small_batches(cfg, batches)
    if compile:  # the first step compiles each layer stack (in worker processes too: wall time, not CPU time)
        t0 = time.perf_counter()
        train_step(project, *data[0], amp_dtype=dtype)
        compile_s = time.perf_counter() - t0
    wall0 = time.perf_counter()
    for i in range(warmup):
        train_step(project, *data[i % len(data)], amp_dtype=dtype)
        plain_step(plain, *data[i % len(data)], amp=dtype)
    times = {"project": [], "plain": []}
    for i in range(steps):
        batch = data[(warmup + i) % len(data)]
        runs = [("project", lambda: train_step(project, *batch, amp_dtype=dtype)),
                ("plain", lambda: plain_step(plain, *batch, amp=dtype))]
        for name, fn in runs[::-1] if i % 2 else runs:  # alternate which goes first
            times[name].append(_cpu_s(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"amp": amp, "compile": compile, "project_cpu_s": med["project"], "plain_cpu_s": med["plain"],
           "ratio": med["project"] / med["plain"], "project_all": times["project"], "plain_all": times["plain"],
           "wall_s": time.perf_counter() - wall0}
    if compile:
        out["compile_s"] = compile_s
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m instagan.bench_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=7, help="timed steps of each (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    p.add_argument("--amp", nargs="+", choices=("none", "bf16", "auto"),
                   default=["none", "bf16"] if native_bf16() else ["none"], help="bf16 by default where native")
    p.add_argument("--compile", action="store_true", help="the project's step with train.compile")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compile and args.threads == 1:
        from torch._inductor import config as inductor

        inductor.compile_threads = 1
    result = {"model": SMALL, "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
              "torch": torch.__version__, "python": platform.python_version(),
              "runs": [compare(a, args.steps, args.warmup, args.compile) for a in args.amp]}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
