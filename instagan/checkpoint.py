"""Full-state checkpoints: a directory with `state.pt` (state_dicts only) and `config.json`.

    save(state, "ckpt/")                      # networks, optimizers, schedulers, pools, step, epoch
    state = restore("ckpt/")                  # a TrainState that takes the same next step
    cfg, payload = load("ckpt/")              # raw: torch.load(weights_only=True), no pickled code runs

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
FORMAT_VERSION = 1


def save(state, directory: str | os.PathLike) -> Path:
    """Write `state` (an instagan.train.TrainState) to `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **state.state_dict()}
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(state.cfg.to_json())
    return directory


def load(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Config, dict]:
    """Read a checkpoint directory: (config, payload), loaded with weights_only=True."""
    directory = Path(directory)
    for name in (STATE_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {name} (is it a checkpoint directory?)")
    cfg = Config.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    payload = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint {directory} has format version {version}, this code reads {FORMAT_VERSION}")
    return cfg, payload


def restore(directory: str | os.PathLike, device: str | torch.device = "cpu", nets=None, rank: int = 0):
    """A TrainState loaded from `directory`; `nets` as in TrainState.create (e.g. already DDP-wrapped)."""
    from instagan.train import TrainState

    cfg, payload = load(directory, device)
    state = TrainState.create(cfg, device, nets=nets, rank=rank)
    state.load_state_dict(payload)
    return state
