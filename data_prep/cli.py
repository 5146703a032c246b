"""Command line of data_prep: one subcommand per source, shared output options, a summary and exit codes.

    python -m data_prep --help
    python -m data_prep folder ../shared/data/shp2gir_coco_sample --out /tmp/shp2gir --a-name sheep --b-name giraffe
    python -m data_prep coco --annotations trainval.json --images images --a date --b fig --out /tmp/fruits
    python -m data_prep labelmap --images photos --labels annotations/pixel-level --names label_list.mat \\
        --a pants --b skirt --out /tmp/ccp
    python -m data_prep synthetic --n 1000 --size 200 --out /tmp/synth200

Exit codes: 0 when rows were written (bad inputs are quarantined, see <out>/quarantine.jsonl); 1 when nothing
valid remains; 2 when the inputs themselves are unusable (missing annotation file, unknown category...).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from data_prep import coco, folder, labelmap, synthetic
from data_prep.rows import Options, UsageError
from data_prep.writer import clear_outputs, convert_all

SOURCES = {"folder": folder, "coco": coco, "labelmap": labelmap, "synthetic": synthetic}


def make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    out = common.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="output folder: <out>/<split>/<a|b>/part-*.parquet")
    out.add_argument("--max-side", type=int, default=None, help="shrink images (and masks) so the longer side <= this")
    out.add_argument("--image-format", choices=("keep", "png", "jpeg"), default="keep",
                     help="keep: store source JPEG/PNG bytes unchanged when not resized (default)")
    out.add_argument("--shard-mb", type=float, default=64.0, help="approximate size bound of one part file")
    out.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="conversion processes")
    out.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    out.add_argument("--quiet", action="store_true", help="no progress line")
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, mod in SOURCES.items():
        sp = sub.add_parser(name, parents=[common], help=mod.__doc__.splitlines()[0], description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
    return parser


def build(argv: list[str]) -> dict:
    """Parse argv, convert, write; return metadata.json's content. Raises UsageError for unusable inputs."""
    args = make_parser().parse_args(argv)
    if args.max_side is not None and args.max_side < 8:
        raise UsageError("--max-side must be >= 8")
    opts = Options(max_side=args.max_side, image_format=args.image_format, min_area=args.min_area)
    mod = SOURCES[args.source]
    tasks, info, quarantine = mod.plan(args)
    info = {"source": args.source, **info, "command": "python -m data_prep " + shlex.join(argv)}
    try:
        clear_outputs(args.out, args.overwrite)
    except FileExistsError as e:
        raise UsageError(str(e)) from None
    return convert_all(tasks, mod.convert, opts, args.out, workers=max(1, args.workers), shard_mb=args.shard_mb,
                       info=info, quarantine=quarantine, progress=not args.quiet)


FEW_IMAGES = 5  # a split's domain with fewer images than this gets a warning


def summary(meta: dict, out: str) -> str:
    rows = sum(c["images"] for c in meta["counts"].values())
    instances = sum(c["instances"] for c in meta["counts"].values())
    unique = meta.get("unique_images", rows)
    b = meta["build"]
    both = f" ({unique} unique images: {rows - unique} are in both domains)" if unique != rows else ""
    lines = [f"data_prep {meta['source']}: {rows} images{both}, {instances} instances -> {out} "
             f"in {b['seconds']:.1f} s ({b['images_per_s'] or 0:.1f} images/s, {b['workers']} workers)"]
    lines += [f"  {k}: {c['images']} images, {c['instances']} instances" for k, c in meta["counts"].items()]
    for split in sorted({k.split("/")[0] for k in meta["counts"]}):
        for d in ("a", "b"):
            n = meta["counts"].get(f"{split}/{d}", {}).get("images", 0)
            if n < FEW_IMAGES:
                lines.append(f"  warning: split '{split}' has {n} image(s) of domain {d}: too few to train or "
                             f"evaluate on (check the categories and the split options)")
    if meta["skipped"]:
        lines.append("  skipped (by choice): " + ", ".join(f"{k} {v}" for k, v in meta["skipped"].items()))
    if meta["quarantine"]:
        lines.append(f"  quarantined {sum(meta['quarantine'].values())}: "
                     + ", ".join(f"{k} {v}" for k, v in meta["quarantine"].items())
                     + f" (one line each in {Path(out) / 'quarantine.jsonl'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        meta = build(argv)
    except UsageError as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        return 2
    out = make_parser().parse_args(argv).out
    print(summary(meta, str(out)))
    if not any(c["images"] for c in meta["counts"].values()):
        print(f"data_prep: error: no valid image remains; reasons in {out / 'quarantine.jsonl'}", file=sys.stderr)
        return 1
    return 0
