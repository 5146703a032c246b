"""Full-state checkpoints: a directory with `state.pt` (state_dicts only), `config.json` and `progress.json`.

    save(state, "ckpt/", progress)            # networks, optimizers, schedulers, pools, step, epoch
    cfg, payload = load("ckpt/")              # raw: torch.load(weights_only=True), no pickled code runs
    state = TrainState.from_checkpoint("ckpt/")   # (instagan.train) a state that takes the same next step
    cfg = validate("ckpt/")                   # before Ray starts: readable, and the weights fit config.json

A data-parallel run writes one checkpoint from every rank into the same directory: rank 0 the files above (its
own history pools are in state.pt), every other rank r only `pools_rank<r>.pt`, its own pools, so a resumed run
takes the same next step as an uninterrupted one (instagan.loop).

Writes go to a temporary file first and are renamed into place, so a crash never leaves a torn `state.pt`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from instagan.config import Config

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
# {"step", "epoch", "epoch_step": batches of the current epoch done, "world_size", "budget_cpu_s", "cpu_s", "wall_s"}
PROGRESS_FILE = "progress.json"
POOLS_FILE = "pools_rank{rank}.pt"  # history pools of rank r > 0
FORMAT_VERSION = 1


def save(state, directory: str | os.PathLike, progress: dict | None = None, rank: int = 0) -> Path:
    """Write rank `rank`'s part of `state` (an instagan.train.TrainState) to `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank > 0:
        torch.save({f"pool_{d}": p.state_dict() for d, p in state.pools.items()},
                   directory / POOLS_FILE.format(rank=rank))
        return directory
    payload = {"format_version": FORMAT_VERSION, **state.state_dict()}
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(state.cfg.to_json())
    if progress is not None:
        (directory / PROGRESS_FILE).write_text(json.dumps(progress))
    return directory


def progress(directory: str | os.PathLike) -> dict:
    """The checkpoint's progress.json ({} when it has none; `loop.json` of older Ray Train checkpoints)."""
    for name in (PROGRESS_FILE, "loop.json"):
        path = Path(directory) / name
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def rank_pools(directory: str | os.PathLike, rank: int, device: str | torch.device = "cpu") -> dict | None:
    """Rank r's own history pools ({"pool_a", "pool_b"}) from `directory`; None when it has none (rank 0, whose
    pools are in state.pt, or a run resumed with more ranks than it had)."""
    path = Path(directory) / POOLS_FILE.format(rank=rank)
    return torch.load(path, map_location=device, weights_only=True) if rank > 0 and path.exists() else None


def load(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Config, dict]:
    """Read a checkpoint directory: (config, payload), loaded with weights_only=True. A missing file raises
    FileNotFoundError; an unreadable one (torn, tampered, not a checkpoint) ValueError naming the file and why."""
    directory = Path(directory)
    for name in (STATE_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {name} (is it a checkpoint directory?)")
    try:
        cfg = Config.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"checkpoint {directory / CONFIG_FILE}: {err}") from None
    try:
        payload = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as err:  # torn zip, tampered pickle (weights_only refuses it), not a torch file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"checkpoint {directory / STATE_FILE} cannot be read with weights_only=True "
                         f"({type(err).__name__}: {first[:300]})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {directory / STATE_FILE} holds a {type(payload).__name__}, not a state dict")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint {directory} has format version {version}, this code reads {FORMAT_VERSION}")
    return cfg, payload


def validate(directory: str | os.PathLike, nets: tuple[str, ...] = ("G_ab", "G_ba")) -> Config:
    """Check, without Ray, that a checkpoint can serve: both files readable (weights_only), config.json valid and
    the weights of `nets` the shapes its model section builds. -> its Config. Raises FileNotFoundError or
    ValueError whose message names the file, the network and the first mismatching weights."""
    from instagan.networks import build_generator

    directory = Path(directory)
    cfg, payload = load(directory)
    for name in nets:
        if name not in payload:
            raise ValueError(f"checkpoint {directory / STATE_FILE} has no weights for {name}")
        try:
            build_generator(cfg.model).load_state_dict(payload[name])
        except (RuntimeError, TypeError, AttributeError) as err:
            details = [ln.strip() for ln in str(err).splitlines()[1:4] if ln.strip()]
            m = cfg.model
            raise ValueError(f"checkpoint {directory}: the {name} weights in {STATE_FILE} do not fit the model of "
                             f"{CONFIG_FILE} (arch {m.arch}, ngf {m.ngf}, n_blocks {m.n_blocks}, composite "
                             f"{m.composite}, mask_cond {m.mask_cond}, paint {m.paint}, upsample {m.upsample}): "
                             + " ".join(details or [str(err)[:300]])) from None
    return cfg

