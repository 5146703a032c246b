"""Ray Tune sweeps of InstaGAN (jobs/tune.py parses its arguments and calls `load_sweep`, `sweep_options` and
`sweep`): the search space (checked against the config), one TorchTrainer per trial built as jobs/train.py builds
it, ASHA on a validation metric, and the ranked results.

    cfg, space = load_sweep(Path("configs/tune_synthetic.yaml"), None, ["train.lr_g=loguniform:5e-5,5e-4"], {}, [])
    sweep(cfg, space, sweep_options(cfg, num_samples=4), resume=False)    # -> exit status; prints the ranking
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import yaml

from instagan.config import Config
from instagan.distributed.launch import apply_overrides, build_trainer, init_ray, read_config_file, synthetic_data
from instagan.storage import write_text

DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "choice": None, "grid": None}  # name -> number of arguments
SWEEP_FILE, BEST_FILE = "sweep.json", "best.json"
TRAIN_RUN, TRIAL_DIR = "train", "trial_{id}"  # a trial's Train run folder: <sweep>/trial_<id>/train



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


def load_sweep(config: Path, space_file: Path | None, search: list[str], shortcuts: dict,
               overrides: list[str]) -> tuple[Config, dict]:
    """Base config (file, shortcuts such as run.name, --set overrides) and search space (the file's `space:`,
    then space_file's, then --search items). Raises ValueError."""
    values = read_config_file(config)
    space = dict(values.pop("space", None) or {})
    if space_file is not None:
        more = yaml.safe_load(space_file.read_text()) or {}
        space.update(more.get("space", more) if isinstance(more, dict) else {"<file>": more})
    space.update(parse_search(item) for item in search)
    cfg = apply_overrides(Config.from_dict(values), shortcuts, overrides)
    if cfg.run.val_every < 1:
        raise ValueError("a sweep needs validation reports: set run.val_every > 0 (steps between validations)")
    return cfg, check_space(space, cfg)


def sweep_options(cfg: Config, num_samples: int = 4, max_concurrent: int = 1, metric: str = "val/score",
                  mode: str = "max", grace_period: int | None = None, reduction_factor: float = 3,
                  max_t: int | None = None) -> dict:
    """The sweep's options, checked; grace_period defaults to run.val_every, max_t to run.max_steps."""
    max_t = max_t or cfg.run.max_steps
    if max_t < 1:
        raise ValueError("set --max-t or run.max_steps: ASHA needs the most steps a trial may take")
    opts = {"num_samples": num_samples, "max_concurrent": max_concurrent, "metric": metric, "mode": mode,
            "grace_period": grace_period or cfg.run.val_every, "reduction_factor": reduction_factor, "max_t": max_t}
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

    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg.to_dict(), metric=opts["metric"],
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


def write_hparams(folder: str | Path, rows: list[dict], metric: str) -> Path:
    """TensorBoard's HParams view of the ranked trials: one run per trial under <folder>/hparams/<trial> with its
    sampled values and its last `metric` and step, so `tensorboard --logdir <folder>` compares trials side by side
    (HPARAMS tab). Trials without the metric are left out. -> <folder>/hparams."""
    from torch.utils.tensorboard import SummaryWriter

    root = Path(folder) / "hparams"
    for r in rows:
        if r["metric"] is None or math.isnan(r["metric"]):
            continue
        params = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in r["params"].items()}
        with SummaryWriter(str(root / r["trial"])) as w:
            w.add_hparams(params, {f"hparam/{metric}": r["metric"], "hparam/step": float(r["step"] or 0)},
                          run_name=".")
    return root


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)


def sweep(cfg: Config, space: dict, opts: dict, resume: bool = False, synthetic_n: int = 200,
          address: str | None = None) -> int:
    """Run (or with `resume` continue) the sweep <run.storage_path>/<run.name>; print the ranking and the best
    trial. -> exit status (0, 1: no trial reported the metric, 2: nothing to resume, 130: interrupted)."""
    folder = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    if resume:
        saved = Path(folder) / SWEEP_FILE
        if "://" in folder or not saved.is_file():
            print(f"error: --resume: no {SWEEP_FILE} in {folder} (start the sweep without --resume)", file=sys.stderr)
            return 2
        saved = json.loads(saved.read_text())
        cfg, space, opts = Config.from_dict(saved["base"]), saved["space"], saved["options"]
    else:
        cfg = synthetic_data(cfg, synthetic_n)  # once for all trials, into <sweep folder>/data
        write_text(f"{folder}/{SWEEP_FILE}", json.dumps({"base": cfg.to_dict(), "space": space, "options": opts},
                                                          indent=2) + "\n")
    print(f"[tune] sweep folder: {folder}", flush=True)

    init_ray(address, opts["max_concurrent"] * (cfg.run.workers * cfg.run.cpus_per_worker + 0.1))  # + trial drivers
    from ray import tune

    if resume and not tune.Tuner.can_restore(folder):
        print(f"error: --resume: {folder} holds no Tune experiment state", file=sys.stderr)
        return 2
    results = build_tuner(cfg, space, opts, folder, restore=resume).fit()
    rows = ranked(results, space, opts)
    if "://" not in folder:
        write_hparams(folder, rows, opts["metric"])
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
    print(f"[tune] TensorBoard: tensorboard --logdir {folder}  (HPARAMS tab: the trials side by side)")
    return 0

