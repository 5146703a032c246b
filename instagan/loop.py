"""The training loop: epochs of batches, one `instagan.train.train_step` each, metrics, sample grids, validation
and checkpoints that resume exactly. One loop for both ways of running it:

    train_local(cfg, "/tmp/runs/my_run")          # one process, no Ray (jobs/train.py --local); -> last checkpoint
    train(cfg, RayHost(cfg))                      # every Ray Train worker (instagan.distributed)

What differs between the two is a `Host`: where batches come from (local Parquet files or this rank's Ray Data
shards), how networks are placed (plain or DDP-wrapped), where the checkpoint to resume from is and where a new
one goes (a folder of the run, or `ray.train.report`). Collectives (`agree`, `mean_over_ranks`, `from_rank0`) are
plain torch.distributed calls, no-ops in one process.

Per step, every rank agrees on the chunk count (all-reduce max, DESIGN.md section 4) and on rank 0's flag "report
now" (Ray's controller takes one report per worker every 2 s, `Host.report_min_s`; a rank's own clock never
decides a collective). Every `run.log_every` steps, metrics averaged over the steps since the last log and over
ranks (flat slash keys: loss/*, lr/G, lr/D, train/chunks, time/step_s, time/data_s, perf/samples_per_s, step,
epoch; rank 0 adds time/cpu_s and time/wall_s) go to `<run>/metrics.jsonl` and TensorBoard (`<run>/tensorboard`).
Every `run.image_every` steps and at the end, a sample grid (instagan.visual) goes to TensorBoard and
`<run>/samples/step_XXXXXX.png`. With run.val_every, rank 0 computes instagan.metrics.validation_metrics (val/*)
on a fixed batch of run.val_split and every rank reports them.

Checkpoints (instagan.checkpoint, with progress.json: batches done in the current epoch, CPU and wall seconds)
every `run.checkpoint_every` steps, at the end of every epoch where the host asks for it (Ray), and at the end.
Budget mode (`budget_cpu_s`, one process: the quality harness, instagan.ablate) trains for a number of process
CPU-seconds instead of steps, with the config's lr shape stretched over the budget, and checkpoints each time
another 1/checkpoints of it is spent. Grids, checkpoints and validation are not counted as training time.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from instagan import checkpoint, visual
from instagan import masks as M
from instagan.config import Config
from instagan.data import local_batches, validation_batches
from instagan.train import TrainState, chunk_count, train_step


# ---- collectives (no-ops in one process) -------------------------------------------------------------------

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(values: list[int], device: torch.device) -> list[int]:
    """Element-wise max over ranks of a few small integers (one all-reduce of an int64 tensor)."""
    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each metric over ranks (every rank must call it with the same keys)."""
    if not _distributed() or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def from_rank0(metrics: dict[str, float]) -> dict[str, float]:
    """Rank 0's dict on every rank (every rank must call it)."""
    if not _distributed():
        return metrics
    box = [metrics]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def step(state: TrainState, batch_a: dict, batch_b: dict, flag: bool = False) -> tuple[dict[str, float], bool]:
    """One data-parallel training step: agree on the chunk count (and on rank 0's `flag`), then train_step.
    Returns (this rank's metrics, the agreed flag). Every rank must call it for every step."""
    t = state.cfg.train
    n, flag = agree([chunk_count(batch_a, batch_b, t.ins_max, t.ins_per), int(flag)], state.device)
    return train_step(state, batch_a, batch_b, n_chunks=n), bool(flag)


# ---- the host: what differs between one process and a Ray Train worker -------------------------------------

