"""Sweep InstaGAN's loss weights and learning rates with Ray Tune, ASHA stopping trials on a validation metric.

    python jobs/tune.py                                             # configs/tune_synthetic.yaml, 4 trials
    python jobs/tune.py --config configs/tune_synthetic.yaml --num-samples 8 --max-concurrent 2 --name sweep1
    python jobs/tune.py --config my.yaml --search train.lr_g=loguniform:5e-5,5e-4 --search loss.lambda_ctx=choice:1,10
    python jobs/tune.py --name sweep1 --resume                      # continue an interrupted sweep
    tensorboard --logdir ~/ray_results/sweep1                       # every trial's curves and image grids

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
import json
import math
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/tune.py` puts jobs/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

from instagan.config import Config  # noqa: E402
from jobs.train import apply_overrides  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "tune_synthetic.yaml"
DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "choice": None, "grid": None}  # name -> number of arguments
SWEEP_FILE, BEST_FILE = "sweep.json", "best.json"
TRAIN_RUN, TRIAL_DIR = "train", "trial_{id}"  # a trial's Train run folder: <sweep>/trial_<id>/train


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


# ---- configuration ----------------------------------------------------------------------------------------------

def parse_search(item: str) -> tuple[str, dict]:
    """"loss.lambda_cyc=loguniform:1,30" -> ("loss.lambda_cyc", {"loguniform": [1, 30]})."""
    key, sep, spec = item.partition("=")
    dist, sep2, values = spec.partition(":")
    if not sep or not sep2:
        raise ValueError(f"--search expects KEY=DIST:V1,V2,..., got {item!r}")
    return key.strip(), {dist.strip(): [_scalar(v) for v in values.split(",")]}


def _scalar(text: str):
    """A command-line value: int, float (also "1e-4", a string to YAML 1.1), else what YAML makes of it."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def check_space(space: dict, cfg: Config) -> dict:
    """Validate {dotted key: {dist: [args]}}: known config keys, known distributions, sane bounds. -> space."""
    if not isinstance(space, dict) or not space:
        raise ValueError("the search space is empty: give a `space:` mapping, --space FILE or --search KEY=DIST:ARGS")
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ValueError(f"space key {key!r}: expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ValueError(f"space key {key!r}: unknown distribution {dist!r} (known: {', '.join(DISTRIBUTIONS)})")
        if not isinstance(args, list) or not args or (DISTRIBUTIONS[dist] and len(args) != DISTRIBUTIONS[dist]):
            raise ValueError(f"space key {key!r}: {dist} expects a list of {DISTRIBUTIONS[dist] or 'values'}, "
                             f"got {args!r}")
        if dist in ("loguniform", "uniform"):
            lo, hi = args
            if not all(isinstance(v, (int, float)) for v in args) or lo >= hi or (dist == "loguniform" and lo <= 0):
                raise ValueError(f"space key {key!r}: {dist} needs numbers 0 {'<' if dist == 'loguniform' else '<='} "
                                 f"lo < hi, got {args!r}")
        for value in args:
            try:
                cfg.replace(**{key: value})
            except ValueError as err:
                raise ValueError(f"space key {key!r}: {err}") from None
    return space


def load_sweep(args: argparse.Namespace) -> tuple[Config, dict]:
    """Base config (file, --data-root, --set, --name, --storage-path) and search space. Raises ValueError."""
    values = yaml.safe_load(args.config.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{args.config}: the top level must be a mapping of sections")
    space = dict(values.pop("space", None) or {})
    if args.space is not None:
        more = yaml.safe_load(args.space.read_text()) or {}
        space.update(more.get("space", more) if isinstance(more, dict) else {"<file>": more})
    space.update(parse_search(item) for item in args.search)
    shortcuts = {"run.name": args.name, "run.storage_path": args.storage_path, "data.root": args.data_root}
    cfg = apply_overrides(Config.from_dict(values), shortcuts, args.overrides)
    if cfg.run.val_every < 1:
        raise ValueError("a sweep needs validation reports: set run.val_every > 0 (steps between validations)")
    return cfg, check_space(space, cfg)


def sweep_options(args: argparse.Namespace, cfg: Config) -> dict:
    max_t = args.max_t or cfg.run.max_steps
    if max_t < 1:
        raise ValueError("set --max-t or run.max_steps: ASHA needs the most steps a trial may take")
    opts = {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent, "metric": args.metric,
            "mode": args.mode, "grace_period": args.grace_period or cfg.run.val_every,
            "reduction_factor": args.reduction_factor, "max_t": max_t}
    if opts["num_samples"] < 1 or opts["max_concurrent"] < 1 or opts["reduction_factor"] <= 1:
        raise ValueError("--num-samples and --max-concurrent must be >= 1, --reduction-factor > 1")
    if not 1 <= opts["grace_period"] <= max_t:
        raise ValueError(f"--grace-period ({opts['grace_period']}) must be between 1 and max_t ({max_t})")
    return opts


# ---- the trial --------------------------------------------------------------------------------------------------

def _report_callback(metric: str):
    """A TuneReportCallback that passes Tune only the reports carrying `metric` (validation steps: Tune rejects a
    result without the metric it schedules on), each with the trial's latest checkpoint path so far."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

    class ValidationReports(TuneReportCallback):
        def __init__(self) -> None:
            super().__init__()
            self.latest = None

        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                self.latest = checkpoint.path
            if metrics and metric in metrics[0]:
                first = {**metrics[0], CHECKPOINT_PATH_KEY: self.latest}
                super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ValidationReports()


def run_trial(params: dict, base: dict, metric: str, folder: str) -> None:
    """Tune's function trainable: base config + sampled `params` (dotted keys), trained by a TorchTrainer whose
    run folder is <sweep folder>/<trial folder>/train; a restored trial resumes from that run's latest checkpoint.
    (Not get_trial_dir(): that is a local staging folder, synced to storage only when the trial ends.)"""
    from ray import tune

    from jobs.train import build_trainer, write_text

    trial_dir = f"{folder.rstrip('/')}/{TRIAL_DIR.format(id=tune.get_context().get_trial_id())}"
    cfg = Config.from_dict(base).replace(**params, **{"run.name": TRAIN_RUN, "run.storage_path": trial_dir})
    write_text(f"{trial_dir.rstrip('/')}/{TRAIN_RUN}/config.json", cfg.to_json() + "\n")
    build_trainer(cfg, callbacks=[_report_callback(metric)]).fit()


def trial_dirname(trial) -> str:
    return TRIAL_DIR.format(id=trial.trial_id)


def build_tuner(cfg: Config, space: dict, opts: dict, folder: str, restore: bool = False):
    """The Tuner of a new sweep in `folder` (<run.storage_path>/<run.name>), or with restore the one saved there."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from jobs.tune import run_trial as trial_fn  # by reference, not pickled from __main__

    trainable = tune.with_resources(tune.with_parameters(trial_fn, base=cfg.to_dict(), metric=opts["metric"],
                                                         folder=folder),
                                    {"cpu": 0.1})  # the trial driver only waits; its Train workers hold the CPUs
    if restore:
        return tune.Tuner.restore(folder, trainable, resume_unfinished=True, resume_errored=True)
    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": tune.choice,
              "grid": tune.grid_search}
    param_space = {k: (makers[d](args) if d in ("choice", "grid") else makers[d](*args))
                   for k, spec in space.items() for d, args in spec.items()}
    scheduler = ASHAScheduler(time_attr="step", max_t=opts["max_t"], grace_period=opts["grace_period"],
                              reduction_factor=opts["reduction_factor"])
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=opts["metric"], mode=opts["mode"], scheduler=scheduler,
                                    num_samples=opts["num_samples"], max_concurrent_trials=opts["max_concurrent"],
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path))


