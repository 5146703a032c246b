"""Launching a training run: the config (embedded default or a file, shortcut flags, --set overrides), the run
folder, generated data when none is given, Ray (a cluster or a local instance) and the TorchTrainer; then the
test-split report of the final checkpoint. jobs/train.py parses its arguments and calls `load_config` and `run`.

    cfg = load_config(Path("configs/tiny_synthetic.yaml"), {"run.max_steps": 10}, ["train.lr_g=1e-4"])
    run(cfg)                          # Ray Train, DDP over run.workers; local=True: one process (instagan.loop)
    build_trainer(cfg).fit()          # the TorchTrainer alone (Ray initialised); jobs/tune.py runs one per trial
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import yaml

from instagan.config import Config
from instagan.storage import write_text

# The embedded default (configs/tiny_synthetic.yaml): a tiny model with the quality recipe on generated 64x64
# images, 2 CPU workers at half a CPU each, about 10 minutes on a 2-core machine, then the test metrics.
DEFAULT = {
    "model": {"ngf": 16, "ndf": 16, "n_blocks": 2, "composite": True, "paint": "extend", "sharp": True,
              "mask_cond": True, "d_mask": True, "paint_init": "zero", "layers": True},
    "loss": {"lambda_seg": 2},
    "train": {"ins_max": 4, "ins_per": 2, "batch_size": 2, "epochs": 1, "epochs_decay": 2, "pool_size": 50,
              "seed": 0, "amp": "auto"},
    "data": {"root": "", "size": 64, "load_size": 72},
    "run": {"name": "tiny_synthetic", "workers": 2, "cpus_per_worker": 0.5, "max_steps": 300, "log_every": 10,
            "image_every": 100, "checkpoint_every": 100, "num_to_keep": 2, "max_failures": 1},
}
SYNTHETIC_SPLIT = "train"




def read_config_file(path: Path | None) -> dict:
    """The sections of a YAML (or JSON) config file as a dict; the embedded DEFAULT for None."""
    if path is None:
        return json.loads(json.dumps(DEFAULT))
    with open(path) as f:  # a stream: YAML errors then name the file and line
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    return values


def load_config(path: Path | None, shortcuts: dict, overrides: list[str]) -> Config:
    """Embedded default or file, then the shortcuts (dotted key -> value or None), then --set items. Raises
    ValueError naming a bad key or value (OSError, yaml.YAMLError for an unreadable file)."""
    return apply_overrides(Config.from_dict(read_config_file(path)), shortcuts, overrides)


def apply_overrides(cfg: Config, shortcuts: dict, overrides: list[str]) -> Config:
    """Shortcut flags (dotted key -> value or None), then --set SECTION.KEY=VALUE items; the storage path made
    absolute. Raises ValueError naming a bad item or key."""
    dotted = {k: v for k, v in shortcuts.items() if v is not None}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        dotted[key.strip()] = value.strip()
    cfg = cfg.replace(**dotted) if dotted else cfg
    storage = cfg.run.storage_path or "~/ray_results"  # Ray Train's default, made explicit in config.json
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return cfg.replace(**{"run.storage_path": storage})


def run_folder(cfg: Config) -> str:
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def synthetic_data(cfg: Config, n: int) -> Config:
    """With data.root empty, generate (or reuse) <run folder>/data and point data.root at it."""
    if cfg.data.root:
        return cfg
    from data_prep.synthetic import write_synthetic

    folder = run_folder(cfg)
    if "://" in folder:  # Ray Data reads any URI, but data_prep writes local folders
        raise ValueError("data.root is empty and run.storage_path is a URI: generate a data set with "
                         "`python -m data_prep synthetic ...`, upload it and set data.root")
    out = Path(folder) / "data"
    meta_file = out / "metadata.json"
    want = {"size": cfg.data.load_size, "seed": cfg.train.seed, "ins": [1, 6]}
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    have = meta.get("counts", {}).get(f"{SYNTHETIC_SPLIT}/a", {}).get("images")
    if meta.get("generator") != want or have != n - round(n * 0.1):  # write_synthetic's test fraction: 0.1
        t0 = time.perf_counter()
        write_synthetic(out, n=n, size=cfg.data.load_size, seed=cfg.train.seed, ins=(1, 6),
                        workers=min(4, os.cpu_count() or 1))
        print(f"[train] generated {n} images per domain in {time.perf_counter() - t0:.1f} s: {out}", flush=True)
    return cfg.replace(**{"data.root": str(out), "data.split": SYNTHETIC_SPLIT})


# Ray Data 2.60 reads Parquet footers on a pool of 32 FooterReader actors per read_parquet, each a Python worker
# process (about 200 MB and 1-2 CPU-s to start), for every domain and every epoch. Each actor reads footers on 128
# threads, so 2 are plenty for this project's data sets (a few to a few hundred part files). Measured on 2 cores,
# one domain's split: one epoch's read 5.2 s with 32 actors, 1.5 s with one. A value the user set wins.
RAY_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}


def ray_env(environ=os.environ) -> dict[str, str]:
    """RAY_DATA_ENV without the variables already set in `environ`."""
    return {k: v for k, v in RAY_DATA_ENV.items() if k not in environ}


def init_ray(address: str | None = None, cpus: float = 0.0, dashboard: bool = True) -> None:
    """Connect to the cluster at `address` (or RAY_ADDRESS, which `ray job submit` sets), else start a local Ray
    with logical CPUs for `cpus` worth of fractional workers or actors plus Ray Data's read and write tasks: more
    than a 2-core machine has. dashboard=False spares a local instance its processes (about 10% of 2 cores). A
    no-op when Ray is already running (called from Python, e.g. tests). Ray Data's settings (RAY_DATA_ENV) go to
    this process and the job's tasks and actors (by the environment a local instance inherits, by runtime_env on a
    cluster)."""
    import ray

    if ray.is_initialized():
        return
    env = ray_env()
    os.environ.update(env)  # this process plans and may run Ray Data's executor (translate's write)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None)
        return
    ray.init(num_cpus=max(4, os.cpu_count() or 1, math.ceil(cpus + 2)), include_dashboard=dashboard)


def data_problem(cfg: Config) -> str | None:
    """Why cfg.data cannot be trained on, checked before Ray starts (local paths only; URIs are read by Ray)."""
    root = cfg.data.root
    if not root or "://" in root:
        return None
    missing = [d for d in ("a", "b") if not any((Path(root) / cfg.data.split / d).glob("part-*.parquet"))]
    if missing:
        return (f"data.root {root} has no Parquet files for domain(s) {', '.join(missing)} of split "
                f"'{cfg.data.split}' (expected {root}/{cfg.data.split}/<a|b>/part-*.parquet, written by data_prep)")
    return None


def build_trainer(cfg: Config, callbacks: list | None = None, loop=None, loop_config: dict | None = None,
                  datasets: dict | None | str = "cfg"):
    """The TorchTrainer for `cfg` (Ray must be initialised). callbacks: Ray Train UserCallbacks (jobs/tune.py
    passes a TuneReportCallback). loop, loop_config, datasets: the worker function (default
    train_loop_per_worker), extra keys for its config dict and the datasets (default: cfg.data's); tests pass
    their own loops through here, so they run the trainer the job runs."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from instagan.distributed.train import data_config, train_loop_per_worker
    from instagan.distributed.train import datasets as cfg_datasets

    r = cfg.run
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config={**cfg.to_dict(), **(loop_config or {})},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        datasets=cfg_datasets(cfg) if datasets == "cfg" else datasets,
        dataset_config=data_config(),
        run_config=RunConfig(name=r.name, storage_path=r.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep),
                             failure_config=FailureConfig(max_failures=r.max_failures), callbacks=callbacks),
    )