class Host:
    """One process training alone from the local Parquet files of cfg.data, its run folder `folder`."""

    report_min_s = 0.0  # least seconds between two reports (Ray: its controller's poll interval)
    epoch_checkpoints = False  # also checkpoint at the end of every epoch

    def __init__(self, cfg: Config, folder: str | Path, device: str = "cpu", resume: bool = False):
        self.cfg, self.folder, self.device, self.resume = cfg, Path(folder), torch.device(device), resume
        self.rank, self.world = 0, 1

    def build_state(self) -> TrainState:
        return TrainState.create(self.cfg, self.device)

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[Path | None]:
        """The checkpoint to resume from: the run folder's latest, when asked to resume."""
        found = [p for p in self.folder.glob("checkpoint_step*") if (p / checkpoint.STATE_FILE).is_file()]
        yield max(found, key=lambda p: p.name) if self.resume and found else None

    def batches(self, epoch: int) -> Iterable[tuple[dict, dict]]:
        d, t = self.cfg.data, self.cfg.train
        return local_batches(d.root, d.split, t.batch_size, d.size, d.load_size, d.flip, t.seed, epoch,
                             ins_cap=t.ins_max)

    def checkpoint_name(self, state: TrainState) -> str:
        return f"checkpoint_step{state.step:08d}"

    def report(self, metrics: dict, write: Callable[[Path], None] | None = None, name: str = "") -> Path | None:
        """Hand over a report; with `write`, a checkpoint that `write(directory)` fills. -> its folder."""
        if write is None:
            return None  # metrics.jsonl and TensorBoard have it already
        out = self.folder / name
        write(out)
        return out


# ---- the loop ------------------------------------------------------------------------------------------------

