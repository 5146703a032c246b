"""Train InstaGAN with Ray Train (DDP over N workers): logs, image grids and full-state checkpoints in the run folder.

    python jobs/train.py                                   # embedded default: generated data, local Ray, 2 workers
    python jobs/train.py --config configs/coco_sheep2giraffe.yaml --set run.workers=8 --set run.use_gpu=true
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --config X.yaml
    python jobs/train.py --local --config X.yaml          # one process, no Ray (instagan/loop.py)

The config is a YAML or JSON file with the sections and keys of instagan/config.py (model, loss, train, data, run);
keys left out take the defaults there (the paper's settings). Without --config the embedded default below is used
(= configs/tiny_synthetic.yaml). Overrides: --set section.key=value (repeatable) and the shortcuts --name,
--storage-path, --workers, --max-steps, --data-root. Unknown keys are an error.

Run folder: <run.storage_path>/<run.name> holds config.json (the resolved config), Ray Train's checkpoint_* folders,
tensorboard/ and samples/step_XXXXXX.png. Submitting again with the same name and storage path resumes from the
latest checkpoint; run.max_failures worker-group restarts happen inside one run. With data.root "" a small
generated data set (ellipses vs rectangles, data_prep's synthetic source) is written to <run folder>/data first.

Ray: --address (or RAY_ADDRESS, which `ray job submit` sets) connects to a cluster; otherwise a local Ray instance
starts with max(4, CPU count) logical CPUs, so fractional-CPU workers and Ray Data's readers all get scheduled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

LAUNCHED = time.time()

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/train.py` puts jobs/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

from instagan.config import Config  # noqa: E402

# The embedded default (configs/tiny_synthetic.yaml): a tiny model with the quality recipe on generated 64x64
# images, 2 CPU workers at half a CPU each, about 9 minutes on a 2-core laptop, then the test metrics.
DEFAULT = {
    "model": {"ngf": 16, "ndf": 16, "n_blocks": 2, "composite": True, "paint": "residual", "mask_cond": True},
    "loss": {"lambda_seg": 2},
    "train": {"ins_max": 4, "ins_per": 2, "batch_size": 2, "epochs": 1, "epochs_decay": 2, "pool_size": 50,
              "seed": 0, "amp": "bf16"},
    "data": {"root": "", "size": 64, "load_size": 72},
    "run": {"name": "tiny_synthetic", "workers": 2, "cpus_per_worker": 0.5, "max_steps": 300, "log_every": 10,
            "image_every": 100, "checkpoint_every": 100, "num_to_keep": 2, "max_failures": 1},
}
SYNTHETIC_SPLIT = "train"


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
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit (no Ray)")
    p.add_argument("--local", action="store_true",
                   help="train in this process without Ray (instagan.loop: the same loop in one process, no DDP)")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> Config:
    """Embedded default or file, then the shortcuts, then --set. Raises ValueError naming a bad key or value."""
    if args.config is None:
        values = json.loads(json.dumps(DEFAULT))
    else:
        values = yaml.safe_load(args.config.read_text()) or {}  # YAML is a superset of JSON
        if not isinstance(values, dict):
            raise ValueError(f"{args.config}: the top level must be a mapping of sections")
    shortcuts = {"run.name": args.name, "run.storage_path": args.storage_path, "run.workers": args.workers,
                 "run.max_steps": args.max_steps, "data.root": args.data_root}
    return apply_overrides(Config.from_dict(values), shortcuts, args.overrides)


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


def write_text(uri_or_path: str, text: str) -> None:
    """Write a small text file to a local path or a pyarrow-supported URI (s3://, gs://, ...)."""
    if "://" not in uri_or_path:
        Path(uri_or_path).parent.mkdir(parents=True, exist_ok=True)
        Path(uri_or_path).write_text(text)
        return
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri_or_path)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


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


def init_ray(cfg: Config, address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:  # fractional workers + Ray Data read tasks need more logical CPUs than a 2-core machine has
        need = math.ceil(cfg.run.workers * cfg.run.cpus_per_worker) + 2
        ray.init(num_cpus=max(4, os.cpu_count() or 1, need))


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


def build_trainer(cfg: Config, callbacks: list | None = None):
    """The TorchTrainer for `cfg` (Ray must be initialised); datasets from cfg.data. callbacks: Ray Train
    UserCallbacks (jobs/tune.py passes a TuneReportCallback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from instagan.distributed import data_config, datasets, train_loop_per_worker

    r = cfg.run
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        datasets=datasets(cfg),
        dataset_config=data_config(),
        run_config=RunConfig(name=r.name, storage_path=r.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep),
                             failure_config=FailureConfig(max_failures=r.max_failures), callbacks=callbacks),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    missing = data_problem(cfg)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    cfg = synthetic_data(cfg, args.synthetic_n)
    folder = run_folder(cfg)
    write_text(f"{folder}/config.json", cfg.to_json() + "\n")
    print(f"[train] run folder: {folder}", flush=True)
    if args.local:
        from instagan.loop import train_local

        try:  # a run folder with checkpoints continues from its latest, as a Ray run of the same name does
            last = train_local(cfg, folder, resume=True)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"[train] done in {time.time() - LAUNCHED:.0f} s without Ray; checkpoint: {last}")
        test_report(cfg, str(last), folder)
        return 0

    init_ray(cfg, args.address)
    from ray.train import TrainingFailedError

    try:
        result = build_trainer(cfg).fit()
    except TrainingFailedError as err:
        print(f"error: training failed: {err}", file=sys.stderr)
        return 1
    samples = sorted(Path(folder, "samples").glob("step_*.png")) if "://" not in folder else []
    print("[train] done in {:.0f} s".format(time.time() - LAUNCHED))
    print(f"[train] final metrics: {json.dumps(result.metrics, sort_keys=True)}")
    print(f"[train] checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    print(f"[train] run folder: {folder}")
    if samples:
        print(f"[train] latest sample grid: {samples[-1]}")
    print(f"[train] TensorBoard: tensorboard --logdir {folder}/tensorboard")
    if result.checkpoint:
        test_report(cfg, result.checkpoint.path, folder)
    return 0


def test_report(cfg: Config, ckpt: str, folder: str) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
