"""Training-step benchmark of the full InstaGAN model on generated inputs; prints one JSON line.

    python -m instagan.bench --size 200 --batch 1 --ins 4 --ins-max 4 --ins-per 2 --steps 5 [--device cuda]
                             [--amp bf16] [--memory auto|lean|plain] [--channels-last] [--compile] [--json]

Builds G_ab, G_ba, D_a, D_b at the given widths (default: the paper's, ngf = ndf = 64), runs warm-up steps, then
`--steps` timed training steps (every chunk's G and D steps) on batches with exactly `--ins` instances per image
in each domain. Reports samples/s (one sample = one image of each domain), FLOP per sample counted by
torch.utils.flop_counter over one extra step, achieved FLOP/s, and peak memory: the process's peak RSS on CPU,
max allocated on GPU since the run started, read before the FLOP-counting step. With --compile (train.compile)
the first warm-up step's wall time, which compiles, is reported as first_step_s. Compare runs only on the same
machine; on CPU run each configuration in its own process, since peak RSS is a high-water mark over the process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import torch

from instagan.config import AMP, Config, amp_dtype
from instagan.memory import use_lean
from instagan.train import TrainState, train_step



def make_inputs(batch: int, ins: int, size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random image and exactly `ins` box-shaped instances of distinct areas per image."""
    img = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    masks = torch.full((batch, max(ins, 1), size, size), -1.0)
    for i in range(batch):
        for k in range(ins):
            side = max(4, int(size * (0.5 - 0.4 * k / max(ins, 1))))
            y0, x0 = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
            masks[i, k, y0:y0 + side, x0:x0 + side] = 1.0
    valid = torch.zeros(batch, max(ins, 1), dtype=torch.bool)
    valid[:, :ins] = True
    return {"img": img, "masks": masks, "valid": valid}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = Config.from_dict({
        "model": {"ngf": args.ngf, "ndf": args.ndf, "n_blocks": args.n_blocks},
        "train": {"ins_max": args.ins_max, "ins_per": args.ins_per, "batch_size": args.batch,
                  "memory": args.memory, "channels_last": args.channels_last, "compile": args.compile},
        "data": {"size": args.size, "load_size": args.size},
    })
    state = TrainState.create(cfg, device)
    gen = torch.Generator().manual_seed(0)
    batches = [(make_inputs(args.batch, args.ins, args.size, gen), make_inputs(args.batch, args.ins, args.size, gen))
               for _ in range(2)]
    amp = amp_dtype(args.amp, device)

    def step(i: int) -> dict:
        return train_step(state, *batches[i % 2], amp_dtype=amp)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    first_step_s = None
    for i in range(args.warmup):
        t0 = time.perf_counter()
        step(i)
        sync()
        first_step_s = time.perf_counter() - t0 if first_step_s is None else first_step_s
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    elapsed = time.perf_counter() - t0
    peak = peak_memory_bytes(device)

    # Imported only now: the FLOP counter's modules (about 75 MB) are a measuring tool, not part of training.
    from torch.utils.flop_counter import FlopCounterMode

    flop_mode = FlopCounterMode(display=False)
    with flop_mode:
        step(0)
    flop_per_sample = flop_mode.get_total_flops() / args.batch
    samples_per_s = args.steps * args.batch / elapsed
    result = {
        "size": args.size, "batch": args.batch, "ins": args.ins, "ins_max": args.ins_max, "ins_per": args.ins_per,
        "ngf": args.ngf, "ndf": args.ndf, "device": str(device), "amp": args.amp, "threads": torch.get_num_threads(),
        "steps": args.steps, "warmup": args.warmup, "memory": args.memory, "lean": use_lean(cfg, device),
        "channels_last": args.channels_last, "compile": args.compile, "first_step_s": first_step_s,
        "samples_per_s": samples_per_s, "s_per_sample": 1 / samples_per_s,
        "flop_per_sample": flop_per_sample, "tflop_per_sample": flop_per_sample / 1e12,
        "achieved_gflop_per_s": flop_per_sample * samples_per_s / 1e9,
        "peak_mem_bytes": peak, "peak_mem_gib": peak / 2**30,
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        if args.peak_tflops:
            result["mfu"] = result["achieved_gflop_per_s"] / (args.peak_tflops * 1e3)
    return result


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m instagan.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=200, help="image side (multiple of 4)")
    p.add_argument("--batch", type=int, default=1, help="images per domain per step")
    p.add_argument("--ins", type=int, default=4, help="instances per image in each domain")
    p.add_argument("--ins-max", type=int, default=4)
    p.add_argument("--ins-per", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=AMP, default="none", help="autocast dtype")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--memory", choices=("auto", "lean", "plain"), default="auto",
                   help="train.memory: the step's memory machinery (auto: lean for paper-size steps)")
    p.add_argument("--channels-last", action="store_true", help="train.channels_last: NHWC weights and activations")
    p.add_argument("--compile", action="store_true", help="train.compile: torch.compile the generators' stacks")
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--ndf", type=int, default=64)
    p.add_argument("--n-blocks", type=int, default=9)
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak TFLOP/s at the chosen precision, to report MFU (e.g. 989 for H100 bf16)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    result = run(args)
    line = json.dumps(result)
    if not args.json:
        print(f"{result['samples_per_s']:.4f} samples/s, {result['tflop_per_sample']:.2f} TFLOP/sample, "
              f"{result['achieved_gflop_per_s']:.1f} GFLOP/s, peak {result['peak_mem_gib']:.2f} GiB", file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