def train_local(cfg: Config, folder: str | Path, device: str = "cpu", budget_cpu_s: float | None = None,
                checkpoints: int = 0, resume: bool = False) -> Path:
    """Train `cfg` in this process until run.max_steps (or all epochs); returns the last checkpoint folder.

    budget_cpu_s, checkpoints: budget mode (module docstring). resume: continue from the folder's latest
    checkpoint (its step, optimizer state, batches of the epoch and, in budget mode, CPU-seconds spent); its model,
    loss, train and data sections and the budget must be this run's (run.* may differ), or it raises ValueError."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(cfg.to_json() + "\n")
    return train(cfg, Host(cfg, folder, device, resume), budget_cpu_s, checkpoints)


def train(cfg: Config, host: Host, budget_cpu_s: float | None = None, checkpoints: int = 0,
          on_step: Callable[[TrainState, int], None] | None = None) -> Path | None:
    """Run the loop on `host` until done. on_step(state, rank) runs after every step (tests record steps or kill
    a worker with it). -> the last checkpoint folder (None where the host hands checkpoints to Ray)."""
    run = _Run(cfg, host, budget_cpu_s, checkpoints, on_step)
    while not run.finished():
        run.epoch()
    return run.close()


class _Run:
    """The loop's state between steps: the TrainState, where the epoch stands, the metrics window and the clock."""

    def __init__(self, cfg: Config, host: Host, budget_cpu_s: float | None, checkpoints: int,
                 on_step: Callable[[TrainState, int], None] | None):
        if budget_cpu_s and host.world > 1:
            raise ValueError("a CPU budget is for one process (each rank's clock would end the run at another step)")
        self.cfg, self.host, self.budget, self.on_step = cfg, host, budget_cpu_s, on_step
        self.clock = Clock()
        self.state = host.build_state()
        self.epoch_step, self.last_ckpt, self.last_ckpt_step = 0, None, -1
        with host.resume_from() as ckpt:
            if ckpt is not None:
                self._resume(ckpt)
        self.marks = [m for m in (budget_cpu_s * (i + 1) / checkpoints for i in range(checkpoints))
                      if m > self.clock.cpu()] if budget_cpu_s else []
        rank0, r = host.rank == 0, cfg.run
        self.log = RankZeroLog(cfg, host.folder, self.state.step) if rank0 else None
        self.val = (validation_batches(cfg.data.root, r.val_split, r.val_images, cfg.data.size, cfg.train.ins_max)
                    if rank0 and r.val_every else None)
        self.classifier = _classifier(r.classifier, self.state.device) if self.val is not None else None
        self.window = Window()
        self.progress = Progress(cfg, budget_cpu_s, self.clock, self.state.step)
        self.last_report = time.monotonic()
        self.first, self.trained, self.stop = True, False, False

    def _resume(self, ckpt: Path) -> None:
        st, rank = self.state, self.host.rank
        saved_cfg, payload = checkpoint.load(ckpt, st.device)
        prog = checkpoint.progress(ckpt)
        for what, saved, asked in (*((f"{k} config", getattr(saved_cfg, k), getattr(self.cfg, k))
                                     for k in ("model", "loss", "train", "data")),
                                   ("CPU budget", prog.get("budget_cpu_s", self.budget), self.budget)):
            if saved != asked:
                raise ValueError(f"checkpoint {ckpt} was trained with another {what} than this run asks for: "
                                 f"use another run folder (or name) to train it anew")
        fresh = {d: p.state_dict() for d, p in st.pools.items()}
        st.load_state_dict(payload)
        if rank > 0:  # its own pools; without a file of its own (more ranks than before) they start empty
            own = checkpoint.rank_pools(ckpt, rank, st.device)
            for d, p in st.pools.items():
                p.load_state_dict(own[f"pool_{d}"] if own else fresh[d], st.device)
        self.epoch_step = int(prog.get("epoch_step", 0))
        self.clock.shift(prog.get("cpu_s", 0.0), prog.get("wall_s", 0.0))
        self.last_ckpt, self.last_ckpt_step = Path(ckpt), st.step
        if rank == 0:
            say(f"[instagan] resumed from {ckpt}: step {st.step}, epoch {st.epoch}, {self.epoch_step} batches of "
                f"the epoch done")

    def finished(self) -> bool:
        st, t, r = self.state, self.cfg.train, self.cfg.run
        if self.budget:
            return self.clock.cpu() >= self.budget
        return self.stop or st.epoch >= t.epochs + t.epochs_decay or 0 < r.max_steps <= st.step

    def epoch(self) -> None:
        """One pass over the host's batches of this epoch (the batches done before a resume are skipped)."""
        seen = 0
        for ((batch_a, batch_b), data_s), last in _with_last(_timed(self.host.batches(self.state.epoch))):
            seen += 1
            if seen <= self.epoch_step:  # trained before the checkpoint this run resumed from
                continue
            self._step(batch_a, batch_b, data_s, seen, last)
            if self.stop:
                return
        if seen == 0:
            raise RuntimeError(f"epoch {self.state.epoch} gave rank {self.host.rank} no batches: is the data set "
                               f"empty?")
        if seen <= self.epoch_step:  # every batch was skipped (resumed with fewer batches per epoch)
            self._end_epoch()

    def _end_epoch(self) -> None:
        if self.budget:
            self.state.epoch += 1  # the lr follows the budget, not the epoch
        else:
            self.state.end_epoch()
        self.epoch_step = 0

    def _step(self, batch_a: dict, batch_b: dict, data_s: float, seen: int, last: bool) -> None:
        st, host, r = self.state, self.host, self.cfg.run
        due_log = (st.step + 1) % r.log_every == 0
        want_report = host.rank == 0 and due_log and time.monotonic() - self.last_report >= host.report_min_s
        if self.budget:
            _set_lr(st, _budget_factor(self.cfg, self.clock.cpu() / self.budget))
        metrics, to_report = step(st, batch_a, batch_b, flag=want_report)
        self.window.add(metrics, data_s)
        self.epoch_step, self.trained = seen, True
        if self.first and host.rank == 0:
            say(f"[instagan] first step done at unix time {time.time():.3f} (world size {host.world}, "
                f"{torch.get_num_threads()} torch threads per worker)")
        self.first = False
        if self.on_step is not None:
            self.on_step(st, host.rank)
        if last:  # the epoch ends with this batch: its checkpoint resumes at the next epoch
            self.progress.epoch_done(seen)
            self._end_epoch()
        self.stop = self.finished()
        with self.clock.paused():  # grids, checkpoints and validation are not training
            if self.log is not None:
                self.log.collect(batch_a, batch_b)
                if r.image_every and st.step % r.image_every == 0:
                    self.log.images(st)
            mark = bool(self.marks) and self.clock.cpu() >= self.marks[0]
            while self.marks and self.clock.cpu() >= self.marks[0]:
                self.marks.pop(0)
            every = not self.budget and r.checkpoint_every > 0 and st.step % r.checkpoint_every == 0
            due_ckpt = (last and host.epoch_checkpoints) or self.stop or every or mark
            due_val = r.val_every > 0 and (st.step % r.val_every == 0 or self.stop)
            if due_log or due_ckpt or due_val:
                self._report(due_ckpt, to_report, due_val)

    def _report(self, due_ckpt: bool, to_report: bool, due_val: bool) -> None:
        st, host = self.state, self.host
        out = self.window.flush(st, host.world)
        if due_val:
            out.update(from_rank0(self._validate() if host.rank == 0 else {}))
        if self.log is not None:
            self.log.scalars({**out, **{f"time/{k}": v for k, v in self.clock.read().items()}}, st.step)
            if "time/step_s" in out:  # steps were taken since the last line
                say(self.progress.line(out))
        if due_ckpt:
            self._checkpoint(out)
        elif to_report or due_val:
            host.report(out)
        if due_ckpt or to_report or due_val:
            self.last_report = time.monotonic()

    def _validate(self) -> dict[str, float]:
        """instagan.metrics.validation_metrics of the generators on the validation batches, plus time/val_s. It
        translates with the generators' underlying modules, so no DDP collective runs on rank 0 alone."""
        from instagan.metrics import validation_metrics

        t0, t, nets = time.perf_counter(), self.cfg.train, self.state.nets
        out = validation_metrics(nets["G_ab"], nets["G_ba"], *self.val, t.ins_max, t.ins_per, self.classifier)
        return {**out, "time/val_s": time.perf_counter() - t0}

    def _checkpoint(self, metrics: dict) -> None:
        st, host = self.state, self.host
        progress = {"step": st.step, "epoch": st.epoch, "epoch_step": self.epoch_step, "world_size": host.world,
                    "budget_cpu_s": self.budget, **self.clock.read()}
        self.last_ckpt = host.report(metrics, lambda d: checkpoint.save(st, d, progress, host.rank),
                                     host.checkpoint_name(st))
        self.last_ckpt_step = st.step

    def close(self) -> Path | None:
        """The end grid, and a checkpoint of the last step unless one was written at it."""
        if self.log is not None:
            path = self.log.images(self.state)
            if path is not None:
                say(f"[instagan] sample grid: {path}")
            self.log.close()
        if self.last_ckpt_step != self.state.step:
            self._checkpoint(self.window.flush(self.state, self.host.world))
        elif not self.trained:  # resumed at the end: nothing left to train, report where the run is
            self.host.report(self.window.flush(self.state, self.host.world))
        return self.last_ckpt


