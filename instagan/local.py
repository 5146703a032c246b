"""Single-process training without Ray: the same `train_step`, data (Parquet via `local_batches`), lr schedule and
checkpoint format as the Ray Train job, for a laptop, a quick ablation or a debugger.

    python jobs/train.py --local --config configs/ablations/cyclegan.yaml --data-root /tmp/synth
    folder = train_local(cfg, "/tmp/runs/my_run")      # -> the last checkpoint folder

The run folder gets config.json, checkpoint_stepXXXXXXXX/ (instagan.checkpoint: state.pt + config.json, loadable by
Translator.from_checkpoint and jobs/evaluate.py) every `run.checkpoint_every` steps and at the end,
metrics.jsonl (one line per `run.log_every` steps, with process CPU seconds so runs can be compared on a busy
machine) and samples/step_XXXXXX.png every `run.image_every` steps. One process: no DDP, no resume (use the Ray job
for long runs); `torch.set_num_threads` decides the cores it uses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from instagan import checkpoint, visual
from instagan.config import Config
from instagan.data import local_batches
from instagan.train import TrainState, train_step

VIS_ROWS = 4


def train_local(cfg: Config, folder: str | Path, device: str = "cpu") -> Path:
    """Train `cfg` in this process until run.max_steps (or all epochs); returns the last checkpoint folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(cfg.to_json() + "\n")
    state = TrainState.create(cfg, device)
    t, d, r = cfg.train, cfg.data, cfg.run
    total = r.max_steps or None
    last: Path | None = None
    cpu0, wall0 = time.process_time(), time.perf_counter()
    vis: dict[str, dict] = {}
    with open(folder / "metrics.jsonl", "a") as log:
        for epoch in range(t.epochs + t.epochs_decay):
            for batch_a, batch_b in local_batches(d.root, d.split, t.batch_size, d.size, d.load_size, d.flip,
                                                  t.seed, epoch, ins_cap=t.ins_max):
                vis = vis or {"a": _head(batch_a), "b": _head(batch_b)}
                metrics = train_step(state, batch_a, batch_b)
                if state.step % r.log_every == 0:
                    log.write(json.dumps({"step": state.step, "epoch": epoch, **state.lr(), **metrics,
                                          "time/cpu_s": time.process_time() - cpu0,
                                          "time/wall_s": time.perf_counter() - wall0}) + "\n")
                    log.flush()
                if r.image_every and state.step % r.image_every == 0:
                    _grid(state, vis, folder)
                if r.checkpoint_every and state.step % r.checkpoint_every == 0:
                    last = checkpoint.save(state, folder / f"checkpoint_step{state.step:08d}")
                if total and state.step >= total:
                    break
            if total and state.step >= total:
                break
            state.end_epoch()
    if last is None or last.name != f"checkpoint_step{state.step:08d}":
        last = checkpoint.save(state, folder / f"checkpoint_step{state.step:08d}")
    _grid(state, vis, folder)
    return last


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
