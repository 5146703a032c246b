"""Sweep InstaGAN's loss weights and learning rates with Ray Tune, ASHA stopping trials on a validation metric.

    python jobs/tune.py                                             # configs/tune_synthetic.yaml, 4 trials
    python jobs/tune.py --config configs/tune_synthetic.yaml --num-samples 8 --max-concurrent 2 --name sweep1
    python jobs/tune.py --config my.yaml --search train.lr_g=loguniform:5e-5,5e-4 --search loss.lambda_ctx=choice:1,10
    python jobs/tune.py --name sweep1 --resume                      # continue an interrupted sweep
    tensorboard --logdir ~/ray_results/sweep1                       # every trial's curves and image grids

The work is done by instagan.distributed.sweep.

Config: a YAML file with the sections of instagan/config.py (as jobs/train.py reads it) plus an optional top-level
`space:` mapping; --space FILE adds or replaces entries and --search KEY=DIST:ARGS does the same from the command
line. Each entry maps a dotted config key to one distribution:
    loss.lambda_cyc: {loguniform: [1, 30]}       train.lr_d: {choice: [1.0e-4, 2.0e-4]}
    loss.lambda_idt: {uniform: [0, 10]}          loss.lambda_ctx: {grid: [1, 10]}    (every value, num-samples times)
A trial trains the base config with its sampled values: a TorchTrainer exactly as jobs/train.py builds it (same
datasets, data_config and train_loop_per_worker), whose TuneReportCallback passes Tune the validation reports
(run.val_every > 0 is required: the metric, default val/score from instagan.metrics, exists only there). ASHA
(time attribute: the training step) stops the trials that fall behind at its rungs.

Folders: the sweep folder <storage path>/<name> holds sweep.json (base config, space, options), Tune's state and
one folder per trial; a trial's Train run folder is <trial folder>/train (config.json, checkpoint_*, tensorboard/,
samples/). With data.root "" a generated set (train and test splits) is written once to <sweep folder>/data.
At the end a ranked table (trial, sampled values, metric, steps, stopped early) is printed, then the best trial's
values, full config and checkpoint path, also as one JSON line (`best: {...}`) and in <sweep folder>/best.json.
--resume restores the sweep (Tuner.restore) with the options saved in sweep.json: finished trials stay, interrupted
ones continue from their Train checkpoints; options given with --resume other than --name, --storage-path and
--address are ignored. Tune rebuilds ASHA with empty rungs on restore (ray-project/ray#30838); as its time axis is
the training step, resumed trials refill the rungs they pass, but values recorded before the interruption are lost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from instagan.distributed import sweep

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tune_synthetic.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python jobs/tune.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"base config YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--space", type=Path, help="YAML mapping of dotted keys to distributions (adds to the config's)")
    p.add_argument("--search", action="append", default=[], metavar="KEY=DIST:ARGS",
                   help="one search dimension, e.g. loss.lambda_cyc=loguniform:1,30 (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one base config key (repeatable)")
    p.add_argument("--num-samples", type=int, default=4, help="trials drawn from the space (x grid size)")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials running at once")
    p.add_argument("--metric", default="val/score", help="reported metric ASHA and the ranking use")
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument("--grace-period", type=int, help="steps before ASHA may stop a trial (default run.val_every)")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA keeps 1/this of the trials per rung")
    p.add_argument("--max-t", type=int, help="steps per trial at most (default run.max_steps)")
    p.add_argument("--storage-path", help="folder or URI of sweeps (default run.storage_path, else ~/ray_results)")
    p.add_argument("--name", help="sweep name (default run.name)")
    p.add_argument("--data-root", help="Parquet set written by data_prep (= --set data.root=...)")
    p.add_argument("--synthetic-n", type=int, default=200, help="images per domain generated when data.root is ''")
    p.add_argument("--resume", action="store_true", help="restore the interrupted sweep <storage path>/<name>")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    return p.parse_args(argv)



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shortcuts = {"run.name": args.name, "run.storage_path": args.storage_path, "data.root": args.data_root}
    try:
        cfg, space = sweep.load_sweep(args.config, args.space, args.search, shortcuts, args.overrides)
        opts = sweep.sweep_options(cfg, args.num_samples, args.max_concurrent, args.metric, args.mode,
                                   args.grace_period, args.reduction_factor, args.max_t)
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return sweep.sweep(cfg, space, opts, args.resume, args.synthetic_n, args.address)


if __name__ == "__main__":
    sys.exit(main())