# ---- pieces of the loop ------------------------------------------------------------------------------------

def say(line: str) -> None:
    """One line on stdout, flushed. Not print(): on a Ray Train worker print is patched to go to Train's logger as
    well as to stdout, and the driver then shows every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Progress:
    """The line rank 0 prints every run.log_every steps: where the run stands against its end (steps, or CPU-seconds
    of a budget), the epoch, samples/s, the main losses, wall time elapsed in this process and an ETA from its pace.
    The total of an epoch-bound run is known once an epoch has ended (until then: run.max_steps, if set)."""

    LOSSES = (("G", "loss/G"), ("D_a", "loss/D_a"), ("D_b", "loss/D_b"))

    def __init__(self, cfg: Config, budget_cpu_s: float | None, clock: Clock, step: int):
        self.cfg, self.budget, self.clock = cfg, budget_cpu_s, clock
        self.step0, self.cpu0, self.wall0 = step, clock.cpu(), time.monotonic()
        self.per_epoch = 0

    def epoch_done(self, batches: int) -> None:
        self.per_epoch = self.per_epoch or batches

    def total(self) -> int | None:
        t, max_steps = self.cfg.train, self.cfg.run.max_steps
        by_epochs = (t.epochs + t.epochs_decay) * self.per_epoch if self.per_epoch else None
        return min(by_epochs or max_steps, max_steps) if max_steps > 0 else by_epochs

    def line(self, metrics: dict[str, float]) -> str:
        step, t = int(metrics["step"]), self.cfg.train
        elapsed = time.monotonic() - self.wall0
        if self.budget:
            cpu = self.clock.cpu()
            done, left = cpu - self.cpu0, self.budget - cpu
            where = f"step {step}, {cpu / self.budget:.0%} of {self.budget:.0f} CPU-s"
        else:
            total = self.total()
            done, left = step - self.step0, (total - step if total else None)
            where = f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"
        eta = _duration(elapsed * left / done) if done > 0 and left is not None else "?"
        epoch = int(metrics["epoch"]) + 1  # a budget stretches the lr schedule over CPU-seconds, not epochs
        parts = [where, f"epoch {epoch}" if self.budget else f"epoch {epoch}/{t.epochs + t.epochs_decay}"]
        if "perf/samples_per_s" in metrics:
            parts.append(f"{metrics['perf/samples_per_s']:.2f} samples/s")
        losses = " ".join(f"{name} {metrics[k]:.3f}" for name, k in self.LOSSES if k in metrics)
        return "[instagan] " + " | ".join([*parts, *([losses] if losses else []),
                                           f"{_duration(elapsed)} elapsed", f"ETA {eta}"])


def _duration(seconds: float) -> str:
    """7 -> '7s', 130 -> '2m10s', 7300 -> '2h01m'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class Clock:
    """Process CPU seconds and wall seconds since creation, minus the time spent inside `paused()`."""

    def __init__(self):
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def cpu(self) -> float:
        return time.process_time() - self.cpu0

    def read(self) -> dict[str, float]:
        return {"cpu_s": self.cpu(), "wall_s": time.perf_counter() - self.wall0}

    def shift(self, cpu_s: float, wall_s: float) -> None:
        """Count `cpu_s` and `wall_s` as already spent (a resumed run)."""
        self.cpu0 -= cpu_s
        self.wall0 -= wall_s

    @contextlib.contextmanager
    def paused(self):
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.shift(-(time.process_time() - cpu), -(time.perf_counter() - wall))


