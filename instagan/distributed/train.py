"""Ray Train for InstaGAN: the worker function and what the driver passes to TorchTrainer. The loop itself is
instagan.loop's, the same one `jobs/train.py --local` runs; here is only what a Ray Train worker does differently
(`RayHost`). Submitted by jobs/train.py:

    TorchTrainer(train_loop_per_worker, train_loop_config=cfg.to_dict(), datasets=datasets(cfg),
                 dataset_config=data_config(), ...)

Every rank builds the same seeded networks and wraps each with `ray.train.torch.prepare_model` (DDP; every
parameter takes part in every forward, so no `find_unused_parameters`). An epoch is one `iter_pairs` pass over
this rank's shards of domains a and b. Reports go through `ray.train.report`, a barrier every rank calls at the
same steps; Ray's controller takes one report per worker every 2 s (a queue of one), so the loop reports to Ray
no sooner than that after the previous report (TensorBoard and metrics.jsonl get every log). Checkpoints (every
`run.checkpoint_every` steps, at the end of every epoch and at the end of the run) are written by every rank
into one temporary folder and handed to Ray, which keeps `run.num_to_keep` of them; a resumed run (after a worker
failure, or a new fit with the same run name and storage path) takes the same next step as an uninterrupted one.
With run.val_every, validation metrics (val/*) are reported by every rank at their steps, so a Tune scheduler
sees each value (jobs/tune.py).

Driver side, `datasets(cfg)` (small splits read once into the object store) and `data_config()` (preserve_order,
no locality hints) give every rank the same rows in the same order in every run, which exact resume needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ray.train
import ray.train.torch

from instagan.config import Config
from instagan.distributed.data import iter_pairs, ray_datasets
from instagan.loop import Host, train
from instagan.train import TrainState, build_networks

MATERIALIZE_SHARE = 0.2  # datasets() keeps a split in the object store when it takes at most this share of it
# Ray's controller polls each worker's one-slot report queue this often; a report sooner than that blocks.
REPORT_MIN_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))


# ---- driver side -----------------------------------------------------------------------------------------------

def split_bytes(root: str, split: str) -> int | None:
    """Encoded size of a split from data_prep's metadata.json ("files"); None when unknown (or a URI)."""
    meta = Path(root) / "metadata.json"
    if "://" in root or not meta.is_file():
        return None
    files = json.loads(meta.read_text()).get("files") or []
    return sum(int(f["bytes"]) for f in files if f["path"].startswith(f"{split}/")) or None


def datasets(cfg: Config) -> dict:
    """{"a": ..., "b": ...} Ray Data datasets of cfg.data, for TorchTrainer(datasets=...) (call after ray.init).

    A split whose Parquet files take at most MATERIALIZE_SHARE of the cluster's object store is read once, in file
    order, into the object store: every epoch then starts without re-reading the files (seconds per epoch here)."""
    out = ray_datasets(cfg.data.root, cfg.data.split)
    size = split_bytes(cfg.data.root, cfg.data.split)
    if size is not None and size <= MATERIALIZE_SHARE * ray.cluster_resources().get("object_store_memory", 0):
        for d, ds in out.items():
            ds.context.execution_options.preserve_order = True  # the same block order in every run
            out[d] = ds.materialize()
    return out


def data_config() -> ray.train.DataConfig:
    """TorchTrainer(dataset_config=...): Ray Train's default ingest options plus preserve_order, and shards that
    ignore node locality. Which rows reach which rank, in which order, is then the same in every run (it follows
    read-task timing otherwise, once a domain has more than one file), so a resumed run sees the batches an
    uninterrupted one would. (Setting preserve_order on a dataset's own context is not enough: Train replaces
    those options with its own.)"""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options, enable_shard_locality=False)


# ---- worker side -----------------------------------------------------------------------------------------------

def rank_world() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def build_state(cfg: Config, rank: int) -> TrainState:
    """Seeded networks (equal on every rank), each wrapped by prepare_model (device + DDP), and a fresh state."""
    nets = {k: ray.train.torch.prepare_model(v) for k, v in build_networks(cfg).items()}
    return TrainState.create(cfg, ray.train.torch.get_device(), nets=nets, rank=rank)


def run_folder(cfg: Config) -> Path:
    """The run folder <storage_path>/<name> when the storage is a local (or mounted) file system; a local temp
    folder otherwise (TensorBoard, metrics.jsonl and PNGs are then written there, not next to the checkpoints)."""
    import pyarrow.fs

    storage = ray.train.get_context().get_storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return Path(storage.experiment_fs_path)
    return Path(tempfile.gettempdir()) / "instagan" / cfg.run.name


def quiet_report_logs() -> None:
    """Ray Train logs each ray.train.report at INFO on the worker ("Reporting training result N: TrainingReport(
    ...20 floats...)"), which the driver prints per rank, and "Moving model to device / Wrapping provided model in
    DistributedDataParallel" per network; the loop's progress line says what matters in one line. Raises those
    loggers (the first is named after its file, execution/context.py) to WARNING in this process."""
    suffix = os.path.join("execution", "context.py")
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(suffix) and "train" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2.torch.train_loop_utils").setLevel(logging.WARNING)


class RayHost(Host):
    """A Ray Train worker: DDP-wrapped networks, this rank's dataset shards, checkpoints through ray.train.report."""

    report_min_s = REPORT_MIN_S
    epoch_checkpoints = True

    def __init__(self, cfg: Config):
        self.cfg = cfg
        if not cfg.run.verbose:
            quiet_report_logs()
        self.rank, self.world = rank_world()
        self.device = ray.train.torch.get_device()
        self.folder = run_folder(cfg)

    def build_state(self) -> TrainState:
        return build_state(self.cfg, self.rank)

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[Path | None]:
        resumed = ray.train.get_checkpoint()
        if resumed is None:
            yield None
            return
        with resumed.as_directory() as ckpt_dir:
            yield Path(ckpt_dir)

    def batches(self, epoch: int) -> Iterable[tuple[dict, dict]]:
        t, d = self.cfg.train, self.cfg.data
        return iter_pairs(ray.train.get_dataset_shard("a"), ray.train.get_dataset_shard("b"), t.batch_size, d.size,
                          d.load_size, d.flip, t.seed, epoch, t.ins_max)

    def checkpoint_name(self, state: TrainState) -> str:
        return f"checkpoint_step{state.step:08d}_epoch{state.epoch:04d}"

    def report(self, metrics: dict, write: Callable[[Path], None] | None = None, name: str = "") -> None:
        if write is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="instagan-ckpt-") as d:
            write(Path(d))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)


def train_loop_per_worker(config: dict, on_step: Callable[[TrainState, int], None] | None = None) -> None:
    """The Ray Train worker function; `config` is Config.to_dict(). `on_step(state, rank)` runs after every step
    (tests use it to record steps or to kill a worker)."""
    cfg = Config.from_dict(config)
    train(cfg, RayHost(cfg), on_step=on_step)
