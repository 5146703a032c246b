"""Train InstaGAN with Ray Train (DDP over N workers): logs, image grids and full-state checkpoints in the run folder.

    python jobs/train.py                                   # embedded default: generated data, local Ray, 2 workers
    python jobs/train.py --config configs/coco_sheep2giraffe.yaml --set run.workers=8 --set run.use_gpu=true
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --config X.yaml
    python jobs/train.py --local --config X.yaml          # one process, no Ray (instagan/loop.py)

The config is a YAML or JSON file with the sections and keys of instagan/config.py (model, loss, train, data, run);
keys left out take the defaults there (the paper's settings). Without --config the embedded default is used
(instagan.distributed.launch.DEFAULT = configs/tiny_synthetic.yaml). Overrides: --set section.key=value
(repeatable) and the shortcuts --name, --storage-path, --workers, --max-steps, --data-root. Unknown keys are an
error. The work is done by instagan.distributed.launch.

Run folder: <run.storage_path>/<run.name> holds config.json (the resolved config), Ray Train's checkpoint_* folders,
tensorboard/ and samples/step_XXXXXX.png. Submitting again with the same name and storage path resumes from the
latest checkpoint; run.max_failures worker-group restarts happen inside one run. With data.root "" a small
generated data set (ellipses vs rectangles, data_prep's synthetic source) is written to <run folder>/data first.

Ray: --address (or RAY_ADDRESS, which `ray job submit` sets) connects to a cluster; otherwise a local Ray instance
starts with max(4, CPU count) logical CPUs, so fractional-CPU workers and Ray Data's readers all get scheduled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

LAUNCHED = time.time()

import yaml  # noqa: E402

from instagan.distributed import launch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python jobs/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML or JSON config (default: the embedded tiny synthetic run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key, e.g. --set train.lr_g=1e-4 (repeatable; applied last)")
    p.add_argument("--name", help="run name (= --set run.name=...)")
    p.add_argument("--storage-path", help="folder or URI holding runs (= --set run.storage_path=...)")
    p.add_argument("--workers", type=int, help="Ray Train workers (= --set run.workers=...)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (= --set run.max_steps=...)")
    p.add_argument("--data-root", help="Parquet data set from data_prep (= --set data.root=...)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--synthetic-n", type=int, default=600,
                   help="images per domain generated when data.root is empty (default 600: 540 train, 60 test)")
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray Train's per-report logs and known-harmless warnings (= --set run.verbose=true)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit (no Ray)")
    p.add_argument("--local", action="store_true",
                   help="train in this process without Ray (instagan.loop: the same loop in one process, no DDP)")
    return p.parse_args(argv)



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shortcuts = {"run.name": args.name, "run.storage_path": args.storage_path, "run.workers": args.workers,
                 "run.max_steps": args.max_steps, "data.root": args.data_root,
                 "run.verbose": True if args.verbose else None}
    try:
        cfg = launch.load_config(args.config, shortcuts, args.overrides)
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    return launch.run(cfg, args.address, args.local, args.synthetic_n, LAUNCHED)


if __name__ == "__main__":
    sys.exit(main())