def _budget_factor(cfg: Config, frac: float) -> float:
    """lr factor at `frac` of a CPU budget: the config's constant-then-linear-decay shape over the budget."""
    t = cfg.train
    const = t.epochs / max(1, t.epochs + t.epochs_decay)
    return 1.0 if frac <= const else max(0.0, (1.0 - frac) / (1.0 - const))


def _set_lr(state: TrainState, factor: float) -> None:
    for opt, sched in ((state.opt_g, state.sched_g), (state.opt_d, state.sched_d)):
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * factor


def _classifier(path: str, device: torch.device):
    """The domain classifier of run.classifier (jobs/train_classifier.py) for val/cls_*; None for ""."""
    if not path:
        return None
    from instagan.metrics import load_classifier

    return load_classifier(path, device)[0]


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
    """metrics.jsonl, TensorBoard scalars and images, PNG sample grids of the run folder; rank 0 only.
    `step`: where the run starts (a resumed run drops the metrics.jsonl lines logged after its checkpoint)."""

    def __init__(self, cfg: Config, folder: Path, step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.folder = cfg, folder
        folder.mkdir(parents=True, exist_ok=True)
        jsonl = folder / "metrics.jsonl"
        if step and jsonl.is_file():  # those steps are trained again
            lines = jsonl.read_text().splitlines(keepends=True)
            jsonl.write_text("".join(ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step))
        self.jsonl = open(jsonl, "a")
        self.writer = SummaryWriter(str(folder / "tensorboard"))
        self.samples: dict[str, list[tuple[Tensor, Tensor]]] = {"a": [], "b": []}
        self.last_image_step = -1

    def collect(self, batch_a: dict, batch_b: dict) -> None:
        """Keep the first VIS_ROWS images of each domain this process sees: the grids show the same inputs."""
        for d, batch in (("a", batch_a), ("b", batch_b)):
            for i in range(len(batch["img"])):
                if len(self.samples[d]) < visual.VIS_ROWS:
                    self.samples[d].append((batch["img"][i], batch["masks"][i][batch["valid"][i].bool()]))

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def images(self, state: TrainState) -> Path | None:
        if not self.samples["a"] or state.step == self.last_image_step:
            return None
        cells = visual.training_cells(state.nets, {d: M.collate(s) for d, s in self.samples.items()},
                                      self.cfg.train.ins_max, self.cfg.train.ins_per)
        for d, rows in cells.items():
            self.writer.add_image(f"samples/{d}2{'b' if d == 'a' else 'a'}", visual.cells_image(rows), state.step)
        self.writer.flush()
        self.last_image_step = state.step
        scale = max(1, 128 // self.cfg.data.size)
        return visual.save_png(visual.labelled_training_grid(cells, scale),
                               self.folder / "samples" / f"step_{state.step:06d}.png")

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()