def run(cfg: Config, address: str | None = None, local: bool = False, synthetic_n: int = 600,
        launched: float | None = None) -> int:
    """Train `cfg` (Ray Train, or with `local` in this process) and print where to look. -> exit status."""
    launched = launched or time.time()
    missing = data_problem(cfg)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    cfg = synthetic_data(cfg, synthetic_n)
    folder = run_folder(cfg)
    write_text(f"{folder}/config.json", cfg.to_json() + "\n")
    print(f"[train] run folder: {folder}", flush=True)
    if local:
        from instagan.loop import train_local

        try:  # a run folder with checkpoints continues from its latest, as a Ray run of the same name does
            last = train_local(cfg, folder, resume=True)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"[train] done in {time.time() - launched:.0f} s without Ray; checkpoint: {last}")
        report_test_split(cfg, str(last), folder)
        return 0

    if not cfg.run.verbose:  # Ray's own deprecation notices about its internals (e.g. Train's ingest options)
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    init_ray(address, cfg.run.workers * cfg.run.cpus_per_worker)
    from ray.train import TrainingFailedError

    try:
        result = build_trainer(cfg).fit()
    except TrainingFailedError as err:
        print(f"error: training failed: {err}", file=sys.stderr)
        return 1
    samples = sorted(Path(folder, "samples").glob("step_*.png")) if "://" not in folder else []
    print("[train] done in {:.0f} s".format(time.time() - launched))
    print(f"[train] final metrics: {json.dumps(result.metrics, sort_keys=True)}")
    print(f"[train] checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    print(f"[train] run folder: {folder}")
    if samples:
        print(f"[train] latest sample grid: {samples[-1]}")
    print(f"[train] TensorBoard: tensorboard --logdir {folder}/tensorboard")
    if result.checkpoint:
        report_test_split(cfg, result.checkpoint.path, folder)
    return 0


def report_test_split(cfg: Config, ckpt: str, folder: str) -> None:
    """Evaluate the final checkpoint on the data's test split (if it has one) and print where to look."""
    from instagan.metrics import evaluate_run_end, summary_table

    t0 = time.perf_counter()
    done = evaluate_run_end(ckpt, cfg.data.root, f"{folder}/eval") if "://" not in folder else None
    if done is None:
        return
    report, grid = done
    print(f"[train] test split, {report['rows']['model']['a2b']['images']} + {report['rows']['model']['b2a']['images']}"
          f" images, against the floors (identity = the input unchanged; untrained generators), "
          f"{time.perf_counter() - t0:.0f} s:")
    print(summary_table(report))
    print("[train] img_shape: share of objects whose pixels keep their colour and take the target shape; "
          "bg_err: mean change of the background (0 = kept)")
    print(f"[train] translated test images: {grid}")

