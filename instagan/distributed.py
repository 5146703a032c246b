"""The Ray Train worker loop of InstaGAN: DDP over the four networks, agreed chunk counts, metrics, TensorBoard,
image grids and full-state checkpoints that resume exactly. Submitted by jobs/train.py:

    TorchTrainer(train_loop_per_worker, train_loop_config=cfg.to_dict(), datasets=datasets(cfg),
                 dataset_config=data_config(), ...)

Every rank builds the same seeded networks, wraps each with `ray.train.torch.prepare_model` (DDP; every parameter
takes part in every forward, so no `find_unused_parameters`) and, per step, agrees with the others on the chunk
count (all-reduce max, DESIGN.md section 4) before `instagan.train.train_step`. An epoch is one `iter_pairs` pass
over this rank's shards of domains a and b.

Reports (`ray.train.report`, a barrier every rank calls at the same steps; decided by step counts or by rank 0's
flag carried on the per-step all-reduce, never by a rank's own clock):
- metrics every `run.log_every` steps, averaged over the steps since the last report and over ranks; flat, slash
  keys: loss/*, lr/G, lr/D, time/step_s, time/data_s, perf/samples_per_s (all ranks), train/chunks, step, epoch.
  Ray's controller takes one report per worker every 2 s (a queue of one), so a report due sooner than that after
  the previous one goes to TensorBoard only: reporting faster would stall training.
- a checkpoint every `run.checkpoint_every` steps, at the end of every epoch and at the end of the run: rank 0
  writes instagan.checkpoint's `state.pt` + `config.json` plus `loop.json` (batches done in the current epoch, so a
  resumed run skips them); every other rank adds `pools_rank<r>.pt`, its own history pools, into the same
  checkpoint folder. A resumed run (after a worker failure, or a new fit with the same run name and storage path)
  therefore takes the same next step as an uninterrupted one.

Validation (run.val_every > 0): every val_every steps and at the last step, rank 0 computes
instagan.metrics.validation_metrics (val/*: background and instance preservation, classifier scores with
run.classifier, val/score) on a fixed batch, the first run.val_images rows per domain of run.val_split, and every
rank reports them: such a step always reports (waiting out the 2 s above if need be), so a Tune scheduler sees each
value (jobs/tune.py).

Rank 0 also writes TensorBoard files to `<run folder>/tensorboard` and image grids (instagan.visual) every
`run.image_every` steps and at the end, to TensorBoard and to `<run folder>/samples/step_XXXXXX.png`.

Driver side, `datasets(cfg)` (small splits read once into the object store) and `data_config()` (preserve_order,
no locality hints) give every rank the same rows in the same order in every run, which exact resume needs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor

from instagan import checkpoint, visual
from instagan import masks as M
from instagan.config import Config
from instagan.data import COLUMNS, augment, iter_pairs, ray_datasets, read_sample
from instagan.train import TrainState, build_networks, chunk_count, train_step

LOOP_FILE = "loop.json"  # {"epoch_step": batches of the current epoch already trained, "world_size": ...}
POOLS_FILE = "pools_rank{rank}.pt"  # history pools of rank r > 0 (rank 0's are in state.pt)
VIS_ROWS = 4  # images per direction in the sample grids
MATERIALIZE_SHARE = 0.2  # datasets() keeps a split in the object store when it takes at most this share of it
# Ray's controller polls each worker's one-slot report queue this often; a report sooner than that blocks.
REPORT_MIN_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))


# ---- building blocks (also used by tests with their own batches) -------------------------------------------------

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


def rank_world() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def build_state(cfg: Config, rank: int) -> TrainState:
    """Seeded networks (equal on every rank), each wrapped by prepare_model (device + DDP), and a fresh state."""
    nets = {k: ray.train.torch.prepare_model(v) for k, v in build_networks(cfg).items()}
    return TrainState.create(cfg, ray.train.torch.get_device(), nets=nets, rank=rank)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(values: list[int], device: torch.device) -> list[int]:
    """Element-wise max over ranks of a few small integers (one all-reduce of an int64 tensor)."""
    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def step(state: TrainState, batch_a: dict, batch_b: dict, flag: bool = False) -> tuple[dict[str, float], bool]:
    """One data-parallel training step: agree on the chunk count (and on rank 0's `flag`), then train_step.

    Returns (this rank's metrics, the agreed flag). Every rank must call it for every step."""
    t = state.cfg.train
    n, flag = agree([chunk_count(batch_a, batch_b, t.ins_max, t.ins_per), int(flag)], state.device)
    return train_step(state, batch_a, batch_b, n_chunks=n), bool(flag)


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each metric over ranks (every rank must call it with the same keys)."""
    if not _distributed() or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def params_vector(state: TrainState) -> Tensor:
    """Every parameter of the four networks as one CPU vector (for comparing ranks in tests)."""
    return torch.cat([p.detach().flatten().cpu() for net in state.nets.values() for p in net.parameters()])


# ---- checkpoints ---------------------------------------------------------------------------------------------

def save_checkpoint(state: TrainState, directory: str | os.PathLike, rank: int, world: int, epoch_step: int) -> None:
    """This rank's part of a full-state checkpoint (see the module docstring)."""
    directory = Path(directory)
    if rank == 0:
        checkpoint.save(state, directory)
        (directory / LOOP_FILE).write_text(json.dumps({"epoch_step": epoch_step, "world_size": world,
                                                       "step": state.step, "epoch": state.epoch}))
    else:
        pools = {f"pool_{d}": p.state_dict() for d, p in state.pools.items()}
        torch.save(pools, directory / POOLS_FILE.format(rank=rank))


def restore_checkpoint(state: TrainState, directory: str | os.PathLike, rank: int) -> int:
    """Load a checkpoint into `state` (rank r's own pools when it has them). -> batches done in the epoch."""
    directory = Path(directory)
    cfg, payload = checkpoint.load(directory, state.device)
    if cfg.model != state.cfg.model:
        raise ValueError(f"checkpoint {directory} was trained with {cfg.model}, this run asks for "
                         f"{state.cfg.model}: use another run name (or storage path) for a different model")
    fresh = {d: p.state_dict() for d, p in state.pools.items()}
    state.load_state_dict(payload)
    if rank > 0:
        path = directory / POOLS_FILE.format(rank=rank)
        own = torch.load(path, map_location=state.device, weights_only=True) if path.exists() else None
        for d, p in state.pools.items():  # without its own file (more ranks than before): start empty
            p.load_state_dict(own[f"pool_{d}"] if own else fresh[d], state.device)
    loop = directory / LOOP_FILE
    return int(json.loads(loop.read_text())["epoch_step"]) if loop.exists() else 0


def report(metrics: dict, state: TrainState | None = None, rank: int = 0, world: int = 1,
           epoch_step: int = 0) -> None:
    """ray.train.report from every rank; with `state`, a checkpoint that every rank contributes to."""
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="instagan-ckpt-") as d:
        save_checkpoint(state, d, rank, world, epoch_step)
        name = f"checkpoint_step{state.step:08d}_epoch{state.epoch:04d}"
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)