# ---- results ----------------------------------------------------------------------------------------------------

def ranked(results, space: dict, opts: dict) -> list[dict]:
    """One row per trial, best first by the last reported metric; trials without it (errors) last."""
    rows = []
    for res in results:
        m = res.metrics or {}
        value = m.get(opts["metric"])
        rows.append({"trial": Path(res.path).name, "params": {k: res.config.get(k) for k in space},
                     "metric": value, "step": m.get("step"), "early": (m.get("step") or 0) < opts["max_t"],
                     "unfinished": res.error is None and not m.get("done"),  # Ctrl-C: Tune's last result not done
                     "checkpoint": m.get("checkpoint_path") or _latest_checkpoint(f"{res.path}/{TRAIN_RUN}"),
                     "run_folder": f"{res.path}/{TRAIN_RUN}",
                     "error": None if res.error is None else str(res.error).strip().splitlines()[-1][:200]})
    sign = -1 if opts["mode"] == "max" else 1
    return sorted(rows, key=lambda r: (r["metric"] is None or math.isnan(r["metric"]),
                                       sign * (r["metric"] if r["metric"] is not None else 0)))


def _latest_checkpoint(run_folder: str) -> str | None:
    """The newest checkpoint_* of a local Train run folder (a trial resumed and then stopped before its first new
    checkpoint reported none to Tune)."""
    found = sorted(Path(run_folder).glob("checkpoint_step*")) if "://" not in run_folder else []
    return str(found[-1]) if found else None


