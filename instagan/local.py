"""Single-process training without Ray: the same `train_step`, data (Parquet via `local_batches`), lr schedule and
checkpoint format as the Ray Train job, for a laptop, a quick ablation or a debugger.

    python jobs/train.py --local --config configs/ablations/cyclegan.yaml --data-root /tmp/synth
    folder = train_local(cfg, "/tmp/runs/my_run")      # -> the last checkpoint folder

The run folder gets config.json, checkpoint_stepXXXXXXXX/ (instagan.checkpoint: state.pt + config.json, loadable by
Translator.from_checkpoint and jobs/evaluate.py) every `run.checkpoint_every` steps and at the end,
metrics.jsonl (one line per `run.log_every` steps, with process CPU seconds so runs can be compared on a busy
machine) and samples/step_XXXXXX.png every `run.image_every` steps. One process, no DDP (use the Ray job for long
runs); `torch.set_num_threads` decides the cores it uses. `budget_cpu_s` trains for a fixed CPU budget
instead of a step count (the quality harness, instagan.ablate, compares models at equal CPU seconds).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from pathlib import Path

from instagan import checkpoint, visual
from instagan.config import Config
from instagan.data import local_batches
from instagan.train import TrainState, train_step

VIS_ROWS = 4


def train_local(cfg: Config, folder: str | Path, device: str = "cpu", budget_cpu_s: float | None = None,
                checkpoints: int = 0, resume: bool = False) -> Path:
    """Train `cfg` in this process until run.max_steps (or all epochs); returns the last checkpoint folder.

    budget_cpu_s: train for this many process CPU-seconds instead (steps and epochs are then unbounded), with the
    config's lr shape stretched over the budget: constant for the first epochs / (epochs + epochs_decay) of it,
    then linear decay to 0. checkpoints > 0 (budget mode): also save one each time another 1/checkpoints of the
    budget is spent, so quality can be followed against CPU time. Each checkpoint folder gets progress.json
    ({"step", "epoch", "epoch_step", "cpu_s", "wall_s"}).
    resume: continue from the folder's latest checkpoint (its step, optimizer state, batches of the epoch and, in
    budget mode, CPU-seconds spent) instead of starting over; its model, loss, train and data sections and the
    budget must be the checkpoint's (run.* may differ, e.g. a larger max_steps), or it raises ValueError.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(cfg.to_json() + "\n")
    t, d, r = cfg.train, cfg.data, cfg.run
    clock = _Clock()
    last = _latest(folder) if resume else None
    state, epoch_step = _resume(cfg, last, clock, device, budget_cpu_s) if last else (TrainState.create(cfg, device), 0)
    total = None if budget_cpu_s else r.max_steps or None
    epochs = itertools.count(state.epoch) if budget_cpu_s else range(state.epoch, t.epochs + t.epochs_decay)
    marks = [budget_cpu_s * (i + 1) / checkpoints for i in range(checkpoints)] if budget_cpu_s else []
    marks = [m for m in marks if m > clock.cpu()]
    vis: dict[str, dict] = {}
    done = bool(total and state.step >= total) or bool(budget_cpu_s and clock.cpu() >= budget_cpu_s)
    seen = 0

    def save() -> Path:
        out = checkpoint.save(state, folder / f"checkpoint_step{state.step:08d}")
        progress = {"step": state.step, "epoch": state.epoch, "epoch_step": seen, "budget_cpu_s": budget_cpu_s}
        (out / "progress.json").write_text(json.dumps({**progress, **clock.read()}))
        return out

    with open(folder / "metrics.jsonl", "a") as log:
        for epoch in epochs:
            if done:
                break
            seen = 0
            for batch_a, batch_b in local_batches(d.root, d.split, t.batch_size, d.size, d.load_size, d.flip,
                                                  t.seed, epoch, ins_cap=t.ins_max):
                vis = vis or {"a": _head(batch_a), "b": _head(batch_b)}
                seen += 1
                if seen <= epoch_step:  # trained before the checkpoint this run resumed from
                    continue
                if budget_cpu_s:
                    _set_lr(state, _budget_factor(cfg, clock.cpu() / budget_cpu_s))
                metrics = train_step(state, batch_a, batch_b)
                if state.step % r.log_every == 0:
                    log.write(json.dumps({"step": state.step, "epoch": epoch, **state.lr(), **metrics,
                                          **{f"time/{k}": v for k, v in clock.read().items()}}) + "\n")
                    log.flush()
                with clock.paused():  # grids and checkpoints are not training
                    if r.image_every and state.step % r.image_every == 0:
                        _grid(state, vis, folder)
                    if r.checkpoint_every and state.step % r.checkpoint_every == 0 and not budget_cpu_s:
                        last = save()
                    while marks and clock.cpu() >= marks[0]:
                        marks.pop(0)
                        last = save()
                done = bool(total and state.step >= total) or bool(budget_cpu_s and clock.cpu() >= budget_cpu_s)
                if done:
                    break
            epoch_step = 0
            if done:
                break
            if budget_cpu_s:
                state.epoch += 1  # the lr follows the budget, not the epoch
            else:
                state.end_epoch()
    if last is None or last.name != f"checkpoint_step{state.step:08d}":
        last = save()
    _grid(state, vis, folder)
    return last