# ---- validation (rank 0 computes, every rank reports) --------------------------------------------------------

def validation_batches(cfg: Config) -> tuple[dict, dict]:
    """The fixed validation set: the first run.val_images rows per domain of data.root's run.val_split (files in
    name order; a local folder or a URI), resized to data.size without crop or flip, each image's train.ins_max
    largest instances. -> (batch_a, batch_b) on the CPU."""
    import pyarrow.dataset
    import pyarrow.fs

    r, root = cfg.run, cfg.data.root.rstrip("/")
    out = []
    for d in ("a", "b"):
        where = f"{root}/{r.val_split}/{d}"
        fs, base = (pyarrow.fs.FileSystem.from_uri(where) if "://" in where
                    else (pyarrow.fs.LocalFileSystem(), str(Path(where).resolve())))
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        files = sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"run.val_every={r.val_every} needs a validation split: no part-*.parquet in "
                                    f"{where} (set run.val_split, or write a {r.val_split!r} split with data_prep)")
        rows = pyarrow.dataset.dataset(files, filesystem=fs, format="parquet").head(r.val_images, columns=COLUMNS)
        batch = M.collate([augment(*read_sample(row), cfg.data.size, cfg.data.size, False, train=False)
                           for row in rows.to_pylist()])
        batch["masks"], batch["valid"] = M.limit(batch["masks"], batch["valid"], cfg.train.ins_max)  # largest first
        out.append(batch)
    return out[0], out[1]


def load_classifier(path: str, device: torch.device):
    """The domain classifier of run.classifier (jobs/train_classifier.py) for val/cls_*; None for ""."""
    if not path:
        return None
    from instagan.metrics import load_classifier as load

    return load(path, device)[0]