def table(rows: list[dict], space: dict, metric: str) -> str:
    head = ["rank", "trial", *space, metric, "steps", "status"]
    body = []
    for i, r in enumerate(rows, 1):
        status = ("error: " + r["error"] if r["error"] else "unfinished" if r["unfinished"]
                  else "stopped early" if r["early"] else "completed")
        body.append([str(i), r["trial"], *(_fmt(r["params"][k]) for k in space), _fmt(r["metric"]),
                     str(r["step"] if r["step"] is not None else "-"), status])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *body])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)


def init_ray(cfg: Config, opts: dict, address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():  # called from Python (tests) inside a running Ray session
        return
    if address:
        ray.init(address=address)
    else:  # concurrent trials' fractional workers + Ray Data read tasks need more logical CPUs than 2 cores
        need = opts["max_concurrent"] * (cfg.run.workers * cfg.run.cpus_per_worker + 0.1) + 2
        ray.init(num_cpus=max(4, os.cpu_count() or 1, math.ceil(need)))


def main(argv: list[str] | None = None) -> int:
    from jobs.train import synthetic_data, write_text

    args = parse_args(argv)
    try:
        cfg, space = load_sweep(args)
        opts = sweep_options(args, cfg)
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    if args.resume:
        saved = Path(folder) / SWEEP_FILE
        if "://" in folder or not saved.is_file():
            print(f"error: --resume: no {SWEEP_FILE} in {folder} (start the sweep without --resume)", file=sys.stderr)
            return 2
        saved = json.loads(saved.read_text())
        cfg, space, opts = Config.from_dict(saved["base"]), saved["space"], saved["options"]
    else:
        cfg = synthetic_data(cfg, args.synthetic_n)  # once for all trials, into <sweep folder>/data
        write_text(f"{folder}/{SWEEP_FILE}", json.dumps({"base": cfg.to_dict(), "space": space, "options": opts},
                                                          indent=2) + "\n")
    print(f"[tune] sweep folder: {folder}", flush=True)

    init_ray(cfg, opts, args.address)
    from ray import tune

    if args.resume and not tune.Tuner.can_restore(folder):
        print(f"error: --resume: {folder} holds no Tune experiment state", file=sys.stderr)
        return 2
    results = build_tuner(cfg, space, opts, folder, restore=args.resume).fit()
    rows = ranked(results, space, opts)
    print(f"\n[tune] {len(rows)} trials ranked by {opts['metric']} ({opts['mode']}), last reported value:")
    print(table(rows, space, opts["metric"]))
    unfinished = sum(1 for r in rows if r["unfinished"])
    if unfinished:  # Ctrl-C: Tune saved the sweep's state and returned what it had
        print(f"[tune] interrupted with {unfinished} trial(s) unfinished (their steps so far above); continue with: "
              f"python jobs/tune.py --storage-path {cfg.run.storage_path} --name {cfg.run.name} --resume")
        return 130
    best = rows[0] if rows and rows[0]["metric"] is not None else None
    if best is None:
        print("error: no trial reported the metric (see the errors above)", file=sys.stderr)
        return 1
    full = cfg.replace(**best["params"], **{"run.name": TRAIN_RUN,
                                            "run.storage_path": best["run_folder"].rsplit("/", 1)[0]})
    best = {**best, "metric_name": opts["metric"], "config": full.to_dict()}
    write_text(f"{folder}/{BEST_FILE}", json.dumps(best, indent=2) + "\n")
    print(f"\n[tune] best trial: {best['trial']}  {opts['metric']} = {_fmt(best['metric'])} at step {best['step']}")
    print(f"[tune] best values: {json.dumps(best['params'])}")
    print(f"[tune] best checkpoint: {best['checkpoint']}")
    print(f"[tune] best config:\n{full.to_json()}")
    print(f"best: {json.dumps(best, sort_keys=True)}")
    print(f"[tune] TensorBoard: tensorboard --logdir {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