def _latest(folder: Path) -> Path | None:
    """The run folder's checkpoint with the highest step (None if it has none)."""
    found = [p for p in folder.glob("checkpoint_step*") if (p / checkpoint.STATE_FILE).is_file()]
    return max(found, key=lambda p: p.name) if found else None


def _resume(cfg: Config, ckpt: Path, clock: "_Clock", device: str,
            budget_cpu_s: float | None) -> tuple[TrainState, int]:
    """The state saved in `ckpt`, the clock set to the time it had spent. -> (state, batches of its epoch done)."""
    saved_cfg, payload = checkpoint.load(ckpt, device)
    prog = json.loads((ckpt / "progress.json").read_text()) if (ckpt / "progress.json").is_file() else {}
    for what, saved, asked in (*((f"{k} config", getattr(saved_cfg, k), getattr(cfg, k))
                                 for k in ("model", "loss", "train", "data")),
                               ("CPU budget", prog.get("budget_cpu_s", budget_cpu_s), budget_cpu_s)):
        if saved != asked:
            raise ValueError(f"checkpoint {ckpt} was trained with another {what} than this run asks for: "
                             f"use another run folder (or delete this one) to train it anew")
    state = TrainState.create(cfg, device)
    state.load_state_dict(payload)
    log = ckpt.parent / "metrics.jsonl"
    if log.is_file():  # drop what was logged after the checkpoint: those steps are trained again
        lines = log.read_text().splitlines(keepends=True)
        log.write_text("".join(ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= state.step))
    clock.cpu0 -= prog.get("cpu_s", 0.0)
    clock.wall0 -= prog.get("wall_s", 0.0)
    if "epoch_step" in prog:
        return state, int(prog["epoch_step"])
    # Checkpoints written before progress.json had epoch_step: every epoch has the same number of batches.
    d, t = cfg.data, cfg.train
    per_epoch = sum(1 for _ in local_batches(d.root, d.split, t.batch_size, d.size, d.load_size, d.flip, t.seed,
                                             0, ins_cap=t.ins_max))
    return state, state.step - state.epoch * per_epoch


class _Clock:
    """Process CPU seconds and wall seconds since creation, minus the time spent inside `paused()`."""

    def __init__(self):
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def cpu(self) -> float:
        return time.process_time() - self.cpu0

    def read(self) -> dict[str, float]:
        return {"cpu_s": self.cpu(), "wall_s": time.perf_counter() - self.wall0}

    @contextlib.contextmanager
    def paused(self):
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu0 += time.process_time() - cpu
            self.wall0 += time.perf_counter() - wall


def _budget_factor(cfg: Config, frac: float) -> float:
    """lr factor at `frac` of a CPU budget: the config's constant-then-linear-decay shape over the budget."""
    t = cfg.train
    const = t.epochs / max(1, t.epochs + t.epochs_decay)
    return 1.0 if frac <= const else max(0.0, (1.0 - frac) / (1.0 - const))


def _set_lr(state: TrainState, factor: float) -> None:
    for opt, sched in ((state.opt_g, state.sched_g), (state.opt_d, state.sched_d)):
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * factor


def _head(batch: dict) -> dict:
    return {k: batch[k][:VIS_ROWS] for k in ("img", "masks", "valid")}


def _grid(state: TrainState, vis: dict, folder: Path) -> None:
    if not vis:
        return
    t, nets = state.cfg.train, state.nets
    grids = [visual.translation_grid(G, F, vis[x], t.ins_max, t.ins_per, VIS_ROWS)
             for x, (G, F) in (("a", (nets["G_ab"], nets["G_ba"])), ("b", (nets["G_ba"], nets["G_ab"])))]
    visual.save_png(visual.stack_grids(grids), folder / "samples" / f"step_{state.step:06d}.png",
                    scale=max(1, 128 // state.cfg.data.size))
