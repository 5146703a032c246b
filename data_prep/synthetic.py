"""`synthetic` source: the generated ellipses (a) vs rectangles (b) set of `instagan.synthetic`, written as Parquet.

    python -m data_prep synthetic --n 1000 --size 200 --out /tmp/synth200
    write_synthetic("/tmp/s", n=8, size=64)   # from Python (tests); returns metadata.json as a dict

Images are PNG (lossless, so masks stay exact against the pixels). Deterministic by --seed: image i of a domain is
the same whatever --n is. The last round(n * test_fraction) indices of each domain form the test split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.rows import Options, Picture, Result, UsageError, make_row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, required=True, help="images in domain a (and in b unless --n-b)")
    p.add_argument("--n-b", type=int, default=None, help="images in domain b (default: --n); unpaired sets differ")
    p.add_argument("--size", type=int, required=True, help="image side in pixels")
    p.add_argument("--ins", type=int, nargs=2, default=(1, 6), metavar=("MIN", "MAX"), help="instances per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--min-area", type=int, default=1, help="drop smaller instances (pixels)")


def plan(args: argparse.Namespace) -> tuple[list, dict, list]:
    import instagan.synthetic  # noqa: F401  imported here so that forked workers inherit it (torch takes ~1.5 s)

    if args.n < 1 or args.size < 8 or args.ins[0] < 1 or args.ins[1] < args.ins[0]:
        raise UsageError("synthetic needs --n >= 1, --size >= 8 and 1 <= --ins MIN <= MAX")
    tasks = []
    for domain, n in (("a", args.n), ("b", args.n if args.n_b is None else args.n_b)):
        n_train = n - round(n * args.test_fraction)
        tasks += [(domain, i, args.size, args.seed, tuple(args.ins), "train" if i < n_train else "test")
                  for i in range(n)]
    info = {"source": "synthetic", "categories": {"a": ["ellipse"], "b": ["rectangle"]},
            "generator": {"size": args.size, "seed": args.seed, "ins": list(args.ins)}}
    return tasks, info, []


def convert(task: tuple, opts: Options) -> Result:
    from instagan.synthetic import SHAPES, make_image

    domain, index, size, seed, ins, split = task
    res = Result()
    img, masks = make_image(domain, index, size, seed, ins)
    source = f"synthetic:{domain}/{index}?seed={seed}&size={size}"
    row = make_row(f"{index:06d}", Picture.from_array(img), [(m, source) for m in masks], SHAPES[domain],
                   source, opts, res)
    if row is not None:
        res.rows.append((split, domain, row))
    return res


def write_synthetic(out_dir: str | Path, n: int, size: int, seed: int = 0, ins: tuple[int, int] = (1, 6),
                    n_b: int | None = None, test_fraction: float = 0.1, workers: int = 1,
                    extra: tuple[str, ...] = ()) -> dict:
    """Write a synthetic Parquet set (same code path as the CLI); `extra` are more CLI flags. -> metadata dict."""
    from data_prep.cli import build

    argv = ["synthetic", "--n", str(n), "--size", str(size), "--seed", str(seed), "--ins", str(ins[0]), str(ins[1]),
            "--test-fraction", str(test_fraction), "--workers", str(workers), "--out", str(out_dir), "--quiet",
            "--overwrite", *map(str, extra)]
    if n_b is not None:
        argv += ["--n-b", str(n_b)]
    return build(argv)
