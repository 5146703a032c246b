"""Translate an image collection offline with a trained checkpoint: Ray Data, an actor pool of Translators.

    python jobs/translate.py --checkpoint CKPT --input /tmp/shp2gir --split sample --out /tmp/sheep2giraffe
    python jobs/translate.py --checkpoint CKPT --input ../shared/data/shp2gir_coco_sample --direction b2a \\
        --out /tmp/giraffe2sheep --png /tmp/giraffe2sheep_png
    python jobs/translate.py --checkpoint CKPT --input trainval.json --images images --a date --b fig --out /tmp/t
    python jobs/translate.py --checkpoint CKPT --input photos/ --masks predict --out /tmp/t \
        --segmenter maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --category sheep     # images without masks
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/translate.py --checkpoint \\
        /shared/ckpt --input /shared/coco_parquet --split test --out s3://bucket/translated --device cuda --actors 8

Input (--kind, detected when left out): `parquet`, a data set written by data_prep (<input>/<split>/<domain>/, the
domain being the direction's source: a for a2b) or any Parquet file or folder with data_prep's columns; `folder`,
the InstaGAN layout (<phase>A/<id>.png + <phase>A_seg/<id>_<k>.png; --split picks the phase); `coco`, an
instances json with --images, --a and --b (data_prep coco's flags). Folder and COCO inputs are converted on the fly
by data_prep's own readers (data_prep.folder / data_prep.coco plan() and convert()) in Ray tasks; `images`, a plain
folder of PNG/JPEG/WebP files (ids: their paths below the folder without the suffix), has no masks.

Masks (--masks): `given` (the default) translates with the input's masks; `predict` finds them with an instance
segmenter (--segmenter: torchvision's COCO Mask R-CNN weights file, downloaded once, or a checkpoint of
jobs/train_segmenter.py; --category: the COCO name or id, or the segmenter's own class; --score-threshold,
--min-instance-area; at most --ins-max instances per image), ignoring any given masks; `auto` predicts only for
images without masks (a plain image folder, Parquet rows with no masks, an InstaGAN folder's images without mask
files or whose <phase>A folder has no _seg sibling, a COCO json's images without any annotation). Each actor loads
the segmenter beside its Translator (on --device), or, with --segment-actors N, N segmenter actors of
--cpus-per-segment-actor CPUs form a stage of their own whose batches stream into the translate actors (README:
which is faster where). Predicted
masks are written beside the translated ones (columns predicted, input_masks, scores, segmenter, segment_s); an
image where nothing is found is listed in the skipped report with the reason no_instances_detected.

Sizes (--size): `model` (the default) resizes every image to the checkpoint's training size (data.size, the scale
the generator learned), translates it and resizes the image and masks back to the input's own size; `native`
translates at the input's own size, reflection-padded up to a multiple of 4 and cropped back (images already a
multiple of 4 are translated exactly at their size; time grows with the pixel count).

Output, under --out: part-<run>-<task>-<uid>.parquet files, one row per translated image: id, image (PNG bytes),
format, height, width, masks (COCO compressed RLE, one per instance, data_prep's encoding, so the output feeds
training and evaluation again), areas, translated (list<bool>: mask k is the translation of input mask k; false
past --ins-max, where the input mask is kept), direction, checkpoint, source, time_s (the image's share of its
batch's Translator time). skipped-<run>.jsonl lists every input that was not translated (id, source, reason,
detail, kind: unreadable image, undecodable or mis-sized masks, no usable instance...) and instances data_prep's
readers dropped; run-<run>.json summarises the run. --png DIR also writes <id>.png: input | input + masks |
translated | translated + masks. On a multi-node cluster the input and checkpoint must be on shared storage and
--out on shared storage or a URI (s3://, gs://...); --png folders are written on the actors' nodes.

Exit codes: 0 when the output holds the translation of at least one input (bad inputs are reported, not fatal);
1 when no input could be translated; 2 when the inputs themselves are unusable (no such file, unknown kind...).

Resuming: ids already present in --out's part files (their id column only is read) are not translated again (a
part file that cannot be read is moved to <out>/unreadable/ and its ids are translated again); each
run writes new part files (nothing is overwritten), each file written whole, so a crash loses at most the blocks
in flight. Skipped inputs are retried (and reported again) on the next run.

Ray: --address (or RAY_ADDRESS) joins a cluster, else a local Ray starts. --actors Translator actors of
--cpus-per-actor CPUs each (--device cuda: one GPU each); Ray Data shows its progress bar (--no-progress hides it).
The work is done by instagan.inputs (listing and reading the input, no Ray) and instagan.distributed.translate
(the Ray Data pipeline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep.rows import UsageError
from instagan import inputs, segment
from instagan.checkpoint import validate as validate_checkpoint
from instagan.config import AMP
from instagan.distributed import launch, translate
from instagan.infer import DIRECTIONS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python jobs/translate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (state.pt + config.json)")
    p.add_argument("--input", required=True, help="Parquet data set/file/folder, InstaGAN folder or COCO json")
    p.add_argument("--out", required=True, help="output folder or URI (part files, skipped and run reports)")
    inputs.add_input_arguments(p, direction_default="a2b", direction_help="a2b translates domain a")
    p.add_argument("--threshold", type=int, default=128, help="folder: mask pixels >= this are instance pixels")
    p.add_argument("--size", choices=("model", "native"), default="model",
                   help="model: resize to the training size and back (default); native: the input's own size")
    p.add_argument("--ins-max", type=int, default=20, help="largest instances translated per image (paper test: 20)")
    p.add_argument("--ins-per", type=int, default=2, help="instances per sequential chunk (paper: 2)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per actor)")
    p.add_argument("--amp", choices=AMP, default="none", help="autocast dtype of the generator")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generator in each actor (a first batch of about a minute on CPU)")
    p.add_argument("--actors", type=int, default=1, help="Translator actors")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray CPUs reserved by each actor")
    p.add_argument("--threads", type=int, default=0, help="torch threads per actor (default: its whole CPUs)")
    p.add_argument("--batch-size", type=int, default=8, help="images per actor call and per generator batch")
    p.add_argument("--rows-per-file", type=int, default=128, help="most rows per output part file")
    p.add_argument("--png", help="also write <id>.png overlays (input and translation with masks) to this folder")
    p.add_argument("--masks", choices=("given", "predict", "auto"), default="given",
                   help="given: the input's masks; predict: the segmenter's for every image; auto: the segmenter's "
                        "for images without masks")
    segment.add_arguments(p, "for --masks predict|auto")
    p.add_argument("--segment-actors", type=int, default=0,
                   help="--masks predict|auto: 0 segments inside each translate actor; N >= 1 runs a separate stage "
                        "of N segmenter actors before the translate actors, so the two overlap")
    p.add_argument("--cpus-per-segment-actor", type=float, default=1.0, help="Ray CPUs reserved by each")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bar")
    return p.parse_args(argv)


def check_segmenter(args: argparse.Namespace) -> None:
    """--masks predict|auto need a segmenter that loads and knows --category: checked before Ray starts (the
    actors load it again). Raises UsageError."""
    if args.masks == "given":
        if args.segmenter or args.category:
            raise UsageError("--segmenter and --category are for --masks predict or auto")
        return
    if not args.segmenter:
        raise UsageError(f"--masks {args.masks} needs --segmenter (a weights file)")
    try:
        segment.check_arguments(args)
    except ValueError as err:
        raise UsageError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if min(args.ins_max, args.ins_per, args.actors, args.batch_size, args.rows_per_file) < 1:
            raise UsageError("--ins-max, --ins-per, --actors, --batch-size and --rows-per-file must be >= 1")
        if args.segment_actors < 0 or (args.segment_actors and args.masks == "given"):
            raise UsageError("--segment-actors must be >= 0, and is for --masks predict or auto")
        if "://" not in args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise UsageError(f"--out {args.out} is a file, not a folder: translations are written as a folder of "
                             f"Parquet files (and PNGs with --png)")
        if "://" not in args.checkpoint:  # before Ray starts: readable, and the weights fit its config.json
            try:
                validate_checkpoint(args.checkpoint, (DIRECTIONS[args.direction],))
            except (OSError, ValueError) as err:
                raise UsageError(str(err)) from None
        check_segmenter(args)
        source = inputs.resolve_input(args.input, args.kind, args.direction, args.split, args.images, args.a,
                                      args.b, args.threshold, unmasked=args.masks != "given")
        if source.kind == "images" and args.masks == "given":
            raise UsageError(f"{args.input} is a folder of images without masks: pass --masks predict (or auto) "
                             f"and --segmenter")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch.init_ray(args.address, args.actors * args.cpus_per_actor
                    + args.segment_actors * args.cpus_per_segment_actor, dashboard=False)
    summary = translate.translate_collection(
        source, args.checkpoint, args.out, direction=args.direction, size=args.size, ins_max=args.ins_max,
        ins_per=args.ins_per, device=args.device, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
        threads=args.threads, batch_size=args.batch_size, rows_per_file=args.rows_per_file, amp=args.amp,
        png=args.png, progress=not args.no_progress, masks=args.masks, segmenter=args.segmenter,
        category=args.category, score_threshold=args.score_threshold, min_area=args.min_instance_area,
        segment_actors=args.segment_actors, cpus_per_segment_actor=args.cpus_per_segment_actor,
        compile=args.compile)
    print(json.dumps(summary))
    if summary["unreadable_parts"]:
        print(f"[translate] {len(summary['unreadable_parts'])} unreadable part file(s) moved to {args.out}/unreadable "
              f"and their ids translated again: {', '.join(summary['unreadable_parts'])}", file=sys.stderr)
    if summary["predicted"]:
        print(f"[translate] {summary['predicted']} image(s) translated with predicted masks", file=sys.stderr)
    if summary["skipped"]:
        print(f"[translate] {summary['skipped']} input(s) skipped, reasons in "
              f"{args.out}/skipped-{summary['run']}.jsonl", file=sys.stderr)
    return 1 if summary["inputs"] and not summary["written"] + summary["already_done"] else 0


if __name__ == "__main__":
    sys.exit(main())
