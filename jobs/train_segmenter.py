"""Train an instance segmenter (Mask R-CNN) on a data_prep Parquet set with Ray Train (DDP), for translating
collections that have no masks (jobs/translate.py --masks predict --segmenter <checkpoint>).

    python jobs/train_segmenter.py                          # generated ellipses (domain a), small arch, 2 workers
    python jobs/train_segmenter.py --data-root /tmp/shp2gir --domains a --name sheep_seg \\
        --set model.arch=maskrcnn_resnet50_fpn --set model.init=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth \\
        --set train.optimizer=sgd --set train.lr=0.005 --set train.steps=2000 --set run.use_gpu=true
    python jobs/train_segmenter.py --local --set train.steps=200   # one process, no Ray (instagan.segment_train)

Config (instagan/segment_train.py SegmentConfig): a YAML or JSON file with sections model (arch, init, size, width),
train (steps, batch_size, optimizer, lr, warmup, weight_decay, flip, seed, score_threshold), data (root, split,
test_split, domains, eval_images) and run (name, storage_path, workers, cpus_per_worker, use_gpu, log_every,
checkpoint_every, num_to_keep, max_failures); keys left out take the defaults, unknown keys are an error;
--set section.key=value overrides any key; --name, --storage-path, --workers, --steps, --data-root, --domains are
shortcuts. model.init "" trains from scratch; a weights file (torchvision's COCO file, downloaded once, or a
segmenter checkpoint) is fine-tuned with new predictors for the trained domains' classes.

Run folder <run.storage_path>/<run.name>: config.json, Ray Train's checkpoint_stepXXXXXXXX folders (segmenter.pt:
what --segmenter loads; training.pt: optimizer and position; config.json), metrics.jsonl, eval.json (the test
split: mean matched IoU, instance recall and precision, COCO mask AP). Running again with the same name and storage
path resumes from the latest checkpoint (raise train.steps to train on). With data.root "" the generated set
(ellipses vs rectangles, 64 px) is written to <run folder>/data first.

Ray: --address (or RAY_ADDRESS) joins a cluster; otherwise a local Ray starts (workers take run.cpus_per_worker,
0.5 by default, so that Ray Data's tasks get CPUs on a small machine). The work is done by
instagan.distributed.segment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from instagan.distributed import segment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python jobs/train_segmenter.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML or JSON config (default: every key's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key, e.g. --set train.lr=1e-3 (repeatable; applied last)")
    p.add_argument("--name", help="run name (= --set run.name=...)")
    p.add_argument("--storage-path", help="folder holding runs (= --set run.storage_path=...)")
    p.add_argument("--workers", type=int, help="Ray Train workers (= --set run.workers=...)")
    p.add_argument("--steps", type=int, help="optimizer steps in all (= --set train.steps=...)")
    p.add_argument("--data-root", help="Parquet data set from data_prep (= --set data.root=...)")
    p.add_argument("--domains", choices=("a", "b", "ab"), help="whose masks are learnt (= --set data.domains=...)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit (no Ray)")
    p.add_argument("--local", action="store_true", help="train in this process without Ray (no DDP)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shortcuts = {"run.name": args.name, "run.storage_path": args.storage_path, "run.workers": args.workers,
                 "train.steps": args.steps, "data.root": args.data_root, "data.domains": args.domains}
    try:
        cfg = segment.load_config(args.config, shortcuts, args.overrides)
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    return segment.run(cfg, args.address, args.local)


if __name__ == "__main__":
    sys.exit(main())