def validate(state: TrainState, batches: tuple[dict, dict], classifier=None) -> dict[str, float]:
    """instagan.metrics.validation_metrics of the current generators on the validation batches, plus time/val_s.
    It translates with the generators' underlying modules, so no DDP collective runs on rank 0 alone."""
    from instagan.metrics import validation_metrics

    t0, t = time.perf_counter(), state.cfg.train
    out = validation_metrics(state.nets["G_ab"], state.nets["G_ba"], *batches, t.ins_max, t.ins_per, classifier)
    return {**out, "time/val_s": time.perf_counter() - t0}


def from_rank0(metrics: dict[str, float]) -> dict[str, float]:
    """Rank 0's dict on every rank (every rank must call it)."""
    if not _distributed():
        return metrics
    box = [metrics]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- logging (rank 0) ----------------------------------------------------------------------------------------

def run_folder(cfg: Config) -> Path:
    """The run folder <storage_path>/<name> when the storage is a local (or mounted) file system; a local temp
    folder otherwise (TensorBoard and PNGs are then written there, not next to the checkpoints)."""
    import pyarrow.fs

    storage = ray.train.get_context().get_storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return Path(storage.experiment_fs_path)
    return Path(tempfile.gettempdir()) / "instagan" / cfg.run.name


class Window:
    """Metrics summed since the last report, with wall time, data-wait time and step count."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.data_s, self.start = 0, 0.0, time.perf_counter()

    def add(self, metrics: dict[str, float], data_s: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.data_s += data_s

    def flush(self, state: TrainState, world: int) -> dict[str, float]:
        """Averages over the window and over ranks (a collective when steps were taken), then reset."""
        out: dict[str, float] = {}
        if self.steps:
            elapsed = time.perf_counter() - self.start
            local = {("train/chunks" if k == "chunks" else k): v / self.steps for k, v in self.sums.items()}
            local["time/step_s"] = elapsed / self.steps
            local["time/data_s"] = self.data_s / self.steps
            out = mean_over_ranks(local, state.device)
            out["perf/samples_per_s"] = world * state.cfg.train.batch_size / out["time/step_s"]
        self.reset()
        return {**out, **state.lr(), "step": state.step, "epoch": state.epoch}


class RankZeroLog:
    """TensorBoard scalars and images, PNG sample grids; rank 0 only."""

    def __init__(self, cfg: Config, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.folder = cfg, folder
        self.writer = SummaryWriter(str(folder / "tensorboard"))
        self.samples: dict[str, list[tuple[Tensor, Tensor]]] = {"a": [], "b": []}
        self.last_image_step = -1

    def collect(self, batch_a: dict, batch_b: dict) -> None:
        """Keep the first VIS_ROWS images of each domain this process sees: the grids show the same inputs."""
        for d, batch in (("a", batch_a), ("b", batch_b)):
            for i in range(len(batch["img"])):
                if len(self.samples[d]) < VIS_ROWS:
                    self.samples[d].append((batch["img"][i], batch["masks"][i][batch["valid"][i].bool()]))

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def images(self, state: TrainState) -> Path | None:
        if not self.samples["a"] or state.step == self.last_image_step:
            return None
        t, nets = self.cfg.train, state.nets
        grids = {}
        for d, (G, F) in (("a", (nets["G_ab"], nets["G_ba"])), ("b", (nets["G_ba"], nets["G_ab"]))):
            grids[d] = visual.translation_grid(G, F, M.collate(self.samples[d]), t.ins_max, t.ins_per, VIS_ROWS)
            self.writer.add_image(f"samples/{d}2{'b' if d == 'a' else 'a'}", grids[d], state.step)
        self.writer.flush()
        self.last_image_step = state.step
        return visual.save_png(visual.stack_grids([grids["a"], grids["b"]]),
                               self.folder / "samples" / f"step_{state.step:06d}.png",
                               scale=max(1, 128 // self.cfg.data.size))

    def close(self) -> None:
        self.writer.close()


# ---- the loop ------------------------------------------------------------------------------------------------

def _timed(it: Iterable) -> Iterator[tuple[object, float]]:
    """Items of `it` with the seconds spent waiting for each."""
    it = iter(it)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        yield item, time.perf_counter() - t0


def _with_last(it: Iterable) -> Iterator[tuple[object, bool]]:
    """(item, is_last) pairs: one item of look-ahead, so the last batch of an epoch is known when it is trained."""
    it = iter(it)
    end = object()
    cur = next(it, end)
    while cur is not end:
        nxt = next(it, end)
        yield cur, nxt is end
        cur = nxt


def train_loop_per_worker(config: dict, on_step: Callable[[TrainState, int], None] | None = None) -> None:
    """The Ray Train worker function; `config` is Config.to_dict(). `on_step(state, rank)` runs after every step
    (tests use it to record steps or to kill a worker)."""
    cfg = Config.from_dict(config)
    t, d, r = cfg.train, cfg.data, cfg.run
    rank, world = rank_world()
    state = build_state(cfg, rank)
    epoch_step = 0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as ckpt_dir:
            epoch_step = restore_checkpoint(state, ckpt_dir, rank)
        if rank == 0:
            print(f"[instagan] resumed from {resumed.path}: step {state.step}, epoch {state.epoch}, "
                  f"{epoch_step} batches of the epoch done", flush=True)
    log = RankZeroLog(cfg, run_folder(cfg)) if rank == 0 else None
    val = validation_batches(cfg) if rank == 0 and r.val_every else None
    classifier = load_classifier(r.classifier, state.device) if val is not None else None
    shard_a, shard_b = ray.train.get_dataset_shard("a"), ray.train.get_dataset_shard("b")
    total_epochs = t.epochs + t.epochs_decay
    window = Window()
    last_report = time.monotonic()
    last_ckpt_step = state.step if resumed is not None else -1
    first_step, trained = True, False

    def finished() -> bool:
        return state.epoch >= total_epochs or (r.max_steps > 0 and state.step >= r.max_steps)

    while not finished():
        batches = iter_pairs(shard_a, shard_b, t.batch_size, d.size, d.load_size, d.flip, t.seed, state.epoch,
                             t.ins_max)
        seen, stop = 0, False
        for ((batch_a, batch_b), data_s), last in _with_last(_timed(batches)):
            seen += 1
            if seen <= epoch_step:  # trained before the checkpoint this run resumed from
                continue
            next_step = state.step + 1
            due_log = next_step % r.log_every == 0
            want_ray = rank == 0 and due_log and time.monotonic() - last_report >= REPORT_MIN_S
            metrics, to_ray = step(state, batch_a, batch_b, flag=want_ray)
            window.add(metrics, data_s)
            epoch_step, trained = seen, True
            if first_step and rank == 0:
                print(f"[instagan] first step done at unix time {time.time():.3f} "
                      f"(world size {world}, {torch.get_num_threads()} torch threads per worker)", flush=True)
                first_step = False
            if on_step is not None:
                on_step(state, rank)
            if last:  # the epoch ends with this batch: its checkpoint should resume at the next epoch
                state.end_epoch()
                epoch_step = 0
            stop = r.max_steps > 0 and state.step >= r.max_steps
            due_val = r.val_every > 0 and (state.step % r.val_every == 0 or stop or state.epoch >= total_epochs)
            if log is not None:
                log.collect(batch_a, batch_b)
                if r.image_every and state.step % r.image_every == 0:
                    log.images(state)
            due_ckpt = last or stop or (r.checkpoint_every > 0 and state.step % r.checkpoint_every == 0)
            if due_log or due_ckpt or due_val:
                out = window.flush(state, world)
                if due_val:
                    out.update(from_rank0(validate(state, val, classifier) if rank == 0 else {}))
                if log is not None:
                    log.scalars(out, state.step)
                if due_ckpt:
                    report(out, state, rank, world, epoch_step)
                    last_ckpt_step = state.step
                elif to_ray or due_val:
                    report(out)
                if due_ckpt or to_ray or due_val:
                    last_report = time.monotonic()
            if stop:
                break
        if seen == 0:
            raise RuntimeError(f"epoch {state.epoch} gave rank {rank} no batches: is the data set empty?")
        if not stop and seen <= epoch_step:  # every batch was skipped (resumed with fewer batches per epoch)
            state.end_epoch()
            epoch_step = 0
    if log is not None:
        if r.image_every:
            path = log.images(state)
            if path is not None:
                print(f"[instagan] sample grid: {path}", flush=True)
        log.close()
    if last_ckpt_step != state.step:
        report(window.flush(state, world), state, rank, world, epoch_step)
    elif not trained:  # resumed at the end: nothing left to train, report where the run is
        report(window.flush(state, world))
